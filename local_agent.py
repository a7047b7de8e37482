#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
# Copyright (c) 2026 the local_agent authors. Keep this notice when you vendor this file.
"""A Prefect-style Local Agent in one stdlib-only file.

The agent polls an orchestration API for flow runs that are due and whose labels it
carries, claims each run, runs the locally stored flow in a subprocess and reports state
and logs back. It speaks the Prefect Server / Cloud 1.x GraphQL API, serves a Prefect 2/3
work pool over REST as Prefect's ``process`` worker does, and, with no API configured, keeps
an embedded SQLite database, so the whole loop works on one machine.

Usage::

    python local_agent.py start [-t TOKEN] [-a API] [-l LABEL]... [options]
    PREFECT_API_URL=http://HOST:4200/api python local_agent.py start --pool POOL [--work-queue Q]...
    python local_agent.py run FLOW [--param KEY=JSON]... [--at WHEN] [--watch]
    python local_agent.py runs | inspect RUN | logs RUN [--follow] | flows | why [RUN] | cancel RUN
    python local_agent.py schedule FLOW (--cron EXPR | --every DURATION | --off | --on) [--timezone TZ]
    python local_agent.py delete flow NAME | delete run RUN
    python local_agent.py ui [--address URL] | status | install systemd|supervisor [start options]
    python local_agent.py --help

Settings resolve in one order: command-line flag, then ``PREFECT__*`` environment
variable, then the TOML config file (``PREFECT__USER_CONFIG_PATH``, default
``~/.prefect/config.toml``), then Prefect 2/3's variables (``PREFECT_API_URL``,
``PREFECT_API_KEY``, ``PREFECT_API_AUTH_STRING``), then the default. The token comes from ``-t/--token``, then
``PREFECT__CLOUD__AGENT__AUTH_TOKEN``, ``PREFECT__CLOUD__AUTH_TOKEN``,
``PREFECT__CLOUD__API_KEY``, then the config keys ``cloud.agent.auth_token``,
``cloud.auth_token``, ``cloud.api_key``. The API is ``-a/--api``, ``PREFECT__CLOUD__API``,
``cloud.api``, then Prefect 2/3's ``PREFECT_API_URL`` (a path ending in ``/api``: the REST
backend); with a token and no API it is Prefect Cloud 1.x, with neither it is the embedded
database ``<home_dir>/local_agent.db`` (``sqlite:///PATH`` selects another file).

Each run is a process ``python local_agent.py execute flow-run`` in its own session, with
``PREFECT__CLOUD__API``, ``PREFECT__CONTEXT__FLOW_RUN_ID``, ``PREFECT__CONTEXT__FLOW_ID``, the
token (``PREFECT__CLOUD__AUTH_TOKEN``, only in its environment) and ``PYTHONPATH`` (the agent's
working directory and ``--import-path``); inside, ``local_agent.context`` holds ``logger``,
``flow_run_id``, ``flow_id``, ``flow_name`` and ``parameters``. The agent keeps a ledger, a
spool of undelivered writes and the runs' output under ``<home_dir>/agents/``, so a restart or
an API outage loses no run and no log line.

Exit codes: 0 success, 1 runtime error (a clear one-line message on stderr), 2 usage
error, 130 interrupted. ``start --once`` exits 1 when any run it took did not succeed.

Library use::

    import local_agent

    @local_agent.Flow("hello")
    def hello(name: str = "world") -> None:
        local_agent.context["logger"].info("Hello, %s!", name)

    if __name__ == "__main__":
        hello.deploy("My Project")
        local_agent.create_flow_run("hello", {"name": "you"})
        hello.run_agent(once=True)

A map of this file. Each section uses only the sections above it; read it top to bottom.

 1. Imports       the stdlib; modules kept out of the flow-run process are imported where used.
 2. Constants     every default, timing and limit (``POLL_BACKOFF``, ``WATCH_SECONDS``, ...).
 3. Errors        ``AgentError`` and its subclasses; ``main()`` maps them to exit codes.
 4. Settings      ``_OPTIONS``, the one table of settings (flag, config key, env variable,
                  default, help); ``resolve_settings`` and its precedence (``_resolve_option``);
                  refusing a token over plain http (``_check_token_safety``).
 5. States        time stamps, Prefect's state JSON (``make_state``), which states are final.
 5a. Schedules    Prefect 1.4.1's ``CronClock``, ``IntervalClock`` and ``Schedule.next``, to the
                  time (croniter's search and DST fix-up; pytz's and pendulum's views of a zone).
 6. Flow storage  ``slugify``, ``store_flow`` / ``load_flow`` (pickles confined to a directory;
                  ``__main__`` objects stored by reference to their script), Local storage JSON
                  and its check on this host (``_locate_flow_file``).
 7. Backends      ``FlowRun``, ``Launch`` and the ``Backend`` interface; the label rule
                  (``_label_mismatch``); ``GraphQLBackend`` (Prefect Server / Cloud 1.x; claims
                  are fenced in ``GraphQLBackend.claim_flow_runs``); ``SQLiteBackend`` (the
                  embedded default; version-checked claims in ``set_flow_run_state``);
                  ``RESTBackend`` (7c: a Prefect 2/3 work pool; states translated both ways in
                  ``_REST_STATES``, the job template in ``_render_job``, claims by PENDING with a
                  token); ``open_backend``; the ``_Outbox`` that delivers states and log lines in
                  order and spools them.
 8. Flow-run process  ``execute flow-run``: ``_FlowRunProcess`` loads the run's flow, runs it,
                  reports its final state (or leaves it in the result file for the agent); a
                  Prefect 1.x flow runs on Prefect's engine (``_run_on_prefects_engine``), and
                  this file's flows mark the task runs a Server made (``_start_task_runs``);
                  the warm template of ``--preload`` (``_serve_template``), which forks runs.
 9. The agent     ``_flow_run_environment`` (what a flow-run process gets), ``_Job`` (one
                  process: start or fork, output, signals; ``_Template`` is the template's
                  agent side; ``_StopChannel`` tells a Prefect 2/3 engine why it is stopped),
                  ``_decide_outcome`` (how a finished run is
                  settled, a pure function), ``RunBook`` (every run the agent owns, its phase,
                  its slots, the ledger), ``_APIHealth``, and ``LocalAgent``: ``step()`` is the
                  whole loop; what it will not claim in ``_why_not_here``, claims in ``_claim``,
                  launches in ``_start_run``, output and exits in ``_tend_jobs``, cancellation
                  in ``_watch_owned_runs``, shutdown in ``_drain``.
10. HTTP endpoint ``--agent-address``: health (503 when polls are stale), poke, status,
                  ``/metrics`` (``_Metrics`` lives with the outbox) and the dashboard
                  (``_Dashboard``: the page and its JSON routes, also served by ``ui``).
11. Python API    ``Flow``, ``deploy``, ``run_agent``, ``create_flow_run`` and the listings.
12. Command line  ``main``, the parser built from ``_OPTIONS``, one ``_cmd_*`` per command,
                  ``why``'s explanations (``_explain_run``), service files (``_systemd_unit``).
"""

from __future__ import annotations

__version__ = "0.2.0"
__all__ = [
    "APIError",
    "AgentError",
    "AuthError",
    "Backend",
    "ClockEvent",
    "ConfigError",
    "CronClock",
    "CronFields",
    "Flow",
    "FlowRun",
    "FlowStorageError",
    "FlowSummary",
    "GraphQLBackend",
    "IntervalClock",
    "Launch",
    "LocalAgent",
    "LogLine",
    "RESTBackend",
    "RunBook",
    "SQLiteBackend",
    "Schedule",
    "Settings",
    "StateUpdateFailed",
    "UntrustedFlowError",
    "cancel_flow_run",
    "context",
    "create_flow_run",
    "deploy",
    "get_run_logs",
    "is_final",
    "labels_match",
    "list_flow_runs",
    "list_flows",
    "load_flow",
    "local_storage",
    "main",
    "make_state",
    "open_backend",
    "parse_cron",
    "resolve_settings",
    "run_agent",
    "serialize_flow",
    "slugify",
    "store_flow",
]

# --- 1. Imports --------------------------------------------------------------------------
#
# Importing this file must stay cheap: every flow-run process imports it, and so does every
# flow that uses ``local_agent.context``. Modules that cost milliseconds and serve one path
# only are imported where they are used, and named here for the type checker: sqlite3 (the
# embedded backend), http.client (the GraphQL backend; it loads the email package), pickle
# (storing and loading flows), subprocess, http.server and ctypes (the agent), argparse (the
# command line), uuid, hashlib, base64, gzip and inspect (registration and new records), gc
# and select (the warm template).

import ast
import collections
import contextlib
import functools
import importlib
import importlib.util
import io
import json
import logging
import math
import os
import random
import re
import signal
import sys
import threading
import time
import types
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar, NamedTuple, TextIO, TypeVar
from urllib.parse import urlsplit

try:
    import fcntl
except ImportError:  # not POSIX: agents are not locked, as with Prefect's agent
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import argparse
    import http.client
    import pickle
    import sqlite3
    import subprocess
    from http.server import ThreadingHTTPServer
    from typing import NoReturn

_T = TypeVar("_T")


# --- 2. Constants ------------------------------------------------------------------------

#: The Prefect core version whose wire formats (state and storage JSON) we produce.
CORE_VERSION = "1.4.1"
PREFECT_CLOUD_API = "https://api.prefect.io"
DEFAULT_AGENT_NAME = "agent"
LOCAL_STORAGE_LABEL = "local"
SCHEDULED_STATES = frozenset({"Scheduled", "Paused", "Resume", "Retrying", "Queued"})
FINAL_STATES = frozenset(
    {
        "Success", "Cached", "Mapped", "Skipped", "Failed", "TimedOut", "TriggerFailed",
        "ValidationFailed", "Cancelled", "Looped", "Finished",
        "Crashed",  # Prefect 2/3's: the process ended without reporting a final state
    }
)
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# The agent's timings.
#: Prefect's poll backoff table: seconds to wait after 0, 1, 2, ... empty polls in a row.
POLL_BACKOFF = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0)
#: Runs due within this window are fetched early and launched exactly when due.
PREFETCH_SECONDS = 10.0
HEARTBEAT_SECONDS = 30.0
#: Seconds between SIGTERM and SIGKILL when a flow-run process must stop.
KILL_GRACE_SECONDS = 10.0
#: Seconds between checks of the runs this agent owns (cancellation).
WATCH_SECONDS = 5.0
#: Seconds between reads of running processes' output.
OUTPUT_POLL_SECONDS = 0.1
#: How long ``--once`` waits out an API that does not answer before it exits 1.
ONCE_API_PATIENCE_SECONDS = 60.0
#: How long a flow-run process waits out an API outage before giving up on it.
FLOW_RUN_API_PATIENCE_SECONDS = 60.0
#: The agent's HTTP endpoint: seconds a client has to send its request; clients served at once.
ENDPOINT_TIMEOUT_SECONDS = 10.0
ENDPOINT_MAX_CONNECTIONS = 16
#: ``/api/health`` answers 503 when the agent has not polled the API successfully for this long
#: (or for six of its longest poll intervals, when that is longer).
HEALTH_STALE_SECONDS = 60.0
#: ``run --watch`` says a run is still unclaimed, and why, this often.
WATCH_NOTE_SECONDS = 10.0
#: Commands find a run by a start of its id or by its name among this many newest runs.
RUN_LOOKUP_LIMIT = 1000
#: ``logs --follow`` stops once the run is final and no line has come for this long.
FOLLOW_LULL_SECONDS = 2.0
#: The embedded scheduler keeps each active schedule's next runs created, as Server's does
#: (``max_scheduled_runs_per_flow``); an agent tops them up at least this often, and sooner
#: when half of a schedule's runs are used.
SCHEDULED_RUNS_AHEAD = 10
SCHEDULER_SECONDS = 60.0

# The warm template of ``--preload`` (see _serve_template).
#: Seconds the agent waits for a template to import its modules, and for its answer to a fork.
TEMPLATE_START_SECONDS = 120.0
TEMPLATE_FORK_SECONDS = 10.0
#: How often an idle template looks for children that ended.
TEMPLATE_REAP_SECONDS = 0.02
#: After a template fails or goes stale, runs start afresh for up to this long before the next one is ready.
TEMPLATE_RETRY_SECONDS = 30.0
#: Variables an interpreter reads only as it starts: a run that sets them otherwise than the
#: template was started with gets a fresh interpreter.
_STARTUP_VARIABLE_PREFIXES = ("PYTHON", "LD_", "MALLOC_")

# The APIs.
REQUEST_TIMEOUT_SECONDS = 15.0
#: Most bytes an API answer may have before it is refused as malformed.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
#: Servers drop idle keep-alive connections (Node's default: after 5 s); reconnect first.
KEEPALIVE_IDLE_SECONDS = 4.0
#: Seconds between a claim on Prefect Server and its read-back: longer than a write takes
#: to commit, so a claim that sorts before ours but was not yet visible cannot be missed.
CLAIM_SETTLE_SECONDS = 0.2
#: The agent claims no run while its directory's disk has less free space than this.
MIN_FREE_DISK_BYTES = 1024 * 1024
#: A run the agent cannot start is left to others, and looked at again after this many seconds.
REFUSED_RECHECK_SECONDS = 60.0
#: How often an idle agent looks for new work in the embedded database, in seconds.
DB_CHANGE_CHECK_SECONDS = 0.1

# Run logs and the outbox of API writes.
#: Lines of a child's output kept for the failure message when it dies.
OUTPUT_TAIL_LINES = 20
#: Longer output lines are split; a run's log keeps at most this much of its output.
MAX_LINE_BYTES = 16 * 1024
MAX_RUN_LOG_BYTES = 10_000_000
#: Log lines sent in one request at most; undelivered writes a spool keeps at most.
OUTBOX_BATCH = 500
MAX_SPOOL_BYTES = 64 * 1024 * 1024
#: A run's lines come in bursts: wait this long to send them in one request, not one each.
OUTBOX_GATHER_SECONDS = 0.05

_AGENT_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
#: The name of the stderr handler the command line attaches (``--log-format json`` reformats it).
_COMMAND_LINE_HANDLER = "local_agent"
_CHILD_FORMAT = "[%(asctime)s] %(levelname)s - %(name)s | %(message)s"
#: The slug of the one task a flow of this file is registered with: its body (see serialize_flow).
_BODY_TASK_SLUG = "flow-body"
#: Starts a log record the flow-run process writes for its agent to collect (ASCII RS).
_RECORD_MARK = "\x1e"
#: Exit codes of ``execute flow-run``: a final state was reported (or handed to the agent
#: through the result file), or the flow could not even be loaded (Failed was reported).
_EXIT_REPORTED, _EXIT_NOT_RUN, _EXIT_UNREPORTED = 0, 1, 3
BANNER = r"""
 _                    _     _                    _
| |    ___   ___ __ _| |   / \   __ _  ___ _ __ | |_
| |   / _ \ / __/ _` | |  / _ \ / _` |/ _ \ '_ \| __|
| |__| (_) | (_| (_| | | / ___ \ (_| |  __/ | | | |_
|_____\___/ \___\__,_|_|/_/   \_\__, |\___|_| |_|\__|
                                |___/
"""


# --- 3. Errors ---------------------------------------------------------------------------


class AgentError(Exception):
    """The root of every error this module raises on purpose; its text says what to do."""

    exit_code = 1


class ConfigError(AgentError):
    """A setting, flag, config file or environment variable is missing or wrong."""


class APIError(AgentError):
    """The API could not be reached or gave an answer we cannot use."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class AuthError(APIError):
    """The API refused the token or key."""


class StateUpdateFailed(APIError):  # noqa: N818 (named after the API's own "State update failed")
    """The API refused a state write because another writer got there first."""


class FlowStorageError(AgentError):
    """A flow cannot be stored, found or loaded."""


class UntrustedFlowError(FlowStorageError):
    """A run's flow file lies outside every directory this agent's operator named."""


def _one_line(text: str, limit: int = 500) -> str:
    """Squash ``text`` onto one line of at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _describe_exception(exc: BaseException) -> str:
    """Return ``Type: message`` on one line."""
    message = str(exc)
    return _one_line(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


# --- 4. Settings -------------------------------------------------------------------------
#
# Every setting has one name in each place: a flag, a config key such as ``cloud.agent.name``
# and the environment variable derived from it (``PREFECT__CLOUD__AGENT__NAME``). One table,
# _OPTIONS, declares each setting once: it drives Settings' defaults, the ``start`` flags and
# their help, and the README's settings table is checked against it. One function resolves
# them: flag, then environment, then config file, then default.


def _hostname() -> str:
    """Return this machine's host name (the label Local storage adds)."""
    return os.uname().nodename  # what socket.gethostname() answers on POSIX, without loading socket


def _unique(items: Iterable[str]) -> list[str]:
    """Return ``items`` without duplicates, in first-seen order."""
    return list(dict.fromkeys(items))


def _as_str(value: object, where: str) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ConfigError(f"{where} must be a string, got {type(value).__name__}")
    return str(value).strip()


def _as_name(value: object, where: str) -> str:
    """An agent name: not empty (it names the agent's directory and its logger)."""
    name = _as_str(value, where)
    if not name:
        raise ConfigError(f"{where} must not be empty")
    return name


def _as_bool(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{where} must be true or false, got {value!r}")


def _as_number(value: object, where: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not number >= 0 or number == float("inf"):
        raise ConfigError(f"{where} must be a number of seconds >= 0, got {value!r}")
    return number


def _as_timeout(value: object, where: str) -> float:
    """``--timeout``: seconds > 0 (leave it out for no timeout: 0 would read as "none" by accident)."""
    seconds = _as_number(value, where)
    if seconds == 0:
        raise ConfigError(f"{where} must be more than 0 seconds; leave it out for no timeout")
    return seconds


def _as_positive(value: object, where: str) -> int:
    if isinstance(value, bool) or not re.fullmatch(r"\s*\d+\s*", str(value)) or int(str(value)) < 1:
        raise ConfigError(f"{where} must be a whole number >= 1, got {value!r}")
    return int(str(value))


def _header_problem(value: str) -> str:
    """What keeps ``value`` out of an HTTP header ("" when nothing): a line break, or a character
    HTTP headers cannot carry. Says nothing of the value itself, which may be a secret."""
    if "\r" in value or "\n" in value:
        return "contains a line break"
    if any(ord(char) < 32 or ord(char) == 127 or ord(char) > 255 for char in value):
        return "contains a character an HTTP header cannot carry"
    return ""


def _as_token(value: object, where: str) -> str:
    """A token or key: one line of Latin-1 text, since it is sent in the Authorization header."""
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {type(value).__name__}")
    token = value.strip()
    problem = _header_problem(token)
    if problem:
        raise ConfigError(f"the token given by {where} {problem}; check how it was copied")
    return token


def _as_level(value: object, where: str) -> str:
    level = _as_str(value, where).upper()
    if level not in _LOG_LEVELS:
        raise ConfigError(f"{where} must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL; got {value!r}")
    return level


def _as_log_format(value: object, where: str) -> str:
    text = _as_str(value, where).lower()
    if text not in ("text", "json"):
        raise ConfigError(f"{where} must be text or json; got {value!r}")
    return text


def _literal(value: object, where: str, example: str) -> object:
    """Read a list or table given as a Python/JSON literal string (Prefect's env form)."""
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value.strip() or "[]")
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ConfigError(f"{where} must be a literal like {example}, got {value!r}") from None


def _as_labels(value: object, where: str) -> list[str]:
    """Labels: a list, a list literal (Prefect's form), or names separated by commas (``etl,daily``)."""
    if isinstance(value, str) and not value.strip().startswith(("[", "(")):
        return _unique(label.strip() for label in value.split(",") if label.strip())
    labels = _literal(value, where, "'[\"dev\", \"etl\"]'")
    if isinstance(labels, str):
        labels = [labels]
    if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels):
        raise ConfigError(f"{where} must be a list of strings like '[\"dev\", \"etl\"]', got {value!r}")
    return _unique(label.strip() for label in labels if label.strip())


def _as_paths(value: object, where: str) -> list[str]:
    paths = _literal(value, where, "'[\"/opt/flows\"]'")
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, (list, tuple)) or not all(isinstance(x, str) for x in paths):
        raise ConfigError(f"{where} must be a list of paths, got {value!r}")
    return [os.path.abspath(os.path.expanduser(path)) for path in paths]


def _as_module(value: object, where: str) -> str:
    """A module name to import, like ``prefect`` or ``project.flows``."""
    name = str(value).strip()
    if not all(part.isidentifier() for part in name.split(".")):
        raise ConfigError(f"{where} must name a Python module, like prefect or project.flows, got {value!r}")
    return name


def _as_modules(value: object, where: str) -> list[str]:
    """Module names: a list, a list literal, or names separated by commas."""
    if isinstance(value, str):
        value = _literal(value, where, "'[\"prefect\"]'") if value.strip().startswith("[") else value.split(",")
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list of Python modules, like [\"prefect\"], got {value!r}")
    return _unique(_as_module(name, where) for name in value if str(name).strip())


def _as_path(value: object, where: str) -> str:
    """One path, absolute ("" stays "": the default)."""
    path = _as_str(value, where)
    return os.path.abspath(os.path.expanduser(path)) if path else ""


def _as_env(value: object, where: str) -> dict[str, str]:
    if isinstance(value, (list, tuple)):
        return dict(_split_env_pair(item, where) for item in value)
    table = _literal(value, where, "'{\"KEY\": \"value\"}'")
    if not isinstance(table, dict) or not all(isinstance(k, str) for k in table):
        raise ConfigError(f"{where} must be a table of KEY = value, got {value!r}")
    return {key: str(item) for key, item in table.items()}


def _split_env_pair(item: object, where: str) -> tuple[str, str]:
    """Split ``KEY=VALUE`` on the first ``=``, so values may contain ``=``."""
    key, sep, val = str(item).partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{where} takes KEY=VALUE, got {item!r}")
    return key.strip(), val


def _sqlite_path(url: str) -> str:
    """``sqlite:///relative.db`` or ``sqlite:////absolute.db`` → the file path."""
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
    if not path:
        raise ConfigError(f"{url!r} is not a valid API URL: it names no database file; use sqlite:///PATH/TO/FILE.db")
    return os.path.abspath(os.path.expanduser(path))


def _as_api(value: object, where: str) -> str:
    """An API URL: ``http(s)://HOST[:PORT]`` or ``sqlite:///PATH``; empty means the default."""
    url = _as_str(value, where)
    if not url:
        return ""
    if url.startswith("sqlite:"):
        _sqlite_path(url)  # rejects a URL without a path
        return url
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0
    except ValueError:  # a bad port
        valid = False
    if not valid:
        raise ConfigError(
            f"{where} {url!r} is not a valid API URL: use http(s)://HOST[:PORT] for a Prefect API "
            "or sqlite:///PATH for the embedded database"
        )
    return url.rstrip("/")


def _as_address(value: object, where: str) -> str:
    """``--agent-address``: ``[http://]HOST:PORT``."""
    address = _as_str(value, where)
    if not address:
        return ""
    try:
        port = urlsplit(address if "://" in address else "http://" + address).port
    except ValueError:
        port = None
    if not port:
        raise ConfigError(f"{where} {address!r} needs a port, like http://127.0.0.1:8080")
    return address


class _Option(NamedTuple):
    """One setting, declared once: its field, config keys (first wins), reader, default and flags."""

    name: str
    keys: tuple[str, ...]
    convert: Callable[[Any, str], Any]
    default: Any = None
    #: The ``start`` flags (none: config and environment only), what they do, and how argparse
    #: takes them: "store" (a value), "append" (repeatable), "true" or "false" (a switch).
    flags: tuple[str, ...] = ()
    help: str = ""
    action: str = "store"
    #: How the default reads in the help and the README, when "none", "true", ... would mislead.
    shown_default: str = ""
    #: Checks one value of a repeatable flag (``-e KEY=VALUE``); the whole list is read by ``convert``.
    check_item: Callable[[Any, str], Any] | None = None
    #: Other programs' variables for it, read after ours (Prefect 2/3's ``PREFECT_API_URL``).
    env_aliases: tuple[str, ...] = ()


_OPTIONS = (
    # The token: the agent key first, as Prefect 0.8 read it, then the client's own names.
    _Option("token", ("cloud.agent.auth_token", "cloud.auth_token", "cloud.api_key"), _as_token, "",
            ("-t", "--token", "-k", "--key"), "API token or key", env_aliases=("PREFECT_API_KEY",)),
    _Option("api", ("cloud.api",), _as_api, "", ("-a", "--api"),
            "API URL (a Prefect 2/3 API ends in /api), or sqlite:///PATH for the embedded database",
            shown_default="Prefect Cloud (`https://api.prefect.io`) with a token; else "
                          "`sqlite:///<home_dir>/local_agent.db`", env_aliases=("PREFECT_API_URL",)),
    _Option("auth_string", ("cloud.api_auth_string",), _as_token, "", (),
            "USER:PASSWORD for a Prefect 2/3 server behind basic authentication",
            env_aliases=("PREFECT_API_AUTH_STRING",)),
    _Option("tenant_id", ("cloud.tenant_id",), _as_token, "", ("--tenant-id",), "tenant to use (Prefect Cloud)",
            shown_default="Server's first tenant; Cloud: the key's"),
    _Option("name", ("cloud.agent.name",), _as_name, DEFAULT_AGENT_NAME, ("-n", "--name"),
            "agent name, also its logger's name"),
    _Option("labels", ("cloud.agent.labels",), _as_labels, [], ("-l", "--label"), "a label (repeatable)", "append"),
    _Option("pool", ("cloud.agent.pool",), _as_name, "", ("--pool",),
            "the work pool to serve, on a Prefect 2/3 API (which routes runs by pool and queue, not labels)"),
    _Option("work_queues", ("cloud.agent.work_queues",), _as_labels, [], ("--work-queue",),
            "take runs only from this queue of the pool (repeatable)", "append",
            shown_default="`[]` (every queue of the pool)"),
    _Option("create_pool", ("cloud.agent.create_pool",), _as_bool, False, ("--create-pool",),
            "create the work pool (type process) and its queues if missing", "true"),
    _Option("level", ("cloud.agent.level",), _as_level, "INFO", ("--log-level",),
            "DEBUG, INFO, WARNING or ERROR"),
    _Option("log_format", ("cloud.agent.log_format",), _as_log_format, "text", ("--log-format",),
            "text, or json: one JSON object a line (time, level, logger, message, flow_run_id, flow_name)"),
    _Option("home_dir", ("home_dir",), _as_str, "~/.prefect"),
    _Option("env", ("cloud.agent.env",), _as_env, {}, ("-e", "--env"), "KEY=VAL for flow runs (repeatable)",
            "append", check_item=_split_env_pair),
    _Option("import_paths", ("cloud.agent.import_paths",), _as_paths, [], ("-p", "--import-path"),
            "add to flow runs' PYTHONPATH (repeatable)", "append"),
    _Option("python", ("cloud.agent.python",), _as_path, "", ("--python",),
            "the Python that runs flow-run processes, e.g. a project's virtualenv with prefect",
            shown_default="the agent's own"),
    _Option("preload", ("cloud.agent.preload",), _as_modules, [], ("--preload",),
            "a module to import once in a warm process that forks each flow run (repeatable; e.g. prefect)",
            "append",
            check_item=_as_module, shown_default="`[]` (a fresh interpreter per run)"),
    _Option("flow_dirs", ("cloud.agent.flow_dirs",), _as_paths, [], ("--flows-dir",),
            "also load flow files from under this directory (repeatable); <home_dir>/flows always", "append",
            shown_default="`[]` (`<home_dir>/flows` always counts)"),
    _Option("show_flow_logs", ("cloud.agent.show_flow_logs",), _as_bool, False, ("-f", "--show-flow-logs"),
            "show flow-run output", "true"),
    _Option("local_label", ("cloud.agent.local_label",), _as_bool, True, ("--no-local-label",),
            "do not add the label local (with --no-hostname-label and no -l, it takes unlabelled runs, as "
            "Prefect 1.4.1's agent does)", "false"),
    _Option("hostname_label", ("cloud.agent.hostname_label",), _as_bool, True, ("--no-hostname-label",),
            "do not add the host name label", "false"),
    _Option("cloud_logs", ("cloud.send_flow_run_logs",), _as_bool, True, ("--no-cloud-logs",),
            "do not send flow-run logs to the API", "false"),
    _Option("agent_address", ("cloud.agent.agent_address",), _as_address, "", ("--agent-address",),
            "serve /api/health, /api/poke, /api/status, /metrics and the dashboard here, e.g. "
            "http://127.0.0.1:8080"),
    _Option("ui_token", ("cloud.agent.ui_token",), _as_token, "", ("--ui-token",),
            "a token the dashboard asks for before it creates or cancels runs (needed off loopback)"),
    _Option("max_polls", ("cloud.agent.max_polls",), _as_positive, None, ("--max-polls",),
            "stop after this many polls"),
    _Option("max_poll_interval", ("cloud.agent.max_poll_interval",), _as_number, POLL_BACKOFF[-1],
            ("--max-poll-interval",), "longest wait between polls"),
    _Option("limit", ("cloud.agent.limit",), _as_positive, None, ("--limit",),
            "run at most this many flow runs at once"),
    _Option("timeout", ("cloud.agent.timeout",), _as_timeout, None, ("--timeout",),
            "stop a flow run after this many seconds"),
    _Option("grace", ("cloud.agent.grace",), _as_number, 30.0, ("--grace",),
            "seconds to let flow runs finish after SIGTERM"),
    _Option("request_timeout", ("cloud.request_timeout",), _as_number, REQUEST_TIMEOUT_SECONDS),
    _Option("allow_insecure_http", ("cloud.agent.allow_insecure_http",), _as_bool, False,
            ("--allow-insecure-http",), "allow a token over plain http to another host", "true"),
    _Option("subreaper", ("cloud.agent.subreaper",), _as_bool, False, ("--subreaper",),
            "adopt and reap orphaned grandchildren (automatic as PID 1)", "true",
            shown_default="false (true as PID 1)"),
)


def _env_name(key: str) -> str:
    """``cloud.agent.name`` → ``PREFECT__CLOUD__AGENT__NAME``."""
    return "PREFECT__" + key.upper().replace(".", "__")


def _default_text(option: _Option) -> str:
    """How an option's default reads in ``--help`` and the README: ``none``, ``true``, ``30``, ``agent``."""
    value = option.default
    if option.shown_default:
        return option.shown_default
    if value is None or value == "" or value == {}:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "`[]`"
    return f"`{value}`"


class Settings:
    """Everything the agent and the commands need, resolved once from all sources."""

    # Each setting's type; its default is in _OPTIONS. Plain classes rather than dataclasses
    # here and below: the dataclasses module costs every flow-run process about 8 ms, and it
    # fails when this file is loaded without registering itself in sys.modules
    # (importlib.util.spec_from_file_location), as vendoring projects do.
    api: str
    token: str
    auth_string: str
    tenant_id: str
    name: str
    labels: list[str]
    pool: str
    work_queues: list[str]
    create_pool: bool
    level: str
    log_format: str
    home_dir: str
    env: dict[str, str]
    import_paths: list[str]
    python: str
    preload: list[str]
    flow_dirs: list[str]
    show_flow_logs: bool
    local_label: bool
    hostname_label: bool
    cloud_logs: bool
    agent_address: str
    ui_token: str
    max_polls: int | None
    max_poll_interval: float
    limit: int | None
    timeout: float | None
    grace: float
    request_timeout: float
    allow_insecure_http: bool
    subreaper: bool
    #: ``start --once``: take what is due now, finish it, exit (a flag, not a setting).
    once: bool
    #: Where each setting came from, e.g. ``{"token": "environment variable PREFECT__..."}``.
    sources: dict[str, str]
    config_path: str

    def __init__(self, **values: Any) -> None:
        for option in _OPTIONS:  # a fresh list or table each time: defaults are never shared
            default = option.default
            setattr(self, option.name, type(default)(default) if isinstance(default, (list, dict)) else default)
        self.once, self.sources, self.config_path = False, {}, ""
        for key, value in values.items():
            if key not in self.__annotations__:
                raise TypeError(f"Settings has no setting {key!r}")
            setattr(self, key, value)

    def __repr__(self) -> str:
        hidden = ("token", "auth_string", "ui_token")  # secrets: never in a repr, a log or a traceback
        shown = {key: getattr(self, key) for key in self.__annotations__ if key not in hidden}
        return "Settings(" + ", ".join(f"{key}={value!r}" for key, value in shown.items()) + ")"

    @property
    def home(self) -> Path:
        """The home directory (``~/.prefect`` unless ``PREFECT__HOME_DIR`` says otherwise)."""
        return Path(os.path.expanduser(self.home_dir)).absolute()

    @property
    def flows_dir(self) -> Path:
        """Where flows are stored by default: ``<home>/flows``."""
        return self.home / "flows"

    @property
    def trusted_script_dirs(self) -> list[str]:
        """Where flows stored as scripts may also lie: the working directory and the import paths."""
        return [os.getcwd(), *self.import_paths]

    @property
    def trusted_flow_dirs(self) -> list[str]:
        """The only directories flow files are loaded from: ``<home>/flows`` and ``--flows-dir``'s."""
        return [str(self.flows_dir), *self.flow_dirs]

    def agent_labels(self) -> list[str]:
        """The labels ``start`` polls with: given ones, ``local``, then the host name."""
        extra = ([LOCAL_STORAGE_LABEL] if self.local_label else []) + ([_hostname()] if self.hostname_label else [])
        return _unique([*self.labels, *extra])


def resolve_settings(
    flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Resolve settings from ``flags``, then ``PREFECT__*`` variables, then the config file."""
    environ = os.environ if environ is None else environ
    given = {key: value for key, value in (flags or {}).items() if value is not None}
    config_path, config = _load_config(environ)
    settings = Settings(config_path=str(config_path), once=bool(given.get("once", False)))
    for option in _OPTIONS:
        value, source = _resolve_option(option, given, environ, config, config_path)
        setattr(settings, option.name, value)
        if source:
            settings.sources[option.name] = source
    _finish_api(settings)
    return settings


def _resolve_option(
    option: _Option,
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    config: Mapping[str, Any],
    config_path: Path,
) -> tuple[Any, str]:
    """Return one setting's value and where it came from, by the documented precedence."""
    flag_name = "--" + option.name.replace("_", "-")
    # 1. The command-line flag.
    if option.name in flags:
        return option.convert(flags[option.name], flag_name), "the " + flag_name + " flag"
    # 2. The environment, each key's variable in order.
    for variable in map(_env_name, option.keys):
        if environ.get(variable, "") != "":
            where = "environment variable " + variable
            return option.convert(environ[variable], where), where
    # 3. The config file, each key in order.
    for key in option.keys:
        value = _config_lookup(config, key)
        if value is not None and value != "":
            where = f"config file {config_path} ({key})"
            return option.convert(value, where), where
    # 4. Other programs' variables for it (Prefect 2/3's), below the agent's own config: one left
    #    in a shell from another project must not override what the agent was configured with.
    for variable in option.env_aliases:
        if environ.get(variable, "") != "":
            where = "environment variable " + variable
            return option.convert(environ[variable], where), where
    # 5. The default.
    return option.default, ""


def _load_config(environ: Mapping[str, str]) -> tuple[Path, dict[str, Any]]:
    """Read the TOML config file, if there is one; its absence is not an error."""
    explicit = environ.get("PREFECT__USER_CONFIG_PATH", "")
    path = Path(os.path.expanduser(explicit or "~/.prefect/config.toml"))
    if not path.exists():
        if explicit:  # Prefect 1.x ignores it too: one project's variable in another's shell is common
            logging.getLogger(__name__).debug("PREFECT__USER_CONFIG_PATH names %s, which does not exist", path)
        return path, {}
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    return path, _parse_toml(data, path)


def _parse_toml(data: bytes, path: Path) -> dict[str, Any]:
    """Parse TOML with ``tomllib`` (3.11+) or ``tomli``; say how to fix it when neither exists."""
    try:
        import tomllib as toml_parser  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # Python 3.9 and 3.10
        try:
            import tomli as toml_parser  # type: ignore[import-not-found,no-redef,unused-ignore]
        except ImportError:
            raise ConfigError(
                f"config file {path} exists but this Python ({sys.version.split()[0]}) cannot "
                "read TOML: run `pip install tomli`, use Python 3.11+, or move the file away"
            ) from None
    try:
        text = data.decode("utf-8")
        parsed: dict[str, Any] = toml_parser.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except Exception as exc:  # tomllib.TOMLDecodeError; the module varies
        raise ConfigError(f"config file {path} is not valid TOML: {_one_line(str(exc))}") from None
    return parsed


def _config_lookup(config: Mapping[str, Any], dotted_key: str) -> Any:
    """Look up ``a.b.c`` in nested TOML tables; None when absent."""
    node: Any = config
    for part in dotted_key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _finish_api(settings: Settings) -> None:
    """Default the API: Prefect Cloud with a token, else the embedded database."""
    if not settings.api:
        if settings.sources.get("token", "").endswith("PREFECT_API_KEY"):
            raise ConfigError("PREFECT_API_KEY is a Prefect 2/3 key, and no API is set: set PREFECT_API_URL (or "
                              "-a) to the Prefect 2/3 API it belongs to; it is not sent to Prefect Cloud 1.x")
        if settings.token:
            settings.api = PREFECT_CLOUD_API
        else:
            settings.api = "sqlite:///" + str(settings.home / "local_agent.db")
            settings.sources.setdefault("api", "the default (embedded database)")


def _is_this_machine(host: str) -> bool:
    """Only ``localhost`` and literal loopback addresses (127.0.0.0/8, ::1); names are not resolved."""
    import ipaddress  # only when a token would go over plain http

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, like 127.0.0.1.nip.io
        return False


def _check_token_safety(settings: Settings) -> None:
    """Refuse to send a token in clear text off this machine; warn on a readable config file."""
    if not settings.token and not settings.auth_string:
        return
    config_path = Path(settings.config_path)
    parts = urlsplit(settings.api)
    host = parts.hostname or ""
    insecure = parts.scheme == "http" and not _is_this_machine(host)
    if insecure and not settings.allow_insecure_http:
        raise ConfigError(
            f"refusing to send the token over plain http to {host}: use https, "
            "or pass --allow-insecure-http if this network is trusted"
        )
    in_config = any(settings.sources.get(name, "").startswith("config file") for name in ("token", "auth_string"))
    if in_config and os.name == "posix":
        mode = config_path.stat().st_mode
        if mode & 0o077:
            logging.getLogger(__name__).warning(
                "config file %s holds a token and is readable by others; run: chmod 600 %s",
                config_path, config_path,
            )


_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|KEY|CREDENTIAL|AUTH", re.IGNORECASE)


class _Redactor:
    """Blanks secrets out of text. One of these sees every string that leaves a process: log
    lines, state messages, status output and error lines."""

    def __init__(self, secrets: Iterable[str]) -> None:
        found = sorted(set(secrets), key=len, reverse=True)  # the longest first, so none hides another
        self.longest = len(found[0].encode("utf-8")) if found else 0
        self._text = re.compile("|".join(re.escape(secret) for secret in found)) if found else None
        self._bytes = re.compile(b"|".join(re.escape(secret.encode("utf-8")) for secret in found)) if found else None

    def __call__(self, text: str) -> str:
        """``text`` with each secret replaced by ``[REDACTED]``."""
        return self._text.sub("[REDACTED]", text) if self._text is not None else text

    def safe_cut(self, data: bytes, cut: int) -> int:
        """Where to cut ``data`` at or before ``cut`` without splitting a secret in two."""
        if self._bytes is not None:
            for match in self._bytes.finditer(data, 0, cut + self.longest):
                if match.start() < cut < match.end():
                    return match.start()
        return cut


def _secrets(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """The token, ``--env`` values with secret-looking names (4+ characters) and inherited ones (8+:
    a name like ``..._SECRETS`` often holds just ``false``)."""
    found = [secret for secret in (settings.token, getattr(settings, "ui_token", ""),
                                   getattr(settings, "auth_string", "")) if secret]
    found += [value for key, value in settings.env.items() if _SECRET_NAME.search(key) and len(value) >= 4]
    return found + _inherited_secrets(environ)


def _inherited_secrets(environ: Mapping[str, str]) -> list[str]:
    """Values of secret-looking variables in ``environ`` (8+ characters)."""
    return [value for key, value in environ.items() if _SECRET_NAME.search(key) and len(value) >= 8]


class _RedactingFilter(logging.Filter):
    """Redacts log records before any handler formats them."""

    def __init__(self, redact: _Redactor) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.redact(record.getMessage()), ()
        return True


# --- 5. States and time ------------------------------------------------------------------
#
# Prefect's serialized state JSON. Every state carries ``type``, ``message``, ``context``,
# ``_result``, ``cached_inputs`` and ``__version__``; Scheduled-family states add
# ``start_time`` and Submitted wraps the state it replaced in ``state``. Times are aware UTC.


def _utcnow() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)


_ISO_FRACTION = re.compile(r"\.(\d+)")


def _parse_time(value: str) -> datetime:
    """Parse an ISO 8601 timestamp (``Z`` or offset, any fraction) into aware UTC."""
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00").replace(" ", "T", 1)
    # Python < 3.11 accepts only 3 or 6 fractional digits.
    text = _ISO_FRACTION.sub(lambda m: "." + (m.group(1) + "000000")[:6], text, count=1)
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _format_time(moment: datetime) -> str:
    """Format an aware datetime as fixed-width ISO 8601 UTC, so strings sort by time."""
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _parse_time_or_now(text: str) -> datetime:
    try:
        return _parse_time(text)
    except ValueError:
        return _utcnow()


def _short_time(moment: datetime | None) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def make_state(
    state_type: str,
    message: str | None = None,
    *,
    start_time: datetime | None = None,
    previous: Mapping[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a serialized Prefect state, as a 1.x client writes it."""
    state: dict[str, Any] = {
        "type": state_type,
        "message": message,
        "context": dict(context or {}),
        "_result": {"type": "NoResultType", "__version__": CORE_VERSION},
        "cached_inputs": {},
        "__version__": CORE_VERSION,
    }
    if state_type in SCHEDULED_STATES or start_time is not None:
        state["start_time"] = _format_time(start_time or _utcnow())
    if previous is not None:
        state["state"] = dict(previous)
    return state


def is_final(state_type: str) -> bool:
    """Whether a run in this state has finished (Success, Failed, Cancelled, ...)."""
    return state_type in FINAL_STATES


def _state_start_time(serialized: Mapping[str, Any] | None) -> datetime | None:
    """The ``start_time`` of a serialized state, or None when it has none or it is bad."""
    value = (serialized or {}).get("start_time")
    if not isinstance(value, str):
        return None
    try:
        return _parse_time(value)
    except ValueError:
        return None


def _duration_text(seconds: float) -> str:
    """``0.42 s``, ``12 s``, ``4 min 3 s``, ``3 d 4 h``: how long, as a person says it."""
    if seconds < 10:
        return f"{seconds:.2f} s"
    whole = round(seconds)
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60),
                                               ("min", 60, "s", 1)):
        if whole >= size:
            rest = whole % size // smaller_size
            return f"{whole // size} {unit}" + (f" {rest} {smaller}" if rest else "")
    return f"{whole} s"


# --- 5a. Schedules: Prefect 1.4.1's clocks -----------------------------------------------
#
# A schedule is a list of clocks, each a cron expression or an interval, with parameters
# and labels of its own; it fires at the merged times of its clocks. The times must be the
# ones Prefect 1.4.1 computes, since a Server creates runs from the same schedule JSON and
# users compare the two. Prefect's times come from croniter 1.3.7, pytz and pendulum 2.1,
# whose handling of daylight-saving changes has quirks (a 02:30 job fires at 03:30 on the
# spring-forward day; a repeated hour fires once, on its second occurrence; an interval of a
# day or more is added to the wall clock). The code below reproduces those libraries' steps
# with ``zoneinfo``; the tests compare its output with real Prefect's, time for time. The
# comments name the routine of croniter (K), prefect.schedules.clocks (C) or pendulum (P)
# each step copies. One deliberate difference: where Prefect 1.4.1 loops forever (a job that
# fires every minute, asked on a fall-back day before the repeated hour), this code goes on
# after the last time it gave.

#: croniter stops looking this many years after the start (then: "failed to find next date").
_CRON_SEARCH_YEARS = 50
#: Prefect's CronClock gives at most this many times per call; Schedule.next at most 10,000.
_CLOCK_EVENT_LIMIT, _SCHEDULE_EVENT_LIMIT = 1000, 10000
#: pytz reads only the 32-bit part of a zone file: its offsets stop changing at 2**31 s.
_PYTZ_LAST_CHANGE = datetime(2038, 1, 19, 3, 14, 7)
#: pendulum extends a zone's rule 400 years past 2037, then its offsets stop changing.
_PENDULUM_LAST_CHANGE = datetime(2438, 1, 1)
#: Zones whose pendulum (pytzdata 2020.1) file ends in a dummy 2038 entry: frozen like pytz.
_PENDULUM_FROZEN_IN_2038 = frozenset({
    "America/Miquelon", "America/Santiago", "Antarctica/Troll", "Atlantic/Azores", "Australia/LHI",
    "Australia/Lord_Howe", "Chile/Continental", "Chile/EasterIsland", "NZ-CHAT", "Pacific/Chatham",
    "Pacific/Easter", "Pacific/Norfolk",
})
#: The longest interval a clock may have: longer ones overflow datetime arithmetic within years.
_LONGEST_INTERVAL = timedelta(days=36525)
#: Prefect's IntervalClock starts here when no start date is given.
_INTERVAL_DEFAULT_START = datetime(2019, 1, 1)
_UNIX_EPOCH = datetime(1970, 1, 1)
_ZoneState = tuple[timedelta, timedelta, str]  # offset, DST part, abbreviation


class ClockEvent(NamedTuple):
    """One time a schedule fires, with the parameters and labels of the clock that fired."""

    start_time: datetime
    parameter_defaults: dict[str, Any]
    labels: list[str] | None


#: Names of UTC that Prefect's zone lists spell otherwise.
_UTC_NAMES = frozenset({"UTC", "ETC/UTC", "UCT", "ETC/UCT", "UNIVERSAL", "ETC/UNIVERSAL", "ZULU", "ETC/ZULU"})


def _check_timezone(name: str) -> str:
    """Return ``name`` if it is a time zone this machine knows (IANA name or UTC), else raise."""
    if name.upper() in _UTC_NAMES:
        return "UTC"
    if name.startswith(("posix/", "right/")) or name in ("localtime", "Factory", "posixrules"):
        raise ValueError(f"unknown time zone {name!r}: use an IANA name such as Europe/Berlin or America/New_York")
    try:
        _zoneinfo(name)
    except (ValueError, OSError, LookupError):
        raise ValueError(
            f"unknown time zone {name!r}: use an IANA name such as Europe/Berlin or America/New_York"
        ) from None
    return name


def _zoneinfo(name: str) -> Any:
    import zoneinfo  # only where a schedule is computed

    if name.upper() == "UTC":
        return timezone.utc
    return zoneinfo.ZoneInfo(name)


class _ZoneView:
    """A named time zone as pytz or pendulum sees it: the same rules, frozen after a date.

    Instants are naive UTC datetimes, wall times naive local ones.
    """

    def __init__(self, name: str, frozen_after: datetime | None) -> None:
        self.name = name
        self.frozen_after = frozen_after
        self.zone = _zoneinfo(name)

    def state(self, instant: datetime) -> _ZoneState:
        if self.frozen_after is not None and instant > self.frozen_after:
            instant = self.frozen_after
        local = instant.replace(tzinfo=timezone.utc).astimezone(self.zone)
        return local.utcoffset() or timedelta(0), local.dst() or timedelta(0), local.tzname() or ""

    def offset(self, instant: datetime) -> timedelta:
        return self.state(instant)[0]

    def to_local(self, instant: datetime) -> datetime:
        return instant + self.offset(instant)

    def candidates(self, wall: datetime) -> list[tuple[datetime, _ZoneState]]:
        """pytz's search: the instants, earliest first, that show ``wall`` (none in a gap, two
        in a repeated hour), found from the offsets one day either side."""
        found = {}
        for side in (timedelta(days=-1), timedelta(days=1)):
            offset = self.offset(wall + side)
            instant = wall - offset
            state = self.state(instant)
            if state[0] == offset:
                found[instant] = state
        return sorted(found.items())

    def localize_pytz(self, wall: datetime) -> datetime:
        """``pytz.timezone(name).localize(wall, is_dst=False)``: a repeated hour's standard-time
        occurrence; in a gap, the wall time read with the offset before the gap."""
        found = self.candidates(wall)
        if len(found) == 1:
            return found[0][0]
        if not found:
            return self.localize_pytz(wall - timedelta(hours=6)) + timedelta(hours=6)
        standard = [instant for instant, state in found if not state[1]]
        return standard[0] if len(standard) == 1 else min(instant for instant, _ in found)

    def localize_pendulum(self, wall: datetime) -> datetime:
        """``pendulum.datetime(..., tz=name)`` (POST_TRANSITION): a repeated hour's later
        occurrence; in a gap, the wall time read with the offset before the gap (P:tz)."""
        found = self.candidates(wall)
        if found:
            return found[-1][0]
        return self.localize_pendulum(wall - timedelta(hours=6)) + timedelta(hours=6)

    def localize_fold0(self, wall: datetime) -> datetime:
        """A plain datetime with pendulum's tzinfo and fold=0: the earlier occurrence; in a
        gap, the wall time read with the offset after the gap."""
        found = self.candidates(wall)
        if found:
            return found[0][0]
        before = self.localize_pendulum(wall - timedelta(hours=6)) + timedelta(hours=6)
        return wall - self.offset(before)

    def pendulum_instant(self, instant: datetime) -> datetime:
        """The instant a pendulum DateTime converted from ``instant`` really denotes: pendulum
        sets ``fold = not is_dst`` (P:tz/timezone.py ``_convert``), which swaps a repeated
        hour's two occurrences in zones with negative DST (Europe/Dublin)."""
        found = self.candidates(self.to_local(instant))
        if len(found) < 2:
            return instant
        return found[0][0] if self.state(instant)[1] else found[-1][0]


def _pytz_view(name: str) -> _ZoneView:
    return _ZoneView(name, _PYTZ_LAST_CHANGE)


def _pendulum_view(name: str) -> _ZoneView:
    frozen = _PYTZ_LAST_CHANGE if name in _PENDULUM_FROZEN_IN_2038 else _PENDULUM_LAST_CHANGE
    return _ZoneView(name, frozen)


def _seconds(span: timedelta) -> float:
    """croniter's ``timedelta_to_seconds``: microseconds first, so the float rounds alike."""
    return (span.microseconds + (span.seconds + span.days * 86400) * 10**6) / 10**6


def _timestamp(instant: datetime) -> float:
    return _seconds(instant - _UNIX_EPOCH)


def _from_timestamp(value: float) -> datetime:
    return datetime.fromtimestamp(value, timezone.utc).replace(tzinfo=None)


# Cron expressions, parsed as croniter 1.3.7's ``_expand`` parses them (K:600-772): exactly
# the expressions Prefect accepts, with a message that names the bad field.

_CRON_FIELDS = ("minute", "hour", "day_of_month", "month", "day_of_week", "second")
_CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7), (0, 59))
_CRON_NAMES: tuple[dict[str, Any], ...] = (
    {}, {}, {"l": "l"},
    {name: number for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1)},
    {name: number for number, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))},
    {},
)
_CRON_LOW_MAP: tuple[dict[int, int], ...] = ({}, {}, {0: 1}, {0: 1}, {7: 0}, {})
_CRON_ALIASES = {
    "@midnight": "0 0 * * *", "@hourly": "0 * * * *", "@daily": "0 0 * * *", "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *",
}
_CRON_RANGE = re.compile(r"^([^-]+)-([^-/]+)(/(\d+))?$")
_CRON_NTH_WEEKDAY = re.compile(r"^(\w+)#(\d+)|l(\d+)$")
_CRON_HASHED = re.compile(r"^(h|r)(\((\d+)-(\d+)\))?(\/(\d+))?$")
_CronValue = Any  # an int, "*" or "l" (last day of the month)


class CronFields(NamedTuple):
    """A parsed cron expression: each field's sorted values or ``["*"]``, and nth weekdays."""

    expression: str
    values: tuple[list[_CronValue], ...]
    nth_weekdays: dict[int, set[Any]]


def parse_cron(expression: str) -> CronFields:
    """Parse a cron expression as Prefect 1.4.1 does; ValueError names the bad field."""
    if not isinstance(expression, str):
        raise ValueError("a cron expression must be a string")
    lowered = expression.lower()
    aliased = _CRON_ALIASES.get(lowered)
    fields = (aliased or lowered).split()
    shown = fields if aliased else expression.split()
    if len(fields) not in (5, 6):
        raise ValueError(
            f"cron expression {expression!r} has {len(fields)} fields; expected 5 (minute hour "
            "day_of_month month day_of_week) or 6 (the same and second)"
        )
    values: list[list[_CronValue]] = []
    nth: dict[int, set[Any]] = {}
    for index, field in enumerate(fields):
        values.append(_parse_cron_field(index, field, shown[index], len(fields), nth))
    plain_weekdays = set(values[4]) - set(nth) - {"*"}
    if nth and plain_weekdays:
        raise _cron_field_error(4, shown[4], "plain weekdays cannot be mixed with nth (#) or last (L) weekdays")
    return CronFields(expression, tuple(values), nth)


def _cron_field_error(index: int, text: str, problem: str) -> ValueError:
    return ValueError(f"field {_CRON_FIELDS[index]!r} ({text}): {problem}")


def _parse_cron_field(index: int, field: str, shown: str, field_count: int,
                      nth: dict[int, set[Any]]) -> list[_CronValue]:
    """One field's values; croniter's stack of comma-separated items, ranges pushed back."""
    low_bound, high_bound = _CRON_RANGES[index]
    if _CRON_HASHED.match(field):
        raise _cron_field_error(index, shown, "hashed (H) and random (R) values are not supported")
    items: list[Any] = field.split(",")
    found: list[_CronValue] = []
    while items:
        item, nth_of_item = str(items.pop()), None  # type: str, Any
        if index == 4:
            item, nth_of_item = _split_nth_weekday(item, shown)
        text = re.sub(r"^\*(\/.+)$", rf"{low_bound}-{high_bound}\1", item)
        match = _CRON_RANGE.search(text)
        if not match:
            text = re.sub(r"^(.+)\/(.+)$", rf"\1-{high_bound}/\2", item)
            match = _CRON_RANGE.search(text)
        if match:
            items += _expand_cron_range(index, shown, match, nth_of_item)
            continue
        value = _cron_single_value(index, shown, text, field_count)
        found.append(value)
        if index == 4 and nth_of_item:
            nth.setdefault(value, set()).add(nth_of_item)
    unique = sorted(set(found), key=lambda value: f"{value:02d}" if isinstance(value, int) else value)
    if len(unique) == (60, 24, 31, 12, 7, 60)[index]:
        return ["*"]  # croniter: every value is "*", which changes day_or's meaning (K:755)
    return ["*"] if unique == ["*"] else unique


def _split_nth_weekday(item: str, shown: str) -> tuple[str, Any]:
    """``fri#2`` is the second Friday, ``l5`` the last one."""
    match = _CRON_NTH_WEEKDAY.match(item)
    if not match:
        return item, None
    day, number, last = match.groups()
    if last:
        return last, "l"
    if not (number.isdigit() and 1 <= int(number) <= 5):
        raise _cron_field_error(4, shown, f"{item!r}: the n in day#n must be 1-5")
    return day, int(number)


def _expand_cron_range(index: int, shown: str, match: re.Match[str], nth_of_item: Any) -> list[Any]:
    low_bound, high_bound = _CRON_RANGES[index]
    low, high, step_text = match.group(1), match.group(2), match.group(4) or "1"
    if index == 2 and high == "l":
        high = "31"
    low, high = (_cron_name_to_number(index, shown, part) for part in (low, high))
    if not low.isdigit() or not high.isdigit():
        raise _cron_field_error(index, shown, "'L' cannot start a range")
    if int(low) > int(high):
        if index == 4 and high == "0":
            high = "7"  # "fri-sun": a range ending on Sunday ends on 7
        else:
            raise _cron_field_error(index, shown, f"range {low}-{high} is reversed")
    first, last, step = int(low), int(high), int(step_text)
    if max(first, last) > high_bound:
        raise _cron_field_error(index, shown, f"{max(first, last)} is out of range {low_bound}-{high_bound}")
    if step == 0:
        raise _cron_field_error(index, shown, "the step must be greater than 0")
    if index == 4 and nth_of_item and nth_of_item != "l":
        return [f"{value}#{nth_of_item}" for value in range(first, last + 1, step)]
    return list(range(first, last + 1, step))


def _cron_name_to_number(index: int, shown: str, part: str) -> str:
    if part.isdigit():
        return part
    if part not in _CRON_NAMES[index]:
        raise _cron_field_error(index, shown, f"{part!r} is not a valid value")
    return str(_CRON_NAMES[index][part])


def _cron_single_value(index: int, shown: str, text: str, field_count: int) -> _CronValue:
    low_bound, high_bound = _CRON_RANGES[index]
    if text.startswith("-"):
        raise _cron_field_error(index, shown, "negative numbers are not allowed")
    value: Any = text
    if not (text == "*" or text.isdigit()):
        if text not in _CRON_NAMES[index]:
            raise _cron_field_error(index, shown, f"{text!r} is not a valid value")
        value = _CRON_NAMES[index][text]
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    # croniter maps 0 to 1 in the day and month fields and 7 to Sunday (0), except where its
    # field numbering for 6-field expressions makes it skip the map (K:728-735).
    skips_map = (index in (2, 3) and field_count == 5) or (index in (3, 4) and field_count == 6)
    if isinstance(value, int) and value in _CRON_LOW_MAP[index] and not skips_map:
        value = _CRON_LOW_MAP[index][value]
    if value not in ("*", "l") and not low_bound <= int(value) <= high_bound:
        raise _cron_field_error(index, shown, f"{value} is out of range {low_bound}-{high_bound}")
    return value


# croniter's forward search on the wall clock (K:333-531).

_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _days_in_month(month: int, year: int) -> int:
    leap = month == 2 and (year % 400 == 0 or (year % 4 == 0 and year % 100 != 0))
    return _MONTH_DAYS[month - 1] + leap


def _nearest_difference(current: int, values: Sequence[_CronValue], size: int) -> int:
    """How far the next allowed value is from ``current``, wrapping at ``size``."""
    for value in values:
        value = size if value == "l" else value
        if value >= current:
            return int(value) - current
    return int(values[0]) - current + size


def _nth_weekdays(year: int, month: int, weekday: int) -> tuple[int, ...]:
    """The days of ``month`` that fall on ``weekday`` (0 = Sunday)."""
    import calendar

    weeks = calendar.Calendar((weekday + 6) % 7).monthdayscalendar(year, month)
    if weeks[0][0] == 0:
        weeks.pop(0)
    return tuple(week[0] for week in weeks)


def _next_nth_weekday_difference(moment: datetime, nth: Mapping[int, set[Any]]) -> int | None:
    """Days to the next wanted nth weekday in this month, or None when none is left."""
    candidates = []
    for weekday, numbers in nth.items():
        days = _nth_weekdays(moment.year, moment.month, weekday)
        for number in numbers:
            if number == "l":
                day = days[-1]
            elif len(days) < number:
                continue
            else:
                day = days[number - 1]
            if moment.day <= day:
                candidates.append(day)
    return min(candidates) - moment.day if candidates else None


def _midnight(moment: datetime) -> datetime:
    return moment.replace(hour=0, minute=0, second=0)


def _cron_match_on_wall(moment: datetime, values: Sequence[list[_CronValue]], nth: Mapping[int, set[Any]]) -> datetime:
    """The first wall time at or after ``moment`` that the fields allow (croniter's ``_calc``)."""
    minutes, hours, days, months, weekdays = values[:5]
    start_year = moment.year
    while abs(moment.year - start_year) <= _CRON_SEARCH_YEARS:
        if months != ["*"]:
            difference = _nearest_difference(moment.month, months, 12)
            if difference:
                month = moment.month - 1 + difference
                moment = datetime(moment.year + month // 12, month % 12 + 1, 1)
                continue
        if days != ["*"]:
            length = _days_in_month(moment.month, moment.year)
            if not ("l" in days and moment.day == length):
                difference = _nearest_difference(moment.day, days, length)
                if difference:
                    moment = _midnight(moment) + timedelta(days=difference)
                    continue
        if nth:
            nth_difference = _next_nth_weekday_difference(moment, nth)
            if nth_difference is None:
                length = _days_in_month(moment.month, moment.year)
                moment = _midnight(moment) + timedelta(days=length - moment.day + 1)
                continue
            if nth_difference:
                moment = _midnight(moment) + timedelta(days=nth_difference)
                continue
        elif weekdays != ["*"]:
            difference = _nearest_difference(moment.isoweekday() % 7, weekdays, 7)
            if difference:
                moment = _midnight(moment) + timedelta(days=difference)
                continue
        if hours != ["*"]:
            difference = _nearest_difference(moment.hour, hours, 24)
            if difference:
                moment = moment.replace(minute=0, second=0) + timedelta(hours=difference)
                continue
        if minutes != ["*"]:
            difference = _nearest_difference(moment.minute, minutes, 60)
            if difference:
                moment = moment.replace(second=0) + timedelta(minutes=difference)
                continue
        if len(values) == 6:
            if values[5] != ["*"]:
                difference = _nearest_difference(moment.second, values[5], 60)
                if difference:
                    moment += timedelta(seconds=difference)
                    continue
        else:
            moment = moment.replace(second=0)
        return moment.replace(microsecond=0)
    raise ValueError("no time matches the cron expression within 50 years")


class _Croniter:
    """croniter(expression, start, day_or).get_next(), in one of the two ways Prefect uses it.

    With pytz (Prefect's normal path) croniter's arithmetic keeps the offset of the search's
    start, so a result across a DST change is shifted by the change, then partly corrected
    (K:259-289). With pendulum (Prefect's escape from a "DST loop", C:338) every wall time is
    read with fold=0.
    """

    def __init__(self, fields: CronFields, start: float, zone: _ZoneView, *, day_or: bool, pendulum: bool = False):
        self.fields = fields
        self.zone = zone
        self.day_or = day_or
        self.pendulum = pendulum
        self.current = start
        self.dst_start = start

    def _search(self, now: float, values: Sequence[list[_CronValue]]) -> float:
        step = 1 if len(values) == 6 else 60
        instant = _from_timestamp(math.floor(now) + step)
        if self.pendulum:
            wall = _cron_match_on_wall(self.zone.to_local(instant), values, self.fields.nth_weekdays)
            return _timestamp(self.zone.localize_fold0(wall))
        offset = self.zone.offset(instant)  # the frozen offset of the search's start
        wall = _cron_match_on_wall(instant + offset, values, self.fields.nth_weekdays)
        return _timestamp(wall - offset)

    def _next_timestamp(self) -> float:
        values = list(self.fields.values)
        if values[2] != ["*"] and values[4] != ["*"] and self.day_or:
            # Day of month OR day of week: the earlier of the two searches (K:243). The first
            # still applies nth weekdays, so "1 * L5" style expressions never match.
            by_day = self._search(self.current, [*values[:4], ["*"], *values[5:]])
            by_weekday = self._search(self.current, [*values[:2], ["*"], *values[3:]])
            return min(by_day, by_weekday)
        return self._search(self.current, values)

    def get_next(self) -> datetime:
        """The next matching wall time (naive, local)."""
        result = self._next_timestamp()
        if self.pendulum:
            return self._fix_dst_pendulum(result)
        zone = self.zone
        start = _from_timestamp(self.dst_start)
        start_state, instant = zone.state(start), _from_timestamp(result)
        state = zone.state(instant)
        wall = instant + state[0]
        if state[0] != start_state[0] and self._dst_fix_applies(
            _seconds(state[0] - start_state[0]), _seconds(instant - start) / 3600, (start + start_state[0]).hour
        ):
            adjusted_wall = wall - (state[0] - start_state[0])
            adjusted = _timestamp(adjusted_wall - state[0])
            if zone.state(_from_timestamp(adjusted)) == state:  # only if that time exists
                wall, result = adjusted_wall, adjusted
            self.dst_start = result
        self.current = result
        return wall

    @staticmethod
    def _dst_fix_applies(lag: float, lag_hours: float, start_hour: int) -> bool:
        """croniter's test for "the offset changed since the start, so correct the result"."""
        hours_before_midnight = 24 - start_hour
        if lag > 0:
            return abs(lag_hours) >= hours_before_midnight
        return 3600 * abs(lag_hours) + abs(lag) >= hours_before_midnight * 3600

    def _fix_dst_pendulum(self, result: float) -> datetime:
        # The same correction, with both times sharing one pendulum tzinfo: differences are
        # wall-clock differences and offsets come from fold=0.
        zone = self.zone
        start_wall = zone.to_local(_from_timestamp(self.dst_start))
        wall = zone.to_local(_from_timestamp(result))
        start_offset = start_wall - zone.localize_fold0(start_wall)
        offset = wall - zone.localize_fold0(wall)
        if offset != start_offset and self._dst_fix_applies(
            _seconds(offset - start_offset), _seconds(wall - start_wall) / 3600, start_wall.hour
        ):
            wall -= offset - start_offset
            result = _timestamp(zone.localize_fold0(wall))
            self.dst_start = result
        self.current = result
        return wall


def _as_naive_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is None else moment.astimezone(timezone.utc).replace(tzinfo=None)


class _Event:
    """A clock's time: the instant (naive UTC) and the wall time Prefect compares it by."""

    __slots__ = ("clock", "instant", "wall", "zone")

    def __init__(self, instant: datetime, wall: datetime, zone: str, clock: int) -> None:
        self.instant, self.wall, self.zone, self.clock = instant, wall, zone, clock

    def __lt__(self, other: _Event) -> bool:
        # pendulum compares two times of one zone by wall clock, others by instant (C:25-35).
        if self.zone == other.zone:
            return self.wall < other.wall
        return self.instant < other.instant

    def same_time(self, other: _Event) -> bool:
        return self.wall == other.wall if self.zone == other.zone else self.instant == other.instant


class CronClock:
    """Fire at the times of a cron expression in a time zone, as Prefect 1.x's CronClock."""

    kind = "CronClock"

    def __init__(
        self,
        cron: str,
        timezone: str = "UTC",
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        day_or: bool = True,
        parameter_defaults: Mapping[str, Any] | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        self.cron = cron
        self.fields = parse_cron(cron)
        self.timezone = _check_timezone(timezone)
        self.start_wall = _wall_time(start, self.timezone)
        self.end_wall = _wall_time(end, self.timezone)
        self.day_or = day_or
        self.parameter_defaults = dict(parameter_defaults or {})
        self.labels = list(labels) if labels is not None else None

    def __repr__(self) -> str:
        return f"CronClock({self.cron!r}, {self.timezone!r})"

    def describe(self) -> str:
        """``cron '0 9 * * 1-5' Europe/Berlin``."""
        return f"cron '{self.cron}' {self.timezone}" + ("" if self.day_or else " (day AND weekday)")

    def events(self, after: datetime, number: int = 0) -> Iterable[_Event]:
        """This clock's times strictly after ``after`` (CronClock.events, C:275-356)."""
        pendulum_zone = _pendulum_view(self.timezone)
        after_instant = pendulum_zone.pendulum_instant(_as_naive_utc(after))
        after_wall = pendulum_zone.to_local(after_instant)
        if self.start_wall is not None:
            # max(after, start - 1 s), compared by wall clock (one pendulum tzinfo).
            before_start = pendulum_zone.localize_pendulum(self.start_wall) - timedelta(seconds=1)
            if pendulum_zone.to_local(before_start) > after_wall:
                after_instant = pendulum_zone.pendulum_instant(before_start)
                after_wall = pendulum_zone.to_local(after_instant)
        end = pendulum_zone.localize_pendulum(self.end_wall) if self.end_wall is not None else None
        start = _pytz_view(self.timezone).localize_pytz(after_wall)
        if after_wall.microsecond:
            start += timedelta(seconds=1)  # Prefect rounds up, croniter floors (C:314)
        for instant in self._instants(_timestamp(start), after_instant):
            if end is not None and instant > end:
                return
            yield _Event(instant, pendulum_zone.to_local(instant), self.timezone, number)

    def _instants(self, start: float, after: datetime) -> Iterable[datetime]:
        pytz_zone, pendulum_zone = _pytz_view(self.timezone), _pendulum_view(self.timezone)
        cron = _Croniter(self.fields, start, pytz_zone, day_or=self.day_or)
        given: set[datetime] = set()
        for _ in range(_CLOCK_EVENT_LIMIT):
            instant = pendulum_zone.localize_pendulum(cron.get_next())
            stuck, seen = 0, set()  # type: int, set[tuple[bool, float, float]]
            last_one = False
            while instant == after or instant in given:
                instant = pendulum_zone.localize_pendulum(cron.get_next())
                stuck += 1
                if stuck > _CLOCK_EVENT_LIMIT:
                    raise ValueError(f"cron expression {self.cron!r} repeats times near {instant} UTC")
                if stuck == 3:
                    # Prefect: "stuck in a DST loop", so a new croniter with pendulum's tzinfo.
                    after = instant
                    cron = _Croniter(self.fields, _timestamp(instant), pendulum_zone, day_or=self.day_or, pendulum=True)
                    instant = pendulum_zone.localize_pendulum(cron.get_next())
                    last_one = instant in given
                elif stuck > 3:
                    position = (cron.pendulum, cron.current, cron.dst_start)
                    if position in seen:
                        # Prefect 1.4.1 would loop here forever: go on after the last time given.
                        cron = _Croniter(self.fields, _timestamp(max(given)), pytz_zone, day_or=self.day_or)
                        stuck, seen, last_one = 0, set(), False
                    seen.add(position)
            given.add(instant)
            yield instant
            if last_one:
                return

    def to_prefect(self) -> dict[str, Any]:
        """This clock as Prefect 1.4.1's ClockSchema writes it."""
        start = self.start_wall
        if start is None and self.timezone != "UTC":
            start = datetime(2000, 1, 1)  # Prefect takes a cron clock's zone only from its start date
        return {
            "type": self.kind, "cron": self.cron, "day_or": self.day_or,
            "start_date": _prefect_time(start, self.timezone), "end_date": _prefect_time(self.end_wall, self.timezone),
            "parameter_defaults": dict(self.parameter_defaults), "labels": self.labels, "__version__": CORE_VERSION,
        }


class IntervalClock:
    """Fire every ``every`` from an anchor time, as Prefect 1.x's IntervalClock."""

    kind = "IntervalClock"

    def __init__(
        self,
        every: timedelta | float,
        *,
        anchor: datetime | None = None,
        timezone: str | None = None,
        end: datetime | None = None,
        parameter_defaults: Mapping[str, Any] | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        self.every = every if isinstance(every, timedelta) else timedelta(seconds=every)
        if not timedelta(0) < self.every <= _LONGEST_INTERVAL:
            raise ValueError("an interval must be longer than 0 s and at most 100 years")
        zone_of_anchor = getattr(anchor.tzinfo, "key", None) if anchor is not None else None
        self.timezone = _check_timezone(timezone or zone_of_anchor or "UTC")
        self.anchor_wall = _wall_time(anchor, self.timezone)
        if self.anchor_wall is None and self.timezone != "UTC":
            self.anchor_wall = _INTERVAL_DEFAULT_START  # so that the zone is in the schedule JSON
        self.end_wall = _wall_time(end, self.timezone)
        self.parameter_defaults = dict(parameter_defaults or {})
        self.labels = list(labels) if labels is not None else None

    def __repr__(self) -> str:
        return f"IntervalClock({self.every!r}, {self.timezone!r})"

    def describe(self) -> str:
        """``every 1 h 30 min from 2026-01-01 08:15:00 America/New_York``."""
        text = f"every {_duration_text(self.every.total_seconds())}"
        if self.anchor_wall not in (None, _INTERVAL_DEFAULT_START):
            text += f" from {self.anchor_wall:%Y-%m-%d %H:%M:%S} {self.timezone}"
        return text

    def events(self, after: datetime, number: int = 0) -> Iterable[_Event]:
        """This clock's times from ``after`` on (IntervalClock.events, C:163-216)."""
        zone = _pendulum_view(self.timezone)
        if self.anchor_wall is None:
            start_wall = start = _INTERVAL_DEFAULT_START
        else:
            start = zone.localize_pendulum(self.anchor_wall)
            start_wall = zone.to_local(start)
        end = zone.localize_pendulum(self.end_wall) if self.end_wall is not None else None
        after_instant = _as_naive_utc(after)
        interval = self.every.total_seconds()
        skip = _seconds(after_instant - start) / interval
        skip = 0 if skip < 0 else (skip + 1 if int(skip) == skip else int(skip + 1))
        offset = self.every * skip
        while True:
            # An offset of a day or more is added to the wall clock, a shorter one to the instant.
            days, seconds = offset.days, offset.total_seconds() - offset.days * 86400
            if days:
                instant = zone.localize_pendulum(_pendulum_add(start_wall, days, seconds))
            else:
                instant = zone.pendulum_instant(_pendulum_add(start, 0, seconds))
            offset += self.every
            if instant < after_instant:  # not <=: Prefect lets a time equal to after through (C:203)
                continue
            if end is not None and instant > end:
                return
            yield _Event(instant, zone.to_local(instant), self.timezone, number)

    def to_prefect(self) -> dict[str, Any]:
        """This clock as Prefect 1.4.1's ClockSchema writes it."""
        return {
            "type": self.kind, "interval": self.every // timedelta(microseconds=1),
            "start_date": _prefect_time(self.anchor_wall, self.timezone),
            "end_date": _prefect_time(self.end_wall, self.timezone),
            "parameter_defaults": dict(self.parameter_defaults), "labels": self.labels, "__version__": CORE_VERSION,
        }


def _pendulum_add(moment: datetime, days: int, seconds: float) -> datetime:
    """pendulum.helpers.add_duration for days and seconds: its carrying, float rounding and all."""
    minutes = hours = 0.0
    if abs(seconds) > 59:
        sign = int(math.copysign(1, seconds))
        minutes, seconds = (value * sign for value in divmod(seconds * sign, 60))
    if abs(minutes) > 59:
        sign = int(math.copysign(1, minutes))
        hours, minutes = (value * sign for value in divmod(minutes * sign, 60))
    if abs(hours) > 23:
        sign = int(math.copysign(1, hours))
        extra_days, hours = (value * sign for value in divmod(hours * sign, 24))
        days += int(extra_days)
    return moment + timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def _wall_time(moment: datetime | None, zone_name: str) -> datetime | None:
    """An aware time as the wall clock of ``zone_name`` shows it; a naive one is that already."""
    if moment is None or moment.tzinfo is None:
        return moment
    return moment.astimezone(_zoneinfo(zone_name)).replace(tzinfo=None)


def _prefect_time(wall: datetime | None, zone_name: str) -> dict[str, str] | None:
    """Prefect's DateTimeTZ JSON: the naive wall time and the zone's name."""
    return None if wall is None else {"dt": wall.isoformat(), "tz": zone_name}


class Schedule:
    """Clocks whose merged times are when a flow runs, as Prefect 1.x's Schedule."""

    def __init__(self, clocks: Sequence[CronClock | IntervalClock]) -> None:
        if not clocks:
            raise ValueError("a schedule needs at least one clock")
        self.clocks = list(clocks)

    def __repr__(self) -> str:
        return f"Schedule({self.clocks!r})"

    def describe(self) -> str:
        """Each clock in words, ``; `` between them."""
        return "; ".join(clock.describe() for clock in self.clocks)

    def next(self, n: int, after: datetime | None = None) -> list[ClockEvent]:
        """The next ``n`` times after ``after`` (default: now), as Prefect's ``Schedule.next``."""
        import heapq

        after = after or _utcnow()
        merged = heapq.merge(*(clock.events(after, number) for number, clock in enumerate(self.clocks)))
        events: list[ClockEvent] = []
        previous: tuple[_Event, ClockEvent] | None = None
        for event in merged:
            clock = self.clocks[event.clock]
            found = ClockEvent(event.instant.replace(tzinfo=timezone.utc), clock.parameter_defaults, clock.labels)
            if previous is not None and previous[0].same_time(event) and previous[1][1:] == found[1:]:
                continue  # Prefect drops an event equal to the one before (S:143)
            previous = (event, found)
            events.append(found)
            if len(events) >= min(n, _SCHEDULE_EVENT_LIMIT):
                break
        return events

    def to_prefect(self) -> dict[str, Any]:
        """This schedule as Prefect 1.4.1's ScheduleSchema writes it (the flow JSON's ``schedule``)."""
        return {
            "clocks": [clock.to_prefect() for clock in self.clocks], "filters": [], "not_filters": [],
            "or_filters": [], "adjustments": [], "__version__": CORE_VERSION,
        }

    @classmethod
    def from_prefect(cls, data: Mapping[str, Any]) -> Schedule:
        """Read Prefect 1.x schedule JSON (a flow's or a Server flow group's); ValueError if unusable."""
        if not isinstance(data, Mapping) or not isinstance(data.get("clocks"), list):
            raise ValueError("a schedule is an object with a list of clocks")
        for key in ("filters", "or_filters", "not_filters", "adjustments"):
            if data.get(key):
                raise ValueError(f"schedules with {key} are not supported; use cron expressions instead")
        return cls([_clock_from_prefect(clock) for clock in data["clocks"]])


def _clock_from_prefect(data: Any) -> CronClock | IntervalClock:
    if not isinstance(data, Mapping):
        raise ValueError("a clock is an object")
    zone, start = _from_prefect_time(data.get("start_date"))
    _, end = _from_prefect_time(data.get("end_date"))
    if not isinstance(data.get("parameter_defaults") or {}, Mapping):
        raise ValueError("a clock's parameter_defaults is an object")
    labels = data.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(label, str) for label in labels)):
        raise ValueError("a clock's labels are a list of strings")
    common: dict[str, Any] = {
        "end": end, "parameter_defaults": data.get("parameter_defaults") or {}, "labels": data.get("labels"),
    }
    if data.get("type") == "CronClock":
        day_or = data.get("day_or")
        return CronClock(str(data.get("cron")), zone, start=start, day_or=True if day_or is None else bool(day_or),
                         **common)
    if data.get("type") == "IntervalClock":
        interval = data.get("interval")
        if not isinstance(interval, int) or not 0 < interval <= _LONGEST_INTERVAL // timedelta(microseconds=1):
            raise ValueError("an IntervalClock's interval is a whole number of microseconds, up to 100 years")
        return IntervalClock(timedelta(microseconds=interval), anchor=start, timezone=zone, **common)
    raise ValueError(f"clocks of type {data.get('type')!r} are not supported; use CronClock or IntervalClock")


def _from_prefect_time(data: Any) -> tuple[str, datetime | None]:
    """A DateTimeTZ JSON value as (zone name, naive wall time); no value is UTC and no time."""
    if data is None:
        return "UTC", None
    if not isinstance(data, Mapping) or not isinstance(data.get("dt"), str):
        raise ValueError("a clock's date is an object with 'dt' and 'tz'")
    zone = _check_timezone(str(data.get("tz") or "UTC"))
    moment = datetime.fromisoformat(data["dt"])
    return zone, _wall_time(moment, zone)


# --- 6. Flow storage ---------------------------------------------------------------------
#
# Flows are pickled with the stdlib into ``<directory>/<slug>.prefect``, Local storage's
# layout since Prefect 0.7. Functions and classes defined in a ``__main__`` script are
# stored by reference to that script's file, since the flow-run process has a different
# ``__main__``; the script must guard its side effects with ``if __name__ == "__main__":``.
# Every function here is given its directory: this section reads no settings.

_QUOTES = re.compile(r"'+")
_DISALLOWED = re.compile(r"[^-a-zA-Z0-9]+")
_DASHES = re.compile(r"-{2,}")
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_ENTITIES = re.compile(r"&(#x[0-9a-fA-F]+|#\d+|[A-Za-z][A-Za-z0-9]*);")
# What unidecode gives for the common Latin letters that have no decomposition.
_TRANSLITERATIONS = {
    "ß": "ss", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "œ": "oe", "Œ": "OE", "đ": "d",
    "Đ": "D", "ł": "l", "Ł": "L", "þ": "th", "Þ": "TH", "ð": "d", "Ð": "D", "ı": "i",
}




def _file_digest(path: str) -> str:
    """A digest of a file's bytes ("" when it cannot be read)."""
    try:
        return _short_hash(Path(path).read_bytes())
    except OSError:
        return ""


def _short_hash(data: bytes) -> str:
    """A short stable digest for names (not security): CRC-32 and length, in hex.

    hashlib would load OpenSSL, 3 MB more in every process, for names that need no strength.
    """
    return f"{zlib.crc32(data):08x}{len(data) & 0xFFFF:04x}"


def _transliterate(text: str) -> str:
    """Approximate unidecode for Latin text: drop accents, spell out ligatures."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(
        _TRANSLITERATIONS.get(char, char) for char in decomposed if not unicodedata.combining(char)
    )


def _decode_entity(match: re.Match[str]) -> str:
    from html.entities import name2codepoint  # a large table, for names only

    body = match.group(1)
    try:
        if body.startswith("#x"):
            return chr(int(body[2:], 16))
        if body.startswith("#"):
            return chr(int(body[1:]))
        return chr(name2codepoint[body]) if body in name2codepoint else match.group(0)
    except (ValueError, OverflowError):
        return match.group(0)


def slugify(name: str) -> str:
    """Make a file-name slug the way python-slugify does (``My Flow! v1`` → ``my-flow-v1``)."""
    text = _QUOTES.sub("-", name)
    text = _transliterate(text)
    text = _ENTITIES.sub(_decode_entity, text)
    text = _transliterate(unicodedata.normalize("NFKD", text)).lower()
    text = _QUOTES.sub("", text)
    text = _DIGIT_COMMA.sub("", text)
    text = _DASHES.sub("-", _DISALLOWED.sub("-", text)).strip("-")
    if not text:  # a name with no Latin letters or digits: keep it unique all the same
        text = "flow-" + _short_hash(name.encode("utf-8"))
    return text


def _lookup(owner: Any, qualname: str) -> Any:
    """Follow a dotted ``qualname`` from ``owner``; None when any step is missing."""
    node = owner
    for part in qualname.split("."):
        node = getattr(node, part, None)
    return node


def _main_script() -> str:
    """The file of the running ``__main__`` script, for objects defined in it."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if not isinstance(main_file, str) or not os.path.isfile(main_file):
        raise FlowStorageError(
            "this flow is defined in an interactive session or from standard input, which the "
            "flow-run process cannot import: define it in a .py file and store it from there"
        )
    return os.path.abspath(main_file)


def _reference_to(module: str, qualname: str, what: str) -> tuple[Any, ...]:
    """A pickle reduction that imports ``module.qualname`` (a script file for ``__main__``)."""
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise FlowStorageError(
            f"{what!r} uses {qualname}, a lambda or nested function, which cannot be stored: "
            "define it with `def` at the top level of a module"
        )
    script = _main_script() if module == "__main__" else ""
    return (_import_object, (module, qualname, script))


def _import_object(module: str, qualname: str, script: str = "") -> Any:
    """Import ``qualname`` from a module, or from a script file that was ``__main__``."""
    target = _import_script(script) if script else importlib.import_module(module)
    found = _lookup(target, qualname)
    if found is None:
        place = script or module
        raise FlowStorageError(f"{qualname} is no longer defined in {place}; store the flow again")
    return found


def _import_script(path: str) -> Any:
    """Import a script file once per process under a private name, so its guard holds."""
    name = "_local_agent_script_" + _short_hash(path.encode("utf-8"))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not os.path.isfile(path):
        raise FlowStorageError(f"the flow's script {path} does not exist on this host")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    _IMPORTING_SCRIPTS.append(path)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        _IMPORTING_SCRIPTS.pop()
    return module


#: The scripts being imported to load a flow from, innermost last. A script that deploys or
#: runs something at import time lacks its ``__main__`` guard: see _refuse_when_importing.
_IMPORTING_SCRIPTS: list[str] = []


def _refuse_when_importing(what: str) -> None:
    """Stop a flow's script that calls ``what`` while the flow-run process imports it.

    Without ``if __name__ == "__main__":`` the script's deploy and run calls would run again in
    every flow-run process (a new run each time, an agent inside the run); say how to fix it.
    """
    if _IMPORTING_SCRIPTS:
        raise FlowStorageError(
            f"the flow's script {_IMPORTING_SCRIPTS[-1]} calls {what} when it is imported: guard the script's "
            'side effects with `if __name__ == "__main__":`'
        )


def _flow_name(obj: Any) -> str:
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name.strip():
        raise FlowStorageError(f"{obj!r} has no `name`; only objects with a name can be stored")
    return name


def store_flow(obj: Any, directory: str | os.PathLike[str]) -> str:
    """Pickle any named object to ``<directory>/<slug(name)>.prefect``; return the path."""
    import pickle

    _refuse_when_importing("store_flow()")
    name = _flow_name(obj)
    folder = Path(directory).expanduser().absolute()
    buffer = io.BytesIO()
    try:
        _script_aware_pickler(buffer).dump(obj)
    except FlowStorageError:
        raise
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise FlowStorageError(
            f"flow {name!r} cannot be stored: {_one_line(str(exc))}; define its functions and "
            "classes at the top level of a module or script"
        ) from None
    path = folder / (slugify(name) + ".prefect")
    names = _stored_names(folder)
    if names.get(path.name, name) != name:
        raise FlowStorageError(
            f"cannot store flow {name!r}: {path} holds flow {names[path.name]!r}, whose name gives the same "
            "file name; rename one of the two flows"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_bytes(buffer.getvalue())
        os.replace(temporary, path)  # readers never see half a file
        if path.name not in names:
            _write_json_atomically(folder / _NAMES_FILE, {**names, path.name: name})
    except OSError as exc:
        raise FlowStorageError(f"cannot write flow file {path}: {exc.strerror or exc}") from None
    return str(path)


#: Beside the flow files: which flow each file holds, so two names with one slug never share a file.
_NAMES_FILE = ".flow-names.json"


def _stored_names(folder: Path) -> dict[str, str]:
    """File name -> flow name of the flows stored in ``folder`` (files stored before the index: unknown)."""
    try:
        names = json.loads((folder / _NAMES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(key): str(value) for key, value in names.items()} if isinstance(names, dict) else {}


def _reduce_main_reference(obj: Any) -> Any:
    """Pickle ``__main__`` functions and classes as imports from their script file."""
    if isinstance(obj, (types.FunctionType, type)) and obj.__module__ == "__main__":
        return _reference_to("__main__", obj.__qualname__, getattr(obj, "__name__", "?"))
    if isinstance(obj, types.FunctionType) and ("<lambda>" in obj.__qualname__ or "<locals>" in obj.__qualname__):
        return _reference_to(obj.__module__, obj.__qualname__, obj.__name__)  # raises, saying why
    return NotImplemented


def _script_aware_pickler(buffer: io.BytesIO) -> pickle.Pickler:
    """A stdlib pickler that stores ``__main__`` objects by reference to their script."""
    import pickle  # see Imports

    class ScriptAwarePickler(pickle.Pickler):
        reducer_override = staticmethod(_reduce_main_reference)

    return ScriptAwarePickler(buffer, protocol=4)


def load_flow(path: str | os.PathLike[str], directory: str | os.PathLike[str]) -> Any:
    """Unpickle a flow file, but only if it lies inside ``directory``."""
    import pickle

    folder = os.path.realpath(directory)
    real = os.path.realpath(path)
    if os.path.commonpath([folder, real]) != folder:
        raise FlowStorageError(
            f"refusing to load {path}: it is outside the storage directory {folder}"
        )
    try:
        data = Path(real).read_bytes()
    except FileNotFoundError:
        raise FlowStorageError(f"flow file {path} does not exist on host {_hostname()}") from None
    except OSError as exc:
        raise FlowStorageError(f"cannot read flow file {path}: {exc.strerror or exc}") from None
    try:
        return pickle.loads(_unwrap_prefect_json(data))
    except ModuleNotFoundError as exc:
        raise FlowStorageError(
            f"flow file {path} needs module {exc.name!r}, which cannot be imported here: run the "
            "agent from that module's directory or add it with -p/--import-path"
        ) from None
    except FlowStorageError:
        raise
    except Exception as exc:  # a corrupt pickle can raise almost anything
        raise FlowStorageError(
            f"flow file {path} is corrupt or unreadable here ({_describe_exception(exc)}); "
            "store the flow again"
        ) from None


def _unwrap_prefect_json(data: bytes) -> bytes:
    """Prefect 0.14.3+ wraps its pickle in JSON ``{"flow": base64}``; unwrap it."""
    if not data.startswith(b"{"):
        return data
    import base64

    wrapped = json.loads(data)
    return base64.b64decode(wrapped["flow"])


def local_storage(flow_name: str, path: str) -> dict[str, Any]:
    """The Local storage JSON for a flow stored at ``path``."""
    return {
        "type": "Local",
        "directory": os.path.dirname(os.path.abspath(path)),
        "flows": {flow_name: os.path.abspath(path)},
        "secrets": [],
        "stored_as_script": False,
        "path": None,
        "__version__": CORE_VERSION,
    }


def _locate_flow_file(flow_name: str, storage: Any, trusted: Sequence[str | os.PathLike[str]],
                      scripts_too: Sequence[str | os.PathLike[str]] = ()) -> tuple[str, str]:
    """Check a run's storage is Local with a file under a ``trusted`` directory; return (path, that directory).

    The directories are the ones the operator named, never the storage's own ``directory``:
    anyone who may register a flow chooses that one. A flow stored as a script (Prefect's
    ``stored_as_script=True``) may also lie under ``scripts_too``: the agent's working
    directory and its import paths, where its operator's code is.
    """
    if not isinstance(storage, Mapping):
        raise FlowStorageError(f"flow {flow_name!r} has no storage; register it with Local storage")
    kind = storage.get("type")
    if kind != "Local":
        raise FlowStorageError(
            f"flow {flow_name!r} uses {kind or 'unknown'} storage; this agent runs only Local storage"
        )
    flows = storage.get("flows")
    path = flows.get(flow_name) if isinstance(flows, Mapping) else None
    if not isinstance(path, str) or not path:
        raise FlowStorageError(
            f"the Local storage of flow {flow_name!r} names no file for it; register it again"
        )
    real_path = os.path.realpath(path)
    places = [*trusted, *scripts_too] if storage.get("stored_as_script") else trusted
    real_dirs = [os.path.realpath(directory) for directory in places]
    home = next((directory for directory in real_dirs if os.path.commonpath([directory, real_path]) == directory), "")
    if not home:
        raise UntrustedFlowError(
            f"flow file {path} is not under a directory this agent loads flows from "
            f"({', '.join(real_dirs)}): store the flow there, or add its directory with --flows-dir "
            "(setting cloud.agent.flow_dirs)" + (" or -p/--import-path" if storage.get("stored_as_script") else "")
        )
    if not os.path.isfile(real_path):
        raise FlowStorageError(
            f"flow file {path} does not exist on host {_hostname()}: store the flow on this machine "
            "or run the agent where it was stored"
        )
    return real_path, home


def _private_open(path: str | os.PathLike[str], mode: str = "w") -> IO[Any]:
    """Open a file for writing that only this user may read (0600 whatever the umask): run output,
    ledgers, spools and databases hold parameters and output before redaction."""
    flags = os.O_WRONLY | os.O_CREAT | {"w": os.O_TRUNC, "wb": os.O_TRUNC, "a": os.O_APPEND, "a+": os.O_APPEND}[mode]
    if mode == "a+":
        flags = (flags & ~os.O_WRONLY) | os.O_RDWR
    return open(os.open(path, flags, 0o600), mode, encoding=None if "b" in mode else "utf-8")


def _private_dirs(top: Path, path: Path) -> None:
    """Make ``path`` and the missing directories between it and ``top`` (``top`` too), each 0700."""
    for directory in [*reversed(path.relative_to(top).parents), path.relative_to(top)]:
        (top / directory).mkdir(mode=0o700, exist_ok=True)


def _write_json_atomically(path: Path, data: Any) -> None:
    """Write JSON so that a reader sees the old file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with _private_open(temporary) as handle:
            handle.write(json.dumps(data))
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)  # a half-written copy would only hold the space a full disk lacks
        raise


# --- 7. Backends: the interface ----------------------------------------------------------


class Launch(NamedTuple):
    """How to start a run whose API says itself how it is run (a Prefect 2/3 job configuration),
    instead of this agent loading a stored flow."""

    #: The whole command, or () for ``<--python> -m <module>``.
    command: tuple[str, ...]
    module: str
    #: Variables on top of the agent's environment and ``--env`` (the run's job, then the API's own).
    env: dict[str, str]
    cwd: str | None
    #: The module ``--python`` must have to run it (checked before claiming).
    needs: str
    #: The variables that give the process the port and token of the agent's _StopChannel, where
    #: it hears why it is about to be stopped (empty: it is not told).
    intent_variables: tuple[str, ...] = ()
    #: Whether ``-f`` shows its output (it is kept and logged either way).
    show_output: bool = True


class FlowRun:
    """A flow run as the agent and the flow-run process see it, from any backend."""

    def __init__(
        self,
        *,
        id: str,
        version: int,
        state: str,
        serialized_state: dict[str, Any],
        flow_id: str,
        flow_name: str,
        storage: Any = None,
        parameters: dict[str, Any] | None = None,
        name: str = "",
        labels: list[str] | None = None,
        scheduled_start_time: datetime | None = None,
        state_message: str | None = None,
        updated: datetime | None = None,
        run_config: Any = None,
        began: datetime | None = None,
        ended: datetime | None = None,
    ) -> None:
        self.id, self.version, self.state, self.serialized_state = id, version, state, serialized_state
        #: When it first went Running, and when it ended (None until then), as the API recorded.
        self.began, self.ended = began, ended
        self.flow_id, self.flow_name, self.storage = flow_id, flow_name, storage
        self.parameters = parameters if parameters is not None else {}
        self.name, self.labels = name, labels if labels is not None else []
        self.scheduled_start_time, self.state_message, self.updated = scheduled_start_time, state_message, updated
        #: The flow's run config (Prefect's JSON: ``{"type": "LocalRun", "env": ..., ...}``), or None.
        self.run_config = run_config
        #: Why this row cannot be run as it stands (a malformed API answer), or "".
        self.problem = ""
        #: Set when the API describes how to start it (Prefect 2/3); None: the agent runs its stored flow.
        self.launch: Launch | None = None

    def __repr__(self) -> str:
        return f"FlowRun(id={self.id!r}, flow_name={self.flow_name!r}, state={self.state!r}, version={self.version})"

    @property
    def start_time(self) -> datetime:
        """When the run is due: its state's start time, else its scheduled start time."""
        return _state_start_time(self.serialized_state) or self.scheduled_start_time or _utcnow()


class FlowSummary(NamedTuple):
    """A registered flow, for listings and for creating runs by name."""

    id: str
    name: str
    version: int
    project: str
    labels: list[str]
    storage: Any
    #: Its declared parameters, as Prefect serializes Parameter tasks; its run config.
    parameters: Any = None
    run_config: Any = None
    #: Its schedule as Prefect's JSON (the flow group's, else the flow's), and whether it is on.
    schedule: Any = None
    schedule_active: bool = False
    #: Server's id of all the flow's versions (the embedded database has none).
    flow_group_id: str = ""


class LogLine(NamedTuple):
    """One line of a run's log."""

    timestamp: str
    level: str
    name: str
    message: str


def _format_log_line(line: LogLine) -> str:
    """A log line as people read it: local time to the millisecond, level, logger, message."""
    try:
        stamp = _parse_time(line.timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    except ValueError:
        stamp = line.timestamp
    return f"[{stamp}] {line.level} - {line.name} | {line.message}"


def _label_mismatch(run_labels: Sequence[str], agent_labels: Sequence[str]) -> str:
    """Why an agent with ``agent_labels`` may not take a run with ``run_labels`` ("" if it may).

    Server's rule: a run's labels must all be the agent's; an unlabeled run only fits an
    unlabeled agent.
    """
    if not run_labels:
        return "it has no labels, and only an agent with no labels takes such a run" if agent_labels else ""
    missing = [label for label in run_labels if label not in agent_labels]
    if missing:
        flags = " ".join(f"-l {label}" for label in missing)
        return f"the agent lacks label(s) {', '.join(missing)} (start it with {flags})"
    return ""


def labels_match(run_labels: Sequence[str], agent_labels: Sequence[str]) -> bool:
    """Whether an agent with ``agent_labels`` may take a run with ``run_labels`` (Server's rule)."""
    return not _label_mismatch(run_labels, agent_labels)


class Backend:
    """The operations the agent, the flow-run process and the commands need from an API.

    ``GraphQLBackend`` speaks to Prefect Server / Cloud 1.x, ``SQLiteBackend`` keeps the
    same records in one SQLite file, ``RESTBackend`` serves a Prefect 2/3 work pool. All are
    safe to share between threads.
    """

    #: A short description for log lines, e.g. ``Prefect API at http://host:4200``.
    location = ""
    #: How long before a run's start the agent claims it, so a slow claim still launches on time.
    claim_lead_seconds = 0.0
    #: Whether the API says how its runs are started (``FlowRun.launch``), as Prefect 2/3 does.
    launches_runs = False

    def connect(self, agent_name: str, labels: Sequence[str]) -> str:
        """Register the agent and check the API answers; return the agent id."""
        raise NotImplementedError

    def get_runs_in_queue(self, labels: Sequence[str], before: datetime) -> list[str]:
        """Ids of runs due by ``before`` whose labels are all among ``labels``."""
        raise NotImplementedError

    def get_flow_runs(self, run_ids: Sequence[str]) -> list[FlowRun]:
        """Metadata of those of ``run_ids`` that are still waiting to be run."""
        raise NotImplementedError

    def get_flow_run(self, run_id: str) -> FlowRun | None:
        """One run with its flow, whatever its state; None when there is no such run."""
        raise NotImplementedError

    def set_flow_run_state(
        self, run_id: str, state: Mapping[str, Any], version: int | None
    ) -> None:
        """Write a state; raise StateUpdateFailed when another writer won."""
        raise NotImplementedError

    def claim_flow_runs(self, claims: Sequence[tuple[FlowRun, Mapping[str, Any]]]) -> list[int | None]:
        """Write each run's Submitted state at the version read; per run, its new version or
        None if another writer won. An error that is not a lost race is raised."""
        versions: list[int | None] = []
        for run, submitted in claims:
            try:
                self.set_flow_run_state(run.id, submitted, run.version)
                versions.append(run.version + 1)
            except StateUpdateFailed:
                versions.append(None)
        return versions

    def write_run_logs(self, logs: Sequence[Mapping[str, Any]]) -> None:
        """Append log lines (``flow_run_id``, ``timestamp``, ``level``, ``name``, ``message``)."""
        raise NotImplementedError

    def get_task_runs(self, run_id: str) -> dict[str, tuple[str, int]]:
        """The run's task runs that the API made when it made the run: task slug -> (id, version)."""
        return {}

    def set_task_run_state(self, task_run_id: str, state: Mapping[str, Any], version: int | None) -> None:
        """Write a task run's state."""

    def heartbeat(self, run_id: str) -> None:
        """Tell the API this run's process is alive."""
        raise NotImplementedError

    def record_process(self, run_id: str, pid: int) -> None:
        """Tell the API which process runs a run (where it keeps that: Prefect 2/3's ``infrastructure_pid``)."""

    def keep_alive(self) -> None:
        """Called every round of the agent's loop: send the agent's own heartbeat when one is due."""

    def routing_reasons(self, run: FlowRun) -> list[str] | None:
        """Why the API's own routing keeps a run from this backend's agent (pools, queues); None
        when the API routes by labels, which the agent's rule explains."""
        return None

    def ensure_project(self, name: str) -> str:
        """The id of the project with this name, created if needed."""
        raise NotImplementedError

    def register_flow(self, project_id: str, serialized_flow: Mapping[str, Any]) -> str:
        """Register a serialized flow (a new version of one with the same name); its id."""
        raise NotImplementedError

    def find_flow(self, name: str) -> FlowSummary | None:
        """The newest version of the flow with this name, or None."""
        raise NotImplementedError

    def create_flow_run(
        self,
        flow_id: str,
        *,
        parameters: Mapping[str, Any],
        labels: Sequence[str] | None,
        scheduled_start_time: datetime | None,
        idempotency_key: str,
        name: str | None = None,
    ) -> str:
        """Create a Scheduled run of a flow; its id."""
        raise NotImplementedError

    def list_flows(self) -> list[FlowSummary]:
        """Every registered flow's newest version, by name."""
        raise NotImplementedError

    def list_flow_runs(
        self,
        *,
        flow_name: str | None = None,
        state: str | None = None,
        run_ids: Sequence[str] | None = None,
        limit: int = 20,
        offset: int = 0,
        search: str | None = None,
        attention_first: bool = False,
    ) -> list[FlowRun]:
        """Runs, newest scheduled first, optionally of one flow, in one state, by id, or whose
        name, id or flow name contains ``search``; ``offset`` skips that many (for paging).
        ``attention_first``: those under way first, then the newest, then the upcoming, soonest
        first, where the backend can order so (the embedded one)."""
        raise NotImplementedError

    def get_run_logs(self, run_id: str, offset: int = 0, limit: int | None = None) -> list[LogLine]:
        """A run's log lines in the order they were written, from ``offset`` on (at most ``limit``)."""
        raise NotImplementedError

    def count_run_logs(self, run_id: str) -> int:
        """How many log lines a run has."""
        return len(self.get_run_logs(run_id))

    def get_state_history(self, run_id: str) -> list[tuple[str, str, str]]:
        """A run's states, oldest first: (state, message, timestamp)."""
        raise NotImplementedError

    def delete_flow_run(self, run_id: str) -> bool:
        """Delete a run with its states and logs; False if there was none."""
        raise NotImplementedError

    def archive_flow(self, flow_id: str) -> None:
        """Archive a flow version as Server does: it cannot be run, its Scheduled runs are cancelled."""
        raise NotImplementedError

    def set_schedule(self, flow: FlowSummary, schedule: Schedule) -> None:
        """Give a flow (all its versions) this schedule and turn it on, as Server's flow-group schedule."""
        raise NotImplementedError

    def list_agents(self) -> list[dict[str, Any]]:
        """The agents the API knows: ``{id, name, labels, last_queried}``, most recently heard first."""
        return []

    def set_schedule_active(self, flow: FlowSummary, active: bool) -> bool:
        """Turn a flow's schedule on (runs are created at once) or off (its future runs are deleted);
        False when there is no schedule to turn on."""
        raise NotImplementedError

    def top_up_schedules(self, now: datetime, flow_id: str | None = None) -> datetime | None:
        """Create the next runs of every active schedule (or one flow's); when to do it again
        (None: the API does it)."""
        return None

    def cancel_flow_run(self, run_id: str) -> str:
        """Ask for a run to be cancelled; return its new state."""
        raise NotImplementedError

    def wait_for_change(self, timeout: float, wake: threading.Event) -> bool:
        """Sleep up to ``timeout`` s or until ``wake``; True if new work may have arrived."""
        wake.wait(timeout)
        return False

    def close(self) -> None:
        """Release connections."""


def _retry_api(call: Callable[[], _T], patience: float) -> _T:
    """Call the API, retrying transient failures for up to ``patience`` seconds."""
    deadline, delay = time.monotonic() + patience, 0.5
    while True:
        try:
            return call()
        except APIError as exc:
            if not exc.transient or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 4.0)


def _expect(value: Any, kind: type[_T] | tuple[type, ...], what: str) -> _T:
    """Return ``value`` if it has the expected type, else raise a malformed-answer error."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise APIError(f"malformed API answer: {what} is {type(value).__name__}, not as expected")
    return value  # type: ignore[return-value]


def _json_field(value: Any) -> Any:
    """Hasura returns JSON columns as objects; some proxies as strings. Accept both."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


# --- 7a. Backends: Prefect Server / Cloud 1.x over GraphQL -------------------------------
#
# The documents below are the ones Prefect 1.x clients send (snake_case dialect). Queries
# whose arguments Prefect renders inline keep them inline, with values quoted by json.dumps.

def _mutation(root: str, selection: str) -> str:
    """A mutation in the shape Prefect 1.x sends: ``<root>`` called with ``$input: <root>_input!``."""
    return f"mutation($input: {root}_input!) {{\n    {root}(input: $input) {{\n        {selection}\n    }}\n}}"


_TENANT_QUERY = "query {\n    tenant {\n        id\n    }\n}"
_AUTH_INFO_QUERY = "query {\n    auth_info {\n        tenant_id\n    }\n}"
_HELLO_QUERY = "query {\n    hello\n}"
_REGISTER_AGENT = _mutation("register_agent", "id")
_GET_RUNS_IN_QUEUE = _mutation("get_runs_in_queue", "flow_run_ids")
# Prefect 1.4.1's agent takes Scheduled runs here; ours also takes Retrying ones (its flows'
# retries, see _retry_if_due): both are in Server's queue of Scheduled-family states.
_FLOW_RUN_METADATA = """query {
    flow_run(where: { id: { _in: %(ids)s }, _or: [{ state: { _in: ["Scheduled", "Retrying"] } },
             { state: { _eq: "Running" }, task_runs: { state_start_time: { _lte: %(now3)s } } }] }) {
        id
        version
        state
        serialized_state
        parameters
        scheduled_start_time
        run_config
        name
        flow {
            environment
            name
            core_version
            version
            id
            storage
        }
        task_runs(where: { state_start_time: { _lte: %(now3)s } }) {
            version
            id
            serialized_state
            task_id
        }
    }
}"""
_RUN_FIELDS = """id
        name
        version
        state
        state_message
        serialized_state
        parameters
        labels
        scheduled_start_time
        updated
        start_time
        end_time
        flow {
            id
            name
            storage
        }"""
_FLOW_RUN_BY_PK = "query {\n    flow_run_by_pk(id: %s) {\n        " + _RUN_FIELDS + "\n    }\n}"
_FLOW_RUN_LIST = "query {\n    flow_run(%s) {\n        " + _RUN_FIELDS + "\n    }\n}"
_CLAIM_VIEW = """query {
    flow_run(where: { id: { _in: %s } }) {
        id
        state
        version
        states {
            id
            state
            timestamp
            serialized_state
        }
    }
}"""
_SET_FLOW_RUN_STATES = _mutation(
    "set_flow_run_states", "states {\n            id\n            status\n            message\n        }"
)
_WRITE_RUN_LOGS = _mutation("write_run_logs", "success")
_STATE_HISTORY = """query {
    flow_run_state(where: { flow_run_id: { _eq: %s } }, order_by: [{ timestamp: asc }, { id: asc }]) {
        state
        message
        timestamp
    }
}"""
_HEARTBEAT = """mutation {
    update_flow_run_heartbeat(input: { flow_run_id: %s }) {
        success
    }
}"""
_PROJECT_QUERY = "query {\n    project(where: { name: { _eq: %s } }) {\n        id\n    }\n}"
_CREATE_PROJECT = _mutation("create_project", "id")
_CREATE_FLOW = _mutation("create_flow_from_compressed_string", "id")
_FLOW_FIELDS = """id
        name
        version
        storage
        parameters
        run_config
        environment
        schedule
        is_schedule_active
        flow_group_id
        flow_group {
            schedule
        }
        project {
            name
        }"""
_AGENT_LIST = "query {\n    agent(order_by: { last_queried: desc_nulls_last }, limit: 100) {\n        id\n" \
              "        name\n        labels\n        last_queried\n    }\n}"
_SET_SCHEDULE_ACTIVE = _mutation("set_schedule_active", "success")
_SET_SCHEDULE_INACTIVE = _mutation("set_schedule_inactive", "success")
_SET_FLOW_GROUP_SCHEDULE = _mutation("set_flow_group_schedule", "success")
#: Server refuses interval clocks shorter than this (Prefect's IntervalClockSchema).
_SERVER_SHORTEST_INTERVAL = timedelta(minutes=1)
_FLOW_LIST = "query {\n    flow(%s) {\n        " + _FLOW_FIELDS + "\n    }\n}"
_CREATE_FLOW_RUN = _mutation("create_flow_run", "id")
_LOG_QUERY = """query {
    log(where: { flow_run_id: { _eq: %s } }, order_by: [{ timestamp: asc }, { id: asc }], offset: %d) {
        timestamp
        level
        name
        message
    }
}"""
_CANCEL_FLOW_RUN = _mutation("cancel_flow_run", "state")
_DELETE_FLOW_RUN = _mutation("delete_flow_run", "success")
_ARCHIVE_FLOW = _mutation("archive_flow", "success")
_TASK_RUNS = """query {
    flow_run_by_pk(id: %s) {
        task_runs(where: { map_index: { _eq: -1 } }) {
            id
            version
            task {
                slug
            }
        }
    }
}"""
_SET_TASK_RUN_STATES = _mutation(
    "set_task_run_states", "states {\n            id\n            status\n            message\n        }"
)


_HTTP_CLIENT_LOCK = threading.Lock()


def _http_client(https: bool) -> types.ModuleType:
    """``http.client``; for a plain-http API, imported without ``ssl``: the TLS libraries it
    loads otherwise are about 4 MB of an idle agent's 20. An https API gets them."""
    with _HTTP_CLIENT_LOCK:
        module = sys.modules.get("http.client")
        if module is not None:
            if https and not hasattr(module, "HTTPSConnection"):
                module = importlib.reload(module)  # imported without ssl earlier: with it now
            return module
        if not https and "ssl" not in sys.modules:
            sys.modules["ssl"] = None  # type: ignore[assignment]  # http.client's own `import ssl` fails
            try:
                import http.client
            finally:
                del sys.modules["ssl"]
        import http.client

        return http.client


class _HTTPTransport:
    """Sends JSON over one keep-alive connection per thread (the stdlib ``http.client``)."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self.url = url
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._timeout = timeout
        self._local = threading.local()
        #: Every thread's open connection, so close() leaves none open.
        self._open: set[http.client.HTTPConnection] = set()
        self._open_lock = threading.Lock()

    def post(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        """Send one POST to the URL's path; return (status, body)."""
        return self.request("POST", self._path, body, headers)

    def request(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]) -> tuple[int, bytes]:
        """Send one request; return (status, body). Network trouble is a transient APIError."""
        http_client = _http_client(self._https)

        for attempt in (1, 2):
            connection, reused = self._connection()
            try:
                connection.request(method, path, body, dict(headers))
                response = connection.getresponse()
                data = response.read(MAX_RESPONSE_BYTES + 1)
            except (http_client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._drop()
                # A reused connection the server had already closed: nothing was processed.
                if reused and attempt == 1:
                    continue
                raise APIError(f"lost the connection to {self.url}: {exc}", transient=True) from None
            except (OSError, http_client.HTTPException) as exc:
                self._drop()
                reason = "timed out" if isinstance(exc, TimeoutError) else _describe_exception(exc)
                raise APIError(f"cannot reach the API at {self.url}: {reason}", transient=True) from None
            self._local.last_used = time.monotonic()
            if len(data) > MAX_RESPONSE_BYTES:
                self._drop()
                raise APIError(f"the API at {self.url} sent an answer over {MAX_RESPONSE_BYTES} bytes")
            if response.will_close:
                self._drop()
            return response.status, data
        raise AssertionError("unreachable")

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        http_client = _http_client(self._https)
        connection = getattr(self._local, "connection", None)
        idle = time.monotonic() - getattr(self._local, "last_used", 0.0)
        if connection is not None and idle < KEEPALIVE_IDLE_SECONDS:
            return connection, True
        self._drop()
        if self._https:
            connection = http_client.HTTPSConnection(self._host, self._port, timeout=self._timeout)
        else:
            connection = http_client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        self._local.connection = connection
        with self._open_lock:
            self._open.add(connection)
        return connection, False

    def _drop(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            with self._open_lock:
                self._open.discard(connection)
            connection.close()

    def close(self) -> None:
        """Close every thread's connection (a thread still using one reconnects)."""
        with self._open_lock:
            connections, self._open = self._open, set()
        for connection in connections:
            connection.close()


def _graphql_data(status: int, raw: bytes, api: str) -> dict[str, Any]:
    """Turn an HTTP answer into the GraphQL ``data`` object, or the right error."""
    if status in (401, 403):
        raise AuthError(
            f"the API at {api} refused the token (HTTP {status}): check -t/--token, "
            "PREFECT__CLOUD__API_KEY or the config file"
        )
    transient = status == 429 or status >= 500
    try:
        answer = json.loads(raw)
    except ValueError:
        raise APIError(
            f"the API at {api} answered HTTP {status} with a body that is not JSON", transient=True
        ) from None
    errors = answer.get("errors") if isinstance(answer, dict) else None
    if errors:
        _raise_graphql_errors(errors, status, api)
    if status != 200:
        raise APIError(f"the API at {api} answered HTTP {status}", transient=transient)
    data = answer.get("data") if isinstance(answer, dict) else None
    return _expect(data, dict, "the answer's data")


def _raise_graphql_errors(errors: Any, status: int, api: str) -> None:
    """Map a GraphQL ``errors`` list to AuthError, StateUpdateFailed or APIError."""
    text = str(errors)
    items = errors if isinstance(errors, list) else [errors]
    messages = "; ".join(
        str(item.get("message", item)) if isinstance(item, dict) else str(item) for item in items
    )
    if "UNAUTHENTICATED" in text or "Malformed Authorization header" in text or "FORBIDDEN" in text:
        raise AuthError(f"the API at {api} refused the token: {_one_line(messages)}")
    if "State update failed" in text:
        raise StateUpdateFailed(_one_line(messages))
    transient = "API_ERROR" in text or status == 429 or status >= 500
    prefix = f"the API at {api} rejected the request (HTTP {status})" if status != 200 else "API error"
    raise APIError(f"{prefix}: {_one_line(messages)}", transient=transient)


class GraphQLBackend(Backend):
    """Prefect Server / Cloud 1.x, through the GraphQL documents its own clients send."""

    def __init__(
        self, api: str, token: str = "", *, tenant_id: str = "", timeout: float = REQUEST_TIMEOUT_SECONDS
    ) -> None:
        self.api = api.rstrip("/")
        self.location = f"Prefect API at {self.api}"
        self._token = token
        self._tenant_id = tenant_id
        self._agent_id = ""
        self._transport = _HTTPTransport(self.api, timeout)
        self.requests_sent = 0

    # The transport.

    def graphql(
        self, query: str, variables: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Send one GraphQL document; return its ``data``."""
        body = json.dumps({"query": query, "variables": json.dumps(variables)}).encode("utf-8")
        all_headers = {
            "Content-Type": "application/json",
            "X-PREFECT-CORE-VERSION": CORE_VERSION,
            "User-Agent": f"local-agent/{__version__}",
        }
        if self._token:
            all_headers["Authorization"] = f"Bearer {self._token}"
        if self._tenant_id and self._token:
            all_headers["X-PREFECT-TENANT-ID"] = self._tenant_id
        if self._agent_id:
            all_headers["X-PREFECT-AGENT-ID"] = self._agent_id
        all_headers.update(headers or {})
        for name, value in all_headers.items():
            problem = _header_problem(value)
            if problem:  # only an API can have sent such a value (an id); settings are checked when read
                raise APIError(f"malformed API answer: the value for the {name} header {problem}")
        self.requests_sent += 1
        status, raw = self._transport.post(body, all_headers)
        return _graphql_data(status, raw, self.api)

    # Start-up.

    def tenant_id(self) -> str:
        """The tenant to work in: configured, from the key (Cloud), or Server's first."""
        if self._tenant_id:
            return self._tenant_id
        if self._token:
            try:
                info = self.graphql(_AUTH_INFO_QUERY).get("auth_info")
            except APIError as exc:
                if exc.transient:
                    raise
                info = None  # Prefect Server has no auth_info: fall through to its tenant
            if isinstance(info, dict):
                if not info.get("tenant_id"):
                    raise AuthError(
                        f"the API at {self.api} found no tenant for this key; was an API "
                        "token given where a key is needed?"
                    )
                self._tenant_id = _expect(info["tenant_id"], str, "auth_info.tenant_id")
                return self._tenant_id
        tenants = _expect(self.graphql(_TENANT_QUERY).get("tenant"), list, "tenant")
        if not tenants:
            raise APIError(
                f"the Prefect Server at {self.api} has no tenant: create one with "
                "`prefect server create-tenant --name default`"
            )
        self._tenant_id = _expect(_expect(tenants[0], dict, "tenant").get("id"), str, "tenant.id")
        return self._tenant_id

    def connect(self, agent_name: str, labels: Sequence[str]) -> str:
        tenant_id = self.tenant_id()
        agent_input = {
            "type": "LocalAgent",
            "name": agent_name,
            "labels": list(labels),
            "tenant_id": tenant_id,
            "agent_config_id": None,
        }
        try:
            answer = self.graphql(_REGISTER_AGENT, {"input": agent_input}).get("register_agent")
            agent_id = _expect(_expect(answer, dict, "register_agent").get("id"), str, "agent id")
            if _header_problem(agent_id):
                raise APIError(f"malformed API answer: the agent id it gave {_header_problem(agent_id)}")
            self._agent_id = agent_id
        except APIError as exc:
            if exc.transient:
                raise
            logging.getLogger(__name__).warning(
                "Unable to register agent to %s (%s); carrying on without an agent id", self.api, exc
            )
        self.graphql(_HELLO_QUERY)
        return self._agent_id

    # The agent's loop.

    def get_runs_in_queue(self, labels: Sequence[str], before: datetime) -> list[str]:
        query_input = {"before": _format_time(before), "labels": list(labels), "tenant_id": self.tenant_id()}
        answer = self.graphql(_GET_RUNS_IN_QUEUE, {"input": query_input}).get("get_runs_in_queue")
        ids = _expect(_expect(answer, dict, "get_runs_in_queue").get("flow_run_ids"), list, "flow_run_ids")
        return [_expect(run_id, str, "a flow run id") for run_id in ids]

    def get_flow_runs(self, run_ids: Sequence[str]) -> list[FlowRun]:
        if not run_ids:
            return []
        now3 = _format_time(_utcnow() - timedelta(seconds=3))
        query = _FLOW_RUN_METADATA % {"ids": json.dumps(list(run_ids)), "now3": json.dumps(now3)}
        rows = _expect(self.graphql(query).get("flow_run"), list, "flow_run")
        return [_parse_flow_run(row) for row in rows]

    def get_flow_run(self, run_id: str) -> FlowRun | None:
        row = self.graphql(_FLOW_RUN_BY_PK % json.dumps(run_id)).get("flow_run_by_pk")
        return None if row is None else _parse_flow_run(row)

    def set_flow_run_state(self, run_id: str, state: Mapping[str, Any], version: int | None) -> None:
        update = {"flow_run_id": run_id, "version": version, "state": dict(state)}
        answer = self.graphql(_SET_FLOW_RUN_STATES, {"input": {"states": [update]}})
        payload = _expect(answer.get("set_flow_run_states"), dict, "set_flow_run_states")
        states = _expect(payload.get("states"), list, "states")
        status = states[0].get("status") if states and isinstance(states[0], dict) else None
        if status not in (None, "SUCCESS"):
            message = states[0].get("message") or status
            raise StateUpdateFailed(f"State update failed for flow run ID {run_id}: {message}")

    claim_lead_seconds = CLAIM_SETTLE_SECONDS + 0.1

    def claim_flow_runs(self, claims: Sequence[tuple[FlowRun, Mapping[str, Any]]]) -> list[int | None]:
        """Claim on an API that does not lock versions (Prefect Server): write, then read back.

        The rule: among the Submitted states after the run's last Scheduled-family state,
        ordered by the server's timestamp (then id), the first one wins. Every claimant reads
        the same history, so all agree on one winner; a loser whose Submitted became the
        run's current state puts the winner's final state back if the winner has finished. A
        claim written twice (a retry after a lost answer) is found by its token, so it still
        counts. One read before and one read-back after one settle delay serve a whole batch.
        """
        # Read the runs again just before writing: one taken (or cancelled) since they were
        # fetched is left alone, so a late claim rarely lands on a run that has moved on.
        current = self._claim_views([run.id for run, _ in claims])
        written = []
        for run, submitted in claims:
            view = current.get(run.id)
            if view is None or view.get("state") not in SCHEDULED_STATES:
                continue
            try:
                self.set_flow_run_state(run.id, submitted, run.version)
            except StateUpdateFailed:
                pass  # Server's 30-s guard: another claim, or our own earlier write; the read-back decides
            except APIError as exc:
                if not exc.transient:
                    raise
                # The write may have landed without our hearing: the read-back decides.
            written.append(run.id)
        if not written:
            return [None] * len(claims)
        time.sleep(CLAIM_SETTLE_SECONDS)
        views = _retry_api(lambda: self._claim_views(written), 30.0)
        return [
            self._settle_claim(run.id, views[run.id], submitted["context"]["claim"]) if run.id in views else None
            for run, submitted in claims
        ]

    def _claim_views(self, run_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        rows = _expect(self.graphql(_CLAIM_VIEW % json.dumps(list(run_ids))).get("flow_run"), list, "flow_run")
        views = [_expect(row, dict, "flow_run") for row in rows]
        return {str(view.get("id")): view for view in views}

    def _settle_claim(self, run_id: str, view: Mapping[str, Any], token: str) -> int | None:
        """Apply the claim rule to a run's state history; our version if we won."""
        rows = [_expect(row, dict, "a state row") for row in _expect(view.get("states"), list, "states")]
        rows.sort(key=lambda row: (_parse_time_or_now(str(row.get("timestamp"))), str(row.get("id"))))
        last_scheduled = max((i for i, row in enumerate(rows) if row.get("state") in SCHEDULED_STATES), default=-1)
        claims = [row for row in rows[last_scheduled + 1:] if row.get("state") == "Submitted"]
        if claims and _is_claim(claims[0], token):
            return int(view["version"]) if isinstance(view.get("version"), int) else None
        if rows and _is_claim(rows[-1], token):
            # We lost, and our Submitted hides the run's real state. If the winner has finished,
            # put its final state back; if it is still running, its next write does that, and a
            # copy of its Running written now could land after its Success.
            hidden = _hidden_final_state(rows, losing_claims=claims[1:])
            if hidden is not None:
                self.set_flow_run_state(run_id, hidden, None)
        return None

    def write_run_logs(self, logs: Sequence[Mapping[str, Any]]) -> None:
        answer = self.graphql(_WRITE_RUN_LOGS, {"input": {"logs": [dict(log) for log in logs]}})
        result = _expect(answer.get("write_run_logs"), dict, "write_run_logs")
        if result.get("success") is not True:
            raise APIError("Writing logs failed.", transient=True)

    def heartbeat(self, run_id: str) -> None:
        self.graphql(_HEARTBEAT % json.dumps(run_id), headers={"X-PREFECT-HEARTBEAT-ID": run_id})

    def get_task_runs(self, run_id: str) -> dict[str, tuple[str, int]]:
        row = _expect(self.graphql(_TASK_RUNS % json.dumps(run_id)).get("flow_run_by_pk"), dict, "flow_run_by_pk")
        found = {}
        for task_run in _expect(row.get("task_runs"), list, "task_runs"):
            task_run = _expect(task_run, dict, "a task run")
            slug = (task_run.get("task") or {}).get("slug")
            if isinstance(slug, str) and isinstance(task_run.get("id"), str):
                found[slug] = (task_run["id"], task_run["version"] if isinstance(task_run.get("version"), int) else 0)
        return found

    def set_task_run_state(self, task_run_id: str, state: Mapping[str, Any], version: int | None) -> None:
        update = {"task_run_id": task_run_id, "version": version, "state": dict(state)}
        self.graphql(_SET_TASK_RUN_STATES, {"input": {"states": [update]}})

    # Registration and the commands.

    def ensure_project(self, name: str) -> str:
        found = _expect(self.graphql(_PROJECT_QUERY % json.dumps(name)).get("project"), list, "project")
        if found:
            return _expect(_expect(found[0], dict, "project").get("id"), str, "project id")
        project_input = {"name": name, "description": None, "tenant_id": self.tenant_id()}
        answer = self.graphql(_CREATE_PROJECT, {"input": project_input}).get("create_project")
        return _expect(_expect(answer, dict, "create_project").get("id"), str, "project id")

    def register_flow(self, project_id: str, serialized_flow: Mapping[str, Any]) -> str:
        import base64
        import gzip
        import hashlib

        _check_server_schedule(serialized_flow.get("schedule"))
        text = json.dumps(serialized_flow, sort_keys=True)
        flow_input = {
            "project_id": project_id,
            "serialized_flow": base64.b64encode(gzip.compress(text.encode("utf-8"))).decode("ascii"),
            "set_schedule_active": False,
            "version_group_id": None,
            # The same flow registered twice stays one version (Prefect 1.x does this too).
            "idempotency_key": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        }
        answer = self.graphql(_CREATE_FLOW, {"input": flow_input}).get("create_flow_from_compressed_string")
        flow_id = _expect(_expect(answer, dict, "create_flow").get("id"), str, "flow id")
        if serialized_flow.get("schedule"):  # as flow.register() does: Server's scheduler takes it from here
            self._schedule_mutation(_SET_SCHEDULE_ACTIVE, flow_id)
        return flow_id

    def _schedule_mutation(self, document: str, flow_id: str) -> bool:
        answer = self.graphql(document, {"input": {"flow_id": flow_id}})
        return bool(_expect(next(iter(answer.values()), None), dict, "schedule mutation").get("success"))

    def set_schedule(self, flow: FlowSummary, schedule: Schedule) -> None:
        clocks = _flow_group_clocks(schedule)
        answer = self.graphql(_SET_FLOW_GROUP_SCHEDULE, {"input": {"flow_group_id": flow.flow_group_id, **clocks}})
        if not _expect(answer.get("set_flow_group_schedule"), dict, "set_flow_group_schedule").get("success"):
            raise APIError(f"the {self.location} did not set the schedule of flow {flow.name!r}")
        self.set_schedule_active(flow, True)

    def set_schedule_active(self, flow: FlowSummary, active: bool) -> bool:
        return self._schedule_mutation(_SET_SCHEDULE_ACTIVE if active else _SET_SCHEDULE_INACTIVE, flow.id)

    def list_agents(self) -> list[dict[str, Any]]:
        rows = _expect(self.graphql(_AGENT_LIST).get("agent"), list, "agent")
        return [{"id": str(row.get("id") or ""), "name": str(row.get("name") or ""),
                 "labels": [str(label) for label in row.get("labels") or []],
                 "last_queried": row.get("last_queried")} for row in rows if isinstance(row, dict)]

    def find_flow(self, name: str) -> FlowSummary | None:
        arguments = (
            "where: { name: { _eq: %s }, archived: { _eq: false } }, order_by: { version: desc }, limit: 1"
            % json.dumps(name)
        )
        rows = _expect(self.graphql(_FLOW_LIST % arguments).get("flow"), list, "flow")
        return _parse_flow_summary(rows[0]) if rows else None

    def create_flow_run(
        self,
        flow_id: str,
        *,
        parameters: Mapping[str, Any],
        labels: Sequence[str] | None,
        scheduled_start_time: datetime | None,
        idempotency_key: str,
        name: str | None = None,
    ) -> str:
        run_input: dict[str, Any] = {
            "flow_id": flow_id,
            "parameters": dict(parameters),
            "idempotency_key": idempotency_key,
        }
        if labels is not None:
            run_input["labels"] = list(labels)
        if scheduled_start_time is not None:
            run_input["scheduled_start_time"] = _format_time(scheduled_start_time)
        if name:
            run_input["flow_run_name"] = name
        answer = self.graphql(_CREATE_FLOW_RUN, {"input": run_input}).get("create_flow_run")
        return _expect(_expect(answer, dict, "create_flow_run").get("id"), str, "flow run id")

    def list_flows(self) -> list[FlowSummary]:
        arguments = "where: { archived: { _eq: false } }, order_by: { name: asc }"
        rows = _expect(self.graphql(_FLOW_LIST % arguments).get("flow"), list, "flow")
        return [_parse_flow_summary(row) for row in rows]

    def list_flow_runs(
        self,
        *,
        flow_name: str | None = None,
        state: str | None = None,
        run_ids: Sequence[str] | None = None,
        limit: int = 20,
        offset: int = 0,
        search: str | None = None,
        attention_first: bool = False,
    ) -> list[FlowRun]:
        conditions = []
        if flow_name is not None:
            conditions.append("flow: { name: { _eq: %s } }" % json.dumps(flow_name))
        if state is not None:
            conditions.append("state: { _eq: %s }" % json.dumps(state))
        if run_ids is not None:
            conditions.append("id: { _in: %s }" % json.dumps(list(run_ids)))
        if search:
            pattern = json.dumps("%" + search.replace("%", "").replace("_", "") + "%")
            conditions.append("_or: [{ name: { _ilike: %s } }, { flow: { name: { _ilike: %s } } }]"
                              % (pattern, pattern))
        arguments = "where: { %s }, order_by: { scheduled_start_time: desc }, limit: %d" % (
            ", ".join(conditions), int(limit)
        ) + (", offset: %d" % int(offset) if offset else "")
        rows = _expect(self.graphql(_FLOW_RUN_LIST % arguments).get("flow_run"), list, "flow_run")
        return [_parse_flow_run(row) for row in rows]

    def get_run_logs(self, run_id: str, offset: int = 0, limit: int | None = None) -> list[LogLine]:
        document = _LOG_QUERY % (json.dumps(run_id), int(offset))
        if limit is not None:
            document = document.replace(f"offset: {int(offset)})", f"offset: {int(offset)}, limit: {int(limit)})", 1)
        rows = _expect(self.graphql(document).get("log"), list, "log")
        return [
            LogLine(str(row.get("timestamp", "")), str(row.get("level", "")), str(row.get("name") or ""),
                    str(row.get("message") or ""))
            for row in (_expect(row, dict, "log") for row in rows)
        ]

    def delete_flow_run(self, run_id: str) -> bool:
        answer = self.graphql(_DELETE_FLOW_RUN, {"input": {"flow_run_id": run_id}}).get("delete_flow_run")
        return _expect(answer, dict, "delete_flow_run").get("success") is True

    def archive_flow(self, flow_id: str) -> None:
        answer = self.graphql(_ARCHIVE_FLOW, {"input": {"flow_id": flow_id}}).get("archive_flow")
        if _expect(answer, dict, "archive_flow").get("success") is not True:
            raise APIError(f"the API did not archive flow {flow_id}")

    def get_state_history(self, run_id: str) -> list[tuple[str, str, str]]:
        rows = _expect(self.graphql(_STATE_HISTORY % json.dumps(run_id)).get("flow_run_state"), list,
                       "flow_run_state")
        return [(str(row.get("state") or ""), str(row.get("message") or ""), str(row.get("timestamp") or ""))
                for row in (_expect(row, dict, "flow_run_state") for row in rows)]

    def cancel_flow_run(self, run_id: str) -> str:
        answer = self.graphql(_CANCEL_FLOW_RUN, {"input": {"flow_run_id": run_id}}).get("cancel_flow_run")
        return str(_expect(answer, dict, "cancel_flow_run").get("state"))

    def close(self) -> None:
        self._transport.close()


def _is_claim(row: Mapping[str, Any], token: str) -> bool:
    """Whether a row of a run's state history is the Submitted state written with ``token``."""
    state = _json_field(row.get("serialized_state"))
    return isinstance(state, dict) and (state.get("context") or {}).get("claim") == token


def _hidden_final_state(rows: list[dict[str, Any]], losing_claims: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The final state under a run's last row (a losing claim), skipping other losers' rows; or None."""
    losers = {id(row) for row in losing_claims}
    real = next((row for row in reversed(rows[:-1]) if id(row) not in losers), None)
    previous = _json_field(real.get("serialized_state")) if real else None
    return previous if isinstance(previous, dict) and is_final(str(previous.get("type"))) else None


def _parse_flow_run(row: Any) -> FlowRun:
    """Read a ``flow_run`` row; a row we can identify but not use gets ``problem`` set."""
    row = _expect(row, dict, "a flow_run row")
    flow = row.get("flow") if isinstance(row.get("flow"), dict) else {}
    message = row.get("state_message")
    run = FlowRun(
        id=_expect(row.get("id"), str, "flow_run.id"),
        version=row["version"] if isinstance(row.get("version"), int) else 0,
        state=str(row.get("state") or ""),
        serialized_state=_json_field(row.get("serialized_state")) or {},
        flow_id=str(flow.get("id") or ""),
        flow_name=str(flow.get("name") or ""),
        storage=_json_field(flow.get("storage")),
        parameters=_json_field(row.get("parameters")) or {},
        name=str(row.get("name") or ""),
        labels=[label for label in row.get("labels") or [] if isinstance(label, str)],
        state_message=message if isinstance(message, str) else None,
        run_config=_json_field(row.get("run_config")),
        began=_optional_time(row.get("start_time")),
        ended=_optional_time(row.get("end_time")),
    )
    run.problem = _flow_run_problem(run, row)
    return run


def _optional_time(value: Any) -> datetime | None:
    """A timestamp the listings show but nothing depends on: None when absent or unreadable."""
    try:
        return _parse_time(value) if isinstance(value, str) and value else None
    except ValueError:
        return None


def _flow_run_problem(run: FlowRun, row: Mapping[str, Any]) -> str:
    """What makes a run unusable as the API gave it (the last problem found), or ""."""
    problems = [_read_timestamp(run, row, column) for column in ("scheduled_start_time", "updated")]
    if not isinstance(run.serialized_state, dict):
        run.serialized_state = {}
        problems.append("its serialized_state is not a JSON object")
    if not isinstance(run.parameters, dict):
        run.parameters = {}
        problems.append("its parameters are not a JSON object")
    if not run.flow_name:
        problems.append("the API gave no flow name for it")
    if not isinstance(row.get("version"), int) or isinstance(row.get("version"), bool):
        problems.append("the API gave no version for it")
    return next((problem for problem in reversed(problems) if problem), "")


def _read_timestamp(run: FlowRun, row: Mapping[str, Any], column: str) -> str:
    """Set a run's timestamp column from the API's row; what is wrong with it, or ""."""
    if isinstance(row.get(column), str):
        try:
            setattr(run, column, _parse_time(row[column]))
        except ValueError:
            return f"its {column} {row[column]!r} is not a timestamp"
    return ""


def _check_server_schedule(data: Any) -> None:
    """Refuse, before registering, a schedule Prefect Server would refuse: intervals under a minute."""
    if data and any(isinstance(clock, IntervalClock) and clock.every < _SERVER_SHORTEST_INTERVAL
                    for clock in Schedule.from_prefect(data).clocks):
        raise AgentError("Prefect Server refuses intervals shorter than a minute (Prefect's IntervalClockSchema); "
                         "the embedded database takes them")


def _flow_group_clocks(schedule: Schedule) -> dict[str, Any]:
    """A schedule as Server's ``set_flow_group_schedule`` takes it: cron and interval clocks in
    one time zone, intervals in whole seconds, starting now (Server sets the start date)."""
    zones = {clock.timezone for clock in schedule.clocks}
    if len(zones) > 1:
        raise AgentError("Prefect Server gives a flow group's schedule one time zone; use one for every clock")
    cron_clocks, interval_clocks = [], []
    for clock in schedule.clocks:
        if isinstance(clock, CronClock):
            cron_clocks.append({"cron": clock.cron, "parameter_defaults": clock.parameter_defaults})
            continue
        if clock.every < _SERVER_SHORTEST_INTERVAL or clock.every % timedelta(seconds=1):
            raise AgentError("Prefect Server takes intervals of whole seconds, 60 s or more")
        if clock.anchor_wall is not None and clock.anchor_wall != _INTERVAL_DEFAULT_START:
            raise AgentError("Prefect Server starts a flow group's intervals when the schedule is set: leave out "
                             "--anchor, or deploy the flow with the schedule in it (Flow(schedule=...))")
        interval_clocks.append({"interval": int(clock.every.total_seconds()),
                                "parameter_defaults": clock.parameter_defaults})
    return {"cron_clocks": cron_clocks, "interval_clocks": interval_clocks, "timezone": zones.pop()}


def _parse_flow_summary(row: Any) -> FlowSummary:
    row = _expect(row, dict, "a flow row")
    run_config = _json_field(row.get("run_config")) or {}
    environment = _json_field(row.get("environment")) or {}
    labels = (run_config.get("labels") if isinstance(run_config, dict) else None) or (
        environment.get("labels") if isinstance(environment, dict) else None
    ) or []
    project = row.get("project") if isinstance(row.get("project"), dict) else {}
    group = row.get("flow_group") if isinstance(row.get("flow_group"), dict) else {}
    return FlowSummary(
        id=_expect(row.get("id"), str, "flow.id"),
        name=str(row.get("name") or ""),
        version=row.get("version") if isinstance(row.get("version"), int) else 1,
        project=str(project.get("name") or ""),
        labels=[str(label) for label in labels],
        storage=_json_field(row.get("storage")),
        parameters=_json_field(row.get("parameters")),
        run_config=run_config,
        schedule=_json_field(group.get("schedule")) or _json_field(row.get("schedule")),
        schedule_active=bool(row.get("is_schedule_active")),
        flow_group_id=str(row.get("flow_group_id") or ""),
    )


# --- 7b. Backends: the embedded SQLite database ------------------------------------------
#
# The records Prefect Server keeps, in one SQLite file in WAL mode. Unlike Server it checks
# versions: a state write names the version it read and fails if the run moved on, inside
# one transaction, so any number of agents sharing the file run each run exactly once.

_SCHEMA_VERSION = 2
_APPLICATION_ID = 0x4C414731  # "LAG1": marks the file as ours
_SCHEMA = """
CREATE TABLE project (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, description TEXT, created TEXT NOT NULL);
CREATE TABLE flow (
    id TEXT PRIMARY KEY, project_id TEXT NOT NULL REFERENCES project(id), name TEXT NOT NULL,
    version INTEGER NOT NULL, storage TEXT, run_config TEXT, labels TEXT NOT NULL,
    parameters TEXT NOT NULL, serialized_flow TEXT NOT NULL, idempotency_key TEXT,
    archived INTEGER NOT NULL DEFAULT 0, created TEXT NOT NULL);
CREATE INDEX flow_by_name ON flow(name, archived, version);
CREATE TABLE flow_run (
    id TEXT PRIMARY KEY, flow_id TEXT NOT NULL REFERENCES flow(id), name TEXT NOT NULL,
    labels TEXT NOT NULL, parameters TEXT NOT NULL, context TEXT NOT NULL,
    idempotency_key TEXT UNIQUE, scheduled_start_time TEXT NOT NULL, state TEXT NOT NULL,
    serialized_state TEXT NOT NULL, state_message TEXT, state_start_time TEXT NOT NULL,
    state_timestamp TEXT NOT NULL, version INTEGER NOT NULL, heartbeat TEXT, agent_id TEXT,
    start_time TEXT, end_time TEXT, created TEXT NOT NULL, updated TEXT NOT NULL);
CREATE INDEX flow_run_queue ON flow_run(state, state_start_time);
CREATE INDEX flow_run_by_flow ON flow_run(flow_id, scheduled_start_time);
CREATE TABLE flow_run_state (
    id INTEGER PRIMARY KEY, flow_run_id TEXT NOT NULL REFERENCES flow_run(id),
    version INTEGER NOT NULL, state TEXT NOT NULL, message TEXT, serialized_state TEXT NOT NULL,
    timestamp TEXT NOT NULL);
CREATE INDEX flow_run_state_by_run ON flow_run_state(flow_run_id, version);
CREATE TABLE log (
    id INTEGER PRIMARY KEY, flow_run_id TEXT NOT NULL, timestamp TEXT NOT NULL,
    level TEXT NOT NULL, name TEXT NOT NULL, message TEXT NOT NULL);
CREATE INDEX log_by_run ON log(flow_run_id, id);
CREATE TABLE agent (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, type TEXT NOT NULL, labels TEXT NOT NULL,
    created TEXT NOT NULL, last_queried TEXT, UNIQUE (name, type, labels));
-- Bumped whenever a run becomes due-able, so idle agents can wake without polling.
CREATE TABLE queue_version (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL);
INSERT INTO queue_version VALUES (1, 0);
"""
#: What each schema version adds to the one before; a database is brought up to date on open.
_SCHEMA_CHANGES = {
    1: _SCHEMA,
    # Schedules: a flow's own (from its flow JSON), its flow group's (set by the schedule command,
    # kept across versions, as Server's), whether it is on, and which runs the scheduler made.
    2: """
ALTER TABLE flow ADD COLUMN schedule TEXT;
ALTER TABLE flow ADD COLUMN is_schedule_active INTEGER NOT NULL DEFAULT 0;
ALTER TABLE flow_run ADD COLUMN auto_scheduled INTEGER NOT NULL DEFAULT 0;
CREATE INDEX flow_run_auto_scheduled ON flow_run(flow_id, auto_scheduled, state, scheduled_start_time);
CREATE TABLE flow_group (
    project_id TEXT NOT NULL REFERENCES project(id), name TEXT NOT NULL, schedule TEXT,
    PRIMARY KEY (project_id, name));
""",
}
#: Runs under way first, then the rest newest first, then the upcoming ones soonest first.
_WAITING = ", ".join(f"'{state}'" for state in sorted(SCHEDULED_STATES))
_ATTENTION_ORDER = (
    f"CASE WHEN r.state IN ('Submitted', 'Running', 'Cancelling') THEN 0 WHEN r.state IN ({_WAITING}) "
    f"AND r.scheduled_start_time > ? THEN 2 ELSE 1 END, CASE WHEN r.state IN ({_WAITING}) AND "
    "r.scheduled_start_time > ? THEN r.scheduled_start_time END ASC, "
)
_RUN_SELECT = """SELECT r.*, f.name AS flow_name, f.storage AS flow_storage, f.run_config AS flow_run_config
FROM flow_run r JOIN flow f ON f.id = r.flow_id"""
_ADJECTIVES = ("amber", "brave", "calm", "dapper", "eager", "fuzzy", "gentle", "hasty", "icy", "jolly", "keen",
               "lucky", "merry", "nimble", "odd", "proud", "quick", "rosy", "sunny", "tidy", "witty", "zesty")
_ANIMALS = ("ant", "bat", "cat", "dog", "eel", "fish", "gnu", "hare", "ibis", "jay", "koala", "lark", "mole",
            "newt", "owl", "puma", "quail", "ram", "seal", "toad", "vole", "wolf", "yak")


#: SQLite's primary result codes for a full disk and an I/O error.
_SQLITE_IOERR, _SQLITE_FULL = 10, 13


def _roll_back(connection: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open: SQLite ends one itself on a full disk, and the
    error that did that, not "no transaction is active", is the one to report."""
    if connection.in_transaction:
        with contextlib.suppress(Exception):
            connection.execute("ROLLBACK")


def _new_id() -> str:
    """A random UUID, the form of Prefect's ids (uuid is imported only where one is made)."""
    import uuid

    return str(uuid.uuid4())


def _known_level(level: object) -> str:
    """A log level the API accepts; anything else is INFO."""
    text = str(level or "INFO").upper()
    return text if text in _LOG_LEVELS else "INFO"


class SQLiteBackend(Backend):
    """The embedded backend: Prefect Server's records in one SQLite file."""

    def __init__(self, path: str, *, busy_timeout: float = REQUEST_TIMEOUT_SECONDS) -> None:
        self.path = os.path.abspath(path)
        self.location = f"embedded database {self.path}"
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []  # every thread's, so close() leaves none open
        self._generation = 0  # bumped by close(): a thread whose connection was closed opens another
        self._agent_id = ""
        self._last_queried = 0.0
        self._queue_seen = -1
        self._db()  # open now, so a bad file is reported before anything else happens

    # Connections and transactions.

    def _db(self) -> sqlite3.Connection:
        """This thread's connection, opened and checked on first use."""
        connection = getattr(self._local, "connection", None)
        if connection is None or getattr(self._local, "generation", -1) != self._generation:
            connection = self._open()
            self._local.connection, self._local.generation = connection, self._generation
            self._connections.append(connection)
        return connection

    def _open(self) -> sqlite3.Connection:
        import sqlite3

        folder = os.path.dirname(self.path)
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            if not os.path.exists(self.path):  # SQLite gives its -wal and -shm files the database's mode
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            connection = sqlite3.connect(
                self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
            )
        except OSError as exc:
            raise ConfigError(f"cannot create the directory of database {self.path}: {exc.strerror or exc}") from None
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        connection.row_factory = sqlite3.Row
        try:
            self._check_schema(connection)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA foreign_keys=ON")
            if connection.execute("PRAGMA user_version").fetchone()[0] < _SCHEMA_VERSION:
                self._update_schema(connection)
        except BaseException as exc:
            connection.close()
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc) from None
            raise
        return connection

    def _check_schema(self, connection: sqlite3.Connection) -> None:
        """Refuse a file that is not ours or was written by a newer release; change nothing."""
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        application = connection.execute("PRAGMA application_id").fetchone()[0]
        tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if tables and application != _APPLICATION_ID:
            raise ConfigError(
                f"{self.path} is an SQLite database of another program; choose another file "
                "with --api sqlite:///PATH"
            )
        if version > _SCHEMA_VERSION:
            raise ConfigError(
                f"database {self.path} has schema version {version}, newer than this "
                f"local_agent {__version__} understands ({_SCHEMA_VERSION}): upgrade local_agent"
            )

    def _update_schema(self, connection: sqlite3.Connection) -> None:
        """Create the tables, or bring an older database up to date, in one transaction."""
        connection.execute("BEGIN IMMEDIATE")
        try:
            version = connection.execute("PRAGMA user_version").fetchone()[0]  # another process may have won
            for change in range(version + 1, _SCHEMA_VERSION + 1):
                for statement in _SCHEMA_CHANGES[change].split(";"):
                    if statement.strip():
                        connection.execute(statement)
            if version == 0:
                connection.execute(f"PRAGMA application_id={_APPLICATION_ID}")
            connection.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            connection.execute("COMMIT")
        except BaseException:
            _roll_back(connection)
            raise

    def _error(self, exc: Exception) -> AgentError:
        """Turn an sqlite3 error into one that says what to do; a full disk or I/O error is transient."""
        text = str(exc)
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # Python 3.11+; older ones: the text
        if code in (_SQLITE_FULL, _SQLITE_IOERR) or "disk is full" in text or "disk I/O error" in text:
            return APIError(f"cannot write database {self.path} ({text}): free some disk space", transient=True)
        if "locked" in text or "busy" in text:
            return APIError(
                f"database {self.path} is locked by another process (waited "
                f"{self._busy_timeout:g} s); try again", transient=True,
            )
        if "readonly" in text or "read-only" in text or "unable to open" in text:
            return ConfigError(
                f"cannot write database {self.path} ({text}): the agent needs write access to it and to "
                "its directory (for the -wal and -shm files); fix that or choose another file with "
                "--api sqlite:///PATH"
            )
        if "not a database" in text or "malformed" in text or "corrupt" in text:
            return ConfigError(
                f"database {self.path} is corrupt or not a database ({text}): move it away to start afresh"
            )
        return APIError(f"database {self.path}: {text}")

    def _read(self, sql: str, arguments: Sequence[Any] = ()) -> list[Any]:
        import sqlite3

        try:
            return list(self._db().execute(sql, arguments).fetchall())
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    def _write(self, work: Callable[[Any], _T]) -> _T:
        """Run ``work(connection)`` in one IMMEDIATE transaction."""
        import sqlite3

        connection = self._db()
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                result = work(connection)
                connection.execute("COMMIT")
            except BaseException:
                _roll_back(connection)
                raise
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        return result

    # The agent's loop.

    def connect(self, agent_name: str, labels: Sequence[str]) -> str:
        labels_json = json.dumps(sorted(labels))

        def register(db: sqlite3.Connection) -> str:
            row = db.execute(
                "SELECT id FROM agent WHERE name = ? AND type = 'LocalAgent' AND labels = ?",
                (agent_name, labels_json),
            ).fetchone()
            if row:
                return str(row["id"])
            agent_id = _new_id()
            db.execute(
                "INSERT INTO agent (id, name, type, labels, created) VALUES (?, ?, 'LocalAgent', ?, ?)",
                (agent_id, agent_name, labels_json, _format_time(_utcnow())),
            )
            return agent_id

        self._agent_id = self._write(register)
        return self._agent_id

    def get_runs_in_queue(self, labels: Sequence[str], before: datetime) -> list[str]:
        import sqlite3

        self._note_agent_queried()
        placeholders = ",".join("?" * len(SCHEDULED_STATES))
        # Unlike Server's fixed window of 75, read on until 25 fit: other labels never starve us.
        found: list[str] = []
        try:
            cursor = self._db().execute(
                f"SELECT id, labels FROM flow_run WHERE state IN ({placeholders}) AND state_start_time <= ? "
                "ORDER BY state_start_time, id",
                (*sorted(SCHEDULED_STATES), _format_time(before)),
            )
            for row in cursor:
                if labels_match(json.loads(row["labels"]), labels):
                    found.append(row["id"])
                    if len(found) == 25:
                        break
            cursor.close()
        except sqlite3.Error as exc:  # a locked file is a transient API error, like any other read's
            raise self._error(exc) from None
        return found

    def _note_agent_queried(self) -> None:
        """Record ``last_queried`` at most every 10 s: each write would wake other agents."""
        if self._agent_id and time.monotonic() - self._last_queried > 10:
            self._last_queried = time.monotonic()
            self._write(
                lambda db: db.execute(
                    "UPDATE agent SET last_queried = ? WHERE id = ?", (_format_time(_utcnow()), self._agent_id)
                )
            )

    def get_flow_runs(self, run_ids: Sequence[str]) -> list[FlowRun]:
        if not run_ids:
            return []
        marks = ",".join("?" * len(run_ids))
        states = ",".join("?" * len(SCHEDULED_STATES))
        rows = self._read(
            f"{_RUN_SELECT} WHERE r.id IN ({marks}) AND r.state IN ({states})",
            (*run_ids, *sorted(SCHEDULED_STATES)),
        )
        return [self._flow_run(row) for row in rows]

    def get_flow_run(self, run_id: str) -> FlowRun | None:
        rows = self._read(f"{_RUN_SELECT} WHERE r.id = ?", (run_id,))
        return self._flow_run(rows[0]) if rows else None

    @staticmethod
    def _flow_run(row: Any) -> FlowRun:
        return FlowRun(
            id=row["id"],
            version=row["version"],
            state=row["state"],
            serialized_state=json.loads(row["serialized_state"]),
            flow_id=row["flow_id"],
            flow_name=row["flow_name"],
            storage=json.loads(row["flow_storage"]) if row["flow_storage"] else None,
            parameters=json.loads(row["parameters"]),
            name=row["name"],
            labels=json.loads(row["labels"]),
            scheduled_start_time=_parse_time(row["scheduled_start_time"]),
            state_message=row["state_message"],
            updated=_parse_time(row["updated"]),
            run_config=json.loads(row["flow_run_config"]) if row["flow_run_config"] else None,
            began=_optional_time(row["start_time"]),
            ended=_optional_time(row["end_time"]),
        )

    def set_flow_run_state(self, run_id: str, state: Mapping[str, Any], version: int | None) -> None:
        serialized = json.dumps(dict(state))

        def write(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT version FROM flow_run WHERE id = ?", (run_id,)).fetchone()
            if row is None and version is not None:  # deleted since it was read (a schedule turned off)
                raise StateUpdateFailed(f"State update failed for flow run ID {run_id}: it was deleted.")
            if row is None:
                raise APIError(f"there is no flow run with id {run_id}")
            if version is not None and version != row["version"]:
                raise StateUpdateFailed(
                    f"State update failed for flow run ID {run_id}: provided version {version} "
                    f"but current version is {row['version']}."
                )
            self._apply_state(db, run_id, row["version"] + 1, state, serialized)

        self._write(write)

    def _apply_state(
        self, db: sqlite3.Connection, run_id: str, new_version: int, state: Mapping[str, Any], serialized: str
    ) -> None:
        """Write a state row and move the run to it, with Server's side effects."""
        now = _format_time(_utcnow())
        state_type = str(state.get("type"))
        start = _state_start_time(state)
        db.execute(
            """UPDATE flow_run SET version = ?, state = ?, serialized_state = ?, state_message = ?,
                   state_start_time = ?, state_timestamp = ?, updated = ?,
                   heartbeat = CASE WHEN ? THEN ? ELSE heartbeat END,
                   agent_id = CASE WHEN ? THEN ? ELSE agent_id END,
                   start_time = CASE WHEN ? AND start_time IS NULL THEN ? ELSE start_time END,
                   end_time = CASE WHEN ? THEN ? ELSE end_time END
               WHERE id = ?""",
            (
                new_version, state_type, serialized, state.get("message"),
                _format_time(start) if start else now, now, now,
                state_type in ("Running", "Submitted"), now,
                state_type == "Submitted" and bool(self._agent_id), self._agent_id,
                state_type == "Running", now,
                is_final(state_type), now,
                run_id,
            ),
        )
        db.execute(
            "INSERT INTO flow_run_state (flow_run_id, version, state, message, serialized_state, timestamp) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, new_version, state_type, state.get("message"), serialized, now),
        )
        if state_type in SCHEDULED_STATES:
            db.execute("UPDATE queue_version SET value = value + 1")

    def write_run_logs(self, logs: Sequence[Mapping[str, Any]]) -> None:
        now = _format_time(_utcnow())
        rows = [
            (
                str(log["flow_run_id"]),
                str(log.get("timestamp") or now),
                _known_level(log.get("level")),
                str(log.get("name") or ""),
                str(log.get("message") or ""),
            )
            for log in logs
        ]
        self._write(
            lambda db: db.executemany(
                "INSERT INTO log (flow_run_id, timestamp, level, name, message) VALUES (?, ?, ?, ?, ?)", rows
            )
        )

    def heartbeat(self, run_id: str) -> None:
        self._write(
            lambda db: db.execute("UPDATE flow_run SET heartbeat = ? WHERE id = ?", (_format_time(_utcnow()), run_id))
        )

    def wait_for_change(self, timeout: float, wake: threading.Event) -> bool:
        # Another process's `run` bumps queue_version; a read of one row notices it at once.
        deadline = time.monotonic() + timeout
        while not wake.is_set():
            current = int(self._read("SELECT value FROM queue_version")[0][0])
            changed = 0 <= self._queue_seen != current
            self._queue_seen = current
            remaining = deadline - time.monotonic()
            if changed or remaining <= 0:
                return changed
            wake.wait(min(DB_CHANGE_CHECK_SECONDS, remaining))
        return False

    # Registration and the commands.

    def ensure_project(self, name: str) -> str:
        def find_or_create(db: sqlite3.Connection) -> str:
            row = db.execute("SELECT id FROM project WHERE name = ?", (name,)).fetchone()
            if row:
                return str(row["id"])
            project_id = _new_id()
            db.execute(
                "INSERT INTO project (id, name, created) VALUES (?, ?, ?)", (project_id, name, _format_time(_utcnow()))
            )
            return project_id

        return self._write(find_or_create)

    def register_flow(self, project_id: str, serialized_flow: Mapping[str, Any]) -> str:
        import hashlib

        text = json.dumps(serialized_flow, sort_keys=True)
        key = hashlib.sha256(text.encode("utf-8")).hexdigest()
        name = str(serialized_flow["name"])
        labels = _serialized_flow_labels(serialized_flow)

        def register(db: sqlite3.Connection) -> str:
            latest = db.execute(
                "SELECT id, version, idempotency_key FROM flow WHERE project_id = ? AND name = ? "
                "ORDER BY version DESC LIMIT 1",
                (project_id, name),
            ).fetchone()
            if latest and latest["idempotency_key"] == key:
                return str(latest["id"])
            flow_id = _new_id()
            # The old versions' scheduled runs go (as Server's archiving does); the new one makes its own.
            versions = db.execute("SELECT id FROM flow WHERE project_id = ? AND name = ?", (project_id, name))
            for old in versions.fetchall():
                self._delete_auto_scheduled(db, old["id"])
            db.execute("UPDATE flow SET archived = 1 WHERE project_id = ? AND name = ?", (project_id, name))
            group = db.execute("SELECT schedule FROM flow_group WHERE project_id = ? AND name = ?",
                               (project_id, name)).fetchone()
            schedule = serialized_flow.get("schedule")
            db.execute(
                "INSERT INTO flow (id, project_id, name, version, storage, run_config, labels, parameters, "
                "serialized_flow, idempotency_key, created, schedule, is_schedule_active) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    flow_id, project_id, name, (latest["version"] + 1) if latest else 1,
                    json.dumps(serialized_flow.get("storage")), json.dumps(serialized_flow.get("run_config")),
                    json.dumps(labels), json.dumps(serialized_flow.get("parameters") or []), text, key,
                    _format_time(_utcnow()), json.dumps(schedule) if schedule else None,
                    # As flow.register() does, a new version's schedule is on if it has one.
                    bool(schedule or (group and group["schedule"])),
                ),
            )
            return flow_id

        flow_id = self._write(register)
        self.top_up_schedules(_utcnow(), flow_id)
        return flow_id

    def _flow_summaries(self, where: str, arguments: Sequence[Any]) -> list[FlowSummary]:
        rows = self._read(
            "SELECT f.id, f.name, f.version, f.labels, f.storage, f.parameters, f.run_config, p.name AS project, "
            "coalesce(g.schedule, f.schedule) AS schedule, f.is_schedule_active "
            "FROM flow f JOIN project p ON p.id = f.project_id "
            f"LEFT JOIN flow_group g ON g.project_id = f.project_id AND g.name = f.name WHERE {where}",
            arguments,
        )
        return [
            FlowSummary(
                id=row["id"], name=row["name"], version=row["version"], project=row["project"],
                labels=json.loads(row["labels"]), storage=json.loads(row["storage"]) if row["storage"] else None,
                parameters=json.loads(row["parameters"]) if row["parameters"] else None,
                run_config=json.loads(row["run_config"]) if row["run_config"] else None,
                schedule=json.loads(row["schedule"]) if row["schedule"] else None,
                schedule_active=bool(row["is_schedule_active"]),
            )
            for row in rows
        ]

    def find_flow(self, name: str) -> FlowSummary | None:
        found = self._flow_summaries("f.name = ? AND f.archived = 0 ORDER BY f.created DESC LIMIT 1", (name,))
        return found[0] if found else None

    def create_flow_run(
        self,
        flow_id: str,
        *,
        parameters: Mapping[str, Any],
        labels: Sequence[str] | None,
        scheduled_start_time: datetime | None,
        idempotency_key: str,
        name: str | None = None,
    ) -> str:
        start = scheduled_start_time or _utcnow()

        def create(db: sqlite3.Connection) -> str:
            return self._insert_flow_run(db, flow_id, parameters, labels, start, idempotency_key, name)

        return self._write(create)

    def _insert_flow_run(self, db: sqlite3.Connection, flow_id: str, parameters: Mapping[str, Any],
                         labels: Sequence[str] | None, start: datetime, idempotency_key: str, name: str | None,
                         *, auto_scheduled: bool = False) -> str:
        """Create a Scheduled run as Server does (the run for a known idempotency key, if there is one)."""
        state = make_state("Scheduled", "Flow run scheduled.", start_time=start)
        existing = db.execute("SELECT id FROM flow_run WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
        if existing:
            return str(existing["id"])
        flow = db.execute("SELECT labels, parameters, archived FROM flow WHERE id = ?", (flow_id,)).fetchone()
        if flow is None:
            raise APIError(f"there is no flow with id {flow_id}")
        if flow["archived"]:
            raise APIError(f"Flow {flow_id} is archived.")
        _check_required_parameters(json.loads(flow["parameters"]), parameters)
        run_id, now = _new_id(), _format_time(_utcnow())
        run_labels = sorted(labels if labels is not None else json.loads(flow["labels"]))
        db.execute(
            "INSERT INTO flow_run (id, flow_id, name, labels, parameters, context, idempotency_key, "
            "scheduled_start_time, state, serialized_state, state_start_time, state_timestamp, version, "
            "created, updated, auto_scheduled) VALUES (?, ?, ?, ?, ?, '{}', ?, ?, 'Pending', '{}', ?, ?, -1, ?, "
            "?, ?)",
            (
                run_id, flow_id, name or f"{random.choice(_ADJECTIVES)}-{random.choice(_ANIMALS)}",
                json.dumps(run_labels), json.dumps(dict(parameters)), idempotency_key,
                _format_time(start), _format_time(start), now, now, now, auto_scheduled,
            ),
        )
        # Like Server: the run is written Pending (version 0), then Scheduled (version 1).
        pending = make_state("Pending", "Flow run created")
        self._apply_state(db, run_id, 0, pending, json.dumps(pending))
        self._apply_state(db, run_id, 1, state, json.dumps(state))
        return run_id

    def list_flows(self) -> list[FlowSummary]:
        return self._flow_summaries("f.archived = 0 ORDER BY f.name, f.created", ())

    def list_flow_runs(
        self,
        *,
        flow_name: str | None = None,
        state: str | None = None,
        run_ids: Sequence[str] | None = None,
        limit: int = 20,
        offset: int = 0,
        search: str | None = None,
        attention_first: bool = False,
    ) -> list[FlowRun]:
        conditions, arguments = ["1"], []  # type: tuple[list[str], list[Any]]
        if search:
            literal = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            conditions.append("(r.name LIKE ? ESCAPE '\\' OR r.id LIKE ? ESCAPE '\\' OR f.name LIKE ? ESCAPE '\\')")
            arguments.extend([f"%{literal}%", f"{literal}%", f"%{literal}%"])
        if flow_name is not None:
            conditions.append("f.name = ?")
            arguments.append(flow_name)
        if state is not None:
            conditions.append("r.state = ?")
            arguments.append(state)
        if run_ids is not None:
            conditions.append(f"r.id IN ({','.join('?' * len(run_ids))})")
            arguments.extend(run_ids)
        rows = self._read(
            f"{_RUN_SELECT} WHERE {' AND '.join(conditions)} ORDER BY {_ATTENTION_ORDER if attention_first else ''}"
            "r.scheduled_start_time DESC, r.id LIMIT ? OFFSET ?",
            (*arguments, *([_format_time(_utcnow())] * 2 if attention_first else []), int(limit), int(offset)),
        )
        return [self._flow_run(row) for row in rows]

    def get_run_logs(self, run_id: str, offset: int = 0, limit: int | None = None) -> list[LogLine]:
        rows = self._read(
            "SELECT timestamp, level, name, message FROM log WHERE flow_run_id = ? ORDER BY id LIMIT ? OFFSET ?",
            (run_id, -1 if limit is None else int(limit), int(offset)),
        )
        return [LogLine(row["timestamp"], row["level"], row["name"], row["message"]) for row in rows]

    def count_run_logs(self, run_id: str) -> int:
        return int(self._read("SELECT count(*) FROM log WHERE flow_run_id = ?", (run_id,))[0][0])

    def delete_flow_run(self, run_id: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM flow_run_state WHERE flow_run_id = ?", (run_id,))
            db.execute("DELETE FROM log WHERE flow_run_id = ?", (run_id,))
            return bool(db.execute("DELETE FROM flow_run WHERE id = ?", (run_id,)).rowcount)

        return self._write(delete)

    def archive_flow(self, flow_id: str) -> None:
        def archive(db: sqlite3.Connection) -> None:
            if not db.execute("UPDATE flow SET archived = 1 WHERE id = ?", (flow_id,)).rowcount:
                raise APIError(f"there is no flow with id {flow_id}")
            self._delete_auto_scheduled(db, flow_id)
            for row in db.execute("SELECT id, version FROM flow_run WHERE flow_id = ? AND state = 'Scheduled'",
                                  (flow_id,)).fetchall():
                state = make_state("Cancelled", f"Flow {flow_id} was archived.")
                self._apply_state(db, row["id"], row["version"] + 1, state, json.dumps(state))

        self._write(archive)

    def list_agents(self) -> list[dict[str, Any]]:
        rows = self._read("SELECT id, name, labels, last_queried FROM agent ORDER BY last_queried DESC LIMIT 100")
        return [{"id": row["id"], "name": row["name"], "labels": json.loads(row["labels"]),
                 "last_queried": row["last_queried"]} for row in rows]

    # Schedules: what Server's scheduler service and its schedule mutations do.

    def set_schedule(self, flow: FlowSummary, schedule: Schedule) -> None:
        text = json.dumps(schedule.to_prefect())

        def write(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT project_id, name FROM flow WHERE id = ?", (flow.id,)).fetchone()
            if row is None:
                raise APIError(f"there is no flow with id {flow.id}")
            db.execute("INSERT INTO flow_group (project_id, name, schedule) VALUES (?, ?, ?) "
                       "ON CONFLICT (project_id, name) DO UPDATE SET schedule = excluded.schedule",
                       (row["project_id"], row["name"], text))
            self._delete_auto_scheduled(db, flow.id)

        self._write(write)
        self.set_schedule_active(flow, True)

    def set_schedule_active(self, flow: FlowSummary, active: bool) -> bool:
        def write(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT coalesce(g.schedule, f.schedule) AS schedule FROM flow f LEFT JOIN flow_group g "
                "ON g.project_id = f.project_id AND g.name = f.name WHERE f.id = ?", (flow.id,)).fetchone()
            if row is None or (active and not row["schedule"]):
                return False
            db.execute("UPDATE flow SET is_schedule_active = ? WHERE id = ?", (active, flow.id))
            if not active:
                self._delete_auto_scheduled(db, flow.id)
            return True

        changed = self._write(write)
        if changed and active:
            self.top_up_schedules(_utcnow(), flow.id)
        return changed

    @staticmethod
    def _delete_auto_scheduled(db: sqlite3.Connection, flow_id: str) -> None:
        """Delete the scheduler's runs that have not started, as Server does when a schedule changes."""
        for table in ("flow_run_state", "log"):
            db.execute(f"DELETE FROM {table} WHERE flow_run_id IN (SELECT id FROM flow_run WHERE flow_id = ? "
                       "AND auto_scheduled = 1 AND state = 'Scheduled')", (flow_id,))
        db.execute("DELETE FROM flow_run WHERE flow_id = ? AND auto_scheduled = 1 AND state = 'Scheduled'", (flow_id,))

    def top_up_schedules(self, now: datetime, flow_id: str | None = None) -> datetime | None:
        """Keep each active schedule's next runs created, as Server's scheduler service does.

        Every agent and command sharing the file may do this at once: a run's idempotency key
        names the flow, the time and the clock's parameters, so each time is one run. A flow
        with enough future runs is skipped without computing its schedule.
        """
        rows = self._read(
            "SELECT f.id, coalesce(g.schedule, f.schedule) AS schedule, "
            "(SELECT count(*) FROM flow_run r WHERE r.flow_id = f.id AND r.auto_scheduled = 1 "
            "AND r.state = 'Scheduled' AND r.scheduled_start_time > ?) AS upcoming "
            "FROM flow f LEFT JOIN flow_group g ON g.project_id = f.project_id AND g.name = f.name "
            "WHERE f.is_schedule_active = 1 AND f.archived = 0 AND (? IS NULL OR f.id = ?)",
            (_format_time(now), flow_id, flow_id),
        )
        next_time = now + timedelta(seconds=SCHEDULER_SECONDS)
        for row in rows:
            if row["upcoming"] >= SCHEDULED_RUNS_AHEAD:
                next_time = min(next_time, self._when_half_used(row["id"], now))
                continue
            try:
                events = Schedule.from_prefect(json.loads(row["schedule"])).next(SCHEDULED_RUNS_AHEAD, now)
                self._write(functools.partial(self._create_scheduled_runs, flow_id=row["id"], events=events,
                                              now=now, schedule=row["schedule"]))
            except Exception as exc:  # Server logs a schedule it cannot use and goes on, as must every agent
                if isinstance(exc, APIError) and exc.transient:
                    raise
                logging.getLogger(__name__).error("Cannot schedule runs of flow %s: %s", row["id"], exc)
                continue
            if len(events) > SCHEDULED_RUNS_AHEAD // 2:
                next_time = min(next_time, events[SCHEDULED_RUNS_AHEAD // 2].start_time)
        return max(next_time, now + timedelta(seconds=1))

    def _when_half_used(self, flow_id: str, now: datetime) -> datetime:
        rows = self._read("SELECT scheduled_start_time FROM flow_run WHERE flow_id = ? AND auto_scheduled = 1 AND "
                          "state = 'Scheduled' AND scheduled_start_time > ? ORDER BY scheduled_start_time LIMIT 1 "
                          "OFFSET ?", (flow_id, _format_time(now), SCHEDULED_RUNS_AHEAD // 2))
        return _parse_time(rows[0][0]) if rows else now

    def _create_scheduled_runs(self, db: sqlite3.Connection, *, flow_id: str, events: Sequence[ClockEvent],
                               now: datetime, schedule: str) -> None:
        """Server's ``schedule_flow_runs``: a run per event, none for a time already scheduled, and
        none at all if the schedule was turned off or changed since ``events`` were computed from it."""
        import hashlib

        current = db.execute(
            "SELECT f.is_schedule_active, f.archived, coalesce(g.schedule, f.schedule) AS schedule FROM flow f "
            "LEFT JOIN flow_group g ON g.project_id = f.project_id AND g.name = f.name WHERE f.id = ?", (flow_id,)
        ).fetchone()
        if current is None or not current["is_schedule_active"] or current["archived"] or \
                current["schedule"] != schedule:
            return

        last = db.execute("SELECT max(scheduled_start_time) FROM flow_run WHERE flow_id = ? AND auto_scheduled = 1",
                          (flow_id,)).fetchone()[0]
        last_scheduled = _parse_time(last) if last else now
        for event in events:
            key = f"auto-scheduled:{flow_id}:{event.start_time.isoformat()}"
            if event.parameter_defaults or event.labels is not None:
                # Clocks with their own parameters or labels may fire at the same time.
                extra = json.dumps([event.parameter_defaults, event.labels], sort_keys=True)
                key += ":" + hashlib.sha256(extra.encode("utf-8")).hexdigest()[:32]
            elif event.start_time <= last_scheduled:
                continue
            self._insert_flow_run(db, flow_id, event.parameter_defaults, event.labels, event.start_time, key, None,
                                  auto_scheduled=True)

    def get_state_history(self, run_id: str) -> list[tuple[str, str, str]]:
        rows = self._read("SELECT state, message, timestamp FROM flow_run_state WHERE flow_run_id = ? ORDER BY version",
                          (run_id,))
        return [(row["state"], row["message"] or "", row["timestamp"]) for row in rows]

    def cancel_flow_run(self, run_id: str) -> str:
        def cancel(db: sqlite3.Connection) -> str:
            row = db.execute("SELECT state, version FROM flow_run WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise APIError(f"there is no flow run with id {run_id}")
            if is_final(row["state"]):
                return str(row["state"])
            if row["state"] in ("Running", "Cancelling"):
                state = make_state("Cancelling", "Flow run is cancelling")
            else:
                state = make_state("Cancelled", "Flow run is cancelled")
            self._apply_state(db, run_id, row["version"] + 1, state, json.dumps(state))
            return str(state["type"])

        return self._write(cancel)

    def close(self) -> None:
        connections, self._connections = self._connections, []
        self._generation += 1
        for connection in connections:
            connection.close()


def _serialized_flow_labels(serialized_flow: Mapping[str, Any]) -> list[str]:
    """A registered flow's labels: its run config's, else its environment's (Prefect 0.x)."""
    for section in ("run_config", "environment"):
        config = serialized_flow.get(section)
        if isinstance(config, Mapping) and isinstance(config.get("labels"), list):
            return [str(label) for label in config["labels"]]
    return []


def _check_required_parameters(declared: Any, given: Mapping[str, Any]) -> None:
    """Server's rule: every required parameter of the flow must be supplied."""
    required = {
        str(item.get("name")) for item in declared or [] if isinstance(item, Mapping) and item.get("required")
    }
    missing = required - set(given)
    if missing:
        raise APIError(f"Required parameters were not supplied: {sorted(missing)}")


# --- 7c. Backends: Prefect 2/3 work pools over REST ---------------------------------------
#
# The agent serves one work pool of type ``process``, as Prefect 3.9.1's own process worker
# does (prefect/workers/base.py and workers/process.py): it heartbeats, polls the pool's due
# runs, claims each by proposing PENDING, starts ``python -m prefect.engine`` with the run's
# job configuration (see _render_job), and the engine reports the run's states and logs
# itself. Prefect 2/3 names states otherwise; _REST_STATES translates both ways, so the agent
# loop keeps speaking one vocabulary. Two things differ from Server and shape this class:
# - An answer's HTTP status does not say who won a claim (ACCEPT, ABORT and REJECT come as
#   200 or 201): its body's ``status`` does. Our PENDING message carries the claim's token,
#   so a claim retried after a lost answer is known as ours.
# - Final states are not protected: the server takes a proposal over COMPLETED. Every guess
#   of the agent's is written ``unless_final`` (the outbox reads before it writes).

#: Prefect 2/3 state types, as the agent names them. PAUSED is not Prefect 1's Paused, which the
#: agent would take as due: a paused run waits for a person, and then for a worker as SCHEDULED.
_REST_STATES = {
    "SCHEDULED": "Scheduled", "PENDING": "Submitted", "RUNNING": "Running", "COMPLETED": "Success",
    "FAILED": "Failed", "CRASHED": "Crashed", "CANCELLING": "Cancelling", "CANCELLED": "Cancelled",
    "PAUSED": "Suspended",
}
_AGENT_TO_REST = {**{name: kind for kind, name in _REST_STATES.items()}, "Retrying": "SCHEDULED"}
#: Deployments of this file's own flows (``deploy()``) have this entrypoint before the flow's name,
#: and the flow file's path as their ``path``: the agent runs them itself, with no prefect.
_OWN_ENTRYPOINT = "local_agent:"
_OWN_DEPLOYMENT = "local-agent"
#: How long a deployment read from the API is used before it is read again.
_DEPLOYMENT_CACHE_SECONDS = 30.0
_REST_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
#: The longest page the server's list endpoints give.
_REST_PAGE = 200
#: How the token of a claim rides in the PENDING state's message (the state has no other free field).
_CLAIM_IN_MESSAGE = re.compile(r"\[claim ([0-9a-f]+)\]")
#: The job template a new ``process`` pool gets (Prefect 3.9.1's ProcessWorker default), as the
#: official worker sets it on a pool whose template is empty.
_PROCESS_JOB_TEMPLATE: dict[str, Any] = {
    "job_configuration": {
        "command": "{{ command }}", "env": "{{ env }}", "labels": "{{ labels }}", "name": "{{ name }}",
        "stream_output": "{{ stream_output }}", "working_dir": "{{ working_dir }}",
    },
    "variables": {
        "properties": {
            "name": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "Name",
                     "description": "Name given to infrastructure created by a worker."},
            "env": {"additionalProperties": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                    "description": "Environment variables to set when starting a flow run.",
                    "title": "Environment Variables", "type": "object"},
            "labels": {"additionalProperties": {"type": "string"}, "title": "Labels", "type": "object",
                       "description": "Labels applied to infrastructure created by a worker."},
            "command": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "Command",
                        "description": "The command to use when starting a flow run. In most cases, this should "
                                       "be left blank and the command will be automatically generated by the "
                                       "worker."},
            "stream_output": {"default": True, "title": "Stream Output", "type": "boolean",
                              "description": "If enabled, workers will stream output from flow run processes to "
                                             "local standard output."},
            "working_dir": {"anyOf": [{"format": "path", "type": "string"}, {"type": "null"}], "default": None,
                            "title": "Working Directory",
                            "description": "If provided, workers will open flow run processes within the "
                                           "specified path as the working directory. Otherwise, a temporary "
                                           "directory will be created."},
        },
        "type": "object",
    },
}
_PLACEHOLDER = re.compile(r"\{\{\s*([\w.-]+)\s*\}\}")


def _is_rest_api(url: str) -> bool:
    """Whether an API URL is a Prefect 2/3 one: its path ends in ``/api`` (Cloud: ``/api/accounts/...``)."""
    path = urlsplit(url).path.rstrip("/")
    return path.endswith("/api") or "/api/accounts/" in path + "/"


def _render_job(template: Mapping[str, Any], deployment_values: Mapping[str, Any],
                run_values: Mapping[str, Any]) -> dict[str, Any]:
    """A run's job configuration, as Prefect's workers resolve it: the template's variable
    defaults, then the deployment's job variables, then the run's; ``env`` tables merge."""
    properties = _table(_table(template.get("variables")).get("properties"))
    values: dict[str, Any] = {name: spec["default"] for name, spec in properties.items()
                              if isinstance(spec, Mapping) and "default" in spec}
    given = [item if isinstance(item, Mapping) else {} for item in (deployment_values, run_values)]
    env: dict[str, Any] = {}
    for layer in (values, *given):
        if isinstance(layer.get("env"), Mapping):
            env.update(layer["env"])
    for layer in given:
        values.update(layer)
    values["env"] = env
    configuration = template.get("job_configuration")
    return {key: _fill_placeholders(value, values)
            for key, value in (configuration.items() if isinstance(configuration, Mapping) else ())
            if _fill_placeholders(value, values) is not None}


def _fill_placeholders(value: Any, values: Mapping[str, Any]) -> Any:
    """A template value with ``{{ name }}`` filled in: alone, it takes the variable as it is."""
    if isinstance(value, str):
        alone = _PLACEHOLDER.fullmatch(value.strip())
        if alone:
            return values.get(alone.group(1))
        return _PLACEHOLDER.sub(lambda match: str(values.get(match.group(1)) or ""), value)
    if isinstance(value, Mapping):
        return {key: _fill_placeholders(item, values) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill_placeholders(item, values) for item in value]
    return value


def _rest_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """An agent's state as a Prefect 2/3 proposal, and whether it is forced."""
    kind = str(state.get("type"))
    context = state.get("context") or {}
    rest = "CRASHED" if kind == "Failed" and context.get("crashed") else _AGENT_TO_REST.get(kind)
    if rest is None:
        raise AgentError(f"a Prefect 2/3 API has no state {kind!r}")
    proposal: dict[str, Any] = {"type": rest, "message": state.get("message") or ""}
    # The same write sent again (its answer lost, or a 503 after the commit) is refused by the
    # server as a duplicate (PreventDuplicateTransitions): one id per state, however often sent.
    import uuid

    transition = uuid.uuid5(uuid.NAMESPACE_URL, "local-agent:" + json.dumps(state, sort_keys=True, default=str))
    proposal["state_details"] = {"transition_id": str(transition)}
    if rest == "PENDING" and context.get("claim"):
        proposal["message"] = f"{proposal['message']} [claim {context['claim']}]"
    if rest == "SCHEDULED":  # a hand-back, as Prefect's own reschedule writes it
        proposal["name"] = "AwaitingRetry"
        proposal["state_details"]["scheduled_time"] = state.get("start_time") or _format_time(_utcnow())
    # As the official worker: Cancelled is forced, over whatever the engine wrote as it was stopped.
    return proposal, rest == "CANCELLED"


def _table(value: Any) -> dict[str, Any]:
    """A JSON object from the API, or {} when it is absent or of another shape."""
    return value if isinstance(value, dict) else {}


def _state_of(answer: Mapping[str, Any]) -> dict[str, Any]:
    """The state in an orchestration answer (``{"status", "state", "details"}``), or {}."""
    return _table(answer.get("state"))


def _parameter_schema(parameters: Any) -> dict[str, Any]:
    """Declared parameters (name, required, default) as a deployment's parameter schema."""
    declared = [item for item in parameters or [] if isinstance(item, Mapping) and "name" in item]
    properties = {str(item["name"]): {"title": str(item["name"]), **({} if item.get("required") else
                                                                       {"default": item.get("default")})}
                  for item in declared}
    return {"type": "object", "title": "Parameters", "properties": properties,
            "required": [str(item["name"]) for item in declared if item.get("required")]}


def _rest_parameters(schema: Any) -> list[dict[str, Any]]:
    """A deployment's parameter schema in the shape flows declare parameters here (name, required)."""
    schema = schema if isinstance(schema, Mapping) else {}
    required = set(schema.get("required") or [])
    properties = schema.get("properties") if isinstance(schema.get("properties"), Mapping) else {}
    return [{"name": str(name), "required": name in required} for name in properties]


class RESTBackend(Backend):
    """Prefect 2/3 over REST: the agent as a ``process`` worker of one work pool."""

    #: One set_state call decides a claim (about 20-60 ms): claim just ahead of the start time.
    claim_lead_seconds = 0.5
    launches_runs = True

    def __init__(self, api: str, token: str = "", *, pool: str = "", work_queues: Sequence[str] = (),
                 create_pool: bool = False, timeout: float = REQUEST_TIMEOUT_SECONDS, auth_string: str = "") -> None:
        self.api = api.rstrip("/")
        self.pool, self.work_queues, self.create_pool = pool, list(work_queues), create_pool
        self.location = f"Prefect API at {self.api}" + (f", work pool {pool!r}" if pool else "")
        self._path = urlsplit(self.api).path.rstrip("/")
        self._transport = _HTTPTransport(self.api, timeout)
        self._token, self._auth_string = token, auth_string
        self._worker = ""
        self._pool_record: dict[str, Any] = {}
        self._next_beat = 0.0
        #: The last poll's runs (their whole records), so the agent's next question needs no call.
        self._due: dict[str, dict[str, Any]] = {}
        self._flow_names: dict[str, str] = {}
        self._deployments: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._lock = threading.Lock()
        self.requests_sent = 0

    # The transport.

    def call(self, method: str, path: str, body: Any = None, *, missing_ok: bool = False) -> Any:
        """One request under the API's path; its JSON answer (None for 204, or 404 with ``missing_ok``)."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Accept": "application/json", "User-Agent": f"local-agent/{__version__}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        elif self._auth_string:  # a self-hosted server's basic authentication, as Prefect's client sends it
            import base64

            headers["Authorization"] = "Basic " + base64.b64encode(self._auth_string.encode("utf-8")).decode("ascii")
        for delay in (0.25, 0.5, 1.0, 2.0, 0.0):
            self.requests_sent += 1
            status, raw = self._transport.request(method, self._path + path, data, headers)
            # Busy (its SQLite database locked, the write rolled back) or asking us to slow down:
            # Prefect's own client tries again too.
            if status not in (429, 503) or not delay:
                break
            time.sleep(random.uniform(delay / 2, delay))
        if status == 404 and missing_ok:
            return None
        if status >= 400:
            raise self._error(method, path, status, raw)
        if status == 204 or not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise APIError(f"the API at {self.api} answered {method} {path} with a body that is not JSON",
                           transient=True) from None

    def _error(self, method: str, path: str, status: int, raw: bytes) -> APIError:
        try:
            detail: Any = json.loads(raw)
            detail = detail.get("detail", detail) if isinstance(detail, dict) else detail
        except ValueError:
            detail = raw.decode("utf-8", "replace")
        detail = _one_line(detail if isinstance(detail, str) else json.dumps(detail), 300)
        if status == 401:
            return AuthError(f"the API at {self.api} refused the key (HTTP 401): check -k/--key or PREFECT_API_KEY, "
                             "or PREFECT_API_AUTH_STRING for a server behind basic authentication")
        # The server answers 503 when its database is busy; the write was rolled back: retry it.
        transient = status in (408, 429) or status >= 500
        return APIError(f"the API at {self.api} refused {method} {path} (HTTP {status}): {detail}",
                        transient=transient)

    def _pool_path(self, tail: str = "") -> str:
        from urllib.parse import quote

        return f"/work_pools/{quote(self.pool, safe='')}{tail}"

    # Start-up.

    def connect(self, agent_name: str, labels: Sequence[str]) -> str:
        if not self.pool:
            raise ConfigError(f"the API at {self.api} is a Prefect 2/3 API, which gives runs to workers by work "
                              "pool: start the agent with --pool POOL (and --work-queue QUEUE for only some queues)")
        health = self.call("GET", "/health", missing_ok=True)
        if health is not True:
            raise ConfigError(f"the API at {self.api} is not a Prefect 2/3 API (GET /health did not answer true): "
                              "a Prefect Server 1.x API is given without /api")
        self._pool_record = self._read_or_create_pool()
        self._check_queues()
        self._worker = f"{agent_name}@{_hostname()}"
        self._beat(read_pool=False)  # just read
        return f"{self.pool}/{self._worker}"

    def _read_or_create_pool(self) -> dict[str, Any]:
        pool = self.call("GET", self._pool_path(), missing_ok=True)
        if pool is None and not self.create_pool:
            raise ConfigError(f"work pool {self.pool!r} does not exist at {self.api}: create it with "
                              f"`prefect work-pool create {self.pool} --type process`, or pass --create-pool")
        if pool is None:
            try:
                pool = self.call("POST", "/work_pools/", {"name": self.pool, "type": "process"})
                logging.getLogger(__name__).info("Created work pool %r (type process)", self.pool)
            except APIError as exc:
                if "(HTTP 409)" not in str(exc):
                    raise
                pool = self.call("GET", self._pool_path())  # another agent created it first
        pool = _expect(pool, dict, "work pool")
        if pool.get("type") != "process":
            raise ConfigError(f"work pool {self.pool!r} is of type {pool.get('type')!r}; this agent runs flows as "
                              "local processes and serves only pools of type process")
        if not pool.get("base_job_template"):  # as the official worker, on first contact
            self.call("PATCH", self._pool_path(), {"base_job_template": _PROCESS_JOB_TEMPLATE})
            pool["base_job_template"] = _PROCESS_JOB_TEMPLATE
        return pool

    def _check_queues(self) -> None:
        """Each ``--work-queue`` must exist (the poll answers 404 for the whole pool otherwise)."""
        from urllib.parse import quote

        for name in self.work_queues:
            path = self._pool_path(f"/queues/{quote(name, safe='')}")
            if self.call("GET", path, missing_ok=True) is not None:
                continue
            if not self.create_pool:
                raise ConfigError(f"work pool {self.pool!r} has no work queue {name!r}: create it with `prefect "
                                  f"work-queue create {name} --pool {self.pool}`, or pass --create-pool")
            try:
                self.call("POST", self._pool_path("/queues"), {"name": name})  # "/queues/" redirects
            except APIError as exc:
                if "(HTTP 409)" not in str(exc):  # 409: another agent created it first
                    raise

    def _beat(self, *, read_pool: bool = True) -> None:
        """The worker's heartbeat (REST, as the official worker's fallback), and a fresh look at the
        pool (its job template)."""
        self._next_beat = time.monotonic() + HEARTBEAT_SECONDS  # a failing API is not asked every round
        self.call("POST", self._pool_path("/workers/heartbeat"),
                  {"name": self._worker, "heartbeat_interval_seconds": int(HEARTBEAT_SECONDS)})
        pool = self.call("GET", self._pool_path(), missing_ok=True) if read_pool else None
        if isinstance(pool, dict):
            self._pool_record = pool

    # The agent's loop.

    def keep_alive(self) -> None:
        """The worker heartbeat, every HEARTBEAT_SECONDS, whether or not the agent has room to poll."""
        if self._worker and time.monotonic() >= self._next_beat:
            self._beat()

    def get_runs_in_queue(self, labels: Sequence[str], before: datetime) -> list[str]:
        self.keep_alive()
        body: dict[str, Any] = {"scheduled_before": _format_time(before)}
        if self.work_queues:
            body["work_queue_names"] = self.work_queues
        rows = _expect(self.call("POST", self._pool_path("/get_scheduled_flow_runs"), body), list,
                       "get_scheduled_flow_runs")
        due = {}
        for row in rows:
            record = _expect(_expect(row, dict, "a scheduled run").get("flow_run"), dict, "flow_run")
            due[_expect(record.get("id"), str, "flow_run.id")] = record
        with self._lock:
            self._due = due
        return list(due)

    def get_flow_runs(self, run_ids: Sequence[str]) -> list[FlowRun]:
        runs = []
        for run_id in run_ids:
            with self._lock:
                record = self._due.get(run_id)
            record = record or self.call("GET", f"/flow_runs/{run_id}", missing_ok=True)
            if record is None:
                continue
            run = self._flow_run(record)
            if run.state == "Scheduled":
                run.launch = self._launch(record, run)
                runs.append(run)
        return runs

    def _deployment(self, deployment_id: Any) -> dict[str, Any] | None:
        """A deployment, read again at most every _DEPLOYMENT_CACHE_SECONDS; None when there is none."""
        if not deployment_id:
            return None
        key = str(deployment_id)
        with self._lock:
            read_at, deployment = self._deployments.get(key, (-math.inf, None))
        if time.monotonic() - read_at > _DEPLOYMENT_CACHE_SECONDS:
            found = self.call("GET", f"/deployments/{key}", missing_ok=True)
            deployment = found if isinstance(found, dict) else None
            with self._lock:
                self._deployments[key] = (time.monotonic(), deployment)
        return deployment

    def _job(self, record: Mapping[str, Any], deployment: Mapping[str, Any]) -> dict[str, Any]:
        template = self._pool_record.get("base_job_template") or _PROCESS_JOB_TEMPLATE
        return _render_job(template, deployment.get("job_variables") or {}, record.get("job_variables") or {})

    def _as_own_flow(self, run: FlowRun, record: Mapping[str, Any], deployment: Mapping[str, Any]) -> bool:
        """Give a run of one of this file's own flows its storage and run config; whether it is one."""
        entrypoint, path = deployment.get("entrypoint"), deployment.get("path")
        if not (isinstance(entrypoint, str) and entrypoint.startswith(_OWN_ENTRYPOINT) and isinstance(path, str)):
            return False
        job = self._job(record, deployment)
        run.storage = local_storage(run.flow_name, path)
        run.run_config = {"type": "LocalRun", "env": job.get("env") or {}, "working_dir": job.get("working_dir")}
        return True

    def _launch(self, record: Mapping[str, Any], run: FlowRun) -> Launch | None:
        """How to start a run: its deployment's and its own job variables over the pool's template
        (None for this file's own flows, which the agent starts as it starts any of them)."""
        deployment_id = record.get("deployment_id")
        deployment = self._deployment(deployment_id)
        if deployment is None:
            run.problem = ("its deployment was deleted" if deployment_id else "it has no deployment") + \
                ": a worker runs a deployment's runs (`prefect deploy`)"
            return None
        if self._as_own_flow(run, record, deployment):
            return None
        job = self._job(record, deployment)
        env_given = job.get("env") or {}
        if not isinstance(env_given, Mapping):
            run.problem = f"its job's env is {type(env_given).__name__}, not a table of variables"
            return None
        env = {str(key): str(value) for key, value in env_given.items() if value is not None}
        env.update({
            "PREFECT_API_URL": self.api,
            "PREFECT__FLOW_RUN_ID": run.id,
            "PREFECT__FLOW_ID": run.flow_id,
            "PREFECT__FLOW_NAME": run.flow_name,
            "PREFECT__DEPLOYMENT_ID": str(deployment_id),
            "PREFECT__DEPLOYMENT_NAME": str(deployment.get("name") or ""),
            "PREFECT__WORKER_NAME": self._worker,
            "PYTHONUNBUFFERED": "1",
            # Its records then come as JSON lines: the agent shows them, and sends to the API only
            # those its engine does not send itself (see _prefect_json_record).
            "PREFECT_LOGGING_HANDLERS_CONSOLE_FORMATTER": "json",
        })
        if self._token:  # the only place a run's process finds the key
            env["PREFECT_API_KEY"] = self._token
        if self._auth_string:
            env["PREFECT_API_AUTH_STRING"] = self._auth_string
        import shlex

        try:
            command = tuple(shlex.split(job["command"])) if isinstance(job.get("command"), str) else ()
        except ValueError as exc:  # a job variable nobody checked: this run fails, not the agent
            run.problem = f"its job's command {job['command']!r} cannot be read: {exc}"
            return None
        working_dir = job.get("working_dir")
        return Launch(command, "prefect.engine", env, str(working_dir) if working_dir else None, "prefect",
                      ("PREFECT__CONTROL_PORT", "PREFECT__CONTROL_TOKEN"), job.get("stream_output") is not False)

    def get_flow_run(self, run_id: str) -> FlowRun | None:
        record = self.call("GET", f"/flow_runs/{run_id}", missing_ok=True)
        if record is None:
            return None
        run = self._flow_run(record)
        deployment = self._deployment(record.get("deployment_id"))
        if deployment is not None:  # the flow-run process of one of this file's flows needs its file
            self._as_own_flow(run, record, deployment)
        return run

    def _flow_run(self, record: Any) -> FlowRun:
        try:
            return self._read_flow_run(_expect(record, dict, "a flow run"))
        except (AttributeError, TypeError, ValueError, KeyError) as exc:  # a field of an unexpected shape
            raise APIError(f"malformed API answer: a flow run record: {_describe_exception(exc)}") from None

    def _read_flow_run(self, record: dict[str, Any]) -> FlowRun:
        state = _table(record.get("state"))
        kind = str(state.get("type") or "")
        message = state.get("message") if isinstance(state.get("message"), str) else None
        serialized: dict[str, Any] = {"type": _REST_STATES.get(kind, kind.title()), "name": state.get("name"),
                                      "message": message, "context": {}}
        claim = _CLAIM_IN_MESSAGE.search(message or "")
        if claim:
            serialized["context"]["claim"] = claim.group(1)
        details = state.get("state_details")
        scheduled = details.get("scheduled_time") if isinstance(details, dict) else None
        if kind == "SCHEDULED" and isinstance(scheduled, str):
            serialized["start_time"] = scheduled
        flow_id = str(record.get("flow_id") or "")
        run = FlowRun(
            id=_expect(record.get("id"), str, "flow_run.id"), version=1, state=serialized["type"],
            serialized_state=serialized, flow_id=flow_id, flow_name=self._flow_name(flow_id),
            parameters=record.get("parameters"), name=str(record.get("name") or ""),
            labels=[tag for tag in record.get("tags") or [] if isinstance(tag, str)]
            if isinstance(record.get("tags"), list) else [],
            scheduled_start_time=_optional_time(record.get("expected_start_time")), state_message=message,
            updated=_optional_time(record.get("updated")), began=_optional_time(record.get("start_time")),
            ended=_optional_time(record.get("end_time")),
        )
        if not isinstance(run.parameters, dict):
            run.parameters, run.problem = {}, "its parameters are not a JSON object"
        return run

    def _flow_name(self, flow_id: str) -> str:
        if flow_id and flow_id not in self._flow_names:
            flow = self.call("GET", f"/flows/{flow_id}", missing_ok=True)
            self._flow_names[flow_id] = str(flow.get("name") or "") if isinstance(flow, dict) else ""
        return self._flow_names.get(flow_id, "")

    def claim_flow_runs(self, claims: Sequence[tuple[FlowRun, Mapping[str, Any]]]) -> list[int | None]:
        """Propose PENDING for each run: ours if accepted, or refused over our own earlier claim."""
        return [self._claim(run, submitted) for run, submitted in claims]

    def _claim(self, run: FlowRun, submitted: Mapping[str, Any]) -> int | None:
        proposal, _ = _rest_state(submitted)
        token = f"[claim {submitted['context']['claim']}]"
        # A claim retried after a lost answer is aborted over itself: the token tells.
        answer = _retry_api(lambda: self._propose(run.id, proposal, force=False), 10.0)
        if answer is None:
            return None
        new = _state_of(answer)
        ours = new.get("type") == "PENDING" and token in str(new.get("message") or "")
        accepted = answer.get("status") == "ACCEPT" and new.get("type") == "PENDING"
        # Sent again after a lost answer, our own claim comes back refused as a duplicate (REJECT)
        # or as a transition from PENDING (ABORT): the token says it is ours all the same.
        if not (accepted or (answer.get("status") in ("ABORT", "REJECT") and ours)):
            return None
        labels = {"prefect.worker.name": self._worker, "prefect.worker.type": "process",
                  "prefect.work-pool.name": self.pool, "prefect.work-pool.id": str(self._pool_record.get("id", ""))}
        try:  # the official worker's labels; the run is ours without them
            _retry_api(lambda: self.call("PATCH", f"/flow_runs/{run.id}/labels", labels), 5.0)
        except APIError as exc:
            logging.getLogger(__name__).debug("Could not label flow run %s: %s", run.id, exc)
        return 1

    def _propose(self, run_id: str, proposal: Mapping[str, Any], *, force: bool) -> dict[str, Any] | None:
        answer = self.call("POST", f"/flow_runs/{run_id}/set_state", {"state": dict(proposal), "force": force},
                           missing_ok=True)
        return None if answer is None else _expect(answer, dict, "set_state")

    def set_flow_run_state(self, run_id: str, state: Mapping[str, Any], version: int | None) -> None:
        proposal, force = _rest_state(state)
        answer = self._propose(run_id, proposal, force=force)
        if answer is None:
            raise StateUpdateFailed(f"State update failed for flow run ID {run_id}: there is no such run")
        ours = _table(_state_of(answer).get("state_details")).get("transition_id")
        if answer.get("status") == "REJECT" and ours == proposal["state_details"]["transition_id"]:
            return  # our own write, sent again: it is there
        if answer.get("status") != "ACCEPT":
            reason = _table(answer.get("details")).get("reason") or answer.get("status")
            raise StateUpdateFailed(f"State update failed for flow run ID {run_id}: {reason}")

    def record_process(self, run_id: str, pid: int) -> None:
        self.call("PATCH", f"/flow_runs/{run_id}", {"infrastructure_pid": str(pid)})

    def routing_reasons(self, run: FlowRun) -> list[str]:
        """The official worker's reasons a run waits: another pool or queue, paused, at a limit."""
        record = self.call("GET", f"/flow_runs/{run.id}", missing_ok=True)
        if not isinstance(record, dict):
            return []
        pool, queue = str(record.get("work_pool_name") or ""), str(record.get("work_queue_name") or "")
        reasons = []
        if not record.get("deployment_id"):
            reasons.append("it has no deployment: workers run deployments' runs")
        if not pool:
            return [*reasons, "it is in no work pool"]
        if self.pool and pool != self.pool:
            reasons.append(f"it is in work pool {pool!r}, and the agent serves {self.pool!r}")
        if self.work_queues and queue not in self.work_queues:
            reasons.append(f"it is in work queue {queue!r}, and the agent takes only {', '.join(self.work_queues)}")
        if not record.get("work_queue_id"):
            reasons.append(f"its work queue {queue!r} was deleted: no worker gets it")
        reasons += self._paused_or_full(pool, queue)
        if (record.get("state") or {}).get("name") == "AwaitingConcurrencySlot":
            reasons.append("it waits for a slot under its deployment's concurrency limit")
        return reasons

    def _paused_or_full(self, pool: str, queue: str) -> list[str]:
        from urllib.parse import quote

        reasons = []
        busy = {"state": {"type": {"any_": ["PENDING", "RUNNING", "CANCELLING"]}}}
        pool_record = self.call("GET", f"/work_pools/{quote(pool, safe='')}", missing_ok=True) or {}
        queue_record = self.call("GET", f"/work_pools/{quote(pool, safe='')}/queues/{quote(queue, safe='')}",
                                 missing_ok=True) or {}
        for what, name, record, scope in (("work pool", pool, pool_record, {"work_pools": {"name": {"any_": [pool]}}}),
                                          ("work queue", queue, queue_record,
                                           {"work_pool_queues": {"id": {"any_": [queue_record.get("id")]}}})):
            if record.get("is_paused"):
                reasons.append(f"its {what} {name!r} is paused")
            limit = record.get("concurrency_limit")
            if isinstance(limit, int) and record.get("id"):
                active = self.call("POST", "/flow_runs/count", {"flow_runs": busy, **scope})
                if isinstance(active, int) and active >= limit:
                    reasons.append(f"its {what} {name!r} is at its concurrency limit ({active} of {limit} under way)")
        return reasons

    def write_run_logs(self, logs: Sequence[Mapping[str, Any]]) -> None:
        self.call("POST", "/logs/", [
            {"flow_run_id": log["flow_run_id"], "timestamp": log["timestamp"], "name": log["name"],
             "level": _REST_LEVELS.get(str(log["level"]), 20), "message": log["message"]}
            for log in logs
        ])

    def heartbeat(self, run_id: str) -> None:
        """Nothing: Prefect 2/3 has no flow-run heartbeats from outside the engine."""

    # The commands.

    def find_flow(self, name: str) -> FlowSummary | None:
        from urllib.parse import quote

        if "/" in name:
            flow, deployment = name.split("/", 1)
            row = self.call("GET", f"/deployments/name/{quote(flow, safe='')}/{quote(deployment, safe='')}",
                            missing_ok=True)
            return None if row is None else self._deployment_summary(row)
        rows = _expect(self.call("POST", "/deployments/filter", {"flows": {"name": {"any_": [name]}}, "limit": 2}),
                       list, "deployments")
        if len(rows) > 1:
            raise AgentError(f"flow {name!r} has several deployments: name one, as {name}/DEPLOYMENT")
        return self._deployment_summary(rows[0]) if rows else None

    def _deployment_summary(self, row: Any) -> FlowSummary:
        row = _expect(row, dict, "a deployment")
        flow = self._flow_name(str(row.get("flow_id") or ""))
        return FlowSummary(
            id=_expect(row.get("id"), str, "deployment.id"), name=f"{flow}/{row.get('name')}", version=0,
            project=str(row.get("work_pool_name") or ""), labels=[str(tag) for tag in row.get("tags") or []],
            storage=None, parameters=_rest_parameters(row.get("parameter_openapi_schema")),
            schedule_active=bool(row.get("schedules")) and not row.get("paused"),
        )

    def create_flow_run(
        self,
        flow_id: str,
        *,
        parameters: Mapping[str, Any],
        labels: Sequence[str] | None,
        scheduled_start_time: datetime | None,
        idempotency_key: str,
        name: str | None = None,
    ) -> str:
        if labels is not None:
            raise AgentError("a Prefect 2/3 API routes runs by work pool and queue, not by labels: drop --label")
        body: dict[str, Any] = {"parameters": dict(parameters), "idempotency_key": idempotency_key}
        if scheduled_start_time is not None:
            due = _format_time(scheduled_start_time)
            body["state"] = {"type": "SCHEDULED", "state_details": {"scheduled_time": due}}
        if name:
            body["name"] = name
        answer = self.call("POST", f"/deployments/{flow_id}/create_flow_run", body)
        return _expect(_expect(answer, dict, "create_flow_run").get("id"), str, "flow run id")

    def list_flows(self) -> list[FlowSummary]:
        rows = self._pages("/deployments/filter", {"sort": "NAME_ASC"}, math.inf)
        return sorted((self._deployment_summary(row) for row in rows), key=lambda flow: flow.name)

    def _pages(self, path: str, body: Mapping[str, Any], limit: float, offset: int = 0) -> list[Any]:
        """All rows of a list endpoint, a page at a time, up to ``limit``."""
        rows: list[Any] = []
        while len(rows) < limit:
            page_size = int(min(_REST_PAGE, limit - len(rows)))
            page = _expect(self.call("POST", path, {**body, "offset": offset + len(rows), "limit": page_size}),
                           list, path)
            rows += page
            if len(page) < page_size:
                break
        return rows

    def list_flow_runs(
        self,
        *,
        flow_name: str | None = None,
        state: str | None = None,
        run_ids: Sequence[str] | None = None,
        limit: int = 20,
        offset: int = 0,
        search: str | None = None,
        attention_first: bool = False,
    ) -> list[FlowRun]:
        runs: dict[str, Any] = {}
        if run_ids is not None:
            runs["id"] = {"any_": list(run_ids)}
        if state is not None:
            runs["state"] = {"type": {"any_": [_AGENT_TO_REST.get(state, state.upper())]}}
        if search:
            runs["name"] = {"like_": search}
        body: dict[str, Any] = {"flow_runs": runs, "sort": "EXPECTED_START_TIME_DESC"}
        if flow_name is not None:
            body["flows"] = {"name": {"any_": [flow_name.split("/", 1)[0]]}}
        return [self._flow_run(row) for row in self._pages("/flow_runs/filter", body, limit, offset)]

    def get_run_logs(self, run_id: str, offset: int = 0, limit: int | None = None) -> list[LogLine]:
        body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC"}
        levels: dict[Any, str] = {number: name for name, number in _REST_LEVELS.items()}
        return [
            LogLine(str(row.get("timestamp") or ""), levels.get(row.get("level"), str(row.get("level"))),
                    str(row.get("name") or ""), str(row.get("message") or ""))
            for row in (_expect(row, dict, "a log") for row in
                        self._pages("/logs/filter", body, math.inf if limit is None else limit, offset))
        ]

    def get_state_history(self, run_id: str) -> list[tuple[str, str, str]]:
        rows = _expect(self.call("GET", f"/flow_run_states/?flow_run_id={run_id}"), list, "flow_run_states")
        states = [_expect(row, dict, "a state") for row in rows]
        states.sort(key=lambda row: str(row.get("timestamp") or ""))
        return [(str(row.get("name") or _REST_STATES.get(str(row.get("type")), "")), str(row.get("message") or ""),
                 str(row.get("timestamp") or "")) for row in states]

    def delete_flow_run(self, run_id: str) -> bool:
        if self.call("GET", f"/flow_runs/{run_id}", missing_ok=True) is None:
            return False
        self.call("DELETE", f"/flow_runs/{run_id}", missing_ok=True)
        return True

    def cancel_flow_run(self, run_id: str) -> str:
        answer = self._propose(run_id, {"type": "CANCELLING", "name": "Cancelling"}, force=False)
        if answer is None:
            raise AgentError(f"there is no flow run {run_id}")
        state = _state_of(answer)
        return _REST_STATES.get(str(state.get("type")), str(state.get("type")))

    def list_agents(self) -> list[dict[str, Any]]:
        if not self.pool:
            return []
        rows = _expect(self.call("POST", self._pool_path("/workers/filter"), {}), list, "workers")
        return [{"id": str(row.get("id") or ""), "name": str(row.get("name") or ""), "labels": [],
                 "last_queried": row.get("last_heartbeat_time")} for row in rows if isinstance(row, dict)]

    def _unsupported(self, what: str) -> AgentError:
        return AgentError(f"{what} is not done through this agent on a Prefect 2/3 API: use `prefect deploy` and "
                          "the deployment's schedules")

    def ensure_project(self, name: str) -> str:
        """The work pool this file's flows are deployed to: ``--pool``'s (or its setting's), else the
        project's name; it must exist (``--create-pool`` makes it)."""
        if not self.pool:
            self.pool = name
        self._read_or_create_pool()
        return self.pool

    def register_flow(self, project_id: str, serialized_flow: Mapping[str, Any]) -> str:
        """A flow of this file's as a flow and a deployment (``local-agent``) in the pool: upserts."""
        if serialized_flow.get("schedule"):
            raise self._unsupported("a schedule given to deploy()")
        name = str(serialized_flow["name"])
        storage = serialized_flow.get("storage") or {}
        path = (storage.get("flows") or {}).get(name)
        config = serialized_flow.get("run_config") or {}
        labels = [str(label) for label in serialized_flow.get("labels") or []]
        flow = _expect(self.call("POST", "/flows/", {"name": name, "tags": labels}), dict, "flow")
        env = config.get("env") or {}
        job_variables: dict[str, Any] = {"env": {str(key): str(value) for key, value in env.items()}}
        if config.get("working_dir"):
            job_variables["working_dir"] = config["working_dir"]
        deployment = self.call("POST", "/deployments/", {
            "name": _OWN_DEPLOYMENT, "flow_id": flow["id"], "work_pool_name": project_id,
            "entrypoint": _OWN_ENTRYPOINT + name, "path": path, "tags": labels,
            "parameter_openapi_schema": _parameter_schema(serialized_flow.get("parameters")),
            "enforce_parameter_schema": True, "job_variables": job_variables,
            "description": f"Deployed by local_agent {__version__}; run by its agent (`start --pool {project_id}`)",
        })
        return _expect(_expect(deployment, dict, "deployment").get("id"), str, "deployment id")

    def archive_flow(self, flow_id: str) -> None:
        raise self._unsupported("archiving flows")

    def set_schedule(self, flow: FlowSummary, schedule: Schedule) -> None:
        raise self._unsupported("scheduling flows")

    def set_schedule_active(self, flow: FlowSummary, active: bool) -> bool:
        raise self._unsupported("scheduling flows")

    def close(self) -> None:
        self._transport.close()


# --- 7d. Backends: choosing one, and delivering writes to it -----------------------------


def open_backend(settings: Settings) -> Backend:
    """The backend ``settings.api`` names: an SQLite file, a Prefect 2/3 REST API (its path ends
    in ``/api``, or ``--pool`` is given) or a Prefect 1.x GraphQL API."""
    if settings.api.startswith("sqlite:"):
        if settings.pool:
            raise ConfigError("--pool names a work pool of a Prefect 2/3 API: give its URL with -a/--api or "
                              "PREFECT_API_URL, like http://127.0.0.1:4200/api")
        return SQLiteBackend(_sqlite_path(settings.api), busy_timeout=settings.request_timeout)
    _check_token_safety(settings)
    if settings.pool or _is_rest_api(settings.api):
        return RESTBackend(settings.api, settings.token, pool=settings.pool, work_queues=settings.work_queues,
                           create_pool=settings.create_pool, timeout=settings.request_timeout,
                           auth_string=settings.auth_string)
    return GraphQLBackend(
        settings.api, settings.token, tenant_id=settings.tenant_id, timeout=settings.request_timeout
    )


def _redact_state(state: Mapping[str, Any], redact: _Redactor) -> dict[str, Any]:
    """A state with its message redacted."""
    redacted = dict(state)
    if isinstance(redacted.get("message"), str):
        redacted["message"] = redact(redacted["message"])
    return redacted


class _Metrics:
    """The agent's counters and histograms, rendered in Prometheus' text format for ``/metrics``.

    Written by the agent's loop and its outbox thread, read by the HTTP endpoint's threads.
    """

    #: Buckets (s) of the run-duration and API-latency histograms.
    RUN_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)
    API_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    HELP: ClassVar[dict[str, str]] = {
        "runs_claimed_total": "Flow runs this agent claimed (wrote Submitted for).",
        "runs_launched_total": "Flow-run processes started.",
        "runs_finished_total": "Flow runs this agent saw end, by final state.",
        "runs_handed_back_total": "Claimed runs given back to the queue (Scheduled) at shutdown.",
        "claims_lost_total": "Claims another agent won first.",
        "runs_timed_out_total": "Flow runs stopped for running past --timeout.",
        "runs_cancelled_total": "Flow runs stopped because they were cancelled in the API.",
        "polls_total": "Polls of the API for due runs.",
        "poll_errors_total": "Polls that failed.",
        "api_errors_total": "API requests that failed, by operation.",
        "run_duration_seconds": "Wall time of flow-run processes, from launch to the end of the run.",
        "api_request_duration_seconds": "API request latency, by operation.",
    }

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._histograms: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}

    def count(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Add ``value`` to a histogram: per-bucket counts (the last is +Inf), then sum."""
        buckets = self.RUN_BUCKETS if name == "run_duration_seconds" else self.API_BUCKETS
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            counts = self._histograms.setdefault(key, [0.0] * (len(buckets) + 2))
            for index, bound in enumerate(buckets):
                if value <= bound:
                    counts[index] += 1
            counts[len(buckets)] += 1  # +Inf, which is also the count
            counts[-1] += value

    @contextlib.contextmanager
    def timed(self, operation: str) -> Iterator[None]:
        """Time an API request; count it as an error when it raises."""
        started = time.monotonic()
        try:
            yield
        except Exception:
            self.count("api_errors_total", operation=operation)
            raise
        finally:
            self.observe("api_request_duration_seconds", time.monotonic() - started, operation=operation)

    def render(self, gauges: Mapping[str, tuple[str, float]], info: Mapping[str, str]) -> str:
        """The Prometheus text exposition (format 0.0.4) of everything, with ``gauges`` read now."""
        lines = ["# HELP local_agent_info This agent: its version and name.", "# TYPE local_agent_info gauge",
                 f"local_agent_info{_prometheus_labels(info)} 1"]
        with self._lock:
            counters, histograms = dict(self._counters), {k: list(v) for k, v in self._histograms.items()}
        for name in sorted({name for name, _ in counters} | {n for n in self.HELP if n.endswith("_total")}):
            lines += [f"# HELP local_agent_{name} {self.HELP.get(name, name)}", f"# TYPE local_agent_{name} counter"]
            series = {labels: value for (each, labels), value in counters.items() if each == name} or {(): 0.0}
            lines += [f"local_agent_{name}{_prometheus_labels(dict(labels))} {_prometheus_number(value)}"
                      for labels, value in sorted(series.items())]
        for name in ("run_duration_seconds", "api_request_duration_seconds"):
            buckets = self.RUN_BUCKETS if name == "run_duration_seconds" else self.API_BUCKETS
            lines += [f"# HELP local_agent_{name} {self.HELP[name]}", f"# TYPE local_agent_{name} histogram"]
            for (each, labels), counts in sorted(histograms.items()):
                if each != name:
                    continue
                for bound, count in zip([*buckets, math.inf], counts):
                    le = dict(labels, le=_prometheus_number(bound))
                    lines.append(f"local_agent_{name}_bucket{_prometheus_labels(le)} {_prometheus_number(count)}")
                lines.append(f"local_agent_{name}_sum{_prometheus_labels(dict(labels))} {counts[-1]!r}")
                lines.append(f"local_agent_{name}_count{_prometheus_labels(dict(labels))} "
                             f"{_prometheus_number(counts[len(buckets)])}")
        for name, (help_text, value) in gauges.items():
            lines += [f"# HELP local_agent_{name} {help_text}", f"# TYPE local_agent_{name} gauge",
                      f"local_agent_{name} {_prometheus_number(value)}"]
        return "\n".join(lines) + "\n"


def _prometheus_labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    escaped = (str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
               for value in labels.values())
    return "{" + ",".join(f'{key}="{value}"' for key, value in zip(labels, escaped)) + "}"


def _prometheus_number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


class _Outbox:
    """API writes that must not be lost — run-log lines and states — delivered in order.

    A background thread sends entries as soon as they arrive; entries queued while a send
    is under way go together in the next one, so batches grow exactly when the API is the
    bottleneck. While the API cannot take them they wait, retried about once a second.
    With a spool file (the agent's) they also survive a restart of the process; the spool
    keeps at most MAX_SPOOL_BYTES, dropping the oldest log lines first, never a state.
    """

    def __init__(self, backend: Backend, spool: Path | None = None, logger: logging.Logger | None = None,
                 redact: _Redactor | None = None, metrics: _Metrics | None = None) -> None:
        self._backend = backend
        self._metrics = metrics or _Metrics()
        #: Every line and state message is redacted here, before it is spooled or sent.
        self._redact = redact or _Redactor(())
        self._spool = spool
        self._logger = logger or logging.getLogger(__name__)
        self._entries: collections.deque[dict[str, Any]] = collections.deque()
        self._bytes = 0
        self._held = 0
        self._sent_since_rewrite = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.failing = ""
        #: Why the spool file cannot be written ("" while it can): entries then wait in memory.
        self.spool_failing = ""
        #: Per run, the furthest output offset the spool held at start (see resume_offset).
        self._loaded_offsets: dict[str, int] = {}
        if spool is not None and spool.exists():
            self._load_spool(spool)

    def log(self, run_id: str, message: str, *, level: str = "INFO", name: str = "agent",
            timestamp: datetime | None = None, offset: int | None = None) -> None:
        """Queue one line for a run's log; a line read from output at ``offset`` waits for release()."""
        entry: dict[str, Any] = {"k": "log", "r": run_id, "t": _format_time(timestamp or _utcnow()), "l": level,
                                 "n": name, "m": self._redact(message)}
        if offset is not None:
            entry["o"] = offset
        self._add(entry, hold=offset is not None)

    def release(self) -> None:
        """Let held lines go, once the offsets they were read up to are saved in the ledger.

        Lines read from a process's output are held until then, so every delivered line is
        at or below the saved offset, and every line above it is still in the spool: after a
        crash, reading on from the larger of the two resends nothing and loses nothing.
        """
        with self._lock:
            self._held = 0
        self._wake.set()

    def resume_offset(self, run_id: str) -> int:
        """The furthest output offset of a run that the spool holds lines up to.

        Lines loaded from the spool at start count even once delivered: they are sent while the
        agent adopts its runs, and reading a run's output again from before them would send
        them twice.
        """
        with self._lock:
            queued = (int(e.get("o", 0)) for e in self._entries if e["r"] == run_id and e["k"] == "log")
            return max(self._loaded_offsets.get(run_id, 0), max(queued, default=0))

    def state(self, run_id: str, state: Mapping[str, Any], version: int | None, *, unless_final: bool = False,
              over_crashed: bool = False) -> None:
        """Queue a state write; ``unless_final``: skip it if the run has a final state by then.

        The agent's own conclusions about a run whose process ended (failed, timed out,
        handed back) are written ``unless_final``: a final state the run already has, from
        its process or anyone else, is never overwritten by a guess. ``over_crashed``: except
        Crashed, which Prefect 2/3's engine writes when the agent's own signal stops it.
        """
        entry: dict[str, Any] = {"k": "state", "r": run_id, "s": _redact_state(state, self._redact), "v": version}
        if unless_final:
            entry["g"] = "over-crashed" if over_crashed else True
        self._add(entry)

    @property
    def pending(self) -> int:
        """How many entries wait to be delivered."""
        return len(self._entries)

    @property
    def pending_bytes(self) -> int:
        """How many bytes the entries waiting to be delivered take in the spool."""
        return self._bytes

    def flush(self, timeout: float) -> bool:
        """Release held lines and wait up to ``timeout`` s for everything to be delivered."""
        self.release()
        return self._idle.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what can be delivered within ``timeout``; the spool keeps the rest."""
        self.flush(timeout)
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(2.0)

    def _add(self, entry: dict[str, Any], hold: bool = False) -> None:
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self._lock:
            self._entries.append(entry)
            if hold or self._held:
                self._held += 1  # order is kept: nothing after a held line goes before it
            self._bytes += len(line)
            self._idle.clear()
            if self._spool is not None:
                self._append_to_spool(line)
                if self._bytes > MAX_SPOOL_BYTES:
                    self._shed()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
                self._thread.start()
        self._wake.set()

    def _append_to_spool(self, line: str) -> None:
        """Append an entry to the spool; a disk that refuses costs nothing but the spool (called under the lock).

        The entry stays in memory either way. While the spool cannot be written, each new
        entry tries to write the whole of it again, so it is whole once the disk takes it.
        """
        assert self._spool is not None
        try:
            if self.spool_failing:
                self._rewrite_spool()
            else:
                with _private_open(self._spool, "a") as spool:
                    spool.write(line)
        except OSError as exc:
            self._spool_failed(exc)
            return
        if self.spool_failing:
            self._logger.info("The spool %s can be written again", self._spool)
            self.spool_failing = ""

    def _spool_failed(self, exc: OSError) -> None:
        if not self.spool_failing:
            self._logger.error("Cannot write the spool %s (%s): undelivered API writes wait in memory until it "
                               "can be written; free some disk space", self._spool, exc.strerror or exc)
        self.spool_failing = str(exc)

    def _shed(self) -> None:
        """Drop the oldest log lines until the spool fits again (states are kept)."""
        kept = []
        for entry in self._entries:
            if self._bytes > MAX_SPOOL_BYTES * 0.9 and entry["k"] == "log":
                self._bytes -= len(json.dumps(entry, separators=(",", ":"))) + 1
                self.dropped += 1
                continue
            kept.append(entry)
        self._entries.clear()
        self._entries.extend(kept)
        self._logger.warning("The spool of undelivered API writes is full: dropped %d old log line(s) so far",
                             self.dropped)
        try:
            self._rewrite_spool()
        except OSError as exc:
            self._spool_failed(exc)

    def _load_spool(self, spool: Path) -> None:
        """Take over what a previous run of the agent could not deliver."""
        try:
            lines = spool.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read the spool file {spool}: {exc.strerror or exc}") from None
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash mid-write
            if isinstance(entry, dict) and entry.get("k") == "sent":  # delivered: not sent again
                for _ in range(min(int(entry.get("c", 0)), len(self._entries))):
                    self._bytes -= len(json.dumps(self._entries.popleft(), separators=(",", ":"))) + 1
            elif isinstance(entry, dict) and entry.get("k") in ("log", "state"):
                self._entries.append(entry)
                self._bytes += len(line) + 1
                if entry["k"] == "log" and isinstance(entry.get("o"), int):
                    run_id = str(entry.get("r"))
                    self._loaded_offsets[run_id] = max(self._loaded_offsets.get(run_id, 0), entry["o"])
        if self._entries:
            self._idle.clear()
            self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
            self._thread.start()

    def _rewrite_spool(self) -> None:
        """Replace the spool file with what is still undelivered (called under the lock)."""
        if self._spool is None:
            return
        temporary = self._spool.with_suffix(".tmp")
        try:
            with _private_open(temporary) as spool:
                spool.writelines(json.dumps(entry, separators=(",", ":")) + "\n" for entry in self._entries)
            os.replace(temporary, self._spool)
        except OSError:
            temporary.unlink(missing_ok=True)  # a half-written copy only takes the space the disk lacks
            raise
        self._sent_since_rewrite = 0

    def _run(self) -> None:
        while not self._closed.is_set():
            if self._deliver_some():
                self._wake.wait()
                # A run's lines come in bursts: gather them into one request, not one each.
                self._closed.wait(OUTBOX_GATHER_SECONDS)
            else:  # the API is failing: try again within a second, jittered
                self._wake.wait(random.uniform(0.5, 1.0))
            self._wake.clear()

    def _deliver_some(self) -> bool:
        """Deliver entries in order until none are left (True) or the API fails (False)."""
        while True:
            with self._lock:
                batch = self._next_batch()
                if not batch:
                    if not self._entries:
                        self._bytes = 0
                        if self._spool is not None and self._spool.exists():
                            with contextlib.suppress(OSError):  # emptying needs no space; a stale one resends
                                self._spool.write_bytes(b"")
                        self._idle.set()
                    return True
            try:
                self._send(batch)
                if self.failing:
                    self.failing = ""
                    self._logger.info("The API takes writes again; delivering %d held back", self.pending)
            except AgentError as exc:
                if getattr(exc, "transient", False):
                    if str(exc) != self.failing:  # once per change, not once per retry
                        self._logger.warning("Holding %d API write(s) back: %s; retrying", self.pending, exc)
                    self.failing = str(exc)
                    return False
                # Refused for good (another writer won, or a malformed line): do not block the rest.
                self._logger.warning("Dropped %d undeliverable API write(s): %s", len(batch), exc)
            with self._lock:
                for _ in batch:
                    self._bytes -= len(json.dumps(self._entries.popleft(), separators=(",", ":"))) + 1
                self._sent_since_rewrite += len(batch)
                if self._spool is not None and not self.spool_failing:
                    # Said at once, so a restart does not send these again (the spool is
                    # emptied or rewritten only now and then).
                    self._append_to_spool(json.dumps({"k": "sent", "c": len(batch)}) + "\n")
                if self._entries and self._sent_since_rewrite > 1000:
                    with contextlib.suppress(OSError):  # a long backlog: keep the spool short
                        self._rewrite_spool()

    def _next_batch(self) -> list[dict[str, Any]]:
        """The head state alone, or the run of log lines at the head (up to BATCH), not held."""
        ready = len(self._entries) - self._held
        if ready <= 0:
            return []
        if self._entries[0]["k"] == "state":
            return [self._entries[0]]
        batch: list[dict[str, Any]] = []
        for index, entry in enumerate(self._entries):
            if index == ready or entry["k"] != "log" or len(batch) == OUTBOX_BATCH:
                break
            batch.append(entry)
        return batch

    def _send(self, batch: list[dict[str, Any]]) -> None:
        if batch[0]["k"] == "state":
            entry = batch[0]
            if entry.get("g"):
                current = self._backend.get_flow_run(entry["r"])
                if current is not None and is_final(current.state) and not (
                        entry["g"] == "over-crashed" and current.state == "Crashed"):
                    self._logger.info("Flow run %s is %s already; not writing %s over it",
                                      entry["r"], current.state, entry["s"].get("type"))
                    return
            with self._metrics.timed("set_flow_run_state"):
                self._backend.set_flow_run_state(entry["r"], entry["s"], entry["v"])
            return
        with self._metrics.timed("write_run_logs"):
            self._backend.write_run_logs([
                {"flow_run_id": e["r"], "timestamp": e["t"], "level": e["l"], "name": e["n"], "message": e["m"]}
                for e in batch
            ])


class _RunLogHandler(logging.Handler):
    """A logging handler that puts records into a run's log."""

    def __init__(self, outbox: _Outbox, run_id: str) -> None:
        super().__init__()
        self._outbox = outbox
        self._run_id = run_id
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._outbox.log(
                self._run_id,
                self.format(record),
                level=record.levelname if record.levelname in _LOG_LEVELS else "INFO",
                name=record.name,
                timestamp=datetime.fromtimestamp(record.created, timezone.utc),
            )
        except Exception:
            self.handleError(record)


# --- 8. The flow-run process -------------------------------------------------------------


class _Context(dict):  # type: ignore[type-arg]
    """What a running flow may read: ``logger``, ``flow_run_id``, ``flow_id``, ``flow_name``, ``parameters``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


#: Filled in by the flow-run process; empty everywhere else.
context = _Context()
_IS_LOCAL_AGENT_MODULE = True  # lets the flow-run process find every loaded copy of this file


def _utc_formatter(fmt: str) -> logging.Formatter:
    formatter = logging.Formatter(fmt)
    formatter.converter = time.gmtime
    return formatter


class _RecordLineHandler(logging.Handler):
    """Writes log records as marked JSON lines on stdout, for the agent to collect and ship.

    Through one stream with the process's other output, records and prints stay in order,
    and a record written just before a crash is not lost with the process.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream
        self.setFormatter(logging.Formatter("%(message)s"))
        #: Says which records another handler ships to the API already (Prefect's own, on its
        #: engine): those are marked, and the agent shows them but does not ship them again.
        self.shipped_elsewhere: Callable[[logging.LogRecord], bool] = lambda record: False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            payload: dict[str, Any] = {
                "t": _format_time(datetime.fromtimestamp(record.created, timezone.utc)),
                "l": record.levelname,
                "n": record.name,
                "m": self.format(record),
            }
            if self.shipped_elsewhere(record):
                payload["s"] = 1
            self._stream.write(_RECORD_MARK + json.dumps(payload) + "\n")
            self._stream.flush()
        except Exception:
            self.handleError(record)


#: Loggers whose records Prefect 2/3's engine sends to the API itself (its ``api`` handler, logging.yml).
_PREFECT3_SHIPPED_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect.extra")


def _parse_output_line(text: str) -> tuple[LogLine, bool]:
    """A line of a flow-run process's output (a marked log record, a record of Prefect 2/3's JSON
    console format, or plain output), and whether the process shipped it to the API itself."""
    if text.startswith(_RECORD_MARK):
        try:
            record = json.loads(text[1:])
            line = LogLine(str(record["t"]), str(record["l"]), str(record["n"]), str(record["m"]))
            return line, bool(record.get("s"))
        except (ValueError, KeyError, TypeError):
            pass
    if text.startswith('{"name":'):
        found = _prefect_json_record(text)
        if found is not None:
            return found
    return LogLine(_format_time(_utcnow()), "INFO", "output", text), False


def _prefect_json_record(text: str) -> tuple[LogLine, bool] | None:
    """A record as Prefect 2/3's JsonFormatter prints it (the agent asks for that format), or None."""
    try:
        record = json.loads(text)
        message = str(record["msg"])
        args = record.get("args")
        if args:
            message = message % (tuple(args) if isinstance(args, list) else args)
        error = record.get("exc_info")
        if isinstance(error, dict) and error.get("traceback"):
            message += "\n" + str(error["traceback"]).rstrip()
        stamp = _format_time(datetime.fromtimestamp(float(record["created"]), timezone.utc))
        name = str(record["name"])
        line = LogLine(stamp, str(record["levelname"]), name, message)
    except (ValueError, KeyError, TypeError, OverflowError):
        return None
    return line, name.startswith(_PREFECT3_SHIPPED_LOGGERS)


class _FlowRunProcess:
    """``execute flow-run``: load the run's flow, run it, report its state and logs.

    Under an agent (``LOCAL_AGENT_RESULT_FILE`` set) its log records go to stdout for the
    agent to ship, and a final state it cannot deliver is left in the result file for the
    agent to deliver. Alone, it ships its own logs.
    """

    def __init__(
        self, backend: Backend, run_id: str, *, cloud_logs: bool, level: str, result_file: str = "",
        trusted_dirs: Sequence[str] = (), redact: _Redactor | None = None, script_dirs: Sequence[str] = (),
    ) -> None:
        self.backend = backend
        self.trusted_dirs, self.script_dirs = trusted_dirs, script_dirs
        self.run_id = run_id
        self.result_file = result_file
        self.redact = redact or _Redactor(())
        self.outbox = _Outbox(backend, redact=self.redact) if cloud_logs and not result_file else None
        self.logger = logging.getLogger("flow_runner")
        self._level = level
        self._done = threading.Event()

    def run(self) -> int:
        """Run the flow once; the exit code."""
        self._install_logging()
        try:
            return self._run()
        except APIError as exc:
            self.logger.error("Giving up on flow run %s: %s", self.run_id, exc)
            return _EXIT_UNREPORTED
        finally:
            self._done.set()
            if self.outbox is not None:
                self.outbox.close(FLOW_RUN_API_PATIENCE_SECONDS)

    def _install_logging(self) -> None:
        root = logging.getLogger()
        root.setLevel(self._level)
        handlers: list[logging.Handler] = []
        if self.result_file:
            handlers.append(_RecordLineHandler(sys.stdout))
        else:
            console = logging.StreamHandler(sys.stdout)
            console.setFormatter(_utc_formatter(_CHILD_FORMAT))
            handlers.append(console)
            if self.outbox is not None:
                handlers.append(_RunLogHandler(self.outbox, self.run_id))
        for handler in handlers:
            handler.addFilter(_RedactingFilter(self.redact))
            root.addHandler(handler)

    def _run(self) -> int:
        run = _retry_api(lambda: self.backend.get_flow_run(self.run_id), FLOW_RUN_API_PATIENCE_SECONDS)
        if run is None:
            self.logger.error("Flow run %s not found", self.run_id)
            return _EXIT_NOT_RUN
        if is_final(run.state):
            self.logger.info("Flow run %s has already finished (%s); nothing to do.", run.id, run.state)
            return _EXIT_REPORTED
        try:
            path, directory = _locate_flow_file(run.flow_name, run.storage, self.trusted_dirs, self.script_dirs)
            script = isinstance(run.storage, Mapping) and bool(run.storage.get("stored_as_script"))
            flow = _load_flow_script(path, run.flow_name) if script else load_flow(path, directory)
            stored_as = getattr(flow, "name", run.flow_name)
            if isinstance(stored_as, str) and stored_as != run.flow_name:
                raise FlowStorageError(
                    f"flow file {path} holds flow {stored_as!r}, not {run.flow_name!r}: their names give the "
                    "same file name; rename one of the two flows and store it again"
                )
            _share_context(flow_run_id=run.id, flow_id=run.flow_id, flow_name=run.flow_name,
                           parameters=dict(run.parameters), logger=logging.getLogger("flow"))
            self._note_changed_code(run)
        except FlowStorageError as exc:
            return self._fail_to_load(str(exc))
        except BaseException as exc:  # the flow's own modules may fail to import
            self.logger.error("Failed to load flow %r", run.flow_name, exc_info=True)
            return self._fail_to_load("Failed to load flow: " + _describe_exception(exc))
        if _is_prefect_flow(flow) and isinstance(self.backend, GraphQLBackend):
            return self._run_on_prefects_engine(flow, run)
        if _is_prefect_flow(flow):  # run here by Prefect's local runner: its records are ours to ship
            self._leave_prefects_logs_to_prefect(prefect_ships=False)
        running = make_state("Running", "Running flow.")
        try:
            _retry_api(lambda: self.backend.set_flow_run_state(run.id, running, run.version),
                       FLOW_RUN_API_PATIENCE_SECONDS)
        except StateUpdateFailed as exc:
            self.logger.warning("Not running flow run %s: its state changed (%s)", run.id, exc)
            return _EXIT_NOT_RUN
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        attempt, attempts = _attempt_of(run), 1 + int(getattr(flow, "retries", 0) or 0)
        if attempts > 1:
            self.logger.info("Beginning flow run %r, attempt %d of %d", run.flow_name, attempt, attempts)
        else:
            self.logger.info("Beginning flow run %r", run.flow_name)
        tasks = self._start_task_runs(run)
        final = _retry_if_due(self._call(flow, run), attempt, attempts, float(getattr(flow, "retry_delay", 0) or 0))
        self._finish_task_runs(tasks, final)
        self.logger.info("Flow run %s: %s", final["type"].upper(), final["message"])
        return _EXIT_REPORTED if self._report(final) else _EXIT_UNREPORTED

    def _run_on_prefects_engine(self, flow: Any, run: FlowRun) -> int:
        """Run a Prefect 1.x flow as ``prefect execute flow-run`` does: its CloudFlowRunner writes
        the run's and its task runs' states, heartbeats and logs itself. A final state the API
        does not have at the end is left to the agent (or, alone, sent) like any other."""
        import prefect  # type: ignore[import-not-found]  # only a Prefect flow needs it

        self._leave_prefects_logs_to_prefect(prefect_ships=True)
        context = {"flow_run_id": run.id, "flow_id": run.flow_id, "flow_run_name": run.name}
        # As `prefect execute flow-run`: logs go to the backend, the storage's secrets are resolved.
        with prefect.context(running_with_backend=True, **context):
            try:
                secrets = dict(prefect.context.get("secrets", {}))
                for name in (run.storage.get("secrets") if isinstance(run.storage, Mapping) else None) or []:
                    secrets[name] = prefect.tasks.secrets.PrefectSecret(name=name).run()
                with prefect.context(secrets=secrets):
                    final = prefect.engine.get_default_flow_runner_class()(flow=flow).run()
            except Exception as exc:  # what Prefect's own entry point does with it
                message = f"Failed to load and execute flow run: {exc!r}"
                self.logger.error("%s", message)
                return _EXIT_REPORTED if self._report(make_state("Failed", message)) else _EXIT_UNREPORTED
        state = final.serialize()
        current = _retry_api(lambda: self.backend.get_flow_run(run.id), FLOW_RUN_API_PATIENCE_SECONDS)
        if current is not None and is_final(current.state):
            self._write_result(dict(state), delivered=True)
            return _EXIT_REPORTED
        if not is_final(str(state.get("type"))):
            return _EXIT_REPORTED  # Prefect's own answer: a run left Running, for a later retry
        return _EXIT_REPORTED if self._report(dict(state)) else _EXIT_UNREPORTED

    def _leave_prefects_logs_to_prefect(self, *, prefect_ships: bool) -> None:
        """Prefect prints its records, and on a Prefect API ships them (CloudHandler): print them
        through our record handler only, marked as shipped when Prefect ships them, so the agent
        shows every record once and ships each once."""
        prefect_logger = logging.getLogger("prefect")
        for handler in list(prefect_logger.handlers):
            if type(handler) is logging.StreamHandler:  # its console handler; its CloudHandler stays
                prefect_logger.removeHandler(handler)
        ships = prefect_ships and any(type(handler).__name__ == "CloudHandler" for handler in prefect_logger.handlers)

        def shipped_by_prefect(record: logging.LogRecord) -> bool:
            return ships and (record.name == "prefect" or record.name.startswith("prefect."))

        for handler in logging.getLogger().handlers:
            if isinstance(handler, _RecordLineHandler):  # under an agent: printed, marked
                handler.shipped_elsewhere = shipped_by_prefect
            elif isinstance(handler, _RunLogHandler):  # alone: not sent a second time
                handler.addFilter(lambda record: not shipped_by_prefect(record))

    def _start_task_runs(self, run: FlowRun) -> dict[str, tuple[str, int]]:
        """Mark the task runs the API made for this run, as Prefect's UI shows them: each
        parameter Success, the flow's body Running (see serialize_flow). Best effort: the flow
        runs whatever these writes meet."""
        try:
            tasks = self.backend.get_task_runs(run.id)
            for slug, (task_run_id, version) in tasks.items():
                done = slug != _BODY_TASK_SLUG
                state = make_state("Success" if done else "Running",
                                   "Task run succeeded." if done else "Starting task run.")
                self.backend.set_task_run_state(task_run_id, state, version)
            return tasks
        except APIError as exc:
            self.logger.debug("Could not mark the task runs: %s", exc)
            return {}

    def _finish_task_runs(self, tasks: Mapping[str, tuple[str, int]], final: Mapping[str, Any]) -> None:
        if _BODY_TASK_SLUG not in tasks:
            return
        message = "Task run succeeded." if final["type"] == "Success" else final.get("message")
        try:
            self.backend.set_task_run_state(tasks[_BODY_TASK_SLUG][0], make_state(str(final["type"]), message), None)
        except APIError as exc:
            self.logger.debug("Could not mark the flow's task run: %s", exc)

    def _call(self, flow: Any, run: FlowRun) -> dict[str, Any]:
        """Call the flow; its outcome as a final state."""
        try:
            failure = _call_flow(flow, run.parameters)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt are failures too
            self.logger.error("Flow run failed with %s", _describe_exception(exc), exc_info=True)
            return make_state("Failed", _describe_exception(exc))
        if failure is not None:
            return make_state("Failed", failure)
        return make_state("Success", "All reference tasks succeeded.")

    def _note_changed_code(self, run: FlowRun) -> None:
        """Say in the run's log when the flow's code changed since its version was deployed."""
        env, _ = _local_run(run)
        path, deployed = env.get("LOCAL_AGENT_CODE_FILE", ""), env.get("LOCAL_AGENT_CODE_DIGEST", "")
        if path and deployed and _file_digest(path) != deployed:
            self.logger.warning("The code of flow %r (%s) changed since this version of the flow was deployed: "
                                "this run runs the code as it is now; deploy the flow again to record the change as "
                                "a new version", run.flow_name, path)

    def _fail_to_load(self, message: str) -> int:
        self.logger.error("%s", message)
        self._report(make_state("Failed", _one_line(message)))
        return _EXIT_NOT_RUN

    def _report(self, state: dict[str, Any]) -> bool:
        """Deliver the final state; the result file is the fallback the agent delivers from.

        The file is written first (undelivered), so a process killed mid-report leaves the
        agent something to deliver; a file that cannot be written never stops the report.
        """
        state = _redact_state(state, self.redact)
        kept = self._write_result(state, delivered=False)
        # Under an agent a short wait is enough: the agent delivers whatever is left.
        patience = 3.0 if kept else FLOW_RUN_API_PATIENCE_SECONDS
        try:
            _retry_api(lambda: self.backend.set_flow_run_state(self.run_id, state, None), patience)
        except APIError as exc:
            if kept:
                self.logger.warning("Could not report %s (%s); the agent will deliver it", state["type"], exc)
                return True
            self.logger.error("Could not report state %s: %s", state["type"], exc)
            return False
        self._write_result(state, delivered=True)
        return True

    def _write_result(self, state: dict[str, Any], *, delivered: bool) -> bool:
        """Leave the final state in the result file for the agent; False if there is none or it failed."""
        if not self.result_file:
            return False
        try:
            _write_json_atomically(Path(self.result_file), {"state": state, "delivered": delivered})
        except OSError as exc:
            then = ("the agent may send it again; it will not write over it" if delivered
                    else f"reporting {state['type']} directly")
            self.logger.warning("Cannot write the result file %s (%s); %s", self.result_file, exc.strerror or exc,
                                then)
            return False
        return True

    def _heartbeat(self) -> None:
        while not self._done.wait(HEARTBEAT_SECONDS):
            try:
                self.backend.heartbeat(self.run_id)
            except AgentError as exc:
                self.logger.debug("Heartbeat failed: %s", exc)


def _share_context(**values: Any) -> None:
    """Fill ``context`` in every loaded copy of this file (a vendored copy has its own)."""
    for module in list(sys.modules.values()):
        if getattr(module, "_IS_LOCAL_AGENT_MODULE", False) and isinstance(getattr(module, "context", None), dict):
            module.context.update(values)


def _is_prefect_flow(obj: Any) -> bool:
    return type(obj).__module__.startswith("prefect.") and hasattr(obj, "run")


def _call_flow(flow: Any, parameters: Mapping[str, Any]) -> str | None:
    """Run a stored object with the run's parameters; a failure message, or None."""
    if _is_prefect_flow(flow):  # a real Prefect flow: run it locally, read its final state
        from prefect.engine.flow_runner import FlowRunner  # type: ignore[import-not-found]

        state = flow.run(parameters=dict(parameters), runner_cls=FlowRunner)
        return None if not state.is_failed() else _one_line(str(state.message or "Prefect flow failed"))
    if callable(flow):  # this file's Flow, a function, a class
        flow(**parameters)
    elif callable(getattr(flow, "run", None)):
        flow.run(**parameters)
    else:
        raise FlowStorageError(f"the stored {type(flow).__name__} is not callable and has no run()")
    return None


def _attempt_of(run: FlowRun) -> int:
    """Which attempt at the run this is: one more than the ``run_count`` of the Retrying state
    it was claimed from (Prefect's count of the attempts made)."""
    before = run.serialized_state.get("state") if run.state == "Submitted" else run.serialized_state
    if isinstance(before, Mapping) and before.get("type") == "Retrying":
        count = before.get("run_count")
        return (count if isinstance(count, int) and count > 0 else 1) + 1
    return 1


def _retry_if_due(final: dict[str, Any], attempt: int, attempts: int, delay: float) -> dict[str, Any]:
    """A failed attempt with attempts left becomes Prefect's Retrying, due ``delay`` seconds on,
    for any agent with the run's labels; the last one stays Failed, saying so."""
    if final["type"] != "Failed" or attempts <= 1:
        return final
    if attempt >= attempts:
        return make_state("Failed", f"{final['message']} (attempt {attempt} of {attempts}: no retries left)")
    due = _utcnow() + timedelta(seconds=delay)
    retrying = make_state("Retrying", f"Attempt {attempt} of {attempts} failed ({final['message']}); "
                                      f"retrying at {_short_time(due)} UTC", start_time=due)
    retrying["run_count"] = attempt
    return retrying


def _script_dirs(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """Where flow scripts may lie: as the agent that started this process says, else as settings say."""
    try:
        given = json.loads(environ.get("LOCAL_AGENT_SCRIPT_DIRS", "null"))
    except ValueError:
        given = None
    if isinstance(given, list) and all(isinstance(item, str) for item in given):
        return list(given)
    return settings.trusted_script_dirs


def _load_flow_script(path: str, flow_name: str) -> Any:
    """A Prefect flow stored as a script, found in it by name, as Prefect's Local storage does."""
    try:
        from prefect.utilities.storage import extract_flow_from_file  # type: ignore[import-not-found]
    except ImportError:
        raise FlowStorageError(
            f"flow {flow_name!r} is stored as a script ({path}), which needs prefect: start the agent with "
            "--python pointing at an environment with prefect 1.x"
        ) from None
    return extract_flow_from_file(file_path=path, flow_name=flow_name)


def _execute_flow_run(settings: Settings, environ: Mapping[str, str] | None = None) -> int:
    """The body of ``execute flow-run``: run the flow run named in the environment."""
    environ = os.environ if environ is None else environ
    run_id = environ.get("PREFECT__CONTEXT__FLOW_RUN_ID", "")
    if not run_id:
        raise ConfigError(
            "not inside a flow run: PREFECT__CONTEXT__FLOW_RUN_ID is not set (the agent sets it)"
        )
    backend = open_backend(settings)
    try:
        level = _as_level(environ.get("PREFECT__LOGGING__LEVEL", "INFO"), "PREFECT__LOGGING__LEVEL")
        cloud_logs = _as_bool(environ.get("PREFECT__LOGGING__LOG_TO_CLOUD", "true"), "PREFECT__LOGGING__LOG_TO_CLOUD")
        result_file = environ.get("LOCAL_AGENT_RESULT_FILE", "")
        return _FlowRunProcess(backend, run_id, cloud_logs=cloud_logs, level=level, result_file=result_file,
                               trusted_dirs=settings.trusted_flow_dirs, script_dirs=_script_dirs(settings, environ),
                               redact=_Redactor(_secrets(settings, environ))).run()
    finally:
        backend.close()


# The warm template (``--preload``). One process imports the preloaded modules once (prefect,
# a project's flow module) and forks each flow-run process from itself, as Python's
# forkserver and gunicorn's --preload do. Each child is still a process of its own: its own
# session and process group, output file, environment, working directory, signal handlers and
# exit status, and it goes on exactly as ``execute flow-run`` does in a fresh interpreter. The
# agent and the template talk over two pipes, one JSON object per line:
#   agent → template   {"run": ID, "env": {...}, "cwd": DIR, "out": FILE}, then {"go": ID}
#   template → agent   {"ready": [MODULE, ...]} or {"failed": WHY}, once, at start;
#                      {"run": ID, "pid": PID} or {"run": ID, "refused": WHY}, per request;
#                      {"exited": PID, "returncode": CODE}, as children end.
# A forked child waits for its "go": a child whose agent gave up on the template before it
# heard the pid (and so started the run afresh) never runs, so no run can run twice.

def _serve_template(preload: Sequence[str], requests_fd: int, replies_fd: int) -> dict[str, Any] | None:
    """The body of ``execute template``: import ``preload`` once, then fork a flow-run process per
    request. Returns the request in each forked child, and None in the template once the agent hangs up."""
    import gc  # only the template freezes its heap
    import select  # only the template waits on a pipe

    def reply(**message: Any) -> None:
        os.write(replies_fd, (json.dumps(message) + "\n").encode())  # one line: under PIPE_BUF, atomic

    problem = _preload(preload)
    if problem:
        reply(failed=problem)
        return None
    loaded = _loaded_module_files()
    gc.freeze()  # what the template imported stays out of the children's collections: fewer pages copied
    reply(ready=list(preload))
    children: set[int] = set()
    waiting: dict[str, int] = {}  # run id → the pipe its forked child waits on for "go"
    pending = b""
    while True:
        for pid, returncode in _reap_children(children):
            reply(exited=pid, returncode=returncode)
        if not select.select([requests_fd], [], [], TEMPLATE_REAP_SECONDS)[0]:
            continue
        data = os.read(requests_fd, 1 << 16)
        if not data:
            return None  # the agent hung up; children it started go on, and a restarted agent adopts them
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            request = json.loads(line)
            if "go" in request:
                go = waiting.pop(request["go"], -1)
                with contextlib.suppress(OSError):
                    os.write(go, b"g")
                    os.close(go)
                continue
            why = _why_not_fork(loaded)
            if why:
                reply(run=request["run"], refused=why, stale=True)
                continue
            pid, go_or_problem = _fork_flow_run(request, (requests_fd, replies_fd, *waiting.values()))
            if pid == 0:
                return dict(request)  # the child: it runs the flow run
            if isinstance(go_or_problem, str):
                reply(run=request["run"], refused=go_or_problem)
                continue
            children.add(pid)
            waiting[request["run"]] = go_or_problem
            reply(run=request["run"], pid=pid)


def _preload(modules: Sequence[str]) -> str:
    """Import the modules a template forks runs with; why that cannot be done ("" when it can)."""
    name = ""
    try:
        for name in modules:
            importlib.import_module(name)
    except BaseException as exc:  # however a module fails on import, the agent says why and stops
        return f"--preload {name} cannot be imported: {_describe_exception(exc)}"
    if threading.active_count() > 1:
        return (f"--preload {' '.join(modules)} started threads ({_thread_names()}), which a forked process "
                "would not have: preload modules that start no thread at import")
    return ""


def _thread_names() -> str:
    return ", ".join(thread.name for thread in threading.enumerate() if thread is not threading.current_thread())


def _loaded_module_files() -> dict[str, tuple[int, int]]:
    """Every imported module's file, with its modification time and size."""
    files: dict[str, tuple[int, int]] = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and path not in files:
            with contextlib.suppress(OSError):
                stat = os.stat(path)
                files[path] = (stat.st_mtime_ns, stat.st_size)
    return files


def _why_not_fork(loaded: Mapping[str, tuple[int, int]]) -> str:
    """Why the template must not fork a run ("" when it may): code changed on disk since it was
    imported, which a fresh interpreter would run. (No thread can appear after the check at start:
    nothing runs in the template but its loop.)"""
    for path, (mtime, size) in loaded.items():
        try:
            stat = os.stat(path)
            changed = (stat.st_mtime_ns, stat.st_size) != (mtime, size)
        except OSError:
            changed = True
        if changed:
            return f"{path} changed since the template imported it"
    return ""


def _fork_flow_run(request: Mapping[str, Any], template_fds: Sequence[int]) -> tuple[int, int | str]:
    """Fork one flow-run process. In the child: (0, 0) once it is set up as a fresh process would
    be and the agent said go. In the template: its pid and the pipe that says go to it, or (0, why)."""
    ready_read, ready_write = os.pipe()
    go_read, go_write = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # nothing the template buffered may be written twice
    pid = os.fork()
    if pid == 0:
        os.close(ready_read)
        os.close(go_write)
        try:
            _become_flow_run(request, template_fds)
        except BaseException as exc:
            os.write(ready_write, _describe_exception(exc).encode()[:1000] or b"?")
            os._exit(_EXIT_NOT_RUN)
        os.close(ready_write)
        if os.read(go_read, 1) != b"g":
            os._exit(_EXIT_NOT_RUN)  # the agent gave up on the template and started this run afresh
        os.close(go_read)
        return 0, 0
    os.close(ready_write)
    os.close(go_read)
    answer = b""
    while chunk := os.read(ready_read, 1024):  # until the child closes it: set up, or gone
        answer += chunk
    os.close(ready_read)
    if answer:
        os.close(go_write)
        os.waitpid(pid, 0)  # it exits at once
        return 0, f"the forked process could not be set up: {answer.decode(errors='replace')}"
    return pid, go_write


def _become_flow_run(request: Mapping[str, Any], template_fds: Sequence[int]) -> None:
    """Turn a forked child of the template into the flow-run process the agent asked for."""
    os.setsid()  # its own session and process group, as start_new_session gives a fresh one
    for fd in template_fds:
        os.close(fd)
    output = os.open(request["out"], os.O_WRONLY | os.O_APPEND)
    nothing = os.open(os.devnull, os.O_RDONLY)
    os.dup2(nothing, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(nothing)
    os.close(output)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if request.get("module"):
        sys.argv[:] = [str(request["module"])]  # as `python -m MODULE` sets it
    else:
        sys.argv[1:] = ["execute", "flow-run"]
    _default_signal_handlers()
    _reload_prefects_configuration()


def _default_signal_handlers() -> None:
    """A flow-run process takes SIGINT and SIGTERM as Python's defaults, whatever it inherited: an
    agent started in the background by a shell (``&``) ignores SIGINT, and so would its children."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _reap_children(children: set[int]) -> list[tuple[int, int]]:
    """The template's children that ended, with their return codes (negative: the signal)."""
    ended = []
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        if pid in children:
            children.discard(pid)
            ended.append((pid, os.waitstatus_to_exitcode(status)))
    return ended


def _reload_prefects_configuration() -> None:
    """Prefect read its configuration from the template's environment when it was imported; a
    forked run reads it again from its own, as a fresh interpreter would (its API, token, run
    config variables, logging level)."""
    prefect: Any = sys.modules.get("prefect")
    if prefect is None:
        return
    prefect3_context: Any = sys.modules.get("prefect.context")
    if "prefect.configuration" not in sys.modules:  # Prefect 2/3: its settings are one object
        refresh = getattr(prefect3_context, "refresh_global_settings_context", None)
        if refresh is not None:
            refresh()
        return
    configuration: Any = sys.modules["prefect.configuration"]
    prefect_logging: Any = sys.modules["prefect.utilities.logging"]
    configuration.USER_CONFIG = os.getenv("PREFECT__USER_CONFIG_PATH", "~/.prefect/config.toml")
    configuration.BACKEND_CONFIG = os.getenv("PREFECT__BACKEND_CONFIG_PATH", "~/.prefect/backend.toml")
    old_extra_loggers = list(prefect.config.logging.get("extra_loggers", []))
    fresh = configuration.load_default_config()
    prefect.config.clear()
    prefect.config.update(fresh)
    prefect.context.clear()
    type(prefect.context).__init__(prefect.context)  # the context a fresh import makes from the config
    for name in {"prefect", *old_extra_loggers}:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
    prefect.context.logger = prefect_logging.prefect_logger = prefect_logging.configure_logging()
    prefect_logging.configure_extra_loggers()


# --- 9. The agent ------------------------------------------------------------------------
#
# Files under <home>/agents/<name>-<hash of API>/, so a restarted agent finds its runs:
#   lock            held while the agent runs (one agent per name, API and home directory)
#   ledger.json     the runs it owns: pid, process start time, version, output offset, ...
#   spool.jsonl     API writes (states, log lines) it could not deliver yet
#   runs/ID.out     a flow-run process's stdout and stderr, tailed into the run's log
#   runs/ID.result  the final state the process reported, or could not report
#
# Reading order: _Job (one process and its output), _decide_outcome (how a finished run is
# settled, a pure function), RunBook (every run the agent owns and its phase, the ledger),
# then LocalAgent, whose step() is the whole loop on one screen.

def _source_file() -> str:
    """This module's source file, also when it runs from its compiled copy (see _compiled_copy)."""
    if __file__.endswith(".pyc") and os.environ.get("LOCAL_AGENT_SOURCE"):
        return os.environ["LOCAL_AGENT_SOURCE"]
    return os.path.abspath(__file__)


def _docs_location() -> str:
    """The README beside this file, where there is one (a vendored copy may have none)."""
    readme = os.path.join(os.path.dirname(_source_file()), "README.md")
    return readme if os.path.isfile(readme) else "the README.md of local_agent"


def _compiled_copy(cache_dir: Path) -> str:
    """A bytecode copy of this file in ``cache_dir``, made once per version of the source.

    Python compiles a script it runs every time (about 35 ms and 8 MB for this file), and never
    caches it; imports are cached only where Python may write ``__pycache__``. The agent runs
    itself and every flow-run process from this copy instead. "" when it cannot be made.
    """
    import py_compile  # only the agent compiles

    if __file__.endswith(".pyc"):
        return os.path.abspath(__file__)
    try:
        source = _source_file()
        digest = _short_hash(Path(source).read_bytes())
        tag = sys.implementation.cache_tag or "python"
        target = cache_dir / f"local_agent-{digest}.{tag}.pyc"
        if not target.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            py_compile.compile(source, cfile=str(temporary), doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
            os.replace(temporary, target)
        return str(target) if target.read_bytes()[:4] == importlib.util.MAGIC_NUMBER else ""
    except (OSError, py_compile.PyCompileError):
        return ""


def _run_from_compiled_copy(settings: Settings) -> None:
    """Replace this process with the same command run from the compiled copy (see _compiled_copy).

    Only for ``python local_agent.py start ...``: a long-running agent then starts from
    bytecode, saving the memory the compiler keeps. Nothing is open yet; the pid stays the same.
    """
    orig_argv = getattr(sys, "orig_argv", None)  # Python 3.10+
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if __name__ != "__main__" or not __file__.endswith(".py") or not orig_argv or script != _source_file():
        return
    options = orig_argv[1:len(orig_argv) - len(sys.argv)]  # the interpreter's own options, e.g. -X ...
    compiled = _compiled_copy(settings.home / "cache")
    if not compiled or os.environ.get("LOCAL_AGENT_SOURCE"):
        return  # no copy, or we came from one already
    os.environ["LOCAL_AGENT_SOURCE"] = script
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *options, compiled, *sys.argv[1:]])


# Processes.


def _describe_exit(returncode: int | None) -> str:
    """Say how a process ended, naming the signal that killed it."""
    if returncode is None:
        return "ended while no agent watched it (its exit status is unknown)"
    if returncode >= 0:
        return f"exited with code {returncode}"
    number = -returncode
    name = _signal_name(number)
    if number == signal.SIGKILL:
        return f"was killed by {name} (the out-of-memory killer may have ended it)"
    if number == signal.SIGSEGV:
        return f"crashed with a segmentation fault ({name})"
    return f"was killed by {name}"


def _signal_name(number: int) -> str:
    """``SIGTERM`` for 15; ``signal 99`` for a number with no name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _process_start_ticks(pid: int) -> str:
    """The process's start time from /proc (Linux), to tell it from a later one with its pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return ""


def _find_flow_run_process(result_file: str, out_file: str) -> int:
    """The pid of a live flow-run process for this run that this agent started, or 0 (Linux): its
    environment names the run's result file, or (forked by a template, which keeps its own
    environment in /proc) its stdout is the run's output file."""
    marker = f"LOCAL_AGENT_RESULT_FILE={result_file}".encode()
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return 0
    for pid in pids:
        try:
            if os.readlink(f"/proc/{pid}/fd/1") != out_file:
                with open(f"/proc/{pid}/environ", "rb") as environ:
                    if marker not in environ.read().split(b"\0"):
                        continue
        except OSError:
            continue
        if _process_alive(pid, ""):
            return pid
    return 0


def _process_alive(pid: int, start_ticks: str) -> bool:
    """Whether ``pid`` still runs and is the same process (not a zombie, not a reused pid)."""
    if pid <= 0:  # 0 and -1 would name process groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return not start_ticks  # someone else's process now holds that pid
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return not start_ticks
    return fields[0] != b"Z" and (not start_ticks or fields[19].decode() == start_ticks)


def _signal_group(pid: int, signal_name: str) -> None:
    """Signal a flow-run process's whole group; one that is gone already is fine."""
    if pid <= 0:  # never our own group (0) or every process (-1)
        return
    try:
        os.killpg(pid, getattr(signal, signal_name))
    except (ProcessLookupError, PermissionError):
        pass


def _become_subreaper() -> bool:
    """Adopt orphaned grandchildren (Linux), so none is left a zombie; True if it worked."""
    try:
        import ctypes  # only an agent that asks for it

        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(36, 1, 0, 0, 0) == 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _reap_orphans(own_children: set[int]) -> None:
    """Reap exited processes that were re-parented to us, leaving our own children to Popen."""
    while True:
        try:
            found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except (ChildProcessError, OSError):
            return
        if found is None or found.si_pid in own_children:
            return  # nothing exited, or it is ours: Popen.poll() reaps it on the next round
        try:
            os.waitpid(found.si_pid, os.WNOHANG)
        except ChildProcessError:
            return


def _startup_variables_differ(template: Mapping[str, str], run: Mapping[str, str]) -> list[str]:
    """The variables a Python reads only as it starts (PYTHON*, LD_*) that a run sets otherwise than its template."""
    names = {name for name in (*template, *run) if name.startswith(_STARTUP_VARIABLE_PREFIXES)}
    return sorted(name for name in names if template.get(name) != run.get(name))


def _wait_then_wake(process: subprocess.Popen[bytes], wake: threading.Event) -> None:
    process.wait()
    wake.set()


def _flow_run_environment(
    settings: Settings, labels: Sequence[str], run: FlowRun, result_path: Path
) -> dict[str, str]:
    """``os.environ``, then ``--env``, then the variables the flow-run process needs."""
    python_path = [os.getcwd(), *filter(None, [os.environ.get("PYTHONPATH", "")]), *settings.import_paths]
    embedded = settings.api.startswith("sqlite:")
    fixed = {
        "PREFECT__CLOUD__API": settings.api,
        "PREFECT__CONTEXT__FLOW_RUN_ID": run.id,
        "PREFECT__CONTEXT__FLOW_ID": run.flow_id,
        "PREFECT__CLOUD__AGENT__LABELS": str(list(labels)),
        "PREFECT__CLOUD__USE_LOCAL_SECRETS": "false",
        "PREFECT__LOGGING__LOG_TO_CLOUD": str(settings.cloud_logs).lower(),
        "PREFECT__CLOUD__SEND_FLOW_RUN_LOGS": str(settings.cloud_logs).lower(),
        "PREFECT__LOGGING__LEVEL": settings.level,
        # Prefect's engine reports to a Prefect API; on the embedded database it runs locally.
        "PREFECT__ENGINE__FLOW_RUNNER__DEFAULT_CLASS": "prefect.engine.flow_runner.FlowRunner" if embedded
        else "prefect.engine.cloud.CloudFlowRunner",
        "PREFECT__ENGINE__TASK_RUNNER__DEFAULT_CLASS": "prefect.engine.task_runner.TaskRunner" if embedded
        else "prefect.engine.cloud.CloudTaskRunner",
        "PREFECT__CLOUD__REQUEST_TIMEOUT": str(settings.request_timeout),
        "PYTHONPATH": os.pathsep.join(python_path),
        "PYTHONUNBUFFERED": "1",  # output reaches the run log as it happens
        "LOCAL_AGENT_RESULT_FILE": str(result_path),
        # Where flows may be loaded from: the agent's own directories, whatever set them.
        "PREFECT__HOME_DIR": str(settings.home),
        "PREFECT__CLOUD__AGENT__FLOW_DIRS": json.dumps(settings.flow_dirs),
        "LOCAL_AGENT_SCRIPT_DIRS": json.dumps(settings.trusted_script_dirs),
    }
    if settings.tenant_id:
        fixed["PREFECT__CLOUD__TENANT_ID"] = settings.tenant_id
    if settings.pool:  # so the process speaks to a Prefect 2/3 API whatever its URL looks like
        fixed["PREFECT__CLOUD__AGENT__POOL"] = settings.pool
    from_config, _ = _local_run(run)
    # As Prefect's LocalAgent: the run config's variables win over --env, the fixed ones over both.
    environment = {**os.environ, **settings.env, **from_config, **fixed}
    # The child reads the token from exactly one place, so a stale one cannot win.
    for key in ("PREFECT__CLOUD__AGENT__AUTH_TOKEN", "PREFECT__CLOUD__AUTH_TOKEN", "PREFECT__CLOUD__API_KEY"):
        environment.pop(key, None)
    if settings.token:
        environment["PREFECT__CLOUD__AUTH_TOKEN"] = settings.token
    return environment


def _local_run(run: FlowRun) -> tuple[dict[str, str], str | None]:
    """A run's ``LocalRun`` (or ``UniversalRun``) settings: its variables and its working directory."""
    config = run.run_config if isinstance(run.run_config, Mapping) else {}
    env, working_dir = config.get("env"), config.get("working_dir")
    variables = {str(key): str(value) for key, value in env.items()} if isinstance(env, Mapping) else {}
    return variables, working_dir if isinstance(working_dir, str) and working_dir else None


#: The run configs this agent runs flows with (Prefect 1.4.1's LocalAgent takes these two).
_RUN_CONFIGS = ("LocalRun", "UniversalRun")


def _why_not_here(run: FlowRun, trusted_dirs: Sequence[str], python_has: set[str],
                  script_dirs: Sequence[str] = ()) -> str:
    """Why this agent cannot start ``run`` ("" when it can): checked before claiming, cheaply, so
    that in a mixed fleet each run goes to an agent that can run it."""
    if run.problem:
        return ""  # a record nobody can run: claimed and failed, saying why
    if run.launch is not None:  # the API says how to run it; the interpreter must have what it runs
        needs = run.launch.needs
        return "" if not needs or needs in python_has else (
            f"it runs with {needs}, and the flow-run Python has no {needs}: start the agent with --python "
            f"pointing at an environment with {needs}")
    config = run.run_config
    kind = config.get("type") if isinstance(config, Mapping) else None
    if kind is not None and kind not in _RUN_CONFIGS:
        return f"its flow has a {kind} run config; this agent runs {' and '.join(_RUN_CONFIGS)}"
    try:
        path, _ = _locate_flow_file(run.flow_name, run.storage, trusted_dirs, script_dirs)
    except FlowStorageError as exc:
        return str(exc)
    script = isinstance(run.storage, Mapping) and bool(run.storage.get("stored_as_script"))
    if (script or _needs_prefect(path)) and not {"prefect", "cloudpickle"} <= python_has:
        return ("its flow was stored by Prefect, and the flow-run Python has no prefect: start the agent with "
                "--python pointing at an environment with prefect 1.x")
    return ""


def _needs_prefect(path: str) -> bool:
    """Whether a flow file was written by Prefect (cloudpickle in its JSON wrapper), not by this file."""
    try:
        with open(path, "rb") as handle:
            return handle.read(1) == b"{"
    except OSError:
        return False


class _TemplateUnavailableError(Exception):
    """The warm template cannot fork this run; it starts in a fresh interpreter instead."""


class _Template:
    """The warm template of ``--preload``, from the agent's side: it starts the process, asks it
    to fork runs and hears when they end (see _serve_template for the other side)."""

    def __init__(self, python: str, program: str, modules: Sequence[str], environment: dict[str, str],
                 log_path: Path, wake: threading.Event) -> None:
        self.python, self.program, self.modules = python, program, list(modules)
        self.environment, self.log_path, self._wake = environment, log_path, wake
        self.process: subprocess.Popen[bytes] | None = None
        self.answered = threading.Event()  # set once it is ready or has failed
        self.problem = ""  # why it failed, went stale or stopped, "" while it works
        self.gone = False  # its process has ended: it will say no more
        self.stale = False  # code it imported changed on disk: replaced at once, not after a pause
        self._requests = -1
        self._changed = threading.Condition()
        self._answers: dict[str, dict[str, Any]] = {}
        self._exits: dict[int, int] = {}

    def start(self) -> None:
        """Start the template; it answers (``answered``) once it has imported its modules."""
        import subprocess  # only the agent starts processes

        requests_read, self._requests = os.pipe()
        replies_read, replies_write = os.pipe()
        try:
            with _private_open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    [self.python, self.program, "execute", "template", str(requests_read), str(replies_write),
                     *self.modules],
                    env=self.environment, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    pass_fds=(requests_read, replies_write), start_new_session=True)
        finally:
            os.close(requests_read)
            os.close(replies_write)
        threading.Thread(target=self._read_replies, args=(replies_read,), name="template", daemon=True).start()

    @property
    def ready(self) -> bool:
        """Whether it imported its modules and still runs."""
        return self.answered.is_set() and not self.problem

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def fork(self, run_id: str, environment: Mapping[str, str], cwd: str, out_path: Path, module: str = "") -> int:
        """The pid of a flow-run process forked for ``run_id`` (running ``module`` as ``python -m``
        would, when given); _TemplateUnavailableError when it cannot be."""
        request = {"run": run_id, "env": dict(environment), "cwd": cwd, "out": str(out_path)}
        self._send({**request, "module": module} if module else request)
        deadline = time.monotonic() + TEMPLATE_FORK_SECONDS
        with self._changed:
            while run_id not in self._answers and not self.problem and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())
            answer = self._answers.pop(run_id, None)
        if answer is None:
            self.stop(self.problem or f"it did not answer within {TEMPLATE_FORK_SECONDS:g} s", at_once=True)
            raise _TemplateUnavailableError(self.problem)  # a child it forked waits for a go that never comes
        if "pid" not in answer:
            if answer.get("stale"):
                self.problem, self.stale = str(answer["refused"]), True  # replaced; it still hears its runs end
            raise _TemplateUnavailableError(str(answer.get("refused", "it refused")))
        self._send({"go": run_id})
        return int(answer["pid"])

    def exit_status(self, pid: int) -> tuple[bool, int | None]:
        """Whether the template saw ``pid`` end, and its return code (negative: the signal)."""
        with self._changed:
            if pid in self._exits:
                return True, self._exits.pop(pid)
        return False, None

    def stop(self, why: str, *, at_once: bool = False) -> None:
        """Stop it; the runs it forked go on. ``at_once`` kills it: it hangs, and must fork nothing late."""
        self.problem = self.problem or why
        if self._requests >= 0:
            with contextlib.suppress(OSError):
                os.close(self._requests)  # it reads the end of its requests and exits
            self._requests = -1
        if self.process is not None:
            if at_once:
                self.process.kill()
            try:
                self.process.wait(timeout=5)
            except Exception:  # subprocess.TimeoutExpired
                self.process.kill()
                self.process.wait()

    def tail(self) -> str:
        """The last line the template wrote, for an error message."""
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
            return lines[-1] if lines else ""
        return ""

    def _send(self, message: Mapping[str, Any]) -> None:
        try:
            data = (json.dumps(message) + "\n").encode()
            while data:  # the agent's loop is the only writer: lines never interleave
                data = data[os.write(self._requests, data):]
        except OSError as exc:
            raise _TemplateUnavailableError(f"it cannot be reached ({exc.strerror or exc})") from None

    def _read_replies(self, replies: int) -> None:
        pending = b""
        try:
            while data := os.read(replies, 1 << 16):
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    self._take(json.loads(line))
        except (OSError, ValueError) as exc:
            self.problem = self.problem or f"its answers could not be read ({exc})"
        finally:
            os.close(replies)
            with self._changed:
                self.problem = self.problem or f"it exited ({self.tail() or 'no output'})"
                self.gone = True
                self._changed.notify_all()
            self.answered.set()
            self._wake.set()

    def _take(self, message: Mapping[str, Any]) -> None:
        with self._changed:
            if "exited" in message:
                self._exits[int(message["exited"])] = int(message["returncode"])
                self._wake.set()  # the loop hears of the end at once
            elif "run" in message:
                self._answers[str(message["run"])] = dict(message)
            elif "failed" in message:
                self.problem = str(message["failed"])
            self._changed.notify_all()
        if "ready" in message or "failed" in message:
            self.answered.set()


class _StopChannel:
    """Tells flow-run processes why they are about to be stopped, before the signal, so the flow's
    own engine settles its run (Prefect 2/3's attempt control, prefect/_internal/control_listener.py).

    The agent listens on loopback; each process connects with its run's one-time token (a line),
    then a hello (``\x00PF`` + version + capabilities), answered with version 1 and no receipts.
    Before SIGTERM the agent sends one byte, ``c`` (cancelled), ``r`` (handed back) or ``q`` (let
    go: the agent writes the outcome), and waits up to a second for ``a``.
    """

    INTENTS: ClassVar[dict[str, bytes]] = {"cancel": b"c", "shutdown": b"r", "timeout": b"q"}
    _HELLO_REPLY = b"\x00PF\x01\x00"

    def __init__(self) -> None:
        import socket

        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._tokens: dict[str, str] = {}
        self._connections: dict[str, socket.socket] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="stop-channel", daemon=True).start()

    def register(self, run_id: str) -> str:
        """A one-time token for the process of a run."""
        token = os.urandom(16).hex()
        with self._lock:
            self._tokens[token] = run_id
        return token

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._greet, args=(connection,), name="stop-channel-hello", daemon=True).start()

    def _greet(self, connection: Any) -> None:
        try:
            connection.settimeout(5.0)
            line = b""
            while not line.endswith(b"\n") and len(line) <= 64:
                byte = connection.recv(1)
                if not byte:
                    raise OSError("closed")
                line += byte
            with self._lock:
                run_id = self._tokens.pop(line.strip().decode("ascii", "replace"), None)
            if run_id is None:
                raise OSError("unknown token")
            hello = b""
            while len(hello) < 5:  # all of it: a byte left unread would be taken for the ack later
                chunk = connection.recv(5 - len(hello))
                if not chunk:
                    raise OSError("closed")
                hello += chunk
            if hello.startswith(b"\x00PF"):
                connection.sendall(self._HELLO_REPLY)
            with self._lock:
                self._connections[run_id] = connection
        except OSError:
            connection.close()

    def tell(self, run_id: str, why: str) -> bool:
        """Say why a run's process is about to be stopped; whether it acknowledged within a second."""
        intent = self.INTENTS.get(why)
        with self._lock:
            connection = self._connections.pop(run_id, None)
        if connection is None or intent is None:
            return False
        try:
            connection.settimeout(1.0)
            connection.sendall(intent)
            return bool(connection.recv(1) == b"a")
        except OSError:
            return False
        finally:
            connection.close()

    def forget(self, run_id: str) -> None:
        """Drop a settled run's token and connection."""
        with self._lock:
            connection = self._connections.pop(run_id, None)
            for token in [token for token, owner in self._tokens.items() if owner == run_id]:
                del self._tokens[token]
        if connection is not None:
            connection.close()

    def close(self) -> None:
        """Stop listening and close every connection."""
        self._listener.close()
        with self._lock:
            connections, self._connections = list(self._connections.values()), {}
        for connection in connections:
            connection.close()


class _Job:
    """A flow-run process this agent owns, started by it or adopted after a restart, and its output."""

    def __init__(self, run_id: str, *, flow_name: str, version: int | None, pid: int, runs_dir: Path,
                 started_at: float, start_ticks: str = "", offset: int = 0, stopping: str = "",
                 adopted: bool = False) -> None:
        self.run_id, self.flow_name, self.version, self.pid = run_id, flow_name, version, pid
        self.out_path = runs_dir / f"{run_id}.out"  # its stdout and stderr
        #: A working directory of its own, for a run whose job names none (Prefect 2/3), as
        #: Prefect's worker gives one: what its pull steps clone stays apart from other runs'.
        self.work_dir = runs_dir / f"{run_id}.work"
        self.result_path = runs_dir / f"{run_id}.result"  # the final state it reported, or could not
        self.started_at = started_at  # wall-clock time at launch
        self.process: subprocess.Popen[bytes] | None = None  # None when adopted, or forked by a template
        self.template: _Template | None = None  # the warm template that forked it and hears its end
        self.start_ticks = start_ticks
        self.offset = offset  # how much of the output has been read
        self.partial = b""  # a line not finished yet
        self.tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)  # for failure messages
        self.deadline: float | None = None  # the agent's monotonic clock past which it is stopped
        self.logged_bytes = 0
        self.dropped_lines = 0
        #: Why the agent is stopping it ("timeout", "cancel", "shutdown"), or "".
        self.stopping = stopping
        self.kill_at: float | None = None
        self.returncode: int | None = None
        self.exited = False
        self.adopted = adopted
        self.run_name = ""  # the run's readable name, for -f (not kept in the ledger)
        self.show_output = True  # whether -f shows it (a Prefect 2/3 job's stream_output)

    def start(self, command: list[str], environment: dict[str, str], cwd: str | None = None) -> None:
        """Start the flow-run process in its own session, its output going to a file."""
        import subprocess  # only the agent starts processes

        self.out_path.parent.mkdir(parents=True, exist_ok=True)  # someone may have removed it
        self.result_path.unlink(missing_ok=True)
        # Output goes to a file, not a pipe: nothing can block on it, and the process
        # outlives the agent without losing a byte; the agent tails the file.
        with _private_open(self.out_path, "wb") as output:
            self.process = subprocess.Popen(
                command,
                env=environment,
                cwd=cwd or os.getcwd(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as one, deaf to our Ctrl-C
            )
        self.pid = self.process.pid
        self.start_ticks = _process_start_ticks(self.pid)

    def fork(self, template: _Template, environment: Mapping[str, str], cwd: str | None = None,
             module: str = "") -> None:
        """Start the flow-run process as a fork of the warm template (same session, output and
        signals as ``start`` gives), running ``module`` when given; _TemplateUnavailableError when
        the template cannot."""
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self.result_path.unlink(missing_ok=True)
        with _private_open(self.out_path, "wb"):
            pass  # the child appends to it
        self.pid = template.fork(self.run_id, environment, cwd or os.getcwd(), self.out_path, module)
        self.template = template
        self.start_ticks = _process_start_ticks(self.pid)

    @classmethod
    def from_ledger(cls, run_id: str, entry: Mapping[str, Any], runs_dir: Path) -> _Job:
        """A job a previous start of the agent recorded in its ledger."""
        return cls(
            run_id, flow_name=str(entry.get("flow_name", "")), version=entry.get("version"), pid=int(entry["pid"]),
            runs_dir=runs_dir, started_at=float(entry.get("started_at", time.time())),
            start_ticks=str(entry.get("start_ticks", "")), offset=int(entry.get("offset", 0)),
            stopping=str(entry.get("stopping", "")), adopted=True,
        )

    def ledger_entry(self) -> dict[str, Any]:
        """What the ledger keeps of this job, so a restarted agent can adopt it."""
        return {
            "flow_name": self.flow_name, "version": self.version, "pid": self.pid,
            "start_ticks": self.start_ticks, "started_at": self.started_at, "offset": self.line_offset,
            "stopping": self.stopping,
        }

    def has_exited(self) -> bool:
        """Whether the process has ended (reaping it if it is our child)."""
        if not self.exited:
            if self.process is not None:
                self.returncode = self.process.poll()
                self.exited = self.returncode is not None
            elif self.template is not None:
                self.exited, self.returncode = self.template.exit_status(self.pid)
                if not self.exited and self.template.gone:  # nobody hears its end now: watch it as adopted
                    self.template, self.adopted = None, True
            else:
                self.exited = not _process_alive(self.pid, self.start_ticks)
        return self.exited

    @property
    def line_offset(self) -> int:
        """Where the output's last complete line ends: a restart reads on from here."""
        return self.offset - len(self.partial)

    @property
    def how_it_ended(self) -> str:
        """How the process ended, as far as this agent can know; a stop of the agent's own says so."""
        watched = self.process is not None or not self.adopted
        if self.stopping and watched and self.returncode is not None and self.returncode <= 0:
            reasons = {"timeout": "it timed out", "cancel": "its run was cancelled"}
            why = reasons.get(self.stopping, "the agent shut down")
            if self.returncode == 0:  # told why first (_StopChannel), it ended cleanly on the signal
                return f"was stopped by the agent ({why})"
            return f"was stopped by the agent with {_signal_name(-self.returncode)} ({why})"
        return _describe_exit(self.returncode if watched else None)

    def remove_files(self) -> None:
        """Remove the process's output and result files (and working directory), once its run is settled."""
        self.out_path.unlink(missing_ok=True)
        self.result_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            _remove_path(self.work_dir)

    def read_output(self, redact: _Redactor, *, to_the_end: bool = False) -> list[tuple[LogLine, bool]]:
        """The lines the process wrote since the last read, redacted (a flood is read in slices),
        each with whether the process shipped it itself."""
        lines: list[tuple[LogLine, bool]] = []
        try:
            with open(self.out_path, "rb") as output:
                output.seek(self.offset)
                while True:
                    data = output.read(1024 * 1024)
                    if not data:
                        break
                    self.offset += len(data)
                    lines += self._split(self.partial + data, redact)
                    if not to_the_end:
                        break  # the rest on the next round, between the loop's other duties
        except FileNotFoundError:
            return lines
        if to_the_end and self.partial:
            lines += self._lines_of(self.partial, redact)
            self.partial = b""
        return lines

    def _split(self, data: bytes, redact: _Redactor) -> list[tuple[LogLine, bool]]:
        raw_lines = data.split(b"\n")
        self.partial = raw_lines.pop()
        # An endless line is cut, never held whole; never through a secret, and only where
        # any secret that starts before the cut is there whole.
        while len(self.partial) > MAX_LINE_BYTES + redact.longest:
            cut = redact.safe_cut(self.partial, MAX_LINE_BYTES) or MAX_LINE_BYTES
            raw_lines.append(self.partial[:cut])
            self.partial = self.partial[cut:]
        return [line for raw in raw_lines for line in self._lines_of(raw, redact)]

    @staticmethod
    def _lines_of(raw: bytes, redact: _Redactor) -> list[tuple[LogLine, bool]]:
        """A line of output, redacted whole and then cut to lines a run's log takes."""
        text = redact(raw.decode("utf-8", "replace"))
        return [_parse_output_line(text[start:start + MAX_LINE_BYTES]) for start in range(0, max(len(text), 1),
                                                                                             MAX_LINE_BYTES)]

    def stop(self, why: str, kill_at: float) -> None:
        """SIGTERM the process group now, SIGKILL at ``kill_at`` (see ``kill_if_due``)."""
        self.stopping = why
        _signal_group(self.pid, "SIGTERM")
        self.kill_at = kill_at

    def kill_if_due(self, now: float) -> None:
        """SIGKILL a group that outstayed its SIGTERM."""
        if self.kill_at is not None and now >= self.kill_at:
            _signal_group(self.pid, "SIGKILL")
            self.kill_at = None


def _remove_path(path: Path) -> None:
    """Remove a file, or a directory with everything in it."""
    if path.is_dir() and not path.is_symlink():
        import shutil  # only for a run's own working directory

        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _read_result(path: Path) -> tuple[dict[str, Any] | None, bool] | None:
    """A flow-run process's final state and whether it delivered it, or None if it left none."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        state = result["state"]
        return (state if isinstance(state, dict) else None), bool(result.get("delivered"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class _Outcome(NamedTuple):
    """How the agent settles a run whose process ended."""

    #: The final state type, for ``--once`` and the agent's log ("NotRun" when the flow never ran).
    result: str
    #: A state the agent must write (None: the process delivered its own).
    state: dict[str, Any] | None = None
    #: A line for the run's log, and its level ("" when there is nothing to add).
    note: str = ""
    level: str = "INFO"


def _decide_outcome(
    reported: tuple[dict[str, Any] | None, bool] | None,
    how: str,
    *,
    stopping: str,
    lost: bool,
    timeout: float | None,
    last_output: str,
    pid: int,
    host: str,
    now: datetime,
) -> _Outcome:
    """Settle a finished run from what is known: the result file, how the process ended, and why
    the agent was stopping it. A final state the process reported always wins over a guess."""
    if reported is not None:
        state, delivered = reported
        return _Outcome(state["type"] if state else "NotRun", state if state is not None and not delivered else None)
    if stopping == "timeout":
        message = f"Flow run timed out after {timeout or 0:g} s; its process {how}."
        return _Outcome("Failed", make_state("Failed", message))
    if stopping == "cancel":
        return _Outcome("Cancelled", make_state("Cancelled", f"Flow run was cancelled; its process {how}."))
    if stopping == "shutdown":  # the agent stopped it while shutting down: back to the queue
        message = f"The agent on host {host} shut down before this run finished; rescheduled."
        return _Outcome("Scheduled", make_state("Scheduled", message, start_time=now),
                        f"{message} (its process {how})", "WARNING")
    if lost:
        what = f"The agent on host {host} restarted and the flow-run process PID {pid} was lost: it {how}."
    else:
        what = f"Flow-run process PID {pid} on host {host} {how} before reporting a final state."
    message = what + (f" Last output: {last_output}" if last_output else "")
    # Failed, marked as a crash: an API that tells the two apart (Prefect 2/3) writes Crashed.
    crashed = make_state("Failed", _one_line(message, 2000), context={"crashed": True})
    return _Outcome("Failed", crashed, message, "ERROR")


#: A run's phases in the RunBook, in order: fetched ahead of its start; its claim written
#: (or being written) with no answer yet, or an answer lost to an error; claimed and not
#: started; its process started (or adopted). A run leaves the book when settled.
#: INHERITED: a claim the last start of this agent wrote and never started.
#: REFUSED: a run this agent will not take (its flow file is where it may not load from).
DUE, CLAIMING, CLAIMED, LAUNCHED, INHERITED, REFUSED = "due", "claiming", "claimed", "launched", "inherited", "refused"
#: Phases that hold a slot (``--limit``) and keep the agent from finishing.
_BUSY = (DUE, CLAIMED, LAUNCHED)


class _Entry:
    """One run in the RunBook."""

    __slots__ = ("claim", "job", "phase", "run", "run_id", "version")

    def __init__(self, run_id: str, phase: str, run: FlowRun | None = None) -> None:
        self.run_id, self.phase, self.run = run_id, phase, run
        self.version: int | None = None  # the run's version after our claim
        self.claim = ""  # the token of our Submitted state, until a process runs it
        self.job: _Job | None = None


class RunBook:
    """Every run an agent is responsible for, its phase, its free slots and its ledger.

    The ledger (``ledger.json``) holds the launched runs' processes and the claims written
    without a process yet, and is saved before each claim is written, so an agent killed at
    any moment finds on restart every run it may own.
    """

    def __init__(self, directory: Path, limit: int | None, logger: logging.Logger) -> None:
        self.directory = directory
        self.runs_dir = directory / "runs"
        self.limit = limit
        self.logger = logger
        self._entries: dict[str, _Entry] = {}
        #: Why the ledger cannot be written ("" while it can).
        self.failing = ""

    # Views.

    def run_of(self, run_id: str) -> FlowRun | None:
        """The run as it was fetched, when the book holds it (adopted runs have none)."""
        entry = self._entries.get(run_id)
        return entry.run if entry else None

    def phase(self, run_id: str) -> str:
        """The run's phase, or "" when the book does not hold it."""
        entry = self._entries.get(run_id)
        return entry.phase if entry else ""

    def in_phase(self, *phases: str) -> list[_Entry]:
        """The entries in these phases, by due time where they have one."""
        found = [entry for entry in self._snapshot() if entry.phase in phases]
        return sorted(found, key=lambda entry: entry.run.start_time if entry.run else _utcnow())

    @property
    def busy(self) -> int:
        """Runs taken and not yet settled: fetched, claimed or running."""
        return sum(1 for entry in self._snapshot() if entry.phase in _BUSY)

    @property
    def jobs(self) -> list[_Job]:
        """The processes the agent watches."""
        return [entry.job for entry in self._snapshot() if entry.job is not None]

    def _snapshot(self) -> list[_Entry]:
        # One C-level copy: /api/status, /metrics and JSON logs read the book from other threads
        # while the loop changes it; iterating the live dict there could fail mid-way.
        return list(self._entries.values())

    def free_slots(self) -> int:
        """How many more runs ``--limit`` allows the agent to take."""
        return sys.maxsize if self.limit is None else self.limit - self.busy

    def is_taken(self, run_id: str, now: float = 0.0) -> bool:
        """Whether a run is on its way here (fetched, claimed, running, to be settled), or was
        refused less than REFUSED_RECHECK_SECONDS before ``now``."""
        entry = self._entries.get(run_id)
        if entry is not None and entry.phase == REFUSED and now - (entry.version or 0) >= REFUSED_RECHECK_SECONDS:
            return False
        return self.phase(run_id) in (*_BUSY, INHERITED, REFUSED)

    def due(self, before: datetime) -> list[FlowRun]:
        """Fetched runs starting by ``before``, earliest first."""
        return [entry.run for entry in self.in_phase(DUE) if entry.run and entry.run.start_time <= before]

    def to_launch(self, now: datetime) -> list[tuple[FlowRun, int]]:
        """Claimed runs whose start time has come, earliest first."""
        return [(entry.run, entry.version or 0) for entry in self.in_phase(CLAIMED)
                if entry.run and entry.run.start_time <= now]

    def next_start(self, claim_lead: float) -> datetime | None:
        """When the next fetched run should be claimed or claimed run launched."""
        starts = [entry.run.start_time - timedelta(seconds=claim_lead) for entry in self.in_phase(DUE) if entry.run]
        starts += [entry.run.start_time for entry in self.in_phase(CLAIMED) if entry.run]
        return min(starts, default=None)

    # Moves from phase to phase.

    def fetched(self, run: FlowRun) -> None:
        """A run found in the queue, to be claimed as its start nears."""
        entry = self._entries.setdefault(run.id, _Entry(run.id, DUE, run))
        entry.phase, entry.run = DUE, run  # an unsettled claim's token stays in the ledger

    def claiming(self, runs: Sequence[FlowRun]) -> list[str] | None:
        """Record claims about to be written, in the ledger first; their tokens, or None (and the
        runs left for another agent) when the ledger cannot be written: no claim without it."""
        tokens = []
        for run in runs:
            entry = self._entries.setdefault(run.id, _Entry(run.id, CLAIMING, run))
            entry.phase, entry.claim = CLAIMING, os.urandom(16).hex()
            tokens.append(entry.claim)
        if self.save():  # before the claim: an agent killed now finds it on restart
            return tokens
        for run in runs:
            self.settled(run.id)
        return None

    def claimed(self, run_id: str, version: int) -> None:
        """Our claim won; the run waits for its start time."""
        entry = self._entries[run_id]
        entry.phase, entry.version = CLAIMED, version

    def launched(self, job: _Job) -> None:
        """A run's process started (or was found after a restart)."""
        entry = self._entries.setdefault(job.run_id, _Entry(job.run_id, LAUNCHED))
        entry.phase, entry.job, entry.claim = LAUNCHED, job, ""
        self.save()

    def refuse(self, run_id: str, now: float) -> None:
        """A run this agent cannot start: not fetched again for REFUSED_RECHECK_SECONDS (no slot held)."""
        entry = self._entries.setdefault(run_id, _Entry(run_id, REFUSED))
        entry.phase, entry.run, entry.version = REFUSED, None, int(now)

    def settled(self, run_id: str) -> None:
        """The run needs nothing more from this agent: lost claim, failed start, final state, handed back."""
        self._entries.pop(run_id, None)

    def release_unstarted(self) -> list[tuple[FlowRun, int | None]]:
        """Forget fetched runs (never claimed) and return the claimed ones, to be handed back."""
        handed: list[tuple[FlowRun, int | None]] = []
        for entry in self.in_phase(DUE, CLAIMED):
            if entry.phase == CLAIMED and entry.run is not None:
                handed.append((entry.run, entry.version))
            self.settled(entry.run_id)
        return handed

    # The ledger.

    def save(self) -> bool:
        """Write the ledger: the processes running, and the claims written without one. False
        when the disk refused (logged once, until it takes the ledger again)."""
        entries = {
            "runs": {run_id: entry.job.ledger_entry() for run_id, entry in self._entries.items() if entry.job},
            "claims": {run_id: entry.claim for run_id, entry in self._entries.items() if entry.claim and not entry.job},
        }
        try:
            _write_json_atomically(self.directory / "ledger.json", entries)
        except OSError as exc:
            if not self.failing:
                self.logger.error("Cannot save the ledger in %s (%s): no new runs are claimed until it can be "
                                  "saved; free some disk space", self.directory, exc.strerror or exc)
            self.failing = str(exc)
            return False
        if self.failing:
            self.logger.info("The ledger in %s can be saved again; claiming runs again", self.directory)
            self.failing = ""
        return True

    def load(self) -> tuple[list[_Job], dict[str, str]]:
        """The jobs and the unstarted claims the last start of this agent left in its ledger."""
        path = self.directory / "ledger.json"
        try:
            ledger = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return [], {}
        except (OSError, ValueError) as exc:
            self.logger.error("The ledger %s is damaged (%s); moved aside to %s.bad", path, exc, path.name)
            os.replace(path, path.with_name(path.name + ".bad"))
            return [], {}
        if not isinstance(ledger, dict) or not isinstance(ledger.get("runs", {}), dict):
            return [], {}
        jobs = []
        for run_id, item in (ledger.get("runs") or {}).items():
            try:
                jobs.append(_Job.from_ledger(run_id, item, self.runs_dir))
            except (KeyError, TypeError, ValueError):
                self.logger.warning("Ignoring a damaged ledger entry for flow run %s", run_id)
        return jobs, dict(ledger.get("claims") or {})

    def remove_strays(self) -> None:
        """Remove output and result files of runs the book does not hold: settled by a start that died
        before it removed them."""
        try:
            strays = [path for path in self.runs_dir.iterdir() if path.name.split(".")[0] not in self._entries]
        except OSError:
            return
        for path in strays:
            with contextlib.suppress(OSError):
                _remove_path(path)

    def inherit(self, run_id: str, token: str) -> None:
        """A claim the last start wrote and never started: settled once the API answers."""
        entry = self._entries.setdefault(run_id, _Entry(run_id, INHERITED))
        entry.phase, entry.claim = INHERITED, token


class _Clock:
    """The agent's time; tests pass one of their own to step through the loop without waiting."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back, for deadlines and intervals."""
        return time.monotonic()

    def now(self) -> datetime:
        """The current time, as aware UTC, for comparing with runs' start times."""
        return _utcnow()


class _APIHealth:
    """Whether the API answers the agent, logged once per change rather than on every retry."""

    def __init__(self, clock: _Clock, logger: logging.Logger) -> None:
        self.clock, self.logger = clock, logger
        #: What the last failure said ("" while the API answers), and since when it fails.
        self.problem = ""
        self.down_since = 0.0

    def failed(self, exc: AgentError) -> None:
        """An API call failed; say so if the problem is new."""
        self.down_since = self.down_since or self.clock.monotonic()
        text = str(exc)
        if text != self.problem:
            self.problem = text
            level = logging.ERROR if isinstance(exc, AuthError) else logging.WARNING
            self.logger.log(level, "%s; retrying", text)

    def answered(self) -> None:
        """An API call succeeded; say so if it had been failing."""
        self.down_since = 0.0
        if self.problem:
            self.logger.info("The API answers again.")
            self.problem = ""

    def down_for(self) -> float:
        """Seconds the API has been failing (0 while it answers)."""
        return self.clock.monotonic() - self.down_since if self.down_since else 0.0


#: The agent loop's phases: registering with the API; taking runs; finishing the runs taken
#: (after --once, --max-polls or a stop); after a signal, handing back what has not started
#: and giving running flows --grace seconds; done.
CONNECTING, RUNNING, DRAINING, HURRYING, DONE = "connecting", "running", "draining", "hurrying", "done"


class LocalAgent:
    """Polls a backend for due flow runs with its labels and runs each in a subprocess."""

    def __init__(self, settings: Settings | None = None, *, backend: Backend | None = None,
                 clock: _Clock | None = None, **options: Any) -> None:
        self.settings = settings if settings is not None else resolve_settings(options)
        self.labels = self.settings.agent_labels()
        self.logger = logging.getLogger(self.settings.name)
        self.backend = backend
        self.clock = clock or _Clock()
        self.agent_id = ""
        self.phase = CONNECTING
        #: Final state of every run this agent took, by run id (read by ``--once``).
        self.results: dict[str, str] = {}
        key = _short_hash(self.settings.api.encode("utf-8"))
        self.directory = self.settings.home / "agents" / f"{slugify(self.settings.name)}-{key}"
        self.book = RunBook(self.directory, self.settings.limit, self.logger)
        self._wake = threading.Event()
        self._poll_now = False
        self._stop = threading.Event()
        self._hurry = threading.Event()
        self._stop_signal = 0
        self._polls = self._empty_polls = self._connect_attempts = 0
        self._next_poll = self._next_watch = self._connect_started = self._next_top_up = 0.0
        self._grace_end: float | None = None
        self._opened_at = self._last_poll_ok = 0.0
        self.api = _APIHealth(self.clock, self.logger)
        self._gave_up = False
        self._disk_full = False
        self._outbox: _Outbox | None = None
        self._lock_file: IO[Any] | None = None
        self._http: ThreadingHTTPServer | None = None
        self._program = _source_file()  # what flow-run processes run: this file, or its compiled copy
        self._python = sys.executable  # and with which interpreter (--python)
        self._python_has: set[str] = set()  # which of prefect and cloudpickle it has (see _check_python)
        self._refusals_logged: set[str] = set()
        self._template: _Template | None = None  # the warm template of --preload, when there is one
        self._stop_channel: _StopChannel | None = None  # opened for the first run that takes intents
        self._retired_templates: list[_Template] = []  # replaced ones, kept while runs they forked go on
        self._next_template_at = 0.0
        self.subreaper = False
        self._redact = _Redactor(_secrets(self.settings, os.environ))
        #: What ``/metrics`` reports; the wall-clock time it started, for ``local_agent_start_time_seconds``.
        self.metrics = _Metrics()
        self.started_at = time.time()

    # Public controls.

    def start(self, *, banner: bool = True) -> int:
        """Run until stopped, ``--max-polls`` is reached or (``--once``) the queue is empty."""
        _attach_agent_logging(self.logger, self.settings.level, self._redact,
                              _JSONLogFormatter(self._flow_name_of) if self.settings.log_format == "json" else None)
        try:
            self.open()  # bad settings and files fail here, before the banner
            if banner:
                print(BANNER, flush=True)
            if self.settings.pool:  # a Prefect 2/3 API routes by pool and queue; labels play no part
                self.logger.info("Starting LocalAgent on work pool %r (queues: %s)", self.settings.pool,
                                 ", ".join(self.settings.work_queues) or "all")
            else:
                self.logger.info("Starting LocalAgent with labels %s", self.labels)
            self.logger.info("Agent documentation can be found at %s", _docs_location())
            _log_agent_settings(self)
            restore = _stop_on_signals(self)
            try:
                while self.phase != DONE:
                    self._wait(self.step())
            finally:
                restore()
        finally:
            self.close()
        return self._exit_code()

    def step(self) -> float:
        """One round of the agent's loop; the seconds to wait before the next round.

        1. Tend the processes it owns: ship output, settle those that ended, enforce deadlines.
        2. Connecting: register with the API, retrying while it is down.
        3. Draining after a signal: hand back what has not started; stop flows past the grace.
        4. Notice runs cancelled in the API; hand back claims a killed start left behind.
        5. Claim runs as their start nears and launch each when due.
        6. Running: poll for new runs when the backoff allows and a slot is free.
        """
        now = self.clock.monotonic()
        self._tend_jobs()                                          # 1.
        if self.phase == CONNECTING:
            return self._connect()                                 # 2.
        if self.phase == RUNNING and self._stop.is_set():
            self._begin_drain(now)
        if self.phase != RUNNING and not self._drain(now):         # 3.
            return 0.0
        self._keep_alive()
        if now >= self._next_watch:                                # 4.
            self._watch_owned_runs()
            self._next_watch = now + WATCH_SECONDS
        if self.phase == RUNNING and self.book.in_phase(INHERITED):
            self._settle_inherited_claims()
        self._launch_due()                                         # 5.
        if self.phase != RUNNING:
            return OUTPUT_POLL_SECONDS
        if (self._poll_now or now >= self._next_poll) and self.book.free_slots() > 0:
            self._poll_and_count(now)                              # 6.
        return self._time_to_next_round() if self.phase == RUNNING else 0.0

    @property
    def stopping(self) -> bool:
        """Whether a signal has asked the agent to stop (a second one hurries it)."""
        return self._stop.is_set() and bool(self._stop_signal)

    def stop(self, signum: int = 0) -> None:
        """Stop taking runs and drain; a second call skips the grace period."""
        if self._stop.is_set():
            self._hurry.set()
        self._stop_signal = self._stop_signal or signum
        self._stop.set()
        self._wake.set()

    def poke(self) -> None:
        """Poll now instead of waiting out the backoff."""
        self._poll_now = True
        self._wake.set()

    def health_problem(self) -> str:
        """Why the agent is unhealthy ("" when it is): it has not polled the API for too long."""
        stale = max(HEALTH_STALE_SECONDS, 6 * self.settings.max_poll_interval)
        since = self._last_poll_ok or self._opened_at
        waited = self.clock.monotonic() - since
        if since and waited > stale:
            what = "polled" if self._last_poll_ok else "reached"
            problem = self.api.problem or "no answer"
            return self._redact(f"the agent has not {what} the API for {waited:.0f} s: {problem}")
        return ""

    def _flow_name_of(self, run_id: str) -> str:
        """The flow of a run this agent holds ("" when it holds none by that id), for JSON logs.

        Called from any thread that logs, while the loop may change the book: a miss is harmless."""
        try:
            run = self.book.run_of(run_id)
            if run is not None:
                return run.flow_name or ""
            return next((job.flow_name for job in self.book.jobs if job.run_id == run_id), "")
        except RuntimeError:  # the book changed size under us
            return ""

    def _write_identity(self) -> None:
        """``agent.json`` in the agent's directory: who holds its lock, for the ``status`` command."""
        identity = {"pid": os.getpid(), "name": self.settings.name, "labels": self.labels,
                    "api": self._redact(self._backend().location),
                    "started": datetime.fromtimestamp(self.started_at, timezone.utc).isoformat(timespec="seconds"),
                    "agent_address": self.settings.agent_address}
        with contextlib.suppress(OSError):  # status then says less; the agent runs as well without it
            _write_json_atomically(self.directory / "agent.json", identity)

    def metrics_text(self) -> str:
        """``/metrics``: the counters, and gauges read now, in Prometheus' text format."""
        since_poll = self.clock.monotonic() - self._last_poll_ok if self._last_poll_ok else math.nan
        limit = self.settings.limit
        gauges = {
            "seconds_since_last_poll": ("Seconds since the last successful poll (NaN before the first).", since_poll),
            "spool_entries": ("API writes waiting to be delivered.", self._outbox.pending if self._outbox else 0),
            "spool_bytes": ("Bytes of API writes waiting to be delivered.",
                            self._outbox.pending_bytes if self._outbox else 0),
            "running_processes": ("Flow-run processes running.", len(self.book.jobs)),
            "free_slots": ("Runs the agent may still take (+Inf without --limit).",
                           self.book.free_slots() if limit else math.inf),
            "start_time_seconds": ("When the agent started, in seconds since the Unix epoch.", self.started_at),
        }
        return self.metrics.render(gauges, {"version": __version__, "name": self.settings.name})

    def status(self) -> dict[str, Any]:
        """What the agent is doing, for ``/api/status``."""
        return {
            "agent_id": self.agent_id, "name": self.settings.name, "labels": self.labels, "pid": os.getpid(),
            "started": datetime.fromtimestamp(self.started_at, timezone.utc).isoformat(timespec="seconds"),
            "last_poll_seconds_ago": round(self.clock.monotonic() - self._last_poll_ok, 3)
            if self._last_poll_ok else None,
            "undelivered_bytes": self._outbox.pending_bytes if self._outbox else 0,
            "running": {job.run_id: job.pid for job in self.book.jobs},
            "waiting": sorted(entry.run_id for entry in self.book.in_phase(DUE, CLAIMED)),
            "undelivered": self._outbox.pending if self._outbox else 0,
            "api_problem": self._redact(self.api.problem),
        }

    # Start-up and shutdown.

    def open(self) -> None:
        """Open the backend, lock this agent's directory, load its spool, adopt its last start's runs."""
        if self.backend is None:
            self.backend = open_backend(self.settings)
        try:
            self.settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)
            _private_dirs(self.settings.home, self.book.runs_dir)
        except OSError as exc:
            raise ConfigError(f"cannot create the agent's directory {self.directory}: {exc.strerror or exc}") from None
        self._lock_file = _lock_agent_directory(self.directory, self.settings)
        self._write_identity()
        self._python = self._check_python()
        # The compiled copy is bytecode for this interpreter; another one runs the source.
        same_python = os.path.realpath(self._python) == os.path.realpath(sys.executable)
        self._program = (_compiled_copy(self.settings.home / "cache") if same_python else "") or _source_file()
        if self.settings.preload:
            self._start_template(wait=True)
        self._outbox = _Outbox(self.backend, self.directory / "spool.jsonl", self.logger, self._redact, self.metrics)
        if self._outbox.pending:
            self.logger.info("Delivering %d API write(s) left over from the last run", self._outbox.pending)
        if self.settings.subreaper or os.getpid() == 1:
            self.subreaper = _become_subreaper()
        self._adopt_previous_runs()
        self._opened_at = self.clock.monotonic()
        if self.settings.agent_address:  # up before the API is: a health check then says why it is not
            self._http = _serve_agent_address(self, self.settings.agent_address)

    def _check_python(self) -> str:
        """The interpreter for flow-run processes, checked once: it runs; which of prefect and
        cloudpickle it has (Prefect flows need both)."""
        python = self.settings.python or sys.executable
        if python == sys.executable:
            self._python_has = {name for name in ("prefect", "cloudpickle") if importlib.util.find_spec(name)}
            return python
        import subprocess  # only the agent starts processes

        probe = ("import importlib.util as u; "
                 "print(' '.join(m for m in ('prefect', 'cloudpickle') if u.find_spec(m)))")
        try:
            found = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60,
                                   stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"--python {python} cannot be run ({_describe_exception(exc)}): give the path "
                              "of a Python interpreter") from None
        if found.returncode != 0:
            raise ConfigError(f"--python {python} fails to start ({_one_line(found.stderr)}): give the path "
                              "of a working Python interpreter")
        self.logger.info("Flow runs use %s (%s)", python, f"with {found.stdout.strip()}" if found.stdout.strip()
                         else "without prefect or cloudpickle")
        self._python_has = set(found.stdout.split())
        return python

    def _start_template(self, *, wait: bool = False) -> None:
        """Start the warm template of ``--preload``; with ``wait``, until it is ready (a module that
        cannot be imported is then an error of the agent's start)."""
        placeholder = FlowRun(id="", version=0, state="", serialized_state={}, flow_id="", flow_name="")
        environment = _flow_run_environment(self.settings, self.labels, placeholder, Path(os.devnull))
        if self._backend().launches_runs:  # its runs get the agent's environment and the API's (see Launch)
            environment = {**os.environ, **self.settings.env, "PYTHONUNBUFFERED": "1"}
        template = _Template(self._python, self._program, self.settings.preload, environment,
                             self.directory / "template.out", self._wake)
        self._template, self._next_template_at = template, self.clock.monotonic() + TEMPLATE_RETRY_SECONDS
        try:
            template.start()
        except OSError as exc:
            template.problem = f"it cannot be started: {exc.strerror or exc}"
        if not wait:
            return
        if not template.answered.wait(TEMPLATE_START_SECONDS):
            template.stop(f"it was not ready within {TEMPLATE_START_SECONDS:g} s", at_once=True)
        if template.problem:
            raise ConfigError(f"the warm template of --preload {' '.join(self.settings.preload)} failed: "
                              f"{template.problem}")
        self.logger.info("Flow runs fork from a warm process (PID %d) that imported %s", template.pid,
                         ", ".join(self.settings.preload))

    def _warm_template(self) -> _Template | None:
        """The template to fork runs from, if one is ready; a failed one is replaced (at most every
        TEMPLATE_RETRY_SECONDS; runs start afresh meanwhile)."""
        template = self._template
        if template is not None and template.problem:
            if template.stale:  # a new one imports the new code now
                self._next_template_at = self.clock.monotonic()
            else:
                self.logger.warning("The warm template stopped: %s; runs start in fresh interpreters until "
                                    "another is ready", template.problem)
            self._retired_templates.append(template)
            self._template = template = None
        if template is None and self.settings.preload and self.clock.monotonic() >= self._next_template_at:
            self._start_template()
            template = self._template
        return template if template is not None and template.ready else None

    def _fork_from_template(self, job: _Job, environment: Mapping[str, str], working_dir: str | None,
                            module: str = "") -> bool:
        """Start the job as a fork of the warm template, if there is one and the run allows it."""
        template = self._warm_template()
        if template is None:
            return False
        differ = _startup_variables_differ(template.environment, environment)
        if differ:
            self.logger.debug("Flow run %s starts in a fresh interpreter: it sets %s, which Python reads "
                              "only as it starts", job.run_id, ", ".join(differ))
            return False
        # Prefect's engine beats a run's heartbeat from a fresh `python -m prefect heartbeat`
        # process by default: as heavy as the run itself. A forked run beats it from a thread
        # of its own, unless its settings say otherwise.
        environment = {"PREFECT__CLOUD__HEARTBEAT_MODE": "thread", **environment}
        try:
            job.fork(template, environment, working_dir, module)
        except _TemplateUnavailableError as exc:
            self.logger.warning("Flow run %s starts in a fresh interpreter: the warm template cannot fork it (%s)",
                                job.run_id, exc)
            return False
        return True

    def _tend_templates(self) -> None:
        """Replace a failed or stale template (when due); stop replaced ones once no run they forked is left."""
        if self.settings.preload and self.phase == RUNNING:
            self._warm_template()
        for template in list(self._retired_templates):
            if not any(job.template is template for job in self.book.jobs):
                template.stop("replaced")
                self._retired_templates.remove(template)

    def close(self) -> None:
        """Stop the endpoint, deliver what the API takes (the spool keeps the rest), release files."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        for template in [*self._retired_templates, *filter(None, [self._template])]:
            template.stop("the agent stopped")
        if self._stop_channel is not None:
            self._stop_channel.close()
        if self._outbox is not None:
            self._outbox.close(timeout=2.0 if self._outbox.failing else 10.0)  # the spool keeps the rest
            if self._outbox.pending:
                self.logger.warning("%d API write(s) could not be delivered; they are kept in %s for the next start",
                                    self._outbox.pending, self.directory / "spool.jsonl")
        if self.backend is not None:
            self.backend.close()
        if self._lock_file is not None:
            self._lock_file.close()

    def _backend(self) -> Backend:
        assert self.backend is not None, "the agent has not opened its backend"
        return self.backend

    def _api_writes(self) -> _Outbox:
        assert self._outbox is not None, "the agent has not opened its outbox"
        return self._outbox

    def _adopt_previous_runs(self) -> None:
        """Take back the runs a previous start of this agent owned (after a crash or kill)."""
        jobs, claims = self.book.load()
        for job in jobs:
            if self.settings.timeout:
                job.deadline = self.clock.monotonic() + job.started_at + self.settings.timeout - time.time()
            job.offset = max(job.offset, self._api_writes().resume_offset(job.run_id))
            self.book.launched(job)
            if _process_alive(job.pid, job.start_ticks):
                self.logger.info("Adopting flow run %s (PID %d), left running by this agent's last start",
                                 job.run_id, job.pid)
                self._run_log(job.run_id, f"Agent {self.settings.name} restarted and adopted process PID {job.pid}")
        for run_id, token in claims.items():
            if not self.book.phase(run_id):
                self.book.inherit(run_id, token)
                self._adopt_unlaunched(run_id)
        self.book.remove_strays()
        self.book.save()

    def _adopt_unlaunched(self, run_id: str) -> None:
        """A claim the last start wrote without recording a process: find the process, if any."""
        job = _Job(run_id, flow_name="", version=None, pid=0, runs_dir=self.book.runs_dir, started_at=time.time(),
                   adopted=True)
        job.pid = _find_flow_run_process(str(job.result_path), str(job.out_path))
        if job.pid:
            job.start_ticks = _process_start_ticks(job.pid)
        elif not job.result_path.exists():
            return  # never started: _settle_inherited_claims decides, once the API answers
        self.book.launched(job)  # a live process is watched; one that ended is settled next round
        self.logger.info("Adopting flow run %s, started by this agent's last start just before it stopped", run_id)

    def _settle_inherited_claims(self) -> None:
        """Hand back runs a killed agent claimed but never started, if its claim still stands."""
        for entry in self.book.in_phase(INHERITED):
            try:
                run = self._backend().get_flow_run(entry.run_id)
            except APIError:
                return  # try again next round
            if run is not None and run.state == "Submitted" and (run.serialized_state.get("context") or {}).get(
                    "claim") == entry.claim:
                message = (f"The agent on host {_hostname()} stopped after claiming this run and before "
                           "starting it; rescheduled.")
                self._run_log(entry.run_id, message, level="WARNING")
                self._set_final(entry.run_id, make_state("Scheduled", message, start_time=self.clock.now()),
                                run.version)
            self.book.settled(entry.run_id)
            self.book.save()

    def _connect(self) -> float:
        """Register with the backend; on a transient failure, the seconds until the next try."""
        now = self.clock.monotonic()
        self._connect_started = self._connect_started or now
        if self._stop.is_set():
            self._begin_drain(now)
            return 0.0
        try:
            with self.metrics.timed("connect"):
                self.agent_id = self._backend().connect(self.settings.name, self.labels)
        except APIError as exc:
            if not exc.transient:
                raise
            self.api.failed(exc)
        else:
            self.logger.debug("Assigned agent id: %s", self.agent_id)
            self.api.answered()
            self.logger.info("Agent successfully connected to %s", self._backend().location)
            self.logger.info("Waiting for flow runs...")
            self.phase, self._next_poll, self._next_watch = RUNNING, now, now
            return 0.0
        self._connect_attempts += 1
        out_of_patience = self.settings.once and now - self._connect_started > ONCE_API_PATIENCE_SECONDS
        max_polls = self.settings.max_polls
        if out_of_patience or (max_polls is not None and self._connect_attempts >= max_polls):
            self.logger.error("Giving up: the API did not answer after %d attempt(s).", self._connect_attempts)
            self._gave_up = True
            self._begin_drain(now)
            return 0.0
        return self._poll_interval(self._connect_attempts)

    def _exit_code(self) -> int:
        if self._stop_signal == signal.SIGINT:
            return 130
        if self._gave_up:
            return 1
        if self.settings.once and any(state != "Success" for state in self.results.values()):
            return 1
        return 0

    # Waiting.

    def _wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` s; a signal, a process's end or (embedded) a new run wakes us sooner."""
        if timeout > 0 and not self._wake.is_set():
            if self.phase != RUNNING:
                self._wake.wait(timeout)
            else:
                try:
                    if self._backend().wait_for_change(timeout, self._wake):
                        self._poll_now = True
                except AgentError as exc:
                    self.api.failed(exc)
                    self._wake.wait(timeout)
        self._wake.clear()

    def _time_to_next_round(self) -> float:
        """Until the next poll (if a slot is free), watch, claim, launch or output read."""
        now = self.clock.monotonic()
        wake_at = [self._next_watch]
        if self.book.free_slots() > 0:
            wake_at.append(self._next_poll)
        next_start = self.book.next_start(self._backend().claim_lead_seconds)
        if next_start is not None:
            wake_at.append(now + max(0.0, (next_start - self.clock.now()).total_seconds()))
        if self.book.jobs:
            wake_at.append(now + OUTPUT_POLL_SECONDS)
        return max(0.0, min(wake_at) - now)

    def _poll_interval(self, empty_polls: int) -> float:
        """Prefect's backoff while idle; about a second, jittered, while the API is failing."""
        if self.api.problem:
            return random.uniform(0.5, 1.0)  # so the agent resumes within a second of the API's return
        interval = POLL_BACKOFF[min(empty_polls, len(POLL_BACKOFF) - 1)]
        return min(interval, max(self.settings.max_poll_interval, POLL_BACKOFF[0]))

    # Polling and claiming.

    def _poll_and_count(self, now: float) -> None:
        """Poll once, set the next poll by the backoff, and stop polling when the limits say so."""
        self._poll_now = False
        found = self._poll()
        self._polls += 1
        self.metrics.count("polls_total")
        self._empty_polls = 0 if found else self._empty_polls + 1
        self._next_poll = self.clock.monotonic() + self._poll_interval(self._empty_polls)
        if self._finished_polling(found):
            self._begin_drain(now)

    def _finished_polling(self, found: bool) -> bool:
        if self.settings.max_polls is not None and self._polls >= self.settings.max_polls:
            self.logger.debug("Reached the maximum of %d poll(s).", self._polls)
            return True
        if not self.settings.once:
            return False
        # --once: stop when a poll finds nothing new and nothing is left to launch, or when
        # the API has been failing for too long to wait on (cron should hear about it).
        if self.api.down_for() > ONCE_API_PATIENCE_SECONDS:
            self.logger.error("Giving up: the API has not answered for %g s.", ONCE_API_PATIENCE_SECONDS)
            self._gave_up = True
            return True
        return not found and not self.book.in_phase(DUE, CLAIMED) and not self.api.problem

    def _poll(self) -> bool:
        """Ask for due runs; queue new ones for launch. True when any were found."""
        backend = self._backend()
        self.logger.debug("Querying for ready flow runs...")
        before = self.clock.now() + timedelta(seconds=0 if self.settings.once else PREFETCH_SECONDS)
        try:
            self._top_up_schedules()
            with self.metrics.timed("get_runs_in_queue"):
                run_ids = backend.get_runs_in_queue(self.labels, before)
            self._last_poll_ok = self.clock.monotonic()
            # Read metadata only for runs there is room for; the rest stay queued for others.
            now = self.clock.monotonic()
            new_ids = [run_id for run_id in run_ids if not self.book.is_taken(run_id, now)][: self.book.free_slots()]
            if not new_ids:
                self.logger.debug("No ready flow runs found.")
                self.api.answered()
                return False
            self.logger.debug("Found %d ready flow run(s): %s", len(new_ids), new_ids)
            self.logger.debug("Retrieving metadata for %d flow run(s)...", len(new_ids))
            with self.metrics.timed("get_flow_runs"):
                runs = backend.get_flow_runs(new_ids)
        except APIError as exc:
            self.metrics.count("poll_errors_total")
            self.api.failed(exc)
            return False
        self.api.answered()
        runs = sorted((run for run in runs if run.state in SCHEDULED_STATES), key=lambda run: run.start_time)
        runs = runs[: self.book.free_slots()]
        if runs:
            self.logger.info("Found %d flow run(s) to submit for execution.", len(runs))
        for run in runs:
            self.book.fetched(run)
        return bool(runs)

    def _top_up_schedules(self) -> None:
        """Create the next runs of the embedded database's schedules when due (a Server has a
        service for that: there it is never due)."""
        now = self.clock.monotonic()
        if now < self._next_top_up:
            return
        moment = self.clock.now()
        next_time = self._backend().top_up_schedules(moment)
        wait = math.inf if next_time is None else (next_time - moment).total_seconds()
        self._next_top_up = now + max(1.0, wait)

    def _launch_due(self) -> None:
        """Claim fetched runs as their start nears, and launch each at its start time, in order.

        A backend whose claims take time to settle (Prefect Server) has them made that much
        early, so the launch itself is on time; nothing is launched before its start time.
        """
        if self._stop_signal:
            return
        lead = timedelta(seconds=self._backend().claim_lead_seconds)
        near = [run for run in self.book.due(self.clock.now() + lead) if self._may_load(run)]
        if near and self._room_to_run():
            self._claim(near)
        for run, version in self.book.to_launch(self.clock.now()):
            self.logger.info("Deploying flow run %s", run.id)
            self._start_run(run, version)

    def _may_load(self, run: FlowRun) -> bool:
        """False for a run this agent cannot start: it is left unclaimed, for an agent that can
        (logged once per run; looked at again every REFUSED_RECHECK_SECONDS)."""
        settings = self.settings
        reason = _why_not_here(run, settings.trusted_flow_dirs, self._python_has, settings.trusted_script_dirs)
        if not reason:
            return True
        if run.id not in self._refusals_logged:
            self._refusals_logged.add(run.id)
            self.logger.warning("Leaving flow run %s to another agent: %s", run.id, reason)
        self.book.refuse(run.id, self.clock.monotonic())
        return False

    def _room_to_run(self) -> bool:
        """Whether the agent's disk has room for a run's output, result and ledger (logged once per change)."""
        try:
            stats = os.statvfs(self.directory)
        except (OSError, AttributeError):  # no statvfs here: the ledger's own write is the check
            return True
        free = stats.f_bavail * stats.f_frsize
        if free < MIN_FREE_DISK_BYTES and not self._disk_full:
            self.logger.error("Only %d bytes are free under %s: no new runs are claimed until %d are; free some "
                              "disk space", free, self.directory, MIN_FREE_DISK_BYTES)
        elif free >= MIN_FREE_DISK_BYTES and self._disk_full:
            self.logger.info("There is room on the disk again under %s; claiming runs again", self.directory)
        self._disk_full = free < MIN_FREE_DISK_BYTES
        return not self._disk_full

    def _claim(self, runs: Sequence[FlowRun]) -> None:
        """Write Submitted, naming this agent; a run another agent won leaves the book."""
        who = f"agent {self.settings.name} ({self.agent_id or 'unregistered'}) on {_hostname()}"
        tokens = self.book.claiming(runs)  # in the ledger before the claim is written
        if tokens is None:
            return  # the ledger cannot be written: these runs stay Scheduled for another agent
        claims = []
        for run, token in zip(runs, tokens):
            self.logger.debug("Updating flow run %s state from %s -> Submitted...", run.id, run.state)
            context = {"agent_id": self.agent_id, "agent_name": self.settings.name, "claim": token}
            claims.append((run, make_state("Submitted", f"Submitted for execution by {who}",
                                           previous=run.serialized_state, context=context)))
        try:
            with self.metrics.timed("claim_flow_runs"):
                versions = self._backend().claim_flow_runs(claims)
        except APIError as exc:
            self.logger.error("Could not claim flow run(s) %s: %s", [run.id for run in runs], exc)
            # A claim that did land without our hearing is handed back once the API answers
            # (_settle_inherited_claims), not left to the next start.
            for run, token in zip(runs, tokens):
                self.book.inherit(run.id, token)
            self.book.save()
            return
        for run, version in zip(runs, versions):
            if version is None:
                self.logger.debug("Flow run %s was taken by another agent", run.id)
                self.metrics.count("claims_lost_total")
                self.book.settled(run.id)
            else:
                self.metrics.count("runs_claimed_total")
                self.book.claimed(run.id, version)
                self._run_log(run.id, f"Claimed by {who}")

    def _start_run(self, run: FlowRun, version: int) -> None:
        """Check a claimed run's flow file and start its process; fail it if that cannot be done."""
        try:
            if run.problem:
                raise FlowStorageError(f"the API's record of this run is unusable: {run.problem}")
            job = _Job(run.id, flow_name=run.flow_name, version=version, pid=0, runs_dir=self.book.runs_dir,
                       started_at=time.time())
            job.run_name = run.name
            if run.launch is not None:
                launch = run.launch
                job.show_output = launch.show_output
                if launch.cwd is None:
                    job.work_dir.mkdir(mode=0o700, exist_ok=True)
                    launch = launch._replace(cwd=str(job.work_dir))
                environment = {**os.environ, **self.settings.env, **launch.env}
                if launch.intent_variables:
                    channel = self._stop_channel = self._stop_channel or _StopChannel()
                    port_variable, token_variable = launch.intent_variables
                    environment.update({port_variable: str(channel.port), token_variable: channel.register(run.id)})
                # Its own command runs afresh; the default, `python -m MODULE`, forks from a warm
                # template when there is one (`--preload prefect.engine`).
                if launch.command or not self._fork_from_template(job, environment, launch.cwd, launch.module):
                    job.start(list(launch.command) or [self._python, "-m", launch.module], environment, launch.cwd)
            else:
                _locate_flow_file(run.flow_name, run.storage, self.settings.trusted_flow_dirs,
                                  self.settings.trusted_script_dirs)
                environment = _flow_run_environment(self.settings, self.labels, run, job.result_path)
                _, working_dir = _local_run(run)
                if not self._fork_from_template(job, environment, working_dir):
                    job.start([self._python, self._program, "execute", "flow-run"], environment, working_dir)
        except (FlowStorageError, OSError) as exc:
            message = str(exc) if isinstance(exc, FlowStorageError) else f"cannot start the flow-run process: {exc}"
            self.logger.error("Deployment of flow run %s aborted: %s", run.id, message)
            self._run_log(run.id, message, level="ERROR")
            self._set_final(run.id, make_state("Failed", message), version)
            self.book.settled(run.id)
            return
        if job.process is not None:  # (a template says when what it forked ends)
            # A thread waits on the process, so the loop hears of its end at once, not on its next round.
            threading.Thread(target=_wait_then_wake, args=(job.process, self._wake), name=f"wait-{job.pid}",
                             daemon=True).start()
        if self.settings.timeout:
            job.deadline = self.clock.monotonic() + self.settings.timeout
        self.book.launched(job)
        self.metrics.count("runs_launched_total")
        self.logger.debug("Submitted flow run %s to process PID %d", run.id, job.pid)
        self._run_log(run.id, f"Submitted for execution: PID: {job.pid}")
        try:
            self._backend().record_process(run.id, job.pid)
        except APIError as exc:  # only for people looking at the run: it runs as well without
            self.logger.debug("Could not record the process of flow run %s: %s", run.id, exc)

    # Watching processes.

    def _tend_jobs(self) -> None:
        """Ship new output, settle processes that ended, enforce deadlines, save the ledger."""
        read_any = False
        for job in self.book.jobs:
            exited = job.has_exited()
            offset = job.offset
            for line, shipped in job.read_output(self._redact, to_the_end=exited):
                self._collect(job, line, shipped)
            read_any = read_any or job.offset != offset
            if exited:
                # The order makes every crash point safe: the outcome is in the spool before
                # the ledger forgets the run, and the ledger forgets it before its result file
                # goes, so a restart either settles it again from that file or knows it is done.
                self._finish(job)
                if self._stop_channel is not None:
                    self._stop_channel.forget(job.run_id)
                self.book.settled(job.run_id)
                self.book.save()
                job.remove_files()
                if self.settings.limit is not None:
                    self._poll_now = True  # a slot is free
        self._enforce_deadlines()
        self._tend_templates()
        if self.subreaper:
            templates = [*self._retired_templates, *filter(None, [self._template])]
            _reap_orphans({job.pid for job in self.book.jobs if job.process is not None} |
                          {template.pid for template in templates})
        if read_any:
            self.book.save()
            self._api_writes().release()  # see _Outbox.release: after the ledger, never before

    def _collect(self, job: _Job, line: LogLine, shipped: bool = False) -> None:
        """Keep a line for the failure message, echo it with ``-f``, ship it to the run log
        (unless the process shipped it itself: Prefect's engine ships its own records)."""
        line = line._replace(message=line.message.rstrip("\r"))  # redacted by _Job.read_output
        shown = line.message if line.name == "output" else _format_log_line(line)
        job.tail.append(shown)
        if self.settings.show_flow_logs and job.show_output:  # whose line it is: several runs may be writing
            if self.settings.log_format == "json":
                entry = {"time": line.timestamp, "level": line.level, "logger": line.name, "message": line.message,
                         "flow_run_id": job.run_id, "flow_name": job.flow_name, "flow_run_name": job.run_name}
                sys.stdout.write(json.dumps(entry, ensure_ascii=False) + "\n")
            else:
                sys.stdout.write(f"{job.run_name or job.run_id[:8]} | {shown}\n")
            sys.stdout.flush()
        if shipped or not self.settings.cloud_logs:
            return
        job.logged_bytes += len(line.message)
        if job.logged_bytes > MAX_RUN_LOG_BYTES:
            job.dropped_lines += 1
            return
        level = line.level if line.level in _LOG_LEVELS else "INFO"
        self._api_writes().log(job.run_id, line.message, level=level, name=line.name,
                               timestamp=_parse_time_or_now(line.timestamp), offset=job.line_offset)

    def _finish(self, job: _Job) -> None:
        """Report how a run ended, as _decide_outcome settles it (its files go afterwards)."""
        how = job.how_it_ended
        if job.returncode:
            self.logger.info("Process PID %d returned non-zero exit code %s (%s)", job.pid, job.returncode, how)
        if job.dropped_lines:
            self._run_log(job.run_id, f"{job.dropped_lines} line(s) of output were not logged: a run's log "
                          f"keeps at most {MAX_RUN_LOG_BYTES // 1_000_000} MB", level="WARNING")
        self._run_log(job.run_id, f"Flow-run process PID {job.pid} {how}")
        if job.started_at:
            self.metrics.observe("run_duration_seconds", max(0.0, time.time() - job.started_at))
        reported = _read_result(job.result_path)
        final = "" if reported is not None else self._final_state_of(job.run_id)
        # Crashed is what Prefect 2/3's engine writes as a signal ends it: when the signal was the
        # agent's, the agent knows better why the run ended (timed out, cancelled, handed back).
        if final and not (final == "Crashed" and job.stopping):
            self._record_result(job.run_id, final)  # the process reported it: nothing to guess
            return
        outcome = _decide_outcome(
            reported, how, stopping=job.stopping, timeout=self.settings.timeout,
            lost=job.adopted and job.process is None and job.returncode is None,
            last_output=" | ".join(line for line in job.tail if line.strip())[-1500:],
            pid=job.pid, host=_hostname(), now=self.clock.now(),
        )
        if outcome.note:
            self._run_log(job.run_id, outcome.note, level=outcome.level)
        if outcome.state is not None:  # never over a final state the run has by then (see _Outbox.state)
            self._api_writes().state(job.run_id, outcome.state, None, unless_final=True,
                                     over_crashed=bool(job.stopping))
        self._record_result(job.run_id, outcome.result)

    def _final_state_of(self, run_id: str) -> str:
        """The run's final state in the API, or "" (not final, or the API cannot say now)."""
        try:
            run = self._backend().get_flow_run(run_id)
        except APIError as exc:
            self.logger.debug("Could not read flow run %s: %s", run_id, exc)
            return ""
        return run.state if run is not None and is_final(run.state) else ""

    def _record_result(self, run_id: str, state_type: str) -> None:
        self.results[run_id] = state_type
        if is_final(state_type):
            self.metrics.count("runs_finished_total", state=state_type)
        elif state_type in SCHEDULED_STATES:
            self.metrics.count("runs_handed_back_total")
        self.logger.info("Flow run %s finished: %s", run_id, state_type)

    def _set_final(self, run_id: str, state: dict[str, Any], version: int | None) -> None:
        self._record_result(run_id, state["type"])
        self._api_writes().state(run_id, state, version)

    def _run_log(self, run_id: str, message: str, *, level: str = "INFO") -> None:
        self._api_writes().log(run_id, message, level=level, name=self.settings.name)

    # Limits, cancellation and shutdown.

    def _enforce_deadlines(self) -> None:
        now = self.clock.monotonic()
        for job in self.book.jobs:
            if job.deadline is not None and now >= job.deadline and not job.stopping:
                self.logger.warning("Flow run %s timed out after %g s; stopping PID %d",
                                    job.run_id, self.settings.timeout, job.pid)
                self._run_log(job.run_id,
                              f"Timed out after {self.settings.timeout:g} s: stopping process PID {job.pid}",
                              level="ERROR")
                self.metrics.count("runs_timed_out_total")
                self._terminate(job, "timeout")
            job.kill_if_due(now)

    def _watch_owned_runs(self) -> None:
        """Stop the processes of runs that were cancelled in the API."""
        jobs = {job.run_id: job for job in self.book.jobs}
        if not jobs:
            return
        try:
            current = self._backend().list_flow_runs(run_ids=list(jobs), limit=len(jobs))
        except APIError as exc:
            self.logger.debug("Could not check owned runs: %s", exc)
            return
        for run in current:
            job = jobs.get(run.id)
            if job is not None and run.state in ("Cancelling", "Cancelled") and not job.stopping:
                self.logger.info("Flow run %s was cancelled; stopping PID %d", run.id, job.pid)
                self.metrics.count("runs_cancelled_total")
                self._run_log(run.id, f"Cancellation requested: stopping process PID {job.pid}")
                self._terminate(job, "cancel")

    def _keep_alive(self) -> None:
        """The agent's own heartbeat, where the API has one (a Prefect 2/3 worker's): a full agent
        does not poll, and must not look dead for that."""
        try:
            self._backend().keep_alive()
        except APIError as exc:  # the poll says when the API is down; this would only repeat it
            self.logger.debug("Could not send the agent's heartbeat: %s", exc)

    def _terminate(self, job: _Job, why: str) -> None:
        if self._stop_channel is not None and self._stop_channel.tell(job.run_id, why):
            self.logger.debug("Flow run %s's process knows why it is being stopped (%s)", job.run_id, why)
        job.stop(why, self.clock.monotonic() + KILL_GRACE_SECONDS)
        self.book.save()

    def _begin_drain(self, now: float) -> None:
        """Take no new runs; finish the ones taken (launching fetched ones when due)."""
        self.phase = DRAINING
        self._next_watch = now + WATCH_SECONDS
        if self.book.busy:
            self.logger.info("Waiting for %d flow run(s) to finish", self.book.busy)

    def _drain(self, now: float) -> bool:
        """A round of draining: after a signal, hand back and mind the grace. False once all is done."""
        if not self.book.busy:
            self.phase = DONE
            return False
        if self._stop_signal and self.phase == DRAINING:
            self._hand_back_unstarted(now)
        if self.phase == HURRYING and (self._hurry.is_set() or now >= (self._grace_end or now)):
            self._stop_all_jobs(now)
        return True

    def _hand_back_unstarted(self, now: float) -> None:
        """After a signal: runs not started go back to the queue; running flows get ``--grace`` s."""
        for run, version in self.book.release_unstarted():
            message = f"The agent on host {_hostname()} shut down before starting this run; rescheduled."
            self._set_final(run.id, make_state("Scheduled", message, start_time=self.clock.now()), version)
        self.book.save()
        self.phase, self._grace_end = HURRYING, now + self.settings.grace
        if self.book.jobs:
            self.logger.info("Giving %d flow run(s) up to %g s to finish", len(self.book.jobs), self.settings.grace)

    def _stop_all_jobs(self, now: float) -> None:
        """The grace is over (or a second signal came): stop every flow, to be handed back."""
        for job in self.book.jobs:
            if not job.stopping:
                self._terminate(job, "shutdown")
            if self._hurry.is_set() and (job.kill_at or 0) > now + 1:
                job.kill_at = now + 1.0

    # API trouble.



#: A flow run's id in an agent log line ("Flow run 3f2a…-… finished"), for JSON logs.
_RUN_ID_IN_TEXT = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")


class _JSONLogFormatter(logging.Formatter):
    """``--log-format json``: one object a line, with the run a line is about, for log shippers."""

    def __init__(self, flow_name_of: Callable[[str], str]) -> None:
        super().__init__()
        self.flow_name_of = flow_name_of

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": message,
        }
        found = _RUN_ID_IN_TEXT.search(message)
        if found:
            entry["flow_run_id"] = found.group(0)
            flow_name = self.flow_name_of(found.group(0))
            if flow_name:
                entry["flow_name"] = flow_name
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _attach_agent_logging(logger: logging.Logger, level: str, redact: _Redactor,
                          formatter: logging.Formatter | None = None) -> None:
    """Redact the agent's log records; attach the seed's stderr handler unless the application configured logging."""
    for handler in logging.getLogger().handlers:
        if formatter is not None and handler.get_name() == _COMMAND_LINE_HANDLER:  # ours: it may change form
            handler.setFormatter(formatter)
    for each in (logger, logging.getLogger(__name__)):
        if not any(isinstance(existing, _RedactingFilter) for existing in each.filters):
            each.addFilter(_RedactingFilter(redact))
    if logger.hasHandlers():
        if logger.getEffectiveLevel() > logging.getLevelName(level):
            logger.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter or logging.Formatter(_AGENT_FORMAT))
    for each in (logger, logging.getLogger(__name__)):
        each.addHandler(handler)
        each.setLevel(level)


def _log_agent_settings(agent: LocalAgent) -> None:
    """What the agent runs with, at DEBUG level (never the token itself)."""
    settings, debug = agent.settings, agent.logger.debug
    debug("Backend: %s", settings.api)
    if settings.token:
        debug("Token: given by %s", settings.sources.get("token", "the caller"))
    else:
        debug("Token: none")
    debug("Environment variables: %s", sorted(settings.env))
    debug("Max polls: %s", settings.max_polls)
    debug("Agent address: %s", settings.agent_address)
    debug("Log to Cloud: %s", settings.cloud_logs)
    debug("Import paths: %s", settings.import_paths)
    debug("Show flow logs: %s", settings.show_flow_logs)
    debug("Limit: %s, timeout: %s, grace: %s s", settings.limit, settings.timeout, settings.grace)
    debug("Agent directory: %s%s", agent.directory, " (child subreaper)" if agent.subreaper else "")


def _stop_on_signals(agent: LocalAgent) -> Callable[[], None]:
    """Drain on SIGTERM and SIGINT, hurry on the second (main thread only); a function that undoes it."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(signum: int, frame: object) -> None:
        if agent.stopping:
            agent.logger.warning("Second signal received: stopping flow runs now.")
        else:
            agent.logger.info("%s received: the agent is shutting down.", signal.Signals(signum).name)
        agent.stop(signum)

    for sig in previous:
        signal.signal(sig, on_signal)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _lock_agent_directory(directory: Path, settings: Settings) -> IO[Any]:
    """Hold the agent directory's lock: one agent per name, API and home directory."""
    handle = _private_open(directory / "lock", "a+")  # held for the agent's life
    if fcntl is None:  # not POSIX: no lock, as with Prefect's agent
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(
            f"an agent named {settings.name!r} is already running for {settings.api} with home "
            f"directory {settings.home} (PID {holder}); stop it or give this one another --name"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


# --- 10. The HTTP endpoint ---------------------------------------------------------------
#
# ``--agent-address``: routes for health checks, Prometheus and operators, and the dashboard
# (also served alone by the ``ui`` command). Reads need no authentication: keep it on
# 127.0.0.1 or behind a proxy that has it. Writes (create, cancel) need ``--ui-token`` as a
# bearer token, or, with no token, an address on loopback; every request must name this
# server in its Host header, so another site's page cannot reach it through DNS rebinding.


def _time_json(moment: datetime | None) -> str | None:
    return _format_time(moment) if moment else None


def _run_json(run: FlowRun) -> dict[str, Any]:
    """A run as ``--output json`` shows it (keys documented in the README)."""
    return {"id": run.id, "name": run.name, "flow_name": run.flow_name, "flow_id": run.flow_id,
            "state": run.state, "state_message": run.state_message, "labels": list(run.labels),
            "parameters": run.parameters, "scheduled_start_time": _time_json(run.scheduled_start_time),
            "updated": _time_json(run.updated), "version": run.version}


def _history_json(history: Sequence[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """A run's states with how long each lasted (until the next; None for the last)."""
    moments = [_parse_time_or_now(stamp) for _, _, stamp in history]
    return [{"state": state, "message": message, "timestamp": stamp,
             "seconds": (moments[index + 1] - moments[index]).total_seconds() if index + 1 < len(history) else None}
            for index, (state, message, stamp) in enumerate(history)]


#: The dashboard: one page, its style and script inline (no CDN, no build step); it reads the
#: JSON routes below and polls them.
_DASHBOARD_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>local_agent</title>
<link rel="icon" href="data:,">
<style>
:root{--ln:#e2e5ea;--mu:#687084;--tx:#1d2330;--ac:#3b5bdb;--mono:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
*{box-sizing:border-box}
body{margin:0;background:#f5f6f8;color:var(--tx);
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif}
a{color:var(--ac);text-decoration:none}
.wrap{max-width:1200px;margin:0 auto;padding-left:20px;padding-right:20px}
header{background:#fff;border-bottom:1px solid var(--ln)}
.top{display:flex;align-items:stretch;gap:24px;min-height:54px}
.brand{font-weight:650;font-size:16px;display:flex;align-items:center;gap:8px}
.logo{width:18px;height:18px;border-radius:5px;background:var(--ac)}
nav{display:flex}
.tab{background:none;border:0;border-bottom:2px solid transparent;padding:0 12px;font:inherit;font-weight:500;
  color:var(--mu);cursor:pointer}
.tab[aria-current=page]{color:var(--tx);border-bottom-color:var(--ac)}
.meta{flex:1;display:flex;align-items:center;justify-content:flex-end;gap:10px;min-width:0;font-size:12.5px;
  color:var(--mu)}
#location,#error-text{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.pill{font-size:11px;font-weight:600;text-transform:uppercase;letter-spacing:.04em;padding:2px 8px;
  border-radius:99px;background:#eef1f6;white-space:nowrap}
main{padding-top:20px;padding-bottom:40px}
.bar{display:flex;align-items:center;gap:10px;padding:8px 14px;border-radius:8px;margin-top:14px;font-size:13px}
#error-banner{background:#fdecec;color:#8a1c13;border:1px solid #f5c2bd}
#error-text{flex:1}
#token-box{background:#fff8e6;border:1px solid #f1dca4;color:#6b4e00;flex-wrap:wrap}
.card{background:#fff;border:1px solid var(--ln);border-radius:10px;margin-bottom:16px;min-width:0;overflow:auto}
h2{margin:0;padding:12px 16px;border-bottom:1px solid var(--ln);font-size:13px;font-weight:600;display:flex;
  gap:10px;align-items:center}
.tools{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:14px}
label{font-size:12px;font-weight:500;color:var(--mu)}
.tools label{display:flex;flex-direction:column;gap:4px}
.grow{flex:1;min-width:0}
select,input[type=text],input[type=search],input[type=password]{font:inherit;color:var(--tx);background:#fff;
  border:1px solid #cfd4dc;border-radius:7px;padding:0 10px;height:36px;min-width:150px}
input:focus,select:focus{outline:2px solid #b8c6f5;border-color:var(--ac)}
.btn{font:inherit;font-size:13px;font-weight:500;border:1px solid #cfd4dc;background:#fff;color:var(--tx);
  border-radius:7px;padding:6px 12px;cursor:pointer}
.btn:hover{background:#f1f3f6}
.btn:disabled{opacity:.45;cursor:default}
.pri{background:var(--ac);border-color:var(--ac);color:#fff}
.dng{color:#b42318;border-color:#f0b8b2}
.tbl{width:100%;border-collapse:collapse}
th{text-align:left;font-size:11px;font-weight:600;text-transform:uppercase;letter-spacing:.05em;
  color:var(--mu);background:#fafbfc}
.tbl th,.tbl td{padding:10px 16px;border-bottom:1px solid #eef0f3}
.tbl tr:last-child>*{border-bottom:0}
#runs-table tbody tr:hover{background:#f8f9fb;cursor:pointer}
.c-name a{color:var(--tx);font-weight:500}
.num{font-variant-numeric:tabular-nums;white-space:nowrap}
.mu{color:var(--mu)}
.sm{font-size:12px}
.mono{font-family:var(--mono);font-size:12.5px}
.empty{padding:28px;text-align:center;color:var(--mu)}
.pager{display:flex;align-items:center;justify-content:flex-end;gap:10px;padding:10px 16px;
  border-top:1px solid var(--ln)}
.badge{display:inline-flex;align-items:center;gap:6px;font-size:12px;font-weight:500;padding:2px 9px 2px 8px;
  border-radius:99px;white-space:nowrap;background:var(--b);color:var(--f)}
.dot{width:7px;height:7px;border-radius:50%;background:var(--d);display:inline-block;flex:none}
.st-sched{--b:#edf1f7;--f:#475a7a;--d:#7286a8}
.st-run{--b:#e7efff;--f:#1f4fc7;--d:#2f6bed}
.st-ok{--b:#e6f5ec;--f:#17693a;--d:#23a35a}
.st-fail{--b:#fdebea;--f:#b0261b;--d:#dc3b2e}
.st-cancel{--b:#fff1e3;--f:#a84f0c;--d:#f08a24}
.st-skip{--b:#f0f1f3;--f:#5b6170;--d:#9aa0ab}
.badge.st-run .dot{animation:pulse 1.6s infinite}
@keyframes pulse{50%{opacity:.3}}
@media (prefers-reduced-motion:reduce){.dot{animation:none!important}}
.chip{display:inline-block;font:11.5px var(--mono);padding:1px 7px;border-radius:5px;background:#eef1f6;
  color:#46506a;margin:1px 4px 1px 0}
.head{display:flex;align-items:flex-start;gap:14px;flex-wrap:wrap;margin:10px 0 16px}
h1{font-size:22px;margin:0;font-weight:650;word-break:break-word;display:flex;align-items:center;gap:12px;
  flex-wrap:wrap}
.acts{display:flex;gap:8px;align-items:center;flex-wrap:wrap}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:0 16px}
dl{display:grid;grid-template-columns:auto 1fr;gap:8px 16px;margin:0;padding:12px 16px}
dt{color:var(--mu);font-size:12.5px}
dd{margin:0;min-width:0;word-break:break-word}
#detail-params th{text-transform:none;letter-spacing:0;font:500 12.5px var(--mono);color:var(--tx);
  background:none;width:1%}
#detail-params td{font:12.5px var(--mono);word-break:break-word;white-space:pre-wrap}
ol{list-style:none;margin:0;padding:14px 16px}
.tl{display:grid;grid-template-columns:16px 1fr auto;gap:2px 10px;position:relative;padding-bottom:14px}
.tl:last-child{padding-bottom:0}
.tl>.dot{margin-top:6px;width:10px;height:10px}
.tl:not(:last-child):before{content:"";position:absolute;left:4px;top:18px;bottom:0;border-left:2px solid #e5e8ee}
.when{text-align:right;font-size:12px;color:var(--mu);white-space:nowrap}
#log-lines{font:12px/1.55 var(--mono);max-height:460px;overflow:auto;background:#101419;color:#d4d8df;
  border-radius:0 0 10px 10px;padding:8px 0}
.log-line{display:grid;grid-template-columns:96px 64px minmax(0,190px) 1fr;gap:10px;padding:1px 14px}
.log-time,.log-name,.log-empty{color:#7d8694}
.log-level{font-weight:600}
.log-name{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.log-msg{white-space:pre-wrap;word-break:break-word}
.lvl-INFO .log-level{color:#6ea8fe}
.lvl-WARNING .log-level{color:#f2b84b}
.lvl-ERROR .log-level,.lvl-CRITICAL .log-level{color:#ff7b72}
.lvl-ERROR .log-msg,.lvl-CRITICAL .log-msg{color:#ffb3ad}
.log-empty{padding:6px 14px}
.follow{font-weight:400;display:flex;align-items:center;gap:6px;margin-left:auto}
.modal{position:fixed;inset:0;background:rgba(20,25,35,.45);display:flex;justify-content:center;
  align-items:flex-start;padding:60px 16px;z-index:20;overflow:auto}
.dialog{background:#fff;border-radius:12px;width:100%;max-width:520px;box-shadow:0 12px 40px rgba(0,0,0,.25)}
.dialog h2{padding:16px 20px;font-size:16px}
form.pad{padding:16px 20px}
.field{margin-bottom:14px}
.field input{width:100%}
.field label{display:flex;gap:8px;align-items:baseline;margin-bottom:4px}
.field .mono{color:var(--tx);font-size:13px}
.req{font-size:11px;color:#b0261b;font-weight:600}
.hint{font-size:12px;color:var(--mu);margin-top:3px}
.form-error{color:#b0261b;font-size:13px;min-height:18px;margin:4px 0 10px}
.right{display:flex;justify-content:flex-end;gap:8px}
.ro .write,[hidden]{display:none!important}
@media (max-width:720px){
.wrap{padding-left:12px;padding-right:12px}
.top{flex-wrap:wrap;gap:0 12px;padding-top:8px}
#location{display:none}
nav{flex-basis:100%;height:40px;order:3}
.tab:first-child{padding-left:0}
main{padding-top:14px}
.tools label{flex:1 1 140px}
select{min-width:0;width:100%}
.grid2{grid-template-columns:1fr}
thead{display:none}
#runs-table tr{display:grid;grid-template-columns:minmax(0,1fr) auto;gap:3px 10px;padding:10px 14px;
  border-bottom:1px solid #eef0f3}
#runs-table td{padding:0;border:0;min-width:0;font-size:12.5px;color:var(--mu)}
#runs-table .c-name{grid-area:1/1;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;font-size:14px}
#runs-table .c-state{grid-area:1/2}
#runs-table td:nth-child(5){grid-area:2/2;text-align:right}
#runs-table td:nth-child(4){grid-area:3/1}
#runs-table td:nth-child(6){grid-area:3/2;text-align:right}
#runs-table td:nth-child(4):before{content:"Scheduled "}
.stack tr{display:block;padding:10px 14px;border-bottom:1px solid #eef0f3}
.stack td{display:flex;gap:10px;padding:2px 0;border:0}
.stack td[data-label]:before{content:attr(data-label);color:var(--mu);font-size:12px;min-width:84px}
.log-line{display:block;padding:2px 10px}
.log-line>*{margin-right:8px}
.log-name{display:none}
h1{font-size:19px}
.when{grid-column:2;text-align:left}
.modal{padding:0}
.dialog{border-radius:0;min-height:100%}
}
</style>
</head>
<body>
<header><div class="wrap top">
<div class="brand"><span class="logo"></span>local_agent</div>
<nav aria-label="Sections"><button type="button" class="tab" id="tab-runs" data-tab="runs">Runs</button><button
type="button" class="tab" id="tab-flows" data-tab="flows">Flows</button><button type="button" class="tab"
id="tab-agents" data-tab="agents">Agents</button></nav>
<div class="meta"><span id="location"></span><span id="mode" class="pill"></span><span id="version" class="mono">
</span></div>
</div></header>
<div class="wrap">
<div id="error-banner" class="bar" role="alert" hidden><b>Error</b><span id="error-text"></span></div>
<form id="token-box" class="bar" hidden><span id="token-msg"></span><label for="token-input">API token</label><input
id="token-input" type="password" autocomplete="off"><button class="btn pri" id="token-save">Save</button></form>
</div>
<main class="wrap">
<section id="runs-view" hidden>
<div class="tools">
<label>Flow<select id="flow-filter"></select></label>
<label>State<select id="state-filter"><option value="">All states</option></select></label>
<label class="grow">Search<input id="search" type="search" placeholder="Run name, id prefix or flow"
autocomplete="off"></label>
</div>
<div class="card">
<table id="runs-table" class="tbl"><thead><tr><th>Name</th><th>Flow</th><th>State</th><th>Scheduled</th><th>
Duration</th><th>Updated</th></tr></thead><tbody></tbody></table>
<div id="runs-empty" class="empty" hidden></div>
<div class="pager"><span id="page-info" class="mu sm"></span><button type="button" class="btn" id="prev-page">
&#8592; Previous</button><button type="button" class="btn" id="next-page">Next &#8594;</button></div>
</div>
</section>
<section id="run-detail" hidden>
<a href="#/runs" id="back-to-runs" class="sm">&#8592; All runs</a>
<div class="head">
<div class="grow"><h1><span id="detail-name"></span><span id="detail-state"></span></h1><div id="detail-sub"
class="mu sm"></div></div>
<div class="acts write"><button type="button" class="btn dng" id="cancel-run" hidden>Cancel run</button>
<span id="cancel-confirm" class="acts" hidden><span class="sm">Cancel this run?</span><button type="button"
class="btn dng" id="cancel-confirm-yes">Yes, cancel</button><button type="button" class="btn"
id="cancel-confirm-no">Keep running</button></span></div>
</div>
<div class="grid2">
<div class="card"><h2>Details</h2><dl id="detail-meta"></dl></div>
<div class="card"><h2>Parameters</h2><table id="detail-params" class="tbl"><tbody></tbody></table></div>
</div>
<div class="card"><h2>State timeline</h2><ol id="state-timeline"></ol></div>
<div class="card"><h2>Logs <span id="log-status" class="mu sm"></span><label class="follow"><input type="checkbox"
id="log-follow" checked>Follow</label></h2>
<div id="log-lines" role="log" tabindex="0" aria-label="Log lines"></div></div>
</section>
<section id="flows-view" hidden><div class="card">
<table id="flows-table" class="tbl stack"><thead><tr><th>Flow</th><th>Version</th><th>Labels</th><th>Schedule</th>
<th>Next run</th><th></th></tr></thead><tbody></tbody></table>
<div id="flows-empty" class="empty" hidden>No flows registered.</div></div></section>
<section id="agents-view" hidden><div class="card">
<table id="agents-table" class="tbl stack"><thead><tr><th>Agent</th><th>Labels</th><th>Last contact</th></tr>
</thead><tbody></tbody></table>
<div id="agents-empty" class="empty" hidden>No agents have registered.</div></div></section>
</main>
<div id="create-run-panel" class="modal" hidden><div class="dialog" role="dialog" aria-modal="true"
aria-labelledby="create-run-title">
<h2 id="create-run-title">Run flow</h2>
<form id="create-run-form" class="pad" novalidate><p class="hint">
Values are JSON; other text is sent as a string.</p><div id="param-fields"></div>
<div class="field"><label for="run-name"><span class="mono">Run name</span><span class="hint">optional</span>
</label><input id="run-name" type="text" autocomplete="off"></div>
<div id="create-run-error" class="form-error" role="alert"></div>
<div class="right"><button type="button" class="btn" id="create-run-close">Close</button><button class="btn pri"
id="create-run-submit">Create run</button></div>
</form></div></div>
<script>
'use strict';
const sp=(s)=>s.split(' ');
const FINAL=sp('Success Cached Mapped Skipped Failed TimedOut TriggerFailed'+
 ' ValidationFailed Cancelled Looped Finished');
const STATES=sp('Scheduled Retrying Paused Queued Pending Submitted Running Cancelling'+
 ' Success Failed Cancelled TimedOut Skipped');
const FAMS={run:'Submitted Running',ok:'Success Cached Mapped Finished Looped',cancel:'Cancelling Cancelled',
 fail:'Failed TimedOut TriggerFailed ValidationFailed ClientFailed Crashed',skip:'Skipped'};
const fam=(s)=>'st-'+(Object.keys(FAMS).find((k)=>sp(FAMS[k]).includes(s))||'sched');
const C=String.fromCharCode, DASH=C(8212), DOT=' '+C(183)+' ',
  MON=sp('Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec'), TK='local_agent_token';
const S={status:{},token:sessionStorage.getItem(TK)||'',page:1,flows:[],gen:0,timer:0,errors:{},runId:null,run:null,
  runKey:'',logNext:0,logDone:false,form:null};
const $=(s)=>document.querySelector(s), $$=(s)=>Array.from(document.querySelectorAll(s));
const put=(s,kids)=>$(s).replaceChildren(...kids);
const val=(s)=>$(s).value.trim();
const txt=(s,t)=>{$(s).textContent=t;};
// el('td.cls', {attr: value} or 'text', [children]); null/false attributes are left out
function el(tag,props,kids){
 const [t,...cls]=tag.split('.'), e=document.createElement(t);
 if(cls.length)e.className=cls.join(' ');
 if(typeof props!=='object')props={text:props};
 for(const [k,v] of Object.entries(props||{})){
  if(v===null||v===undefined||v===false)continue;
  if(k==='text')e.textContent=v;else e.setAttribute(k,v);
 }
 e.append(...[].concat(kids===undefined?[]:kids).filter((c)=>c!==null&&c!==undefined));
 return e;
}
const oneLine=(s)=>String(s).split(C(10)).join(' ');
const pad=(n,w)=>String(n).padStart(w||2,'0');
const enc=encodeURIComponent;
const hm=(d)=>pad(d.getHours())+':'+pad(d.getMinutes());
function fmtDate(iso){
 if(!iso)return DASH;
 const d=new Date(iso), y=d.getFullYear()===new Date().getFullYear()?'':' '+d.getFullYear();
 return MON[d.getMonth()]+' '+d.getDate()+y+', '+hm(d);
}
function fmtFull(iso){
 if(!iso)return DASH;
 const d=new Date(iso);
 return d.getFullYear()+'-'+pad(d.getMonth()+1)+'-'+pad(d.getDate())+' '+hm(d)+':'+pad(d.getSeconds());
}
const fmtClock=(iso)=>{const d=new Date(iso);return hm(d)+':'+pad(d.getSeconds())+'.'+pad(d.getMilliseconds(),3);};
function rel(iso){
 if(!iso)return DASH;
 const s=(Date.now()-Date.parse(iso))/1000, a=Math.abs(s);
 const t=a<60?Math.round(a)+' s':a<3600?Math.round(a/60)+' min':
  a<86400?Math.round(a/3600)+' h':Math.round(a/86400)+' d';
 return s<0?'in '+t:t+' ago';
}
function dur(sec){
 if(typeof sec!=='number'||isNaN(sec))return DASH;
 if(sec<1)return Math.round(sec*1000)+' ms';
 if(sec<60)return(sec<10?sec.toFixed(1):Math.floor(sec))+' s';
 const m=Math.floor(sec/60), h=Math.floor(m/60);
 if(m<60)return m+'m '+Math.floor(sec%60)+'s';
 return h<48?h+'h '+(m%60)+'m':Math.floor(h/24)+'d '+(h%24)+'h';
}
const runDur=(r)=>r.start_time?((r.end_time?Date.parse(r.end_time):Date.now())-Date.parse(r.start_time))/1000:null;
const isFinal=(s)=>FINAL.includes(s);
const badge=(s,msg)=>el('span',{class:'badge state-'+s+' '+fam(s),title:msg},[el('span.dot'),s]);
const chips=(ls)=>el('span',{},ls&&ls.length?ls.map((l)=>el('span.chip',l)):el('span.mu',DASH));

async function api(method,path,body){
 const headers={}, where=method+' '+path.split('?')[0];
 if(method!=='GET'){
  headers['Content-Type']='application/json';
  if(S.status.needs_token&&S.token)headers.Authorization='Bearer '+S.token;
 }
 let r, data=null;
 try{r=await fetch(path,{method,headers,cache:'no-store',body:body===undefined?undefined:JSON.stringify(body)});}
 catch(e){throw new Error('cannot reach the agent ('+where+')');}
 const text=await r.text();
 try{data=text?JSON.parse(text):null;}catch(e){data=null;}
 if(!r.ok)throw Object.assign(new Error(oneLine((data&&data.error)||r.status+' '+r.statusText+' ('+where+')')),
   {status:r.status});
 return data;
}
function setError(key,msg){
 if(msg)S.errors[key]=oneLine(msg);else delete S.errors[key];
 const m=Object.values(S.errors).pop();
 $('#error-banner').hidden=!m;
 txt('#error-text',$('#error-text').title=m||'');
}
const needToken=()=>S.status.needs_token&&S.status.can_write&&!S.token;
function askToken(msg){
 txt('#token-msg',msg||'This agent needs an API token to create or cancel runs.');
 $('#token-box').hidden=false;
 $('#token-input').focus();
}
function writeFailed(e){
 if((e.status===401||e.status===403)&&S.status.needs_token){
  S.token='';
  sessionStorage.removeItem(TK);
  askToken('The token was refused ('+e.message+'). Enter it again.');
 }
 return e.message;
}

// Routing: #/runs, #/runs/ID, #/flows, #/agents. One poll timer at a time; S.gen drops stale answers.
function restart(){clearTimeout(S.timer);return ++S.gen;}
function later(gen,fn,ms){if(gen===S.gen){clearTimeout(S.timer);S.timer=setTimeout(()=>gen===S.gen&&fn(gen),ms);}}
function route(){
 const gen=restart(), p=(location.hash.slice(1)||'/runs').split('/');
 const view=p[1]==='runs'&&p[2]?'run-detail':p[1]==='flows'?'flows-view':p[1]==='agents'?'agents-view':'runs-view';
 for(const k of ['runs','detail','cancel','agents'])delete S.errors[k];
 setError('');
 for(const v of ['runs-view','run-detail','flows-view','agents-view'])$('#'+v).hidden=v!==view;
 const tab=view==='run-detail'?'runs':view.split('-')[0];
 for(const t of $$('.tab'))t.setAttribute('aria-current',t.dataset.tab===tab?'page':'false');
 document.title=tab[0].toUpperCase()+tab.slice(1)+' - local_agent';
 if(view==='run-detail')openRun(decodeURIComponent(p[2]),gen);
 else if(view==='flows-view')loadFlowsView(gen);
 else if(view==='agents-view')loadAgents(gen);
 else loadRuns(gen);
}

// poll(gen, what, path or function, ms, render): GET, render, and again after ms while the view is current
async function poll(gen,what,path,ms,render){
 try{
  const d=await api('GET',path.call?path():path);
  if(gen!==S.gen)return;
  setError(what);
  render(d);
 }catch(e){
  if(gen!==S.gen)return;
  setError(what,'Loading '+what+' failed: '+e.message);
 }
 later(gen,(g)=>poll(g,what,path,ms,render),ms);
}
// Runs list, polled every 5 s
function runsPath(){
 const q=new URLSearchParams({page:S.page,per_page:50}), f={flow:'#flow-filter',state:'#state-filter',q:'#search'};
 for(const k in f)if(val(f[k]))q.set(k,val(f[k]));
 return 'api/runs?'+q;
}
const loadRuns=(gen)=>poll(gen,'runs',runsPath,5000,renderRuns);
function renderRuns(d){
 const first=(d.page-1)*d.per_page, n=d.runs.length;
 if(!n&&S.page>1){S.page--;return loadRuns(restart());}
 put('#runs-table tbody',d.runs.map((r)=>el('tr',{'data-run-id':r.id,'data-state':r.state},[
  el('td.c-name',{},el('a',{href:'#/runs/'+enc(r.id),text:r.name,title:r.id})),
  el('td.c-flow',r.flow_name),
  el('td.c-state',{},badge(r.state,r.state_message)),
  el('td.num',{title:fmtFull(r.scheduled_start_time),text:fmtDate(r.scheduled_start_time)}),
  el('td.num',{text:dur(runDur(r))}),
  el('td.num.mu',{title:fmtFull(r.updated),text:rel(r.updated)})])));
 $('#runs-empty').hidden=n>0;
 txt('#runs-empty',runsPath().split('&').length>2?'No runs match these filters.':'No flow runs yet.');
 txt('#page-info','Page '+d.page+(n?DOT+(first+1)+C(8211)+(first+n):''));
 $('#prev-page').disabled=d.page<=1;
 $('#next-page').disabled=!d.has_more;
}
function refreshRuns(resetPage){
 if(resetPage)S.page=1;
 if(location.hash&&location.hash!=='#/runs')location.hash='#/runs';else loadRuns(restart());
}

// Run detail: the run every 2 s and its log every 1 s, until both are final
function openRun(id,gen){
 Object.assign(S,{runId:id,run:null,runKey:'',logNext:0,logDone:false});
 txt('#detail-name','Loading'+C(8230));
 for(const s of ['#detail-state','#detail-sub','#detail-meta','#detail-params tbody','#state-timeline',
   '#log-status'])put(s,[]);
 put('#log-lines',[el('div.log-empty',{id:'log-empty',text:'No log lines yet.'})]);
 $('#log-follow').checked=true;
 cancelConfirm(false);
 detailTick(gen,0);
}
async function detailTick(gen,n){
 try{
  if(!S.run||n%2===0){
   const r=await api('GET','api/runs/'+enc(S.runId));
   if(gen!==S.gen)return;
   renderRun(r);
  }
  if(!S.logDone)await pollLogs(gen);
  if(gen!==S.gen)return;
  setError('detail');
 }catch(e){
  if(gen!==S.gen)return;
  setError('detail',(e.status===404?'Run not found: ':'Loading the run failed: ')+e.message);
  if(e.status===404)return txt('#detail-name','Run not found');
 }
 if(!(S.run&&isFinal(S.run.state)&&S.logDone))later(gen,(g)=>detailTick(g,n+1),1000);
}
function renderRun(r){
 S.run=r;
 const key=[r.version,r.state,r.updated,r.states.length,S.status.can_write].join();
 if(key===S.runKey)return txt('#detail-duration',dur(runDur(r)));
 S.runKey=key;
 document.title=r.name+' - local_agent';
 txt('#detail-name',r.name);
 put('#detail-state',[badge(r.state,r.state_message)]);
 txt('#detail-sub',r.flow_name+DOT+r.id);
 cancelConfirm(!$('#cancel-confirm').hidden);
 const meta=[['Run ID',el('span.mono',r.id)],['Flow',r.flow_name+' (version '+r.flow_version+')'],
  ['Message',r.state_message||DASH],['Labels',chips(r.labels)],['Agent',r.claimed_by||DASH],
  ['Scheduled',fmtFull(r.scheduled_start_time)],['Started',fmtFull(r.start_time)],['Ended',fmtFull(r.end_time)],
  ['Duration',el('span',{id:'detail-duration',text:dur(runDur(r))})]];
 put('#detail-meta',meta.flatMap(([k,v])=>[el('dt',k),el('dd',{id:k==='Labels'?'detail-labels':null},v)]));
 const params=Object.entries(r.parameters||{}).map(([k,v])=>el('tr',{'data-param':k},
  [el('th',{scope:'row',text:k}),el('td',{text:typeof v==='string'?v:JSON.stringify(v,null,1)})]));
 put('#detail-params tbody',params.length?params:[el('tr',{},el('td.mu','No parameters.'))]);
 const last=r.states.length-1;
 put('#state-timeline',r.states.map((s,i)=>el('li',{class:'tl '+fam(s.state),'data-state':s.state},[
  el('span.dot'),
  el('div',{},[el('b',s.state),s.message?el('span.mu',DOT+s.message):null]),
  el('div.when',{},[el('span',{title:s.timestamp,text:fmtFull(s.timestamp)}),el('br'),el('span.tl-dur',{
   text:typeof s.seconds==='number'?'for '+dur(s.seconds):i<last?DASH:isFinal(s.state)?'final':'current'})])])));
}
async function pollLogs(gen){
 for(let i=0;i<20;i++){
  const d=await api('GET','api/runs/'+enc(S.runId)+'/logs?after='+S.logNext);
  if(gen!==S.gen)return;
  appendLogs(d.lines);
  S.logNext=d.next;
  S.logDone=!!d.final;
  if(d.final||!d.lines.length)break;
 }
 txt('#log-status',S.logDone?'complete':'following'+C(8230));
}
function appendLogs(lines){
 const box=$('#log-lines');
 if(!lines.length)return;
 if($('#log-empty'))$('#log-empty').remove();
 box.append(...lines.map((l)=>el('div',{class:'log-line lvl-'+l.level},[
  el('time.log-time',{datetime:l.timestamp,title:fmtFull(l.timestamp),text:fmtClock(l.timestamp)}),
  el('span.log-level',l.level),el('span.log-name',{title:l.name,text:l.name}),
  el('span.log-msg',l.message)])));
 while(box.childElementCount>20000)box.firstElementChild.remove();
 if($('#log-follow').checked)box.scrollTop=box.scrollHeight;
}
function cancelConfirm(on){
 const r=S.run, can=!!r&&S.status.can_write&&!isFinal(r.state)&&r.state!=='Cancelling';
 $('#cancel-confirm').hidden=!(on&&can);
 $('#cancel-run').hidden=on||!can;
}
async function doCancel(){
 if(needToken())return askToken();
 const id=S.runId, btn=$('#cancel-confirm-yes');
 btn.disabled=true;
 try{
  const d=await api('POST','api/runs/'+enc(id)+'/cancel',{});
  setError('cancel');
  cancelConfirm(false);
  if(S.runId===id){S.run=null;detailTick(restart(),0);}
 }catch(e){
  setError('cancel','Cancel failed: '+writeFailed(e));
 }finally{btn.disabled=false;}
}

// Flows and the create-run form
function setFlows(flows){
 const sel=$('#flow-filter'), cur=sel.value;
 S.flows=flows;
 put('#flow-filter',[el('option',{value:''},'All flows'),...flows.map((f)=>el('option',{value:f.name},f.name))]);
 sel.value=flows.some((f)=>f.name===cur)?cur:'';
}
const loadFlowsView=(gen)=>poll(gen,'flows','api/flows',10000,renderFlows);
function renderFlows(flows){
 setFlows(flows);
 $('#flows-empty').hidden=flows.length>0;
 put('#flows-table tbody',S.flows.map((f)=>el('tr',{'data-flow-name':f.name},[
  el('td.c-name',{},[el('div',{},el('b',f.name)),el('div.mu.sm',f.project)]),
  el('td',{'data-label':'Version',class:'num',text:'v'+f.version}),
  el('td',{'data-label':'Labels'},chips(f.labels)),
  el('td',{'data-label':'Schedule',class:'c-schedule'},f.schedule?el('span',{},[f.schedule+' ',
   f.schedule_active?null:el('span.chip','paused')]):el('span.mu','none')),
  el('td',{'data-label':'Next run',class:'c-next',title:fmtFull(f.next_run)},f.next_run?el('span',{},
   [fmtDate(f.next_run)+' ',el('span.mu.sm',{text:'('+rel(f.next_run)+')'})]):el('span.mu',DASH)),
  el('td.write',{},el('button',{type:'button',class:'btn run-flow','data-flow':f.name,text:'Run',
    'aria-label':'Run '+f.name}))])));
}
function defaultText(p){
 const d=p.default;
 if(d===undefined||(d===null&&p.required))return '';
 if(typeof d!=='string')return JSON.stringify(d);
 try{JSON.parse(d);return JSON.stringify(d);}catch(e){return d;}
}
function openForm(name){
 const flow=S.flows.find((f)=>f.name===name);
 if(!flow)return;
 if(needToken())askToken();
 S.form=flow;
 txt('#create-run-title','Run '+flow.name);
 txt('#create-run-error','');
 $('#run-name').value='';
 put('#param-fields',flow.parameters.length?flow.parameters.map((p,i)=>el('div.field',{},[
  el('label',{for:'param-'+i},[el('span.mono',p.name),p.required?el('span.req','required'):null]),
  el('input',{id:'param-'+i,class:'param-input mono',type:'text','data-param':p.name,
    'aria-required':p.required?'true':null,
   value:defaultText(p),autocomplete:'off',spellcheck:'false','aria-describedby':'hint-'+i}),
  p.required&&p.default===null?null:el('div.hint',{id:'hint-'+i,text:'Default: '+JSON.stringify(p.default)})])):
  [el('p.mu','This flow takes no parameters.')]);
 $('#create-run-panel').hidden=false;
 ($('.param-input')||$('#run-name')).focus();
}
function closeForm(){$('#create-run-panel').hidden=true;S.form=null;}
async function submitForm(ev){
 ev.preventDefault();
 const flow=S.form, params={};
 if(!flow)return;
 txt('#create-run-error','');
 for(const input of $$('.param-input')){
  const raw=input.value.trim(), name=input.dataset.param;
  if(!raw){
   if(!input.getAttribute('aria-required'))continue;
   input.focus();
   return txt('#create-run-error','Parameter '+name+' is required.');
  }
  try{params[name]=JSON.parse(raw);}catch(e){params[name]=raw;}
 }
 if(needToken()){askToken();return txt('#create-run-error','Enter the API token first.');}
 const btn=$('#create-run-submit');
 btn.disabled=true;
 try{
  const d=await api('POST','api/runs',{flow:flow.name,parameters:params,name:val('#run-name')||null});
  closeForm();
  location.hash='#/runs/'+enc(d.id);
 }catch(e){
  txt('#create-run-error',writeFailed(e));
 }finally{btn.disabled=false;}
}

// Agents, polled every 5 s
const loadAgents=(gen)=>poll(gen,'agents','api/agents',5000,renderAgents);
function renderAgents(agents){
  $('#agents-empty').hidden=agents.length>0;
  put('#agents-table tbody',agents.map((a)=>{
   const age=a.last_queried?(Date.now()-Date.parse(a.last_queried))/1000:1e9;
   return el('tr',{'data-agent-id':a.id},[
    el('td',{class:'c-name '+(age<60?'st-ok':age<900?'st-cancel':'st-skip')},[el('span.dot'),' ',el('b',a.name)]),
    el('td',{'data-label':'Labels'},chips(a.labels)),
    el('td',{'data-label':'Contact',class:'c-contact',title:fmtFull(a.last_queried),
      text:a.last_queried?'last contact '+rel(a.last_queried):'never'})]);
  }));
}

// Start
async function loadStatus(){
 try{
  S.status=await api('GET','api/status');
  setError('status');
  txt('#mode',S.status.mode+(S.status.can_write?'':DOT+'read-only'));
  txt('#location',$('#location').title=S.status.location||'');
  txt('#version',S.status.version?'v'+S.status.version:'');
  document.body.classList.toggle('ro',!S.status.can_write);
  if(needToken())askToken();
 }catch(e){
  setError('status','Loading the agent status failed: '+e.message);
  setTimeout(loadStatus,5000);
 }
}
const on=(s,type,fn)=>$(s).addEventListener(type,fn);
function init(){
 $('#state-filter').append(...STATES.map((s)=>el('option',{value:s,text:s})));
 for(const t of $$('.tab'))t.addEventListener('click',()=>{location.hash='#/'+t.dataset.tab;});
 on('#flow-filter','change',()=>refreshRuns(true));
 on('#state-filter','change',()=>refreshRuns(true));
 let searchTimer=0;
 on('#search','input',()=>{clearTimeout(searchTimer);searchTimer=setTimeout(()=>refreshRuns(true),300);});
 on('#prev-page','click',()=>{S.page=Math.max(1,S.page-1);refreshRuns();});
 on('#next-page','click',()=>{S.page+=1;refreshRuns();});
 on('#runs-table','click',(ev)=>{
  const tr=ev.target.closest('tr[data-run-id]');
  if(tr&&!ev.target.closest('a'))location.hash='#/runs/'+enc(tr.dataset.runId);
 });
 on('#flows-table','click',(ev)=>{const b=ev.target.closest('.run-flow');if(b)openForm(b.dataset.flow);});
 on('#cancel-run','click',()=>cancelConfirm(true));
 on('#cancel-confirm-no','click',()=>cancelConfirm(false));
 on('#cancel-confirm-yes','click',doCancel);
 on('#create-run-form','submit',submitForm);
 on('#create-run-close','click',closeForm);
 on('#create-run-panel','click',(ev)=>{if(ev.target===ev.currentTarget)closeForm();});
 document.addEventListener('keydown',(ev)=>{if(ev.key==='Escape'&&!$('#create-run-panel').hidden)closeForm();});
 on('#token-box','submit',(ev)=>{
  ev.preventDefault();
  if(!(S.token=val('#token-input')))return;
  sessionStorage.setItem(TK,S.token);
  $('#token-input').value='';
  $('#token-box').hidden=true;
 });
 const box=$('#log-lines'), follow=$('#log-follow');
 on('#log-lines','scroll',()=>{follow.checked=box.scrollHeight-box.scrollTop-box.clientHeight<30;});
 on('#log-follow','change',()=>{if(follow.checked)box.scrollTop=box.scrollHeight;});
 window.addEventListener('hashchange',route);
 loadStatus().then(()=>{api('GET','api/flows').then(setFlows,(e)=>setError('flows',
   'Loading flows failed: '+e.message));route();});
}
init();
</script>
</body>
</html>
"""


def _next_run(schedule: Schedule | None, active: bool, after: datetime | None = None) -> datetime | None:
    """When an active schedule fires next; None when it is off, or never fires (``0 0 30 2 *``)."""
    if schedule is None or not active:
        return None
    try:
        upcoming = schedule.next(1, after)
    except Exception:  # a schedule the API holds may be one we cannot follow: listings go on
        return None
    return upcoming[0].start_time if upcoming else None


def _flow_schedule(flow: FlowSummary) -> Schedule | None:
    """A listed flow's schedule, or None when it has none or it cannot be read."""
    try:
        return Schedule.from_prefect(flow.schedule) if flow.schedule else None
    except Exception:  # whatever the API holds: listings go on without it
        return None


def _flow_json(flow: FlowSummary, now: datetime) -> dict[str, Any]:
    """A flow as ``flows -o json`` shows it (keys documented in the README)."""
    schedule = _flow_schedule(flow)
    next_run = _next_run(schedule, flow.schedule_active, now)
    return {"id": flow.id, "name": flow.name, "version": flow.version, "project": flow.project,
            "labels": list(flow.labels), "storage": flow.storage,
            "schedule": schedule.describe() if schedule else None,
            "schedule_active": bool(schedule and flow.schedule_active),
            "next_run": _format_time(next_run) if next_run else None}


def _run_facts(backend: Backend, run: FlowRun) -> dict[str, Any]:
    """A run as ``inspect -o json`` shows it: its keys, states with durations, who claimed it."""
    states = _history_json(backend.get_state_history(run.id))
    try:
        flow = backend.find_flow(run.flow_name)
    except AgentError:  # a Prefect 2/3 flow with several deployments: no one version to show
        flow = None
    # Submitted; on Prefect 2/3, Pending (its history keeps Prefect's names), with the claim's token.
    claimed = next((state["message"] for state in reversed(states) if state["state"] in ("Submitted", "Pending")
                    and "Submitted for execution by " in state["message"]), "")
    claimed = _CLAIM_IN_MESSAGE.sub("", claimed.partition("Submitted for execution by ")[2]).strip()
    return {**_run_json(run), "flow_version": flow.version if flow is not None and flow.id == run.flow_id else None,
            "states": states, "log_lines": backend.count_run_logs(run.id), "claimed_by": claimed or None}


def _dashboard_run_json(run: FlowRun) -> dict[str, Any]:
    return {**_run_json(run), "start_time": _time_json(run.began), "end_time": _time_json(run.ended)}


class _HTTPError(Exception):
    """An answer other than 200 from a dashboard route: its status and one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Dashboard:
    """The dashboard's page and its JSON routes, over a backend opened per request."""

    PER_PAGE, MAX_PER_PAGE = 50, 200
    #: A log answer holds at most this many lines; the page asks again from ``next``.
    LOG_LINES_PER_ANSWER = 5000

    def __init__(self, settings: Settings, *, mode: str, on_loopback: bool,
                 status: Callable[[], dict[str, Any]] | None = None) -> None:
        self.settings, self.mode, self.on_loopback = settings, mode, on_loopback
        self.agent_status = status

    @property
    def can_write(self) -> bool:
        return bool(self.settings.ui_token) or self.on_loopback

    def get(self, path: str, query: Mapping[str, str]) -> tuple[int, str, bytes]:
        if path == "":
            return 200, "text/html; charset=utf-8", _DASHBOARD_PAGE.encode("utf-8")
        parts = path.strip("/").split("/")
        with _backend_for(None, None, self.settings) as backend:
            if path == "/api/runs":
                return self._json(self._runs(backend, query))
            if path == "/api/flows":
                return self._json(self._flows(backend))
            if path == "/api/agents":
                return self._json(self._agents(backend))
            if len(parts) == 3 and parts[:2] == ["api", "runs"]:
                return self._json(self._run(backend, parts[2]))
            if len(parts) == 4 and parts[:2] == ["api", "runs"] and parts[3] == "logs":
                return self._json(self._logs(backend, parts[2], query))
        raise _HTTPError(404, f"there is nothing at {path}")

    def status(self) -> dict[str, Any]:
        """``/api/status``: the agent's status when an agent serves it, and what the page needs."""
        return {**(self.agent_status() if self.agent_status else {}), "mode": self.mode, "version": __version__,
                "location": _Redactor(_secrets(self.settings, {}))(self._location()),
                "can_write": self.can_write, "needs_token": bool(self.settings.ui_token)}

    def _location(self) -> str:
        api = self.settings.api
        return f"embedded database {_sqlite_path(api)}" if api.startswith("sqlite:") else api

    def post(self, path: str, body: bytes, authorization: str) -> tuple[int, str, bytes]:
        self._check_write(authorization)
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise _HTTPError(400, "the body must be a JSON object") from None
        if not isinstance(data, dict):
            raise _HTTPError(400, "the body must be a JSON object")
        parts = path.strip("/").split("/")
        try:
            if path == "/api/runs":
                return self._create(data)
            if len(parts) == 4 and parts[:2] == ["api", "runs"] and parts[3] == "cancel":
                with _backend_for(None, None, self.settings) as backend:
                    run = self._find(backend, parts[2])
                    if is_final(run.state):
                        raise _HTTPError(400, f"flow run {run.name or run.id} has already finished ({run.state})")
                    return self._json({"state": backend.cancel_flow_run(run.id)})
        except AgentError as exc:
            raise _HTTPError(400, str(exc)) from None
        raise _HTTPError(404, f"there is nothing to post to at {path}")

    def _check_write(self, authorization: str) -> None:
        import hmac

        if self.settings.ui_token:
            given = authorization.partition("Bearer ")[2].strip()
            if not hmac.compare_digest(given.encode(), self.settings.ui_token.encode()):
                raise _HTTPError(403, "creating and cancelling runs needs the --ui-token as a bearer token")
        elif not self.on_loopback:
            raise _HTTPError(403, "this dashboard is not on loopback: give it --ui-token to create and cancel runs")

    def _create(self, data: Mapping[str, Any]) -> tuple[int, str, bytes]:
        flow_name, parameters = data.get("flow"), data.get("parameters") or {}
        if not isinstance(flow_name, str) or not isinstance(parameters, dict):
            raise _HTTPError(400, 'give {"flow": NAME, "parameters": {...}}')
        name = data.get("name") if isinstance(data.get("name"), str) and data.get("name") else None
        run_id = create_flow_run(flow_name, parameters, name=name, api=self.settings.api, token=self.settings.token)
        return 201, "application/json", json.dumps({"id": run_id}).encode()

    @staticmethod
    def _json(value: Any) -> tuple[int, str, bytes]:
        return 200, "application/json", json.dumps(value, default=str).encode()

    def _runs(self, backend: Backend, query: Mapping[str, str]) -> dict[str, Any]:
        page = max(1, _query_int(query, "page", 1))
        per_page = min(self.MAX_PER_PAGE, max(1, _query_int(query, "per_page", self.PER_PAGE)))
        state = query.get("state") or None
        if state is not None and state not in _STATE_NAMES:
            raise _HTTPError(400, f"{state!r} is not a state")
        runs = backend.list_flow_runs(flow_name=query.get("flow") or None, state=state, limit=per_page + 1,
                                      offset=(page - 1) * per_page, search=(query.get("q") or "").strip() or None,
                                      attention_first=True)
        shown = runs[:per_page]
        return {"runs": [_dashboard_run_json(run) for run in shown], "page": page, "per_page": per_page,
                "has_more": len(runs) > per_page}

    @staticmethod
    def _find(backend: Backend, given: str) -> FlowRun:
        try:
            return _find_run(backend, given)
        except AgentError as exc:
            raise _HTTPError(404, str(exc)) from None

    def _run(self, backend: Backend, given: str) -> dict[str, Any]:
        run = self._find(backend, given)
        return {**_run_facts(backend, run), **_dashboard_run_json(run)}

    def _logs(self, backend: Backend, given: str, query: Mapping[str, str]) -> dict[str, Any]:
        run = self._find(backend, given)
        after = max(0, _query_int(query, "after", 0))
        lines = backend.get_run_logs(run.id, after, self.LOG_LINES_PER_ANSWER)
        # "final" once the run is final and every line is here: the page then stops following.
        complete = is_final(run.state) and len(lines) < self.LOG_LINES_PER_ANSWER
        return {"lines": [line._asdict() for line in lines], "next": after + len(lines), "final": complete}

    @staticmethod
    def _flows(backend: Backend) -> list[dict[str, Any]]:
        now, listed = _utcnow(), []
        for flow in backend.list_flows():
            declared = [item for item in flow.parameters or [] if isinstance(item, Mapping) and "name" in item]
            shown = {key: value for key, value in _flow_json(flow, now).items() if key != "storage"}
            listed.append({**shown, "parameters": [{"name": item["name"], "default": item.get("default"),
                                                    "required": bool(item.get("required"))} for item in declared]})
        return listed

    @staticmethod
    def _agents(backend: Backend) -> list[dict[str, Any]]:
        try:
            return backend.list_agents()
        except APIError:  # an older Server may not answer this: the page shows none
            return []


def _query_int(query: Mapping[str, str], key: str, default: int) -> int:
    try:
        value = int(query.get(key, default))
    except ValueError:
        raise _HTTPError(400, f"{key} must be a whole number") from None
    if not 0 <= value <= 10**9:
        raise _HTTPError(400, f"{key} must be a whole number from 0 to 1000000000")
    return value


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_allowed(header: str, names: set[str], *, wildcard: bool) -> bool:
    """Whether a request's Host names this server. On every interface, an IP address or localhost
    is taken: another name may be one an attacker points at this machine (DNS rebinding)."""
    if header in names:
        return True
    if not wildcard:
        return False
    import ipaddress

    try:
        name = urlsplit("http://" + header).hostname or ""
    except ValueError:  # not a host at all ("[::1")
        return False
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True




def _serve_agent_address(agent: LocalAgent, address: str) -> ThreadingHTTPServer:
    """Serve the agent's routes on ``--agent-address``: health, poke, status, metrics and the dashboard."""
    dashboard = _Dashboard(agent.settings, mode="agent", on_loopback=_is_loopback(_address_host(address)),
                           status=agent.status)

    def routes(path: str) -> tuple[int, str, bytes] | None:
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", agent.metrics_text().encode()
        if path == "/api/poke":
            agent.poke()
            return 200, "application/json", b"{}"
        if path == "/api/health":
            problem = agent.health_problem()
            if problem:
                return 503, "application/json", json.dumps({"status": "unhealthy", "reason": problem}).encode()
            return 200, "application/json", b"{}"
        return None

    return _serve_http(address, dashboard, agent.logger, routes)


def _cut_off(connection: Any) -> None:
    """End a connection that took too long (its handler then fails and lets its slot go)."""
    import socket

    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


def _address_host(address: str) -> str:
    return urlsplit(address if "://" in address else "http://" + address).hostname or "127.0.0.1"


def _serve_http(address: str, dashboard: _Dashboard, logger: logging.Logger,
                routes: Callable[[str], tuple[int, str, bytes] | None] = lambda path: None) -> ThreadingHTTPServer:
    """Serve ``routes`` (the agent's own) and the dashboard on ``address``, in threads.

    Each connection gets ENDPOINT_TIMEOUT_SECONDS to send its request, and at most
    ENDPOINT_MAX_CONNECTIONS are served at once (more are closed at once): an idle or slow
    client cannot tie up the agent. ``[::1]:PORT`` listens on IPv6.
    """
    import socket  # loaded by http.server anyway
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    parts = urlsplit(address if "://" in address else "http://" + address)
    if not parts.port:
        raise ConfigError(f"--agent-address {address!r} needs a port, like http://127.0.0.1:8080")
    host = parts.hostname or "127.0.0.1"

    names = {f"{name}:{parts.port}" for name in ("127.0.0.1", "localhost", "[::1]", host, f"[{host}]")}

    class Handler(BaseHTTPRequestHandler):
        timeout = ENDPOINT_TIMEOUT_SECONDS

        def do_GET(self) -> None:
            self.answer(lambda path, query: routes(path) or (
                (200, "application/json", json.dumps(dashboard.status()).encode()) if path == "/api/status"
                else dashboard.get(path, query)))

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= 1_000_000:
                self.reply(400, b'{"error": "send a JSON body of at most 1 MB, with its Content-Length"}',
                           "application/json")
                return
            body = self.rfile.read(length)
            if not (self.headers.get("Content-Type") or "").startswith("application/json"):
                # A browser sends JSON to another origin only after asking first, which is never answered.
                self.reply(415, json.dumps({"error": "send Content-Type: application/json"}).encode(),
                           "application/json")
                return
            self.answer(lambda path, query: dashboard.post(path, body, self.headers.get("Authorization") or ""))

        def answer(self, handle: Callable[[str, dict[str, str]], tuple[int, str, bytes]]) -> None:
            target = urlsplit(self.path)
            if not _host_allowed(self.headers.get("Host") or "", names, wildcard=host in ("0.0.0.0", "::")):
                self.reply(421, b'{"error": "this server does not answer for that host name"}', "application/json")
                return
            from urllib.parse import parse_qsl

            redact = _Redactor(_secrets(dashboard.settings, {}))
            try:
                status, content_type, body = handle(target.path.rstrip("/"), dict(parse_qsl(target.query)))
            except _HTTPError as exc:
                status, content_type = exc.status, "application/json"
                body = json.dumps({"error": redact(str(exc))}).encode()
            except AgentError as exc:
                status, content_type = 502, "application/json"
                body = json.dumps({"error": redact(str(exc))}).encode()
            except Exception:  # a bug, or an answer we did not expect: the agent goes on, the client is told
                logger.error("http: %s failed", target.path, exc_info=True)
                status, content_type, body = 500, "application/json", b'{"error": "internal error (see the log)"}'
            self.reply(status, body, content_type)

        def reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                             "script-src 'self' 'unsafe-inline'; frame-ancestors 'none'")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            logger.debug("http: " + format, *args)

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True
        request_queue_size = 4 * ENDPOINT_MAX_CONNECTIONS  # a burst waits for accept(), not for SYN retries
        slots = threading.BoundedSemaphore(ENDPOINT_MAX_CONNECTIONS)

        def process_request(self, request: Any, client_address: Any) -> None:
            if not self.slots.acquire(blocking=False):  # all busy: drop this one, not the agent
                self.shutdown_request(request)
                return
            threading.Thread(target=self.process_request_thread, args=(request, client_address),
                             name="agent-address-client", daemon=True).start()

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            # The socket timeout bounds each read; this bounds the whole request, so a client that
            # sends a byte every few seconds still loses its slot after ENDPOINT_TIMEOUT_SECONDS.
            deadline = threading.Timer(ENDPOINT_TIMEOUT_SECONDS, _cut_off, args=(request,))
            deadline.daemon = True
            deadline.start()
            try:
                super().process_request_thread(request, client_address)
            finally:
                deadline.cancel()
                self.slots.release()

        def handle_error(self, request: Any, client_address: Any) -> None:
            logger.debug("http: a client of %s went away: %s", client_address, sys.exc_info()[1])

    try:
        server = Server((host, parts.port), Handler)
    except OSError as exc:
        raise ConfigError(f"cannot listen on --agent-address {address}: {exc.strerror or exc}") from None
    threading.Thread(target=server.serve_forever, name="agent-address", daemon=True).start()
    logger.debug("Serving %s", address)
    return server


# --- 11. The Python API ------------------------------------------------------------------


def _retry_settings(retries: int, retry_delay: float | timedelta) -> tuple[int, float]:
    """``retries`` (a whole number, 0 or more) and ``retry_delay`` in seconds (0 or more)."""
    delay = retry_delay.total_seconds() if isinstance(retry_delay, timedelta) else retry_delay
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a whole number, 0 or more, got {retries!r}")
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not delay >= 0:
        raise ValueError(f"retry_delay must be 0 or more seconds (or a timedelta), got {retry_delay!r}")
    return retries, float(delay)


def _as_schedule(schedule: Schedule | CronClock | IntervalClock | Sequence[CronClock | IntervalClock] | None,
                 ) -> Schedule | None:
    """A Schedule from a schedule, one clock or a list of clocks (None stays None)."""
    if schedule is None or isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, (CronClock, IntervalClock)):
        return Schedule([schedule])
    if isinstance(schedule, (list, tuple)) and all(isinstance(c, (CronClock, IntervalClock)) for c in schedule):
        return Schedule(list(schedule))
    raise TypeError(f"a schedule is a Schedule, a CronClock, an IntervalClock or a list of clocks, got {schedule!r}")


class Flow:
    """A named callable with labels: store it, deploy it, run it with an agent."""

    #: When the API creates runs of it by itself (flows pickled before schedules existed have none).
    schedule: Schedule | None = None

    def __init__(
        self, name: str, fn: Callable[..., Any] | None = None, labels: Iterable[str] = (), *,
        schedule: Schedule | CronClock | IntervalClock | Sequence[CronClock | IntervalClock] | None = None,
        retries: int = 0, retry_delay: float | timedelta = 0,
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError("a Flow needs a non-empty name")
        self.name = name
        self.fn = fn
        self.labels = _unique(labels)
        self.schedule = _as_schedule(schedule)
        #: A failed run is tried again this many times, each ``retry_delay`` seconds after the last failed.
        self.retries, self.retry_delay = _retry_settings(retries, retry_delay)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the flow's function; the first call on a Flow without one makes it a decorator."""
        if self.fn is None:
            if len(args) == 1 and callable(args[0]) and not kwargs:
                self.fn = args[0]
                self.__doc__ = getattr(self.fn, "__doc__", None)
                return self
            raise TypeError(f"flow {self.name!r} has no function yet; use it as a decorator first")
        return self.fn(*args, **kwargs)

    def run(self, **parameters: Any) -> Any:
        """Run the flow here and now with these parameters."""
        if self.fn is None:
            raise TypeError(f"flow {self.name!r} has no function to run")
        return self.fn(**parameters)

    def store(self, directory: str | os.PathLike[str] | None = None) -> str:
        """Pickle the flow to ``<directory>/<slug>.prefect`` (default: the flows directory); the path."""
        return store_flow(self, directory or resolve_settings().flows_dir)

    def deploy(
        self,
        project_name: str,
        labels: Iterable[str] | None = None,
        *,
        schedule: Schedule | CronClock | IntervalClock | Sequence[CronClock | IntervalClock] | None = None,
        retries: int | None = None,
        retry_delay: float | timedelta | None = None,
        api: str | None = None,
        token: str | None = None,
    ) -> str:
        """Store the flow and register it with the API (its schedule on); return the flow id."""
        self.labels = _unique([*self.labels, *(labels or [])])  # run_agent() needs them too
        if schedule is not None:
            self.schedule = _as_schedule(schedule)
        if retries is not None or retry_delay is not None:
            self.retries, self.retry_delay = _retry_settings(
                self.retries if retries is None else retries, self.retry_delay if retry_delay is None else retry_delay)
        return deploy(self, project_name, api=api, token=token)

    def run_agent(self, **agent_options: Any) -> int:
        """Run a LocalAgent here, with this flow's labels, until it stops."""
        return run_agent(self, **agent_options)

    def __repr__(self) -> str:
        return f"<Flow {self.name!r}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # A decorated flow replaced its function in the module: pickle it by that name.
        owner = sys.modules.get(getattr(self.fn, "__module__", "") or "")
        qualname = getattr(self.fn, "__qualname__", "")
        if owner is not None and qualname and _lookup(owner, qualname) is self:
            return _reference_to(str(self.fn.__module__), qualname, self.name)
        return (Flow, (self.name, self.fn, self.labels),
                {"retries": self.retries, "retry_delay": self.retry_delay, "schedule": self.schedule})


def _settings_for(api: str | None, token: str | None) -> Settings:
    return resolve_settings({"api": api, "token": token})


def _flow_labels(obj: Any, extra: Iterable[str] | None = None) -> list[str]:
    """A stored flow's labels: ``local``, its slug, its own labels, then ``extra``."""
    own = getattr(obj, "labels", None)
    own_labels = [str(label) for label in own] if isinstance(own, (list, tuple, set, frozenset)) else []
    return _unique([LOCAL_STORAGE_LABEL, slugify(_flow_name(obj)), *own_labels, *(extra or [])])


def _flow_function(obj: Any) -> Callable[..., Any] | None:
    """The plain function a stored flow calls (a Flow's, or the object itself), or None."""
    import inspect

    fn = obj.fn if isinstance(obj, Flow) else obj
    return fn if inspect.isfunction(fn) else None


def _code_file(obj: Any) -> str:
    """The source file a flow's code is defined in ("" when there is none, e.g. a built-in)."""
    fn = _flow_function(obj)
    target = obj.fn if isinstance(obj, Flow) else obj  # a class or callable object: its module's file
    path = fn.__code__.co_filename if fn is not None else getattr(
        sys.modules.get(getattr(target, "__module__", "")), "__file__", None)
    return os.path.abspath(path) if isinstance(path, str) and os.path.isfile(path) else ""


def _declared_parameters(obj: Any) -> list[dict[str, Any]]:
    """The parameters of a flow's function, as Prefect serializes ``Parameter`` tasks."""
    import inspect

    fn = _flow_function(obj)
    if fn is None:
        return []
    declared: list[dict[str, Any]] = []
    for parameter in inspect.signature(fn).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        required = parameter.default is parameter.empty
        default = None if required else parameter.default
        try:
            json.dumps(default)
        except (TypeError, ValueError):
            default = repr(default)
        declared.append({
            "name": parameter.name, "slug": parameter.name, "default": default, "required": required,
            "type": "prefect.core.parameter.Parameter", "outputs": "typing.Any", "tags": [],
            "__version__": CORE_VERSION,
        })
    return declared


def _task_json(name: str, slug: str, kind: str, inputs: Iterable[str] = (), retries: int = 0,
               retry_delay: float = 0.0) -> dict[str, Any]:
    """A task as Prefect 1.4.1 serializes it."""
    return {
        "name": name, "slug": slug, "type": kind, "inputs": {key: {"required": True, "type": "typing.Any"}
                                                           for key in inputs},
        "outputs": "typing.Any", "tags": [], "max_retries": retries,
        "retry_delay": round(retry_delay) if retries else None, "timeout": None,
        "trigger": {"fn": "prefect.triggers.all_successful", "kwargs": {}}, "skip_on_upstream_skip": True,
        "cache_for": None, "cache_key": None, "auto_generated": False,
        "cache_validator": {"fn": "prefect.engine.cache_validators.never_use", "kwargs": {}},
        "__version__": CORE_VERSION,
    }


def serialize_flow(obj: Any, path: str, labels: Sequence[str]) -> dict[str, Any]:
    """The flow JSON Prefect Server 1.x accepts at registration, for a stored flow: its parameters
    as Prefect ``Parameter`` tasks feeding one task, the flow's body, so Prefect's tools and UI
    show them (the flow-run process reports these task runs' states)."""
    name = _flow_name(obj)
    parameters = _declared_parameters(obj)
    schedule = getattr(obj, "schedule", None)
    # The flow's retries are its body's, where Prefect's UI shows a task's.
    body = _task_json(name, _BODY_TASK_SLUG, "prefect.tasks.core.function.FunctionTask",
                      [parameter["name"] for parameter in parameters], getattr(obj, "retries", 0),
                      getattr(obj, "retry_delay", 0.0))
    edges = [{"key": parameter["name"], "flattened": False, "mapped": False, "__version__": CORE_VERSION,
              "upstream_task": {"slug": parameter["slug"], "__version__": CORE_VERSION},
              "downstream_task": {"slug": _BODY_TASK_SLUG, "__version__": CORE_VERSION}} for parameter in parameters]
    return {
        "name": name,
        "type": "prefect.core.flow.Flow",
        "schedule": schedule.to_prefect() if isinstance(schedule, Schedule) else None,
        "parameters": parameters,
        "tasks": [*(_task_json(p["name"], p["slug"], p["type"]) for p in parameters), body],
        "edges": edges,
        "reference_tasks": [{"slug": _BODY_TASK_SLUG, "__version__": CORE_VERSION}],
        # Which code this version runs: the file it is defined in and a digest of it. A new digest
        # makes a new version at registration, and a run notes when the code changed since.
        "run_config": {"type": "UniversalRun", "labels": list(labels), "env": _code_fingerprint(obj),
                       "__version__": CORE_VERSION},
        "storage": local_storage(name, path),
        "__version__": CORE_VERSION,
    }


def _code_fingerprint(obj: Any) -> dict[str, str]:
    """Run-config variables about a flow's code: the file it is in and its digest, and whether it
    takes parameters it does not name (``**kwargs``); None when there is nothing to say."""
    path = _code_file(obj)
    digest = _file_digest(path) if path else ""
    variables = {"LOCAL_AGENT_CODE_FILE": path, "LOCAL_AGENT_CODE_DIGEST": digest} if digest else {}
    variables[_PARAMETERS_KIND] = "open" if _takes_any_parameter(obj) else "exact"
    return variables


#: A run-config variable saying whether a flow takes only the parameters it declares ("exact")
#: or others too ("open": ``**kwargs``). Flows registered without it are checked only when they
#: declare parameters (an older registration may have declared none).
_PARAMETERS_KIND = "LOCAL_AGENT_PARAMETERS"


def _takes_any_parameter(obj: Any) -> bool:
    """Whether a flow takes keyword arguments it does not name, or cannot be inspected to tell."""
    import inspect

    fn = _flow_function(obj)
    if fn is None:
        return True
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def _check_parameters(flow: FlowSummary, parameters: Mapping[str, Any]) -> None:
    """Refuse, at creation, parameters a flow does not have and required ones that are missing."""
    declared = [item for item in flow.parameters or [] if isinstance(item, Mapping) and "name" in item]
    names = [str(item["name"]) for item in declared]
    env = flow.run_config.get("env") if isinstance(flow.run_config, Mapping) else None
    kind = env.get(_PARAMETERS_KIND) if isinstance(env, Mapping) else None
    exact = kind == "exact" or (kind is None and bool(names))
    unknown = sorted(set(parameters) - set(names))
    if unknown and exact:
        raise AgentError(f"flow {flow.name!r} has no parameter {', '.join(map(repr, unknown))}; its parameters are "
                         f"{', '.join(names) or 'none'}")
    missing = [str(item["name"]) for item in declared if item.get("required") and item["name"] not in parameters]
    if missing:
        raise AgentError(f"flow {flow.name!r} needs parameter {', '.join(map(repr, missing))}: give it with "
                         f"--param {missing[0]}=JSON")


def deploy(
    obj: Any,
    project_name: str,
    labels: Iterable[str] | None = None,
    *,
    api: str | None = None,
    token: str | None = None,
) -> str:
    """Store a flow and register it in ``project_name``; return the flow id."""
    _refuse_when_importing("deploy()")
    settings = _settings_for(api, token)
    path = store_flow(obj, settings.flows_dir)
    backend = open_backend(settings)
    try:
        project_id = backend.ensure_project(project_name)
        flow_id = backend.register_flow(project_id, serialize_flow(obj, path, _flow_labels(obj, labels)))
    finally:
        backend.close()
    logging.getLogger(__name__).info("Registered flow %r as %s in %s", _flow_name(obj), flow_id, backend.location)
    return flow_id


def run_agent(obj: Any, *, banner: bool = True, **agent_options: Any) -> int:
    """Run a LocalAgent in this process with a flow's labels (``once=True`` to drain and exit)."""
    _refuse_when_importing("run_agent()")
    agent_options["labels"] = _flow_labels(obj, agent_options.get("labels"))
    return LocalAgent(resolve_settings(agent_options)).start(banner=banner)


def create_flow_run(
    flow_name: str,
    parameters: Mapping[str, Any] | None = None,
    labels: Iterable[str] | None = None,
    scheduled_start_time: datetime | None = None,
    *,
    name: str | None = None,
    idempotency_key: str | None = None,
    api: str | None = None,
    token: str | None = None,
) -> str:
    """Schedule a run of the newest version of a registered flow; return the run id (the same
    run again for an ``idempotency_key`` used before)."""
    _refuse_when_importing("create_flow_run()")
    with _backend_for(api, token) as backend:
        flow = backend.find_flow(flow_name)
        if flow is None:
            raise AgentError(
                f"no flow named {flow_name!r} is registered in the {backend.location}; deploy it "
                "first (`local_agent.py flows` lists the registered ones)"
            )
        _check_parameters(flow, parameters or {})
        return backend.create_flow_run(
            flow.id,
            parameters=dict(parameters or {}),
            labels=None if labels is None else list(labels),
            scheduled_start_time=scheduled_start_time,
            idempotency_key=idempotency_key or os.urandom(16).hex(),
            name=name,
        )


def list_flow_runs(
    flow_name: str | None = None,
    state: str | None = None,
    limit: int = 20,
    *,
    api: str | None = None,
    token: str | None = None,
) -> list[FlowRun]:
    """Runs, newest scheduled first, optionally of one flow or in one state."""
    with _backend_for(api, token) as backend:
        return backend.list_flow_runs(flow_name=flow_name, state=state, limit=limit)


def list_flows(*, api: str | None = None, token: str | None = None) -> list[FlowSummary]:
    """Registered flows (newest version of each)."""
    with _backend_for(api, token) as backend:
        return backend.list_flows()


def get_run_logs(run_id: str, *, api: str | None = None, token: str | None = None) -> list[LogLine]:
    """A run's log lines."""
    with _backend_for(api, token) as backend:
        return backend.get_run_logs(run_id)


def cancel_flow_run(run_id: str, *, api: str | None = None, token: str | None = None) -> str:
    """Cancel a run (a running one becomes Cancelling until its agent stops it); its new state."""
    with _backend_for(api, token) as backend:
        return backend.cancel_flow_run(run_id)


class _backend_for:  # noqa: N801 (used as a context manager, reads like a function)
    """``with _backend_for(api, token) as backend:`` opens and closes a backend."""

    def __init__(self, api: str | None, token: str | None, settings: Settings | None = None) -> None:
        self.settings = settings or _settings_for(api, token)

    def __enter__(self) -> Backend:
        self.backend = open_backend(self.settings)
        return self.backend

    def __exit__(self, *exc_info: object) -> None:
        self.backend.close()


# --- 12. The command line ----------------------------------------------------------------


def _parse_when(text: str) -> datetime:
    """``+30s``, ``+5m``, ``+2h``, ``+1d``, or ISO 8601 (local time when it has no offset)."""
    match = re.fullmatch(r"\+(\d+(?:\.\d+)?)([smhd])", text.strip())
    try:
        if match:
            unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
            return _utcnow() + timedelta(seconds=float(match.group(1)) * unit)
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.astimezone()  # the user's local time
        return moment.astimezone(timezone.utc)
    except (OverflowError, OSError):  # past year 9999, or beyond what the local time zone can say
        raise ValueError(f"{text!r} is too far away; give a time before the year 9999") from None
    except ValueError:
        raise ValueError(f"{text!r} is neither +30s/+5m/+2h/+1d nor an ISO 8601 time") from None


def _parse_param(text: str) -> tuple[str, Any]:
    """``KEY=JSON``; a value that is not JSON is taken as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{text!r} is not KEY=VALUE")
    try:
        return key.strip(), json.loads(raw)
    except ValueError:
        return key.strip(), raw


def _format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines
    )


def _command_settings(args: argparse.Namespace) -> Settings:
    flags = {key: getattr(args, key, None) for key in ("api", "token", "tenant_id", "labels", "hostname_label",
                                                         "local_label", "flow_dirs", "pool", "work_queues")}
    return resolve_settings(flags)


def _cmd_start(args: argparse.Namespace) -> int:
    flags = {key: value for key, value in vars(args).items() if key not in ("func", "command")}
    settings = resolve_settings(flags)
    _run_from_compiled_copy(settings)
    return LocalAgent(settings).start()


#: ``install``'s own flags; every other one is a ``start`` flag the service passes on.
_INSTALL_FLAGS = {"--write": True, "--user": False, "--token-file": True}
#: The flags of secrets: never copied onto a service's command line (``-tTOKEN`` included).
_TOKEN_FLAGS = ("-t", "--token", "-k", "--key", "--ui-token")
#: How much longer than ``--grace`` a service manager waits before it kills the agent: the
#: agent needs the grace for its flows, then time to stop them and hand back what is left.
_STOP_MARGIN_SECONDS = 30


def _cmd_install(args: argparse.Namespace) -> int:
    flags = {key: value for key, value in vars(args).items()
             if key not in ("func", "command", "manager", "write", "user", "token_file", "argv")}
    settings = resolve_settings(flags)  # the service's settings, checked now rather than at its first start
    passed_on = _start_flags(args.argv, args.manager)
    for key in settings.env:  # -e KEY VALUE as two words: checked by name here
        if _SECRET_NAME.search(key):
            raise ConfigError(f"{key} looks secret and would be written into the service's definition: give it to "
                              "the flows through their run config, or a file they read")
    environment = {"PREFECT__HOME_DIR": str(settings.home), "PYTHONUNBUFFERED": "1"}
    prefect_variables = {key: value for key, value in os.environ.items() if key.startswith("PREFECT__")}
    environment.update({key: value for key, value in prefect_variables.items()
                        if key not in environment and not _is_secret_variable(key)})
    left_out = sorted(key for key in prefect_variables if _is_secret_variable(key) and key not in
                      {_env_name(name) for name in ("cloud.agent.auth_token", "cloud.auth_token", "cloud.api_key")})
    if left_out:
        print(f"Not copied into the service, as they look secret: {', '.join(left_out)}", file=sys.stderr)
    secrets_file = _service_secrets(args, settings, environment)
    text = (_systemd_unit if args.manager == "systemd" else _supervisor_program)(
        settings, _service_command(passed_on), environment, secrets_file, args.user)
    if not args.write:
        print(text, end="")
        return 0
    try:
        with open(args.write, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise ConfigError(f"cannot write {args.write}: {exc.strerror or exc}") from None
    print(f"Wrote {args.write}; then: " + (
        f"systemctl {'--user ' if args.user else ''}daemon-reload && systemctl {'--user ' if args.user else ''}"
        f"enable --now {Path(args.write).stem}" if args.manager == "systemd" else "supervisorctl reread && "
        "supervisorctl update"))
    return 0


def _is_secret_variable(name: str) -> bool:
    """A variable whose value must not be written into a service definition others can read."""
    return bool(_SECRET_NAME.search(name))


def _start_flags(argv: Sequence[str], manager: str) -> list[str]:
    """The ``start`` flags in ``install``'s arguments, without install's own and without secrets."""
    kept, skip_value, manager_seen = [], False, False
    for arg in argv[1:]:  # after "install"
        if skip_value:
            skip_value = False
            continue
        name = arg.split("=", 1)[0]
        if arg == manager and not manager_seen:
            manager_seen = True
            continue
        if name in _TOKEN_FLAGS or name in _INSTALL_FLAGS:
            skip_value = "=" not in arg and (name in _TOKEN_FLAGS or _INSTALL_FLAGS[name])
            continue
        if arg[:2] in ("-t", "-k") and not arg.startswith("--"):  # -tTOKEN: the value is attached
            continue
        if arg.startswith(("-e", "--env=")):  # -eKEY=VALUE or --env=KEY=VALUE: the pair is attached
            _refuse_secret_env(arg)
        kept.append(arg)
    return kept


def _refuse_secret_env(arg: str) -> None:
    """``install`` puts ``-eKEY=VALUE`` on the service's command line: not a secret's."""
    pair = arg.split("=", 1)[1] if arg.startswith("--env=") else arg[2:]
    key = pair.split("=", 1)[0]
    if key and _SECRET_NAME.search(key):
        raise ConfigError(f"{key} looks secret and would be written into the service's definition: give it to the "
                          "flows through their run config, or a file they read")


def _service_command(start_flags: Sequence[str]) -> list[str]:
    """This agent's ``start`` as a service runs it: the console script, or this interpreter and file."""
    invoked = sys.argv[0] if sys.argv else ""
    if os.path.basename(invoked) == "local-agent" and os.path.isfile(invoked):
        return [os.path.abspath(invoked), "start", *start_flags]
    return [sys.executable, _source_file(), "start", *start_flags]


def _service_secrets(args: argparse.Namespace, settings: Settings, environment: dict[str, str]) -> str:
    """Where the service reads the token: the config file it came from, or ``--token-file``
    (written now, mode 600). Either must be readable by its owner only. "" when there is no token."""
    if not settings.token and not settings.ui_token:
        return ""
    if settings.ui_token and not args.token_file:
        raise ConfigError("the --ui-token must not go on the service's command line: give --token-file PATH, where "
                          "it is kept for the service (mode 600)")
    source = settings.sources.get("token", "")
    if settings.token and source.startswith("config file") and not args.token_file:
        _check_private(settings.config_path)
        environment["PREFECT__USER_CONFIG_PATH"] = os.path.abspath(settings.config_path)
        return ""
    if not args.token_file:
        raise ConfigError(f"the token (from {source}) must not go on the service's command line: give "
                          "--token-file PATH, where it is kept for the service (mode 600)")
    path = os.path.abspath(str(args.token_file))
    if os.path.exists(path):
        _check_private(path)
    else:
        secrets = {key: value for key, value in (("auth_token", settings.token), ("ui_token", settings.ui_token))
                   if value}
        content = "".join(f"{_env_name('cloud.agent.' + key)}={value}\n" for key, value in secrets.items()) \
            if args.manager == "systemd" else "[cloud.agent]\n" + "".join(
                f"{key} = {json.dumps(value)}\n" for key, value in secrets.items())
        try:
            with _private_open(Path(path), "w") as handle:
                handle.write(content)
        except OSError as exc:
            raise ConfigError(f"cannot write the token file {path}: {exc.strerror or exc}") from None
    if args.manager == "supervisor":  # supervisor has no environment files: a config file it is
        environment["PREFECT__USER_CONFIG_PATH"] = path
        return ""
    return path


def _check_private(path: str) -> None:
    """Refuse a file holding the token that its group or others may read."""
    try:
        mode = int(os.stat(path).st_mode)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise ConfigError(f"{path} holds the token but others may read it (mode {mode & 0o777:o}): "
                          f"chmod 600 {path}")


def _systemd_quote(word: str, *, expands_variables: bool = True) -> str:
    """One word of ``ExecStart=`` (or, without ``$`` expansion, ``Environment=``), quoted when it
    must be: systemd unquotes both, expands ``%`` specifiers, and ``$VARIABLES`` in ExecStart."""
    _refuse_newline(word)
    special = ' \t"\'\\%;' + ("$" if expands_variables else "")
    if word and not any(c in word for c in special):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped.replace("$", "$$") if expands_variables else escaped}"'


def _systemd_path(path: str) -> str:
    """A path for ``WorkingDirectory=`` or ``EnvironmentFile=``: systemd takes it raw, but for ``%``."""
    _refuse_newline(path)
    return path.replace("%", "%%")


def _refuse_newline(text: str) -> None:
    if "\n" in text or "\r" in text:
        raise ConfigError(f"{text!r} has a line break, which a service definition cannot hold")


def _systemd_unit(settings: Settings, command: Sequence[str], environment: Mapping[str, str], secrets_file: str,
                  user_unit: bool) -> str:
    """A systemd unit running the agent; stop waits longer than ``--grace`` and signals the agent only."""
    import getpass

    lines = [
        "# Written by `local_agent.py install systemd`. The agent drains on SIGTERM: it takes no new runs,",
        "# hands back what has not started and gives running flows --grace seconds. KillMode=process leaves",
        "# the flow runs to the agent, so a restarted agent adopts those an agent crash left running.",
        "[Unit]",
        f"Description=local_agent {settings.name} (labels {', '.join(settings.agent_labels()) or 'none'})",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
    ]
    if not user_unit:
        lines.append(f"User={getpass.getuser()}")
    lines.append(f"WorkingDirectory={_systemd_path(os.getcwd())}")
    lines += [f"Environment={_systemd_quote(f'{key}={value}', expands_variables=False)}"
              for key, value in sorted(environment.items())]
    if secrets_file:
        lines.append(f"EnvironmentFile={_systemd_path(secrets_file)}")
    lines += [
        "ExecStart=" + " ".join(_systemd_quote(word) for word in command),
        "Restart=on-failure",
        "RestartSec=5",
        "KillSignal=SIGTERM",
        "KillMode=process",
        f"TimeoutStopSec={math.ceil(settings.grace) + _STOP_MARGIN_SECONDS}",
        "",
        "[Install]",
        f"WantedBy={'default.target' if user_unit else 'multi-user.target'}",
    ]
    return "\n".join(lines) + "\n"


def _supervisor_program(settings: Settings, command: Sequence[str], environment: Mapping[str, str],
                        secrets_file: str, user_unit: bool) -> str:
    """A supervisord ``[program:…]`` section running the agent, as Prefect 1.x's ``agent local install``."""
    import getpass
    import shlex

    def value(text: str) -> str:  # supervisor expands %(name)s in values: double the %
        _refuse_newline(text)
        return text.replace("%", "%%")

    for key, item in environment.items():
        if '"' in item:  # supervisor's environment= has no way to quote a quote
            raise ConfigError(f"{key}'s value has a double quote, which supervisor's environment= cannot hold")

    environment_text = ",".join(f'{key}="{value(item)}"' for key, item in sorted(environment.items()))
    lines = [
        "; Written by `local_agent.py install supervisor`. The agent drains on SIGTERM and stops its",
        "; flow runs itself after --grace, so only the agent is signalled (stopasgroup=false).",
        f"[program:local-agent-{slugify(settings.name)}]",
        f"command={value(shlex.join(command))}",
        f"directory={value(os.getcwd())}",
        f"environment={environment_text}",
        "autostart=true",
        "autorestart=unexpected",
        "exitcodes=0",
        "startsecs=5",
        "stopsignal=TERM",
        f"stopwaitsecs={math.ceil(settings.grace) + _STOP_MARGIN_SECONDS}",
        "stopasgroup=false",
        "killasgroup=false",
        "redirect_stderr=true",
    ]
    if not user_unit:
        lines.insert(5, f"user={getpass.getuser()}")
    return "\n".join(lines) + "\n"


def _cmd_ui(args: argparse.Namespace) -> int:
    flags = {key: getattr(args, key, None) for key in ("api", "token", "tenant_id", "ui_token")}
    settings = resolve_settings(flags)
    address = args.address
    dashboard = _Dashboard(settings, mode="ui", on_loopback=_is_loopback(_address_host(address)))
    logger = logging.getLogger(__name__)
    with _backend_for(None, None, settings) as backend:  # a bad API or database fails here, in one line
        backend.list_flows()
    server = _serve_http(address, dashboard, logger)
    print(f"Dashboard of the {dashboard._location()} at {address.rstrip('/')}/ (Ctrl-C stops it)"
          + ("" if dashboard.can_write else "; read-only: give --ui-token to create and cancel runs"), flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        server.shutdown()
        server.server_close()


def _cmd_execute_flow_run(args: argparse.Namespace | None) -> int:
    if threading.current_thread() is threading.main_thread():  # (tests call this in a thread too)
        _default_signal_handlers()
    return _execute_flow_run(resolve_settings({}))


def _cmd_execute_template(args: argparse.Namespace) -> int:
    request = _serve_template(args.modules, args.requests_fd, args.replies_fd)
    if request is None:
        return 0  # the template, once its agent has gone
    if request.get("module"):  # a forked child of a run the API says how to start: `python -m MODULE`
        import runpy

        try:
            runpy.run_module(str(request["module"]), run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return 0
    return _cmd_execute_flow_run(None)  # a forked child: from here on, as a fresh ``execute flow-run``


def _cmd_run(args: argparse.Namespace) -> int:
    settings = _command_settings(args)
    parameters = {**(_read_param_file(args.param_file) if args.param_file else {}), **dict(args.params or [])}
    run_id = create_flow_run(
        args.flow,
        parameters,
        labels=args.run_labels,
        scheduled_start_time=args.at,
        name=args.name,
        idempotency_key=args.idempotency_key,
        api=settings.api,
        token=settings.token,
    )
    print(run_id, flush=True)
    if not args.watch:
        return 0
    with _backend_for(None, None, settings) as backend:
        return _watch_run(backend, run_id, settings)


def _program_name() -> str:
    """This program as the user invoked it, for usage lines and hints: ``local-agent``,
    ``local_agent.py`` or ``python -m local_agent``."""
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if invoked == "__main__.py" or not invoked or invoked == "-c":
        return "python -m local_agent"
    if invoked.endswith(".pyc"):  # the compiled copy the agent re-executes: name the source
        return os.path.basename(os.environ.get("LOCAL_AGENT_SOURCE", "local_agent.py"))
    return invoked


def _read_param_file(path: str) -> dict[str, Any]:
    """``--param-file``: a JSON object of parameters."""
    try:
        with open(path, encoding="utf-8") as handle:
            parameters = json.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read the parameter file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"the parameter file {path} is not JSON: {exc}") from None
    if not isinstance(parameters, dict):
        raise ConfigError(f"the parameter file {path} must hold a JSON object of parameters, like {{\"day\": 1}}")
    return parameters


def _watch_run(backend: Backend, run_id: str, settings: Settings) -> int:
    """``run --watch``: follow a run to its final state, its log as it comes; 0 on Success.

    While nobody has claimed it, say so every WATCH_NOTE_SECONDS, with what ``why`` says."""
    shown, seen_state, quiet_since = 0, "", time.monotonic()
    next_note = time.monotonic() + WATCH_NOTE_SECONDS
    while True:
        run = backend.get_flow_run(run_id)
        if run is None:
            raise AgentError(f"flow run {run_id} has gone from the {backend.location}")
        if run.state != seen_state:
            print(f"{run.name or run_id} is {run.state}" + (f": {run.state_message}" if run.state_message else ""),
                  flush=True)
            seen_state = run.state
        lines = backend.get_run_logs(run_id, shown)
        for line in lines:
            print(f"{run.name or run_id} | {_format_log_line(line)}", flush=True)
        shown += len(lines)
        if lines:
            quiet_since = time.monotonic()
        if is_final(run.state) and time.monotonic() - quiet_since > FOLLOW_LULL_SECONDS:
            return 0 if run.state == "Success" else 1
        if run.state in SCHEDULED_STATES and time.monotonic() >= next_note:
            reasons = _explain_run(run, settings.agent_labels(), settings.trusted_flow_dirs)
            print(f"{run.name or run_id} is not claimed yet: " + ("an agent here would take it; is one running "
                  f"(`{_program_name()} start`)?" if not reasons else "an agent here would not: " + "; ".join(reasons)),
                  flush=True)
            next_note = time.monotonic() + WATCH_NOTE_SECONDS
        time.sleep(0.5)


def _cmd_runs(args: argparse.Namespace) -> int:
    with _backend_for(None, None, _command_settings(args)) as backend:
        flow_name = _flow_named(backend, args.flow) if args.flow is not None else None
        # Enough to order well: the ones a person looks for first may not be the newest scheduled.
        fetched = backend.list_flow_runs(flow_name=flow_name, state=args.state, limit=max(args.count * 5, 200))
    runs = _as_people_look_for_them(fetched)[:args.count]
    if args.output == "json":
        return _print_json([_run_json(run) for run in runs])
    rows = [(run.id, run.name or "-", run.flow_name, run.state, _short_time(run.scheduled_start_time),
             _short_time(run.updated)) for run in runs]
    print(_format_table(("ID", "NAME", "FLOW", "STATE", "SCHEDULED (UTC)", "UPDATED (UTC)"), rows))
    return 0


def _as_people_look_for_them(runs: Sequence[FlowRun], now: datetime | None = None) -> list[FlowRun]:
    """Running ones first, then the most recent first, then the upcoming ones, soonest first."""
    now = now or _utcnow()
    active = [run for run in runs if run.state in ("Submitted", "Running", "Cancelling")]
    upcoming = [run for run in runs if run.state in SCHEDULED_STATES and run.start_time > now]
    rest = [run for run in runs if run not in active and run not in upcoming]

    def when(run: FlowRun) -> datetime:
        return run.scheduled_start_time or run.start_time

    return [*sorted(active, key=when, reverse=True), *sorted(rest, key=when, reverse=True),
            *sorted(upcoming, key=when)]


def _cmd_status(args: argparse.Namespace) -> int:
    home = resolve_settings({}).home
    agents = [_agent_status(folder) for folder in sorted((home / "agents").glob("*/")) if (folder / "lock").exists()]
    if args.output == "json":
        return _print_json(agents)
    if not agents:
        print(f"No agent has run with home directory {home}")
        return 0
    rows = [(agent["name"], "running" if agent["running"] else "stopped", str(agent["pid"] or "-"),
             (agent["started"] or "-").replace("T", " ").replace("+00:00", " UTC"), str(agent["runs"]),
             "-" if agent["last_poll_seconds_ago"] is None else _duration_text(agent["last_poll_seconds_ago"]) + " ago",
             str(agent["undelivered"]), agent["api"] or "-") for agent in agents]
    print(_format_table(("NAME", "STATE", "PID", "SINCE", "RUNS", "LAST POLL", "SPOOL", "API"), rows))
    return 0


def _agent_status(folder: Path) -> dict[str, Any]:
    """One agent directory: who it is, whether it runs, and what its ``/api/status`` or its files say."""
    try:
        identity = json.loads((folder / "agent.json").read_text())
    except (OSError, ValueError):
        identity = {}
    running = _lock_is_held(folder / "lock")
    live: dict[str, Any] = {}
    if running and identity.get("agent_address"):
        import urllib.request

        with contextlib.suppress(OSError, ValueError):
            url = identity["agent_address"].rstrip("/") + "/api/status"
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the agent is here, not via a proxy
            with opener.open(url if "://" in url else "http://" + url, timeout=5) as answer:
                live = json.loads(answer.read())
    try:
        ledger = json.loads((folder / "ledger.json").read_text())
    except (OSError, ValueError):
        ledger = {}
    spooled = _spool_pending(folder / "spool.jsonl")
    return {
        "name": identity.get("name") or folder.name, "directory": str(folder), "running": running,
        "pid": identity.get("pid") if running else None, "started": identity.get("started"),
        "labels": identity.get("labels") or [], "api": identity.get("api") or "",
        "agent_address": identity.get("agent_address") or None,
        "runs": len(live["running"]) if "running" in live else len(ledger.get("runs") or {}),
        "last_poll_seconds_ago": live.get("last_poll_seconds_ago"),
        "undelivered": live.get("undelivered", spooled), "api_problem": live.get("api_problem") or None,
    }


def _spool_pending(path: Path) -> int:
    """How many writes a spool holds that were not delivered: its entries less its "sent" counts."""
    entries = sent = 0
    try:
        with open(path, encoding="utf-8") as spool:
            for line in spool:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, dict) and entry.get("k") == "sent":
                        sent += int(entry.get("c") or 0)
                    else:
                        entries += 1
    except OSError:
        return 0
    return max(0, entries - sent)


def _lock_is_held(path: Path) -> bool:
    """Whether an agent holds this lock file now (a stale file from a dead agent is not held)."""
    if fcntl is None:
        return False
    try:
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def _print_json(value: Any) -> int:
    """``--output json``: one JSON document on stdout."""
    print(json.dumps(value, indent=2, sort_keys=True, default=str))
    return 0


def _find_run(backend: Backend, given: str) -> FlowRun:
    """The run ``given`` names: its id, a start of its id that only it has, or its name (among the
    newest RUN_LOOKUP_LIMIT runs)."""
    text = given.strip()
    if re.fullmatch(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", text):
        run = backend.get_flow_run(text.lower())
        if run is not None:
            return run
    matches = [run for run in backend.list_flow_runs(limit=RUN_LOOKUP_LIMIT)
               if text and (run.id.startswith(text.lower()) or run.name == text)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise AgentError(f"there is no flow run {given!r} in the {backend.location}: give its id, the start of "
                         "its id, or its name (`runs` lists them)")
    named = ", ".join(f"{run.id} ({run.name})" for run in matches[:5])
    more = ", ..." if len(matches) > 5 else ""
    raise AgentError(f"{given!r} could be any of {len(matches)} flow runs ({named}{more}): give more of its id")


def _cmd_schedule(args: argparse.Namespace) -> int:
    with _backend_for(None, None, _command_settings(args)) as backend:
        name = _flow_named(backend, args.flow)
        flow = backend.find_flow(name)
        if flow is None:
            raise AgentError(f"no flow named {args.flow!r} is registered in the {backend.location} "
                             f"(`{_program_name()} flows` lists them)")
        if args.off or args.on:
            if not backend.set_schedule_active(flow, bool(args.on)):
                raise AgentError(f"flow {name!r} has no schedule to turn on: give it one with --cron or --every")
            if args.off:
                print(f"Schedule of flow {name} is off; its future scheduled runs are deleted")
                return 0
        elif args.cron or args.every:
            schedule = Schedule([_clock_from_args(args)])
            if _next_run(schedule, True) is None:
                raise AgentError(f"the schedule never fires: {schedule.describe()} matches no time in the next "
                                 "50 years")
            _check_schedule_parameters(flow, schedule)
            backend.set_schedule(flow, schedule)
        flow = backend.find_flow(name) or flow
    print(_schedule_text(flow, upcoming=SCHEDULED_RUNS_AHEAD // 2))
    return 0


def _clock_from_args(args: argparse.Namespace) -> CronClock | IntervalClock:
    """The clock ``schedule --cron`` or ``--every`` describes; ValueError is shown as a usage error."""
    zone = args.timezone or _local_zone_name()
    parameters = dict(args.params or [])
    try:
        return _clock_for(args, zone, parameters)
    except ValueError as exc:
        raise AgentError(str(exc)) from None


def _clock_for(args: argparse.Namespace, zone: str, parameters: dict[str, Any]) -> CronClock | IntervalClock:
    if args.cron:
        if args.anchor:
            raise AgentError("--anchor goes with --every; a cron schedule is anchored by its expression")
        return CronClock(args.cron, zone, parameter_defaults=parameters)
    # With no anchor an interval counts from midnight, 2019-01-01, in its zone (Prefect's start),
    # so "every 1h" runs on the hour; a Server counts from when the schedule is set.
    return IntervalClock(args.every, anchor=args.anchor, timezone=zone, parameter_defaults=parameters)


def _check_schedule_parameters(flow: FlowSummary, schedule: Schedule) -> None:
    """Refuse a schedule whose runs would lack a required parameter or name an unknown one."""
    for clock in schedule.clocks:
        try:
            _check_parameters(flow, clock.parameter_defaults)
        except AgentError as exc:
            raise AgentError(f"the schedule's runs would be refused: {exc}") from None


def _schedule_text(flow: FlowSummary, upcoming: int = 0) -> str:
    """What a flow's schedule is and, when it is on, when its next runs are."""
    schedule = _flow_schedule(flow)
    if schedule is None:
        return f"Flow {flow.name} has no schedule"
    text = f"Flow {flow.name} runs on {schedule.describe()}" + ("" if flow.schedule_active else " (off)")
    if flow.schedule_active and upcoming:
        zone = _zoneinfo(schedule.clocks[0].timezone)
        try:
            events = schedule.next(upcoming)
        except Exception as exc:  # one the API holds and we cannot follow
            return text + f"\nNext runs: cannot tell ({_one_line(str(exc))})"
        times = [event.start_time.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %Z") for event in events]
        text += "\nNext runs: " + (", ".join(times) or "none")
    return text


def _local_zone_name() -> str:
    """This machine's time zone as an IANA name (``TZ``, else /etc/localtime's link), else UTC."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    with contextlib.suppress(OSError):
        candidates.append(os.path.realpath("/etc/localtime").partition("zoneinfo/")[2].removeprefix("posix/"))
    for name in candidates:
        with contextlib.suppress(ValueError):
            if name:
                return _check_timezone(name)
    return "UTC"


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(w|d|h|min|m|s)", re.IGNORECASE)


def _ui_address(text: str) -> str:
    """``ui --address``: a URL with a port."""
    import argparse  # loaded already: the parser is calling

    try:
        return _as_address(text, "--address")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _timezone_name(text: str) -> str:
    """``--timezone``: an IANA zone name this machine knows."""
    return _argument(_check_timezone, text.strip())


def _cron_expression(text: str) -> str:
    """``--cron``: an expression Prefect accepts (the error names the bad field)."""
    _argument(parse_cron, text)
    return text


def _argument(check: Callable[[str], _T], text: str) -> _T:
    """Run a check on a command-line value; its ValueError becomes argparse's usage error, word for word."""
    import argparse  # loaded already: the parser is calling

    try:
        return check(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``1h30m``, ``1d``, ``2w`` (or plain seconds): a positive duration."""
    return _argument(_duration, text)


def _duration(text: str) -> timedelta:
    compact = text.strip().lower()
    units = {"w": 604800, "d": 86400, "h": 3600, "min": 60, "m": 60, "s": 1}
    try:
        seconds = float(compact)
    except ValueError:
        parts = _DURATION_PART.findall(compact)
        if not parts or _DURATION_PART.sub("", compact).strip():
            raise ValueError(f"{text!r} is not a duration; use 90s, 15m, 1h30m, 1d or 2w") from None
        seconds = sum(float(number) * units[unit] for number, unit in parts)
    if not 1e-6 <= seconds <= _LONGEST_INTERVAL.total_seconds():
        raise ValueError(f"{text!r} is not a duration from 1 µs to 100 years")
    return timedelta(seconds=seconds)


def _flow_named(backend: Backend, name: str) -> str:
    """The registered flow ``name`` means: its own name, or the one whose slug it is."""
    flows = backend.list_flows()
    if any(flow.name == name for flow in flows):
        return name
    return next((flow.name for flow in flows if slugify(flow.name) == name), name)


#: Every state a flow run can be in, for ``runs --state`` (any case).
_STATE_NAMES = sorted(SCHEDULED_STATES | FINAL_STATES | {"Pending", "Submitted", "Running", "Cancelling",
                                                         "ClientFailed", "Completed"})  # Completed: Prefect 2/3's


def _state_name(text: str) -> str:
    """A state's name in Prefect's spelling, whatever the case (``failed`` -> ``Failed``)."""
    import argparse  # loaded already: the parser is calling

    found = next((name for name in _STATE_NAMES if name.lower() == text.strip().lower()), None)
    if found is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a state; use one of {', '.join(_STATE_NAMES)}")
    return found


def _cmd_flows(args: argparse.Namespace) -> int:
    with _backend_for(None, None, _command_settings(args)) as backend:
        flows = backend.list_flows()
    now = _utcnow()
    listed = [_flow_json(flow, now) for flow in flows]
    if args.output == "json":
        return _print_json(listed)
    rows = []
    for flow, shown in zip(flows, listed):
        files = flow.storage.get("flows", {}) if isinstance(flow.storage, dict) else {}
        path = files.get(flow.name, "-") if isinstance(files, dict) else "-"
        described = (shown["schedule"] + ("" if flow.schedule_active else " (off)")) if shown["schedule"] else "-"
        next_run = _parse_time(shown["next_run"]) if shown["next_run"] else None
        rows.append((flow.name, str(flow.version), flow.project, ", ".join(flow.labels) or "-", described,
                     _short_time(next_run), str(path)))
    print(_format_table(("NAME", "VERSION", "PROJECT", "LABELS", "SCHEDULE", "NEXT RUN (UTC)", "FLOW FILE"), rows))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    with _backend_for(None, None, _command_settings(args)) as backend:
        run: FlowRun | None = _find_run(backend, args.run_id)
        run_id = run.id if run else ""
        shown, quiet_since = 0, time.monotonic()
        while True:
            finished = run is None or is_final(run.state)
            lines = backend.get_run_logs(run_id, shown)
            for line in lines:
                if args.output == "json":  # one object per line, so --follow can stream them
                    print(json.dumps({"timestamp": line.timestamp, "level": line.level, "name": line.name,
                                      "message": line.message}, sort_keys=True), flush=True)
                else:
                    print(_format_log_line(line), flush=True)
            shown += len(lines)
            if lines:
                quiet_since = time.monotonic()
            # The last lines may reach the API a moment after the final state: wait for a lull.
            if not args.follow or (finished and time.monotonic() - quiet_since > FOLLOW_LULL_SECONDS):
                return 0
            time.sleep(0.5)
            run = backend.get_flow_run(run_id)


def _cmd_delete(args: argparse.Namespace) -> int:
    with _backend_for(None, None, _command_settings(args)) as backend:
        if args.what == "run":
            run = _find_run(backend, args.target)
            if run.state in ("Submitted", "Running", "Cancelling"):
                raise AgentError(f"flow run {run.id} is {run.state}: cancel it first (`{_program_name()} cancel "
                                 f"{run.id}`), then delete it")
            backend.delete_flow_run(run.id)
            print(f"Deleted flow run {run.id} ({run.name})")
            return 0
        name = _flow_named(backend, args.target)
        archived = 0
        flow = backend.find_flow(name)
        while flow is not None and archived < 10_000:  # every version; bounded, as every loop is
            backend.archive_flow(flow.id)
            archived += 1
            flow = backend.find_flow(name)
        if not archived:
            raise AgentError(f"no flow named {args.target!r} is registered in the {backend.location} "
                             f"(`{_program_name()} flows` lists them)")
    print(f"Deleted flow {name} ({archived} version(s) archived; its Scheduled runs are cancelled)")
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    with _backend_for(None, None, _command_settings(args)) as backend:
        run = _find_run(backend, args.run_id)
        if is_final(run.state):
            raise AgentError(f"flow run {run.id} has already finished ({run.state}); there is nothing to cancel")
        state = backend.cancel_flow_run(run.id)
    print(state)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    with _backend_for(None, None, _command_settings(args)) as backend:
        run = _find_run(backend, args.run_id)
        facts = _run_facts(backend, run)
    states, log_lines = facts["states"], facts["log_lines"]
    if args.output == "json":
        return _print_json(facts)
    print(f"Flow run {run.id} ({run.name or 'no name'})")
    version = f", version {facts['flow_version']}" if facts["flow_version"] else ""
    for key, value in (("flow", f"{run.flow_name} ({run.flow_id}{version})"), ("state", run.state),
                       ("labels", ", ".join(run.labels) or "-"), ("parameters", json.dumps(run.parameters)),
                       ("scheduled", f"{_short_time(run.scheduled_start_time)} UTC"),
                       ("claimed by", facts["claimed_by"] or "-"), ("log lines", str(log_lines)),
                       ("message", run.state_message or "-")):
        print(f"  {key + ':':<12}{value}")
    print("  states:")
    for state in states:
        took = _duration_text(state["seconds"]) if state["seconds"] is not None else ""
        print(f"    {state['timestamp']}  {state['state']:<10} {took:>11}  {state['message']}".rstrip())
    return 0


def _explain_run(run: FlowRun, agent_labels: Sequence[str], trusted_dirs: Sequence[str],
                 now: datetime | None = None, routing: list[str] | None = None) -> list[str]:
    """Why an agent with ``agent_labels`` on this host would not take ``run`` (empty: it would);
    ``routing``: the API's own reasons, where it routes runs itself (see Backend.routing_reasons)."""
    now = now or _utcnow()
    reasons = []
    if run.state not in SCHEDULED_STATES:
        reasons.append(f"it is {run.state}, not Scheduled")
    if routing is not None:
        reasons += routing
    else:
        mismatch = _label_mismatch(run.labels, agent_labels)
        if mismatch:
            reasons.append(mismatch)
    if run.start_time > now:
        due_in = _duration_text((run.start_time - now).total_seconds())
        reasons.append(f"it is not due yet: due in {due_in} at {_short_time(run.start_time)} UTC")
    if routing is None:  # where the API says how to run a run, no flow file is looked for
        problem = _why_not_here(run, trusted_dirs, {"prefect", "cloudpickle"}, [os.getcwd()])  # --python not known
        if problem:
            reasons.append(problem)
    return reasons


def _cmd_why(args: argparse.Namespace) -> int:
    settings = _command_settings(args)
    labels = settings.agent_labels()
    with _backend_for(None, None, settings) as backend:
        runs = [_find_run(backend, args.run_id)] if args.run_id else backend.list_flow_runs(state="Scheduled",
                                                                                            limit=100)
        explained = [(run, _explain_run(run, labels, settings.trusted_flow_dirs,
                                        routing=backend.routing_reasons(run))) for run in runs]
    if args.output == "json":
        return _print_json({"agent_labels": labels, "pool": settings.pool, "work_queues": settings.work_queues,
                            "host": _hostname(), "runs": [{**_run_json(run), "would_run": not reasons,
                                                           "reasons": reasons} for run, reasons in explained]})
    if settings.pool or isinstance(backend, RESTBackend):
        queues = ", ".join(settings.work_queues) or "every queue"
        print(f"An agent serving work pool {settings.pool or '(give --pool)'} ({queues}) on {_hostname()}:")
    else:
        print(f"An agent with labels {labels} on {_hostname()}:")
    if not runs:
        print("  there are no Scheduled flow runs.")
    for run, reasons in explained:
        verdict = "would run it" if not reasons else "would not run it: " + "; ".join(reasons)
        print(f"  {run.id} ({run.flow_name}, labels {run.labels}): {verdict}")
    return 0


def _nonnegative_int(text: str) -> int:
    """A whole number from 0 to a million (``runs --limit``)."""
    if not re.fullmatch(r"\d{1,7}", text.strip()) or int(text) > 1_000_000:
        raise ValueError(text)
    return int(text)


def _flag_type(convert: Callable[[Any, str], Any], what: str) -> Callable[[str], str]:
    """An argparse ``type`` that checks a flag's value the way its setting is checked."""

    def parse(text: str) -> str:
        import argparse  # loaded already: the parser is calling

        try:
            convert(text, "the value")
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text  # resolve_settings converts it again, from the one place that does

    parse.__name__ = what
    return parse


#: What a flag's value is called in an error ("invalid whole number value: 'x'").
_FLAG_VALUE_NAMES: dict[Callable[[Any, str], Any], str] = {
    _as_positive: "whole number", _as_number: "number of seconds", _as_timeout: "number of seconds", _as_api: "URL",
    _as_level: "level", _as_address: "address", _as_path: "path", _split_env_pair: "KEY=VALUE", _as_token: "token",
    _as_name: "name", _as_module: "module",
}
#: The settings every command that talks to an API takes (the rest are ``start``'s alone).
_BACKEND_OPTIONS = ("api", "token", "tenant_id")


def _add_option(parser: argparse.ArgumentParser, option: _Option) -> None:
    """Add a setting's flags to a command, from its one declaration in _OPTIONS."""
    shown = _default_text(option).replace("`", "")
    help_text = option.help + (f" (default: {shown})" if option.action == "store" and shown != "none" else "")
    if option.action in ("true", "false"):
        parser.add_argument(*option.flags, dest=option.name, action=f"store_{option.action}", default=None,
                            help=help_text)
        return
    check = option.check_item or (option.convert if option.action == "store" else None)
    if check is None or check is _as_str:  # any text will do
        parser.add_argument(*option.flags, dest=option.name, action=option.action, help=help_text)
        return
    kind = _flag_type(check, _FLAG_VALUE_NAMES.get(check, "value"))
    parser.add_argument(*option.flags, dest=option.name, action=option.action, type=kind, help=help_text)


def _build_parser(wanted: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser. With ``wanted``, only that command gets its arguments: building
    them all costs an agent's start-up tens of milliseconds, and every other command is listed."""
    import argparse  # only the command line parses arguments

    def wants(name: str) -> bool:
        return wanted is None or wanted == name

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:  # one line, exit 2
            self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    _nonnegative_int.__name__ = "whole number"
    _parse_when.__name__ = "time"
    _parse_param.__name__ = "KEY=JSON"
    _parse_duration.__name__ = "duration"
    _timezone_name.__name__ = "time zone"
    _cron_expression.__name__ = "cron expression"
    options = {option.name: option for option in _OPTIONS}

    parser = Parser(prog=_program_name(), description="A Prefect-style Local Agent in one file.")
    parser.add_argument("--version", action="version", version=f"local_agent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True

    def command(name: str, help_text: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        """A command that talks to an API: it takes the API, token and tenant flags."""
        sub = commands.add_parser(name, help=help_text)
        sub.set_defaults(func=func)
        if wants(name):
            sub.add_argument("--version", action="version", version=f"local_agent {__version__}")
            for option_name in _BACKEND_OPTIONS:
                _add_option(sub, options[option_name])
        return sub

    start = command("start", "start the agent", _cmd_start)
    if wants("start"):
        for option in _OPTIONS:
            if option.flags and option.name not in _BACKEND_OPTIONS:
                _add_option(start, option)
        start.add_argument("-v", "--verbose", dest="level", action="store_const", const="DEBUG",
                           help="same as --log-level DEBUG")
        start.add_argument("--once", action="store_true", default=None,
                           help="run what is due now, wait for it, exit 0 if all succeeded")

    execute = commands.add_parser("execute", help="internal: what the agent runs in each flow-run process")
    if wants("execute"):
        execute_commands = execute.add_subparsers(dest="what", metavar="flow-run", parser_class=Parser)
        execute_commands.required = True
        flow_run = execute_commands.add_parser("flow-run",
                                               help="run the flow run named by PREFECT__CONTEXT__FLOW_RUN_ID")
        flow_run.set_defaults(func=_cmd_execute_flow_run)
        template = execute_commands.add_parser("template", help="the warm process of --preload, forking flow runs")
        template.add_argument("requests_fd", type=int, help="the pipe the agent's requests come on")
        template.add_argument("replies_fd", type=int, help="the pipe the answers go back on")
        template.add_argument("modules", nargs="*", metavar="MODULE", help="a module to import before forking")
        template.set_defaults(func=_cmd_execute_template)

    run = command("run", "create a flow run and print its id", _cmd_run)
    if wants("run"):
        run.add_argument("flow", metavar="FLOW", help="flow name")
        run.add_argument("--param", dest="params", action="append", type=_parse_param, help="KEY=JSON (repeatable)")
        run.add_argument("--param-file", metavar="FILE", help="a JSON object of parameters (--param wins over it)")
        run.add_argument("--name", help="the run's name (default: a readable one, like jolly-koala)")
        run.add_argument("--idempotency-key", metavar="KEY",
                         help="a run created again with the same key is the same run (for retrying scripts)")
        run.add_argument("--watch", action="store_true",
                         help="follow the run and its log to its final state; exit 0 on Success, else 1")
        run.add_argument("--label", dest="run_labels", action="append", help="run label (default: the flow's)")
        run.add_argument("--at", type=_parse_when, help="when: ISO 8601, or +30s, +5m, +2h (default: now)")

    def output_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--output", "-o", choices=("table", "json"), default="table",
                            help="table (default), or json with the keys the README lists")

    runs = command("runs", "list flow runs", _cmd_runs)
    if wants("runs"):
        output_option(runs)
        runs.add_argument("--flow", help="only this flow's runs (its name or its slug)")
        runs.add_argument("--state", type=_state_name, help="only runs in this state, e.g. Failed (any case)")
        runs.add_argument("--limit", dest="count", type=_nonnegative_int, default=20,
                          help="how many (default: %(default)s)")

    logs = command("logs", "print a flow run's log", _cmd_logs)
    if wants("logs"):
        logs.add_argument("run_id", metavar="RUN", help="the run's id, the start of it, or its name")
        output_option(logs)
        logs.add_argument("--follow", action="store_true", help="keep printing until the run is finished")

    output_option(command("flows", "list registered flows", _cmd_flows))

    inspect = command("inspect", "show a flow run: parameters, labels, states and how long each lasted, ...",
                      _cmd_inspect)
    if wants("inspect"):
        inspect.add_argument("run_id", metavar="RUN", help="the run's id, the start of it, or its name")
        output_option(inspect)

    why = command("why", "explain whether an agent here would take Scheduled runs", _cmd_why)
    if wants("why"):
        why.add_argument("run_id", metavar="RUN", nargs="?", help="the run's id, the start of it, or its name")
        output_option(why)
        _add_option(why, options["labels"]._replace(help="the agent's label (repeatable)"))
        _add_option(why, options["hostname_label"])
        _add_option(why, options["local_label"])
        _add_option(why, options["flow_dirs"])
        _add_option(why, options["pool"]._replace(help="the work pool the agent serves (a Prefect 2/3 API)"))
        _add_option(why, options["work_queues"]._replace(help="a work queue the agent takes runs from (repeatable)"))

    schedule = command("schedule", "show, set or turn off a flow's schedule", _cmd_schedule)
    if wants("schedule"):
        schedule.add_argument("flow", metavar="FLOW", help="flow name")
        when = schedule.add_mutually_exclusive_group()
        when.add_argument("--cron", metavar="EXPR", type=_cron_expression,
                          help="a cron expression, e.g. '0 9 * * 1-5' or @daily")
        when.add_argument("--every", metavar="DURATION", type=_parse_duration, help="an interval: 90s, 15m, 1h30m, 1d")
        when.add_argument("--off", action="store_true", help="turn the schedule off and delete its future runs")
        when.add_argument("--on", action="store_true", help="turn the schedule on again")
        schedule.add_argument("--timezone", metavar="TZ", type=_timezone_name,
                              help="the zone the times are in, e.g. Europe/Berlin (default: this machine's)")
        schedule.add_argument("--anchor", metavar="WHEN", type=_parse_when,
                              help="with --every: a time the intervals count from (default: midnight 2019-01-01)")
        schedule.add_argument("--param", dest="params", action="append", type=_parse_param,
                              help="KEY=JSON for the scheduled runs (repeatable)")

    delete = command("delete", "delete a flow (archived, as Prefect Server does) or a flow run", _cmd_delete)
    if wants("delete"):
        delete.add_argument("what", choices=("flow", "run"), help="flow or run")
        delete.add_argument("target", metavar="NAME", help="the flow's name, or the run's id (the start of it) or name")

    install = commands.add_parser("install", help="print (or --write) a systemd unit or supervisor program for start",
                                  allow_abbrev=False)
    if wants("install"):
        install.add_argument("manager", choices=("systemd", "supervisor"), help="the service manager")
        install.add_argument("--version", action="version", version=f"local_agent {__version__}")
        install.add_argument("--write", metavar="PATH", help="write it there instead of printing it")
        install.add_argument("--user", action="store_true", help="a user unit (systemctl --user), run as you")
        install.add_argument("--token-file", metavar="PATH",
                             help="where the service reads the token (written, mode 600, if it does not exist)")
        for option in _OPTIONS:
            if option.flags:
                _add_option(install, option)
        install.set_defaults(func=_cmd_install)

    ui = command("ui", "serve the dashboard for this API or database, with no agent running", _cmd_ui)
    if wants("ui"):
        ui.add_argument("--address", default="http://127.0.0.1:8080", type=_ui_address,
                        help="where to serve it (default: %(default)s)")
        _add_option(ui, options["ui_token"])

    status = commands.add_parser("status", help="the agents of this home directory: running, runs, last poll, spool")
    if wants("status"):
        output_option(status)
        status.add_argument("--version", action="version", version=f"local_agent {__version__}")
        status.set_defaults(func=_cmd_status)

    cancel = command("cancel", "cancel a flow run", _cmd_cancel)
    if wants("cancel"):
        cancel.add_argument("run_id", metavar="RUN", help="the run's id, the start of it, or its name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    if __name__ == "__main__":
        # `import local_agent` inside a flow must find this very module, not a second copy.
        sys.modules.setdefault("local_agent", sys.modules[__name__])
    if list(sys.argv[1:] if argv is None else argv) == ["execute", "flow-run"]:
        return _guarded(_cmd_execute_flow_run, None)  # every run starts here: skip argparse
    arguments = list(sys.argv[1:] if argv is None else argv)
    wanted = arguments[0] if arguments and not arguments[0].startswith("-") else None
    args = _build_parser(wanted).parse_args(arguments)
    args.argv = arguments  # install passes the start flags on as they were written
    if args.func not in (_cmd_execute_flow_run, _cmd_execute_template) and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_AGENT_FORMAT))
        handler.set_name(_COMMAND_LINE_HANDLER)
        logging.getLogger().addHandler(handler)
    return _guarded(args.func, args)


def _guarded(command: Callable[[Any], int], args: argparse.Namespace | None) -> int:
    """Run a command; an AgentError becomes one line on stderr and its exit code."""
    try:
        return int(command(args))
    except AgentError as exc:
        token = getattr(args, "token", None)  # settings may not have resolved: the flag, and the environment
        redact = _Redactor([*([token] if isinstance(token, str) and token else []), *_inherited_secrets(os.environ)])
        print(redact(f"local_agent: error: {exc}"), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("local_agent: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `logs RUN | head`: the reader has gone; end quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's last flush cannot fail again
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
