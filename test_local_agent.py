"""Tests for local_agent: real subprocesses, real HTTP on 127.0.0.1, real SQLite files.

Run with ``python -m pytest -q`` from the repository root. The agent runs as a real process
(``python local_agent.py start ...``) against either the embedded SQLite backend or the
Prefect Server 1.x double (``prefect_double.py``, tested on its own in
``test_prefect_double.py``), which follows Server's semantics (label rule, version bumps, the
30 s duplicate-Submitted guard, no version locking).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import importlib
import io
import itertools
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Callable

import pytest

import local_agent as la  # the module under test; a vendoring project changes only this line
from prefect_double import PrefectServerDouble

AGENT = Path(la.__file__).resolve()
HOST = la._hostname()
TOKEN = "s3cr3t-t0ken-value"

# The flows the tests run. The module lives in a directory the flow-run processes import
# from (the agent's working directory), like a user's project.
FLOWS_SOURCE = '''
import os
import sys
import time

import local_agent


def hello(name="world"):
    local_agent.context["logger"].info("Hello, %s!", name)
    print("printed by the flow")


def fail():
    raise ValueError("boom from the flow")


def show_env(key="FLOW_ENV"):
    local_agent.context["logger"].info("%s=%s", key, os.environ.get(key))


def show_context():
    context = local_agent.context
    context["logger"].info("run=%s flow=%s name=%s params=%s", context["flow_run_id"],
                           context["flow_id"], context["flow_name"], context["parameters"])


def sleep(seconds=1.0):
    time.sleep(seconds)


def import_extra():
    import extra_module
    local_agent.context["logger"].info("extra says %s", extra_module.VALUE)


def exit_code(code=3):
    sys.exit(code)


def hard_exit(code=7):
    print("about to exit hard", flush=True)
    os._exit(code)


def kill_self(signal_number=9):
    print("about to be killed", flush=True)
    os.kill(os.getpid(), signal_number)


def record_start(path):
    with open(path, "a") as handle:
        handle.write("%r\\n" % time.time())


def noop():
    pass


def segfault():
    import ctypes
    ctypes.string_at(0)


def interval(path, seconds=0.5):
    start = time.time()
    time.sleep(seconds)
    with open(path, "a") as handle:
        handle.write("%r %r\\n" % (start, time.time()))


def spawn_and_sleep(pid_file, seconds=60):
    import subprocess
    child = subprocess.Popen(["sleep", "120"])  # in the flow's process group
    with open(pid_file, "w") as handle:
        handle.write("%d %d" % (os.getpid(), child.pid))
    time.sleep(seconds)


def talk_slowly(seconds=3.0):
    print("before the wait", flush=True)
    local_agent.context["logger"].info("logged before the wait")
    time.sleep(seconds)
    print("after the wait", flush=True)


def orphan_maker(pid_file):
    import subprocess
    orphan = subprocess.Popen(["sleep", "1.5"])  # outlives the flow-run process
    with open(pid_file, "w") as handle:
        handle.write(str(orphan.pid))


def leak_secrets():
    token = os.environ.get("PREFECT__CLOUD__AUTH_TOKEN", "")
    secret = os.environ.get("MY_SECRET", "")
    print("x" * (16 * 1024 - 5) + token)  # the token across the cut of a long line
    sys.stdout.write("y" * (40 * 1024 - 7) + secret)  # and a secret in a line without an end yet
    sys.stdout.flush()
    time.sleep(0.3)
    print()
    local_agent.context["logger"].info("logging %s", secret)
    raise RuntimeError("token " + token + " secret " + secret)


_CALLS = []  # module state: a forked run must start with the template's copy, never a sibling's


def identify(path):
    import json
    import random
    import signal
    _CALLS.append(1)
    with open("/proc/%d/cmdline" % os.getppid(), "rb") as parent:
        parent_command = parent.read().split(b"\\0")
    facts = {"pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0), "calls": len(_CALLS),
             "random": random.random(), "cwd": os.getcwd(), "stdin": os.readlink("/proc/self/fd/0"),
             "stdout": os.readlink("/proc/self/fd/1"), "stderr": os.readlink("/proc/self/fd/2"),
             "sigint": signal.getsignal(signal.SIGINT).__name__,
             "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
             "argv": sys.argv[1:], "parent": [part.decode() for part in parent_command],
             "run_id": os.environ["PREFECT__CONTEXT__FLOW_RUN_ID"]}
    with open(path, "a") as handle:
        handle.write(json.dumps(facts) + "\\n")
    print("identified", flush=True)
    print("identified on stderr", file=sys.stderr, flush=True)


def show_version():
    import versioned
    local_agent.context["logger"].info("version %s", versioned.VALUE)


def flaky(path, failures=2):
    with open(path, "a") as handle:
        handle.write("attempt\\n")
    with open(path) as handle:
        attempt = len(handle.read().splitlines())
    if attempt <= failures:
        raise RuntimeError("failing on attempt %d" % attempt)


def needs(day):
    local_agent.context["logger"].info("day %s", day)


def takes_anything(**options):
    local_agent.context["logger"].info("options %s", sorted(options))


def ignore_sigterm(seconds=60):
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ignoring SIGTERM", flush=True)
    time.sleep(seconds)
'''


@pytest.fixture(scope="session")
def flows_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project directory with the ``test_flows`` module, importable by this process."""
    folder = tmp_path_factory.mktemp("project")
    (folder / "test_flows.py").write_text(FLOWS_SOURCE)
    sys.path.insert(0, str(folder))
    return folder


@pytest.fixture
def test_flows(flows_dir: Path) -> Any:
    return importlib.import_module("test_flows")


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An environment without PREFECT__* settings (nor Prefect 2/3's), with a private home and config path."""
    for key in list(os.environ):
        if key.startswith("PREFECT__") or key in ("LOCAL_AGENT_COLLECTS_LOGS", "PREFECT_API_URL", "PREFECT_API_KEY"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT__HOME_DIR", str(home))
    return dict(os.environ)


def run_cli(*args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 60,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``python local_agent.py ARGS`` and capture its output."""
    result = subprocess.run(
        [sys.executable, str(AGENT), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


class JumpingClock(la._Clock):
    """The agent's clock, which tests may move forward; flow-run processes keep real time."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def now(self) -> datetime:
        return datetime.now(timezone.utc) + timedelta(seconds=self.offset)


class IdleSkippingAgent(la.LocalAgent):
    """The real agent, except that a wait with no flow-run process running passes at once.

    Poll backoff and API retries then cost no time, while flow runs, their deadlines and the
    grace period keep real time. The agent gives up (failing the test) after ``budget`` s.
    """

    budget = 60.0

    def __init__(self, settings: la.Settings | None = None, **options: Any) -> None:
        super().__init__(settings, clock=JumpingClock(), **options)
        self._give_up_at = time.monotonic() + self.budget

    def _wait(self, timeout: float) -> None:
        if time.monotonic() > self._give_up_at:
            raise AssertionError(f"the agent did not finish within {self.budget:g} s")
        if self.book.jobs or self._stop.is_set():
            super()._wait(timeout)
            return
        # Nothing is running: let the wait pass at once, once the API writes queued so far are
        # delivered (a real wait gives the outbox's thread that time too).
        patience = time.monotonic() + min(timeout, 2.0)
        while self._api_writes().pending and time.monotonic() < patience:
            time.sleep(0.005)
        assert isinstance(self.clock, JumpingClock)
        self.clock.offset += timeout
        self._wake.clear()


def run_in_process(argv: list[str], *, env: dict[str, str], cwd: Path,
                   timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``local_agent ARGV`` through ``main()`` in this process, as its own process would run.

    The environment, working directory and logging are the command's own for the call: its
    output is captured as a real process's would be, and everything is put back afterwards.
    """
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_environ, saved_cwd = dict(os.environ), os.getcwd()
    loggers = {name: (logger.level, logger.handlers[:]) for name, logger in
               [("", logging.getLogger()), *logging.Logger.manager.loggerDict.items()]
               if isinstance(logger, logging.Logger)}
    IdleSkippingAgent.budget = timeout
    real_agent = la.LocalAgent
    try:
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        logging.getLogger().handlers.clear()  # as in a fresh process: main() attaches its own
        logging.getLogger().setLevel(logging.WARNING)
        la.LocalAgent = IdleSkippingAgent  # type: ignore[misc]
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = la.main(argv)
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        la.LocalAgent = real_agent  # type: ignore[misc]
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_environ)
        for name, logger in [("", logging.getLogger()), *logging.Logger.manager.loggerDict.items()]:
            if isinstance(logger, logging.Logger):
                level, handlers = loggers.get(name, (logging.NOTSET, []))
                logger.setLevel(level)
                logger.handlers[:] = handlers
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


class World:
    """One backend (embedded or the Prefect double) with helpers to seed and read it."""

    def __init__(self, kind: str, tmp_path: Path, env: dict[str, str], flows_dir: Path,
                 server: Any = None, warm: bool = False) -> None:
        self.kind = kind
        #: Whether its agents fork runs from a warm template (``--preload local_agent``).
        self.warm = warm
        self.start_args = ("--preload", "local_agent") if warm else ()
        self.env = env
        self.cwd = flows_dir
        self.storage_dir = tmp_path / "home" / "flows"
        self.server = server
        if kind == "sqlite":
            self.api = f"sqlite:///{tmp_path / 'home' / 'local_agent.db'}"
            self.db = la.SQLiteBackend(la._sqlite_path(self.api))
            self.project = self.db.ensure_project("tests")
        else:
            self.api = server.url

    def flow(self, fn: Any, name: str | None = None, labels: tuple[str, ...] = ("test",),
             storage: Any = "local", **options: Any) -> str:
        """Store ``fn`` as a flow (``options`` for Flow) and register it; return the flow id."""
        flow = la.Flow(name or fn.__name__, fn, **options)
        path = la.store_flow(flow, self.storage_dir)
        if storage == "local":
            storage = la.local_storage(flow.name, path)
        if self.kind == "sqlite":
            serialized = la.serialize_flow(flow, path, list(labels))
            serialized["storage"] = storage
            return self.db.register_flow(self.project, serialized)
        return str(self.server.add_flow(flow.name, storage, labels=list(labels)))

    def run(self, flow_id: str, *, labels: list[str] | None = None, parameters: dict[str, Any] | None = None,
            at: datetime | None = None) -> str:
        """Schedule a run; return its id."""
        if self.kind == "sqlite":
            return self.db.create_flow_run(flow_id, parameters=parameters or {}, labels=labels,
                                           scheduled_start_time=at, idempotency_key=os.urandom(8).hex())
        return str(self.server.add_flow_run(flow_id, labels=labels, parameters=parameters, scheduled_start_time=at))

    def state(self, run_id: str) -> str:
        if self.kind == "sqlite":
            run = self.db.get_flow_run(run_id)
            assert run is not None
            return run.state
        return str(self.server.run(run_id)["state"])

    def message(self, run_id: str) -> str:
        if self.kind == "sqlite":
            run = self.db.get_flow_run(run_id)
            assert run is not None
            return run.state_message or ""
        return str(self.server.run(run_id).get("state_message") or "")

    def history(self, run_id: str) -> list[str]:
        """The run's state types, oldest first."""
        if self.kind == "sqlite":
            rows = self.db._read("SELECT state FROM flow_run_state WHERE flow_run_id = ? ORDER BY version", (run_id,))
            return [row[0] for row in rows]
        return [state["type"] for state in self.server.states(run_id)]

    def logs(self, run_id: str) -> list[str]:
        if self.kind == "sqlite":
            return [line.message for line in self.db.get_run_logs(run_id)]
        return [log["message"] for log in self.server.logs(run_id)]

    def agent(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60,
              real: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``start --api API -l test --no-hostname-label ARGS`` to completion.

        In this process through ``main()``, with idle waits passing at once (see
        run_in_process), or with ``real=True`` as its own process on the real clock.
        """
        argv = ["start", "--api", self.api, "-l", "test", "--no-hostname-label", *self.start_args, *args]
        if real:
            result = run_cli(*argv, env=env or self.env, cwd=self.cwd, timeout=timeout)
        else:
            result = run_in_process(argv, env=env or self.env, cwd=self.cwd, timeout=timeout)
        if self.warm:  # its runs really were forked from the template
            assert "Flow runs fork from a warm process" in result.stderr, result.stderr
            assert "fresh interpreter" not in result.stderr, result.stderr
        return result

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()


@pytest.fixture
def server() -> Iterator[Any]:
    with PrefectServerDouble() as double:
        yield double


@pytest.fixture(params=["sqlite", "graphql"])
def world(request: pytest.FixtureRequest, tmp_path: Path, clean_env: dict[str, str],
          flows_dir: Path) -> Iterator[World]:
    """Each agent behaviour test runs against the embedded backend and the Prefect double
    (and, where a test asks with WARM_TOO, with runs forked from a warm template)."""
    kind, _, warm = request.param.partition("+")
    if kind == "sqlite":
        yield World("sqlite", tmp_path, clean_env, flows_dir, warm=bool(warm))
        return
    with PrefectServerDouble() as double:
        yield World("graphql", tmp_path, clean_env, flows_dir, double, warm=bool(warm))


#: For the tests of what a flow-run process is and how it ends: also with ``--preload``, whose
#: runs are forks of a warm template, which must keep every one of these guarantees.
WARM_TOO = pytest.mark.parametrize("world", ["sqlite", "graphql", "sqlite+warm", "graphql+warm"], indirect=True)


# --- Settings ------------------------------------------------------------------------------


def write_config(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(text))
    path.chmod(0o600)
    monkeypatch.setenv("PREFECT__USER_CONFIG_PATH", str(path))
    return path


def test_settings_precedence_is_flag_then_environment_then_config(
    clean_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path, """
        [cloud]
        api = "http://127.0.0.1:1/config"
        [cloud.agent]
        name = "from-config"
        labels = ["c1", "c2"]
        level = "WARNING"
    """, monkeypatch)
    settings = la.resolve_settings()
    assert (settings.api, settings.name, settings.labels, settings.level) == (
        "http://127.0.0.1:1/config", "from-config", ["c1", "c2"], "WARNING")
    monkeypatch.setenv("PREFECT__CLOUD__AGENT__NAME", "from-env")
    monkeypatch.setenv("PREFECT__CLOUD__AGENT__LABELS", '["e1"]')
    settings = la.resolve_settings()
    assert (settings.name, settings.labels) == ("from-env", ["e1"])
    settings = la.resolve_settings({"name": "from-flag", "labels": ["f1", "f1", "f2"]})
    assert (settings.name, settings.labels) == ("from-flag", ["f1", "f2"])
    assert settings.sources["name"] == "the --name flag"
    monkeypatch.setenv("PREFECT__CLOUD__AGENT__LABELS", "etl, daily")  # as people write it, too
    assert la.resolve_settings().labels == ["etl", "daily"]
    monkeypatch.setenv("PREFECT__CLOUD__AGENT__PRELOAD", "prefect,project.flows")
    assert la.resolve_settings().preload == ["prefect", "project.flows"]


def test_token_order_and_its_source_without_its_value(
    clean_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path, """
        [cloud]
        api_key = "key-from-config"
        auth_token = "token-from-config"
    """, monkeypatch)
    settings = la.resolve_settings()
    assert settings.token == "token-from-config"  # cloud.auth_token before cloud.api_key
    assert settings.sources["token"] == f"config file {config} (cloud.auth_token)"
    assert settings.api == la.PREFECT_CLOUD_API  # a token and no API: Prefect Cloud
    monkeypatch.setenv("PREFECT__CLOUD__API_KEY", "key-from-env")
    assert la.resolve_settings().token == "key-from-env"
    monkeypatch.setenv("PREFECT__CLOUD__AGENT__AUTH_TOKEN", "agent-token-from-env")
    assert la.resolve_settings().token == "agent-token-from-env"
    flagged = la.resolve_settings({"token": "from-flag"})
    assert flagged.token == "from-flag" and flagged.sources["token"] == "the --token flag"
    assert "from-flag" not in repr(flagged)


def test_no_token_and_no_api_means_the_embedded_database(clean_env: dict[str, str], tmp_path: Path) -> None:
    settings = la.resolve_settings()
    assert settings.api == f"sqlite:///{tmp_path / 'home' / 'local_agent.db'}"
    assert isinstance(la.open_backend(settings), la.SQLiteBackend)


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("PREFECT__CLOUD__AGENT__LABELS", "[oops", "must be a literal like"),
    ("PREFECT__CLOUD__AGENT__LABELS", "[1, 2]", "must be a list of strings"),
    ("PREFECT__CLOUD__AGENT__LEVEL", "LOUD", "must be one of DEBUG"),
    ("PREFECT__CLOUD__AGENT__LIMIT", "-1", "must be a whole number"),
    ("PREFECT__CLOUD__AGENT__MAX_POLLS", "0", "must be a whole number >= 1"),
    ("PREFECT__CLOUD__AGENT__AGENT_ADDRESS", "localhost", "needs a port"),
    ("PREFECT__HOME_DIR", "/dev/null/home", "cannot create"),
    ("PREFECT__CLOUD__AGENT__TIMEOUT", "soon", "must be a number"),
    ("PREFECT__CLOUD__AGENT__SHOW_FLOW_LOGS", "maybe", "must be true or false"),
    ("PREFECT__CLOUD__API", "ftp://host", "is not a valid API URL"),
    ("PREFECT__CLOUD__API", "sqlite://", "is not a valid API URL"),
])
def test_bad_settings_give_one_clear_line(clean_env: dict[str, str], variable: str, value: str,
                                          message: str) -> None:
    result = run_cli("start", "--once", env={**clean_env, variable: value})
    assert result.returncode == 1
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_config_path_naming_no_file_is_ignored_as_prefect_ignores_it(clean_env: dict[str, str]) -> None:
    result = run_cli("flows", env={**clean_env, "PREFECT__USER_CONFIG_PATH": "/nonexistent/config.toml"})
    assert result.returncode == 0, result.stderr


def test_without_the_local_label_an_agent_takes_unlabelled_runs_as_prefects_does(
    world: World, test_flows: Any
) -> None:
    unlabelled = world.run(world.flow(test_flows.hello, name="unlabelled", labels=()))
    assert world.agent("--once").returncode == 0
    assert world.state(unlabelled) == "Scheduled"  # an agent with labels never takes it
    bare = run_in_process(["start", "--api", world.api, "--once", "--no-local-label", "--no-hostname-label"],
                          env=world.env, cwd=world.cwd)
    assert bare.returncode == 0, bare.stderr
    assert "Starting LocalAgent with labels []" in bare.stderr
    assert world.state(unlabelled) == "Success"


def test_bad_config_files_give_one_clear_line(clean_env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[cloud\napi = ")
    env = {**clean_env, "PREFECT__USER_CONFIG_PATH": str(config)}
    result = run_cli("runs", env=env)
    assert result.returncode == 1 and f"config file {config} is not valid TOML" in result.stderr
    config.unlink()
    config.mkdir()
    result = run_cli("runs", env=env)
    assert result.returncode == 1 and f"cannot read config file {config}" in result.stderr
    assert all(len(r.splitlines()) == 1 for r in (result.stderr,))


def test_config_without_a_toml_parser_names_the_fix(
    clean_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path, "[cloud]\napi = 'http://127.0.0.1:1'\n", monkeypatch)
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.9 and 3.10 ...
    monkeypatch.setitem(sys.modules, "tomli", None)  # ... without tomli installed
    with pytest.raises(la.ConfigError, match="pip install tomli"):
        la.resolve_settings()


def test_token_is_not_sent_in_clear_text_off_this_machine(clean_env: dict[str, str]) -> None:
    remote = la.resolve_settings({"api": "http://prefect.example.com:4200", "token": TOKEN})
    with pytest.raises(la.ConfigError, match="refusing to send the token over plain http"):
        la.open_backend(remote)
    allowed = la.resolve_settings({"api": "http://prefect.example.com:4200", "token": TOKEN,
                                   "allow_insecure_http": True})
    assert isinstance(la.open_backend(allowed), la.GraphQLBackend)
    assert isinstance(la.open_backend(la.resolve_settings({"api": "http://127.0.0.1:9", "token": TOKEN})),
                      la.GraphQLBackend)
    for host in ("127.evil.com", "127.0.0.1.nip.io", "localhost.example.com", "[::ffff:8.8.8.8]"):
        spoofed = la.resolve_settings({"api": f"http://{host}:4200", "token": TOKEN})
        with pytest.raises(la.ConfigError, match="refusing to send the token over plain http"):
            la.open_backend(spoofed)
    for host in ("localhost", "127.4.5.6", "[::1]"):  # only these literal forms are this machine
        here = la.resolve_settings({"api": f"http://{host}:9", "token": TOKEN})
        assert isinstance(la.open_backend(here), la.GraphQLBackend), host


@pytest.mark.parametrize("token", ["abc\r\nX-Injected: 1", "abc\ndef", "tökén-€"])
def test_a_token_that_cannot_be_a_header_is_one_clear_line_that_never_shows_it(
    clean_env: dict[str, str], token: str
) -> None:
    for where in ("flag", "env"):
        args = ["flows", "--api", "http://127.0.0.1:9"] + (["-t", token] if where == "flag" else [])
        env = {**clean_env, "PREFECT__CLOUD__API_KEY": token} if where == "env" else clean_env
        result = run_cli(*args, env=env)
        assert result.returncode in (1, 2), result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "the token given by" in result.stderr
        assert "abc" not in result.stderr and "tök" not in result.stderr  # not even part of it


def test_an_agent_id_the_api_sends_with_a_line_break_is_not_used_in_a_header(
    api_world: World, test_flows: Any
) -> None:
    run_id = api_world.run(api_world.flow(test_flows.hello))
    api_world.server.fail_next(1, only_root="register_agent", status=200,
                               body=b'{"data": {"register_agent": {"id": "x\\r\\nX-Evil: 1"}}}')
    result = api_world.agent("--once")
    assert result.returncode == 0, result.stderr
    assert "the agent id it gave contains a line break" in result.stderr and "Traceback" not in result.stderr
    assert api_world.state(run_id) == "Success"


def test_config_file_with_a_token_readable_by_others_is_warned_about(
    clean_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_config(tmp_path, "[cloud]\napi_key = 'k'\napi = 'http://127.0.0.1:9'\n", monkeypatch)
    config.chmod(0o644)
    la.open_backend(la.resolve_settings())
    assert f"chmod 600 {config}" in caplog.text and "'k'" not in caplog.text


# --- Flow storage ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "slug"), [
    ("My Flow! v1", "my-flow-v1"),
    ("Bob's flow", "bob-s-flow"),
    ("ETL: daily/__run__", "etl-daily-run"),
    ("Çafé  naïve", "cafe-naive"),
    ("a_b.c", "a-b-c"),
    ("2019-11-11T13:26:41.443000+00:00", "2019-11-11t13-26-41-443000-00-00"),
    ("1,000 rows &amp; more", "1000-rows-more"),
    ("Straße", "strasse"),
])
def test_slugify_matches_python_slugify(name: str, slug: str) -> None:
    assert la.slugify(name) == slug


def test_two_flows_whose_names_give_one_file_name_never_run_each_other(
    world: World, test_flows: Any, flows_dir: Path
) -> None:
    first = la.Flow("Pay Salaries", test_flows.hello)
    path = la.store_flow(first, world.storage_dir)
    assert la.store_flow(first, world.storage_dir) == path  # the same flow again is fine
    with pytest.raises(la.FlowStorageError, match="holds flow 'Pay Salaries', whose name gives the same file name"):
        la.store_flow(la.Flow("pay-salaries", test_flows.fail), world.storage_dir)
    # A file that holds another flow (stored before the index existed, or by hand) is refused at run time.
    storage = la.local_storage("pay-salaries", path)
    if world.kind == "sqlite":
        serialized = {**la.serialize_flow(la.Flow("pay-salaries", test_flows.fail), path, ["test"]), "storage": storage}
        flow_id = world.db.register_flow(world.project, serialized)
    else:
        flow_id = str(world.server.add_flow("pay-salaries", storage, labels=["test"]))
    run_id = world.run(flow_id)
    world.agent("--once")
    assert world.state(run_id) == "Failed"
    assert "holds flow 'Pay Salaries', not 'pay-salaries'" in world.message(run_id)
    assert "Hello, world!" not in world.logs(run_id)  # the other flow never ran


def test_store_and_load_a_flow(tmp_path: Path, test_flows: Any) -> None:
    flow = la.Flow("My Flow! v1", test_flows.hello, labels=["x"])
    path = flow.store(tmp_path)
    assert path == str(tmp_path / "my-flow-v1.prefect")
    loaded = la.load_flow(path, tmp_path)
    assert isinstance(loaded, la.Flow) and loaded.name == "My Flow! v1" and loaded.labels == ["x"]
    assert loaded.fn is test_flows.hello


def test_load_refuses_files_outside_the_storage_directory(tmp_path: Path, test_flows: Any) -> None:
    inside = tmp_path / "flows"
    path = la.store_flow(la.Flow("f", test_flows.hello), tmp_path / "elsewhere")
    with pytest.raises(la.FlowStorageError, match="outside the storage directory"):
        la.load_flow(path, inside)
    (inside).mkdir()
    (inside / "link.prefect").symlink_to(path)  # a link out of the directory does not count
    with pytest.raises(la.FlowStorageError, match="outside the storage directory"):
        la.load_flow(inside / "link.prefect", inside)


def test_corrupt_and_missing_flow_files_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.prefect").write_bytes(b"\x80\x04garbage")
    with pytest.raises(la.FlowStorageError, match="is corrupt or unreadable here"):
        la.load_flow(tmp_path / "bad.prefect", tmp_path)
    with pytest.raises(la.FlowStorageError, match=f"does not exist on host {HOST}"):
        la.load_flow(tmp_path / "none.prefect", tmp_path)


def test_lambdas_and_nested_functions_cannot_be_stored(tmp_path: Path) -> None:
    with pytest.raises(la.FlowStorageError, match="lambda or nested function"):
        la.store_flow(la.Flow("l", lambda: None), tmp_path)

    def nested() -> None:
        pass

    with pytest.raises(la.FlowStorageError, match="define it with `def` at the top level"):
        la.store_flow(la.Flow("n", nested), tmp_path)
    with pytest.raises(la.FlowStorageError, match="has no `name`"):
        la.store_flow(object(), tmp_path)
    assert not list(tmp_path.iterdir())


def test_flows_defined_in_a_script_are_stored_by_reference_to_it(tmp_path: Path, clean_env: dict[str, str]) -> None:
    script = tmp_path / "my_script.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(AGENT.parent)!r})
        import local_agent

        class Greeter:
            def __call__(self, name="script"):
                local_agent.context["logger"].info("greetings, %s", name)

        @local_agent.Flow("scripted")
        def scripted(name="script"):
            Greeter()(name)

        if __name__ == "__main__":
            print(scripted.store())
            print(local_agent.store_flow(Greeter.__new__(Greeter) if False else scripted, sys.argv[1]))
    """))
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "other")], env=clean_env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    stored = Path(result.stdout.split()[0])
    assert stored == tmp_path / "home" / "flows" / "scripted.prefect"
    assert str(script).encode() in stored.read_bytes()  # a reference to the script, not __main__
    stdin = subprocess.run([sys.executable, "-"], input=script.read_text(), env=clean_env,
                           capture_output=True, text=True, timeout=60)
    assert stdin.returncode != 0
    assert "define it in a .py file" in stdin.stderr


def test_changed_code_makes_a_new_version_and_a_run_says_when_its_code_changed(embedded: World,
                                                                               tmp_path: Path) -> None:
    script = tmp_path / "versioned_flow.py"
    source = textwrap.dedent("""
        import sys
        import local_agent

        @local_agent.Flow("versioned", labels=["test"])
        def versioned():
            print("running version", VALUE)

        VALUE = 1

        if __name__ == "__main__":
            print(versioned.deploy("P", api=sys.argv[1]))
    """)
    script.write_text(source)
    env = {**embedded.env, "PYTHONPATH": str(AGENT.parent)}

    def deploy() -> int:
        subprocess.run([sys.executable, str(script), embedded.api], env=env, cwd=tmp_path, check=True,
                       capture_output=True, timeout=60)
        return int(json.loads(run_cli("flows", "-o", "json", "--api", embedded.api, env=env,
                                      check=True).stdout)[0]["version"])

    assert deploy() == 1
    assert deploy() == 1  # the same code: the same version
    run_id = run_cli("run", "versioned", "--label", "test", "--api", embedded.api, env=env, check=True).stdout.strip()
    script.write_text(source.replace("VALUE = 1", "VALUE = 2"))
    assert embedded.agent("--once").returncode == 0
    logs = embedded.logs(run_id)
    assert "running version 2" in logs
    assert any("changed since this version of the flow was deployed" in line for line in logs), logs
    assert deploy() == 2  # deployed again with the change: a new version
    again = run_cli("run", "versioned", "--label", "test", "--api", embedded.api, env=env, check=True).stdout.strip()
    assert embedded.agent("--once").returncode == 0
    assert not any("changed since" in line for line in embedded.logs(again))


def test_a_script_without_its_main_guard_is_told_to_add_it_and_runs_nothing_twice(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(AGENT.parent)!r})
        import local_agent

        @local_agent.Flow("unguarded")
        def unguarded():
            pass

        unguarded.deploy("P")  # the mistake: no `if __name__ == "__main__":`
        local_agent.create_flow_run("unguarded")
        sys.exit(unguarded.run_agent(once=True))
    """))
    result = subprocess.run([sys.executable, str(script)], env=clean_env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    runs = la.list_flow_runs(api=f"sqlite:///{tmp_path / 'home' / 'local_agent.db'}")
    assert len(runs) == 1 and runs[0].state == "Failed"  # the import made no second run
    assert runs[0].state_message == (f"the flow's script {script} calls deploy() when it is imported: guard the "
                                     'script\'s side effects with `if __name__ == "__main__":`')


# --- Agent behaviour, on both backends ----------------------------------------------------


@WARM_TOO
def test_flow_run_goes_from_scheduled_to_success_with_its_logs(world: World, test_flows: Any) -> None:
    run_id = world.run(world.flow(test_flows.hello), parameters={"name": "tests"})
    result = world.agent("--once")
    assert result.returncode == 0, result.stderr
    assert world.history(run_id) == ["Pending", "Scheduled", "Submitted", "Running", "Success"]
    logs = world.logs(run_id)
    assert logs[0].startswith("Claimed by agent agent (") and logs[0].endswith(f") on {HOST}")
    assert logs[1].startswith("Submitted for execution: PID: ")
    pid = logs[1].split()[-1]
    assert logs[-1] == f"Flow-run process PID {pid} exited with code 0"
    assert "Hello, tests!" in logs
    assert "printed by the flow" in logs
    assert f"Deploying flow run {run_id}" in result.stderr
    assert "Found 1 flow run(s) to submit for execution." in result.stderr
    assert "Starting LocalAgent with labels ['test', 'local']" in result.stderr
    assert "Waiting for flow runs..." in result.stderr
    assert "Agent successfully connected to" in result.stderr
    assert "|___/" in result.stdout  # the banner


def test_raising_flow_ends_failed_with_the_error(world: World, test_flows: Any) -> None:
    run_id = world.run(world.flow(test_flows.fail))
    result = world.agent("--once")
    assert result.returncode == 1  # --once: not every run succeeded
    assert world.state(run_id) == "Failed"
    assert world.message(run_id) == "ValueError: boom from the flow"
    assert any("Traceback" in line and "boom from the flow" in line for line in world.logs(run_id))


def test_run_whose_labels_the_agent_lacks_stays_scheduled(world: World, test_flows: Any) -> None:
    run_id = world.run(world.flow(test_flows.hello, labels=("test", "gpu")))
    unlabeled = world.run(world.flow(test_flows.hello, name="unlabeled", labels=()))
    result = world.agent("--once")
    assert result.returncode == 0
    assert world.state(run_id) == "Scheduled"
    assert world.state(unlabeled) == "Scheduled"  # only an agent with no labels takes it


def test_non_local_storage_is_left_for_an_agent_that_can_run_it(world: World, test_flows: Any) -> None:
    storage = {"type": "S3", "bucket": "b", "flows": {"hello": "s3://b/hello"}, "__version__": "1.4.1"}
    run_id = world.run(world.flow(test_flows.hello, storage=storage))
    result = world.agent("--once")
    assert world.history(run_id) == ["Pending", "Scheduled"]  # never claimed
    assert f"Leaving flow run {run_id} to another agent: flow 'hello' uses S3 storage; this agent runs only " \
           "Local storage" in result.stderr


def test_a_run_left_to_others_is_looked_at_again_and_taken_once_it_can_run_here(
    embedded: World, test_flows: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    flow_id = embedded.flow(test_flows.hello)
    stored = (embedded.storage_dir / "hello.prefect").read_bytes()
    (embedded.storage_dir / "hello.prefect").unlink()
    run_id = embedded.run(flow_id)
    agent = stepped_agent(embedded, monkeypatch)
    try:
        drive(agent, lambda: agent.book.phase(run_id) == la.REFUSED)
        (embedded.storage_dir / "hello.prefect").write_bytes(stored)  # the flow is stored here after all
        drive(agent, lambda: False, budget=0.5, must=False)
        assert embedded.state(run_id) == "Scheduled"  # not looked at again at once...
        assert isinstance(agent.clock, JumpingClock)
        agent.clock.offset += la.REFUSED_RECHECK_SECONDS  # ...but a minute later
        drive(agent, lambda: embedded.state(run_id) == "Success")
    finally:
        agent.close()


def test_missing_flow_file_leaves_the_run_for_another_host(world: World, test_flows: Any) -> None:
    flow_id = world.flow(test_flows.hello)
    (world.storage_dir / "hello.prefect").unlink()
    run_id = world.run(flow_id)
    result = world.agent("--once")
    assert world.history(run_id) == ["Pending", "Scheduled"]  # left for the agent on the host that has the file
    assert f"does not exist on host {HOST}" in result.stderr
    assert result.stderr.count(f"Leaving flow run {run_id} to another agent") == 1


@WARM_TOO
def test_parameters_and_context_reach_the_flow(world: World, test_flows: Any) -> None:
    flow_id = world.flow(test_flows.show_context)
    run_id = world.run(flow_id, parameters={})
    world.agent("--once")
    assert f"run={run_id} flow={flow_id} name=show_context params={{}}" in world.logs(run_id)


def test_run_scheduled_ahead_starts_no_earlier_than_due(world: World, test_flows: Any, tmp_path: Path) -> None:
    marker = tmp_path / "started.txt"
    due = datetime.now(timezone.utc) + timedelta(seconds=2)
    run_id = world.run(world.flow(test_flows.record_start), parameters={"path": str(marker)}, at=due)
    # Its own process, on the real clock: polls at 0, 0.25 s, 0.75 s, so the run is prefetched.
    result = world.agent("--max-polls", "3", real=True)
    assert result.returncode == 0, result.stderr
    assert world.state(run_id) == "Success"
    started = float(marker.read_text().split()[0])
    assert started >= due.timestamp()
    assert started - due.timestamp() < 5.0  # prefetched: on time, give or take a loaded machine


@WARM_TOO
def test_env_flags_reach_the_flow_and_fixed_variables_win(world: World, test_flows: Any) -> None:
    run_id = world.run(world.flow(test_flows.show_env))
    world.agent("--once", "-e", "FLOW_ENV=a=b", "-e", "PREFECT__CONTEXT__FLOW_RUN_ID=hijack")
    assert "FLOW_ENV=a=b" in world.logs(run_id)  # split on the first "=" only
    assert world.state(run_id) == "Success"  # the fixed run id won over --env


@WARM_TOO
def test_import_path_reaches_the_flow(world: World, test_flows: Any, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "extra_module.py").write_text("VALUE = 42\n")
    run_id = world.run(world.flow(test_flows.import_extra))
    world.agent("--once", "-p", str(extra))
    assert "extra says 42" in world.logs(run_id)


def test_show_flow_logs_streams_flow_output(world: World, test_flows: Any) -> None:
    world.run(world.flow(test_flows.hello))
    shown = world.agent("--once", "-f")
    assert "Hello, world!" in shown.stdout and "printed by the flow" in shown.stdout
    name = la.list_flow_runs(api=world.api)[0].name
    assert f"{name} | printed by the flow" in shown.stdout.splitlines()  # whose line it is
    world.run(world.flow(test_flows.hello))
    quiet = world.agent("--once")
    assert "Hello, world!" not in quiet.stdout


#: The keys ``--output json`` promises (the README lists them).
FLOW_KEYS = {"id", "name", "version", "project", "labels", "storage", "schedule", "schedule_active", "next_run"}
RUN_KEYS = {"id", "name", "flow_name", "flow_id", "state", "state_message", "labels", "parameters",
            "scheduled_start_time", "updated", "version"}


def test_runs_are_found_by_name_or_id_prefix_and_inspected_in_text_and_json(world: World, test_flows: Any) -> None:
    flow_id = world.flow(test_flows.hello)
    run_ids = [world.run(flow_id, parameters={"name": f"n{n}"}) for n in range(17)]
    assert world.agent("--once").returncode == 0

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_in_process([*args, "--api", world.api], env=world.env, cwd=world.cwd)

    listed = json.loads(cli("runs", "-o", "json", "--limit", "100").stdout)
    assert {run["id"] for run in listed} == set(run_ids) and all(set(run) == RUN_KEYS for run in listed)
    names = {run["id"]: run["name"] for run in listed}
    assert all(re.fullmatch(r"[a-z]+-[a-z]+", name) for name in names.values()), names  # adjective-animal
    run_id = run_ids[0]
    unique = next(length for length in range(1, 37) if sum(other.startswith(run_id[:length]) for other in run_ids) == 1)
    for given in (run_id, run_id[:unique], names[run_id]) if list(names.values()).count(names[run_id]) == 1 \
            else (run_id, run_id[:unique]):
        facts = json.loads(cli("inspect", given, "-o", "json").stdout)
        assert facts["id"] == run_id and set(facts) >= RUN_KEYS, given
    assert [state["state"] for state in facts["states"]] == ["Pending", "Scheduled", "Submitted", "Running", "Success"]
    assert all(isinstance(state["seconds"], float) for state in facts["states"][:-1])
    assert facts["states"][-1]["seconds"] is None and facts["parameters"] == {"name": "n0"}
    assert facts["log_lines"] == len(world.logs(run_id)) and facts["claimed_by"].startswith("agent agent (")
    text = cli("inspect", run_id[:unique]).stdout
    assert f"Flow run {run_id} ({names[run_id]})" in text and "Success" in text and '"name": "n0"' in text
    # Seventeen ids, sixteen hex digits: some first digit is shared, and names more than one run.
    shared = next(digit for digit in "0123456789abcdef" if sum(r.startswith(digit) for r in run_ids) > 1)
    ambiguous = cli("logs", shared)
    assert ambiguous.returncode == 1 and "could be any of" in ambiguous.stderr and "give more of its id" in \
        ambiguous.stderr
    missing = cli("cancel", "no-such-run")
    assert missing.returncode == 1 and "there is no flow run 'no-such-run'" in missing.stderr
    lines = [json.loads(line) for line in cli("logs", run_id[:unique], "-o", "json").stdout.splitlines()]
    assert sorted(line["message"] for line in lines) == sorted(world.logs(run_id))
    assert set(lines[0]) == {"timestamp", "level", "name", "message"}
    why = json.loads(cli("why", run_id[:unique], "-o", "json").stdout)
    assert why["runs"][0]["would_run"] is False and "it is Success, not Scheduled" in why["runs"][0]["reasons"]
    flows = json.loads(cli("flows", "-o", "json").stdout)
    assert [flow["name"] for flow in flows] == ["hello"]
    assert set(flows[0]) == FLOW_KEYS
    assert flows[0]["schedule"] is None and flows[0]["schedule_active"] is False and flows[0]["next_run"] is None


@pytest.mark.parametrize(("seconds", "text"), [(0.4249, "0.42 s"), (12, "12 s"), (243, "4 min 3 s"), (3600, "1 h"),
                                               (3 * 86400 + 4 * 3600 + 59, "3 d 4 h"), (97_479, "1 d 3 h")])
def test_waits_and_durations_read_as_a_person_says_them(seconds: float, text: str) -> None:
    assert la._duration_text(seconds) == text


def test_runs_lists_running_first_then_the_most_recent_then_what_is_upcoming() -> None:
    now = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)

    def run(name: str, state: str, hours: float) -> la.FlowRun:
        start = now + timedelta(hours=hours)
        return la.FlowRun(id=name, version=1, state=state, serialized_state={"type": state,
                          "start_time": la._format_time(start)}, flow_id="f", flow_name="f", name=name,
                          scheduled_start_time=start)

    runs = [run("in 2 h", "Scheduled", 2), run("in 1 h", "Scheduled", 1), run("running", "Running", -1),
            run("late", "Scheduled", -0.5), run("2 h ago", "Success", -2), run("1 h ago", "Failed", -1)]
    assert [r.name for r in la._as_people_look_for_them(runs, now)] == [
        "running", "late", "1 h ago", "2 h ago", "in 1 h", "in 2 h"]


def test_max_polls_stops_the_agent(world: World) -> None:
    result = world.agent("--max-polls", "3", "-v")
    assert result.returncode == 0
    assert result.stderr.count("Querying for ready flow runs...") == 3


def test_child_crashes_become_failed_with_the_reason(world: World, test_flows: Any) -> None:
    runs = {
        "exit": world.run(world.flow(test_flows.hard_exit), parameters={"code": 7}),
        "kill": world.run(world.flow(test_flows.kill_self), parameters={"signal_number": 9}),
    }
    world.agent("--once")
    assert world.state(runs["exit"]) == "Failed"
    assert "exited with code 7" in world.message(runs["exit"])
    assert "about to exit hard" in world.message(runs["exit"])
    assert "killed by SIGKILL (the out-of-memory killer may have ended it)" in world.message(runs["kill"])


@WARM_TOO
def test_timeout_stops_the_process_group_and_fails_the_run(world: World, test_flows: Any) -> None:
    run_id = world.run(world.flow(test_flows.sleep), parameters={"seconds": 30})
    started = time.monotonic()
    world.agent("--once", "--timeout", "1")
    assert time.monotonic() - started < 20
    assert world.state(run_id) == "Failed"
    assert world.message(run_id) == (
        "Flow run timed out after 1 s; its process was stopped by the agent with SIGTERM (it timed out).")


@WARM_TOO
def test_a_flow_that_ignores_sigterm_is_killed_and_said_to_be_stopped_not_out_of_memory(
    world: World, test_flows: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = world.run(world.flow(test_flows.ignore_sigterm))
    agent = stepped_agent(world, monkeypatch, once=True, timeout=1)
    try:
        drive(agent, lambda: "ignoring SIGTERM" in world.logs(run_id))
        assert isinstance(agent.clock, JumpingClock)
        agent.clock.offset += 1  # the timeout: SIGTERM, which the flow ignores
        drive(agent, lambda: bool(agent.book.jobs) and agent.book.jobs[0].stopping == "timeout")
        agent.clock.offset += la.KILL_GRACE_SECONDS  # then SIGKILL
        drive(agent, lambda: agent.phase == la.DONE)
    finally:
        agent.close()
    assert world.message(run_id) == (
        "Flow run timed out after 1 s; its process was stopped by the agent with SIGKILL (it timed out).")
    assert "out-of-memory" not in " ".join(world.logs(run_id))


# --- The embedded backend and its commands ----------------------------------------------


@pytest.fixture
def embedded(tmp_path: Path, clean_env: dict[str, str], flows_dir: Path) -> World:
    return World("sqlite", tmp_path, clean_env, flows_dir)


def test_run_agent_can_leave_the_banner_out(embedded: World, test_flows: Any, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    run_id = embedded.run(embedded.flow(test_flows.noop))
    monkeypatch.chdir(embedded.cwd)
    flow = la.Flow("noop", test_flows.noop, labels=["test"])
    assert flow.run_agent(once=True, banner=False, api=embedded.api, hostname_label=False) == 0
    assert embedded.state(run_id) == "Success"
    assert "|___/" not in capsys.readouterr().out
    flow.run_agent(once=True, api=embedded.api, hostname_label=False)
    assert "|___/" in capsys.readouterr().out  # and by default it is there


def test_quick_start_works_as_written(clean_env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, "examples/welcome.py"], cwd=AGENT.parent, env=clean_env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "|___/" in result.stdout
    assert "INFO - flow | Welcome to local_agent, world!" in result.stdout
    assert "finished: Success" in result.stderr
    assert "Agent successfully connected to embedded database" in result.stderr
    # With an agent of the same name running already: one line saying so, no traceback.
    agent = subprocess.Popen([sys.executable, str(AGENT), "start", "-l", "welcome-flow"], env=clean_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        home = Path(clean_env["PREFECT__HOME_DIR"])
        deadline = time.monotonic() + 30
        while not any(lock_held(path) for path in home.glob("agents/*/lock")) and time.monotonic() < deadline:
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "examples/welcome.py"], cwd=AGENT.parent, env=clean_env,
                                capture_output=True, text=True, timeout=60)
    finally:
        agent.terminate()
        agent.communicate(timeout=60)
    assert second.returncode == 1
    assert second.stderr.startswith("welcome.py: an agent named 'agent' is already running"), second.stderr
    assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr


def lock_held(path: Path) -> bool:
    """Whether another process holds an agent directory's lock."""
    import fcntl

    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def test_run_runs_logs_flows_commands(embedded: World, test_flows: Any) -> None:
    embedded.flow(test_flows.hello, labels=("test",))
    env = embedded.env
    created = run_cli("run", "hello", "--param", 'name="CLI"', env=env, check=True)
    run_id = created.stdout.strip()
    assert len(run_id) == 36
    listing = run_cli("runs", env=env, check=True).stdout.splitlines()
    assert listing[0].split() == ["ID", "NAME", "FLOW", "STATE", "SCHEDULED", "(UTC)", "UPDATED", "(UTC)"]
    assert listing[1].split()[:4:2] == [run_id, "hello"] and listing[1].split()[3] == "Scheduled"
    embedded.agent("--once")
    assert run_cli("runs", "--state", "Success", env=env, check=True).stdout.count(run_id) == 1
    assert run_cli("runs", "--state", "success", env=env, check=True).stdout.count(run_id) == 1  # any case
    assert run_cli("runs", "--state", "Failed", env=env, check=True).stdout.count(run_id) == 0
    logs = run_cli("logs", run_id, env={**env, "TZ": "Asia/Kolkata"}, check=True).stdout
    assert "INFO - flow | Hello, CLI!" in logs
    assert "INFO - agent | Submitted for execution: PID:" in logs
    stamp = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\] INFO - ", logs)  # local time, milliseconds
    assert stamp, logs
    shown_at = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=timezone(timedelta(hours=5.5)))
    assert abs((shown_at - datetime.now(timezone.utc)).total_seconds()) < 300  # Kolkata's time, not UTC
    flows = run_cli("flows", env=env, check=True).stdout.splitlines()
    assert flows[1].split()[:4] == ["hello", "1", "tests", "test"]
    assert str(embedded.storage_dir / "hello.prefect") in flows[1]
    embedded.flow(test_flows.noop, name="Nightly ETL")
    etl_run = run_cli("run", "Nightly ETL", env=env, check=True).stdout.strip()
    assert etl_run in run_cli("runs", "--flow", "nightly-etl", env=env, check=True).stdout  # its slug will do
    finished = run_cli("cancel", run_id, env=env)
    assert finished.returncode == 1
    assert finished.stderr.strip() == f"local_agent: error: flow run {run_id} has already finished (Success); " \
                                      "there is nothing to cancel"


def test_output_to_a_closed_pipe_ends_quietly(embedded: World, test_flows: Any) -> None:
    run_id = embedded.run(embedded.flow(test_flows.hello))
    embedded.db.write_run_logs([{"flow_run_id": run_id, "message": f"line {n}"} for n in range(5000)])
    shell = f"{sys.executable} {AGENT} logs {run_id} | head -n 1"
    result = subprocess.run(["sh", "-c", shell], env=embedded.env, capture_output=True, text=True, timeout=60)
    assert result.stdout.count("\n") == 1 and result.stderr == "", result.stderr


def test_logs_come_back_in_the_order_of_their_records_on_server(api_world: World, test_flows: Any) -> None:
    run_id = api_world.run(api_world.flow(test_flows.hello))
    backend = la.GraphQLBackend(api_world.api)
    try:  # one batch, so the Server gives every row the same `created`
        backend.write_run_logs([
            {"flow_run_id": run_id, "timestamp": f"2026-01-01T00:00:0{second}+00:00", "level": "INFO", "name": "t",
             "message": f"second {second}"} for second in (3, 1, 2)])
        assert [line.message for line in backend.get_run_logs(run_id)] == ["second 1", "second 2", "second 3"]
    finally:
        backend.close()


def test_logs_follow_waits_for_the_end_of_the_run(embedded: World, test_flows: Any) -> None:
    run_id = embedded.run(embedded.flow(test_flows.hello))
    follower = subprocess.Popen([sys.executable, str(AGENT), "logs", run_id, "--follow"], env=embedded.env,
                                stdout=subprocess.PIPE, text=True)
    embedded.agent("--once")
    output, _ = follower.communicate(timeout=30)
    assert follower.returncode == 0
    assert "Hello, world!" in output and "Flow run SUCCESS" in output


def test_run_at_a_later_time_and_parameters_as_json(embedded: World, test_flows: Any) -> None:
    embedded.flow(test_flows.show_context)
    run_id = run_cli("run", "show_context", "--at", "+1h", env=embedded.env, check=True).stdout.strip()
    run = embedded.db.get_flow_run(run_id)
    assert run is not None and 3590 < (run.start_time - datetime.now(timezone.utc)).total_seconds() <= 3600
    bad = run_cli("run", "show_context", "--at", "tomorrow", env=embedded.env)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1
    missing = run_cli("run", "no-such-flow", env=embedded.env)
    assert missing.returncode == 1 and "no flow named 'no-such-flow'" in missing.stderr


@pytest.mark.parametrize("world", ["sqlite", "graphql"], indirect=True)
def test_run_takes_a_name_a_parameter_file_a_key_and_watches_to_the_end(
    world: World, test_flows: Any, tmp_path: Path
) -> None:
    world.flow(test_flows.hello)
    world.flow(test_flows.fail)
    params = tmp_path / "params.json"
    params.write_text('{"name": "from the file"}')
    base = ["--api", world.api, "--label", "test"]
    first = run_cli("run", "hello", "--param-file", str(params), "--name", "nightly-load", "--idempotency-key",
                    "2026-11-30", *base, env=world.env, check=True).stdout.strip()
    again = run_cli("run", "hello", "--idempotency-key", "2026-11-30", *base, env=world.env, check=True)
    assert again.stdout.strip() == first  # the same key: the same run, not a second one
    agent = _agent_process(world)
    watched = run_cli("run", "hello", "--param-file", str(params), "--param", 'name="the flag"', "--watch", *base,
                      env=world.env, timeout=60)
    failing = run_cli("run", "fail", "--watch", *base, env=world.env, timeout=60)
    agent.terminate()
    agent.communicate(timeout=60)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    run_id, *lines = watched.stdout.splitlines()
    name = next(run["name"] for run in json.loads(run_cli("runs", "-o", "json", "--api", world.api,
                                                          env=world.env, check=True).stdout) if run["id"] == run_id)
    assert f"{name} is Success: All reference tasks succeeded." in lines or f"{name} is Success" in " ".join(lines)
    assert any(line.startswith(f"{name} | ") and line.endswith("Hello, the flag!") for line in lines), lines
    assert failing.returncode == 1 and "boom from the flow" in failing.stdout
    run = json.loads(run_cli("inspect", "nightly-load", "-o", "json", "--api", world.api, env=world.env,
                             check=True).stdout)
    assert run["id"] == first and run["parameters"] == {"name": "from the file"} and run["state"] == "Success"
    bad = run_cli("run", "hello", "--param-file", str(tmp_path / "none.json"), *base, env=world.env)
    assert bad.returncode == 1 and "cannot read the parameter file" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("world", ["sqlite", "graphql"], indirect=True)
def test_delete_a_run_and_a_flow(world: World, test_flows: Any) -> None:
    flow_id = world.flow(test_flows.hello)
    done = world.run(flow_id)
    assert world.agent("--once").returncode == 0
    later = world.run(flow_id, at=datetime.now(timezone.utc) + timedelta(hours=1))
    busy = world.run(flow_id, at=datetime.now(timezone.utc) + timedelta(hours=1))
    backend = la.open_backend(la.resolve_settings({"api": world.api}))
    try:
        backend.set_flow_run_state(busy, la.make_state("Running", "Running flow."), None)
    finally:
        backend.close()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_in_process([*args, "--api", world.api], env=world.env, cwd=world.cwd)

    assert cli("delete", "run", done[:13]).returncode == 0
    assert "there is no flow run" in cli("inspect", done).stderr
    refused = cli("delete", "run", busy)
    assert refused.returncode == 1 and f"flow run {busy} is Running: cancel it first" in refused.stderr
    deleted = cli("delete", "flow", "hello")
    assert deleted.returncode == 0, deleted.stderr
    assert world.state(later) == "Cancelled" and world.state(busy) == "Running"  # an active run is left alone
    assert json.loads(cli("flows", "-o", "json").stdout) == []
    assert "no flow named 'hello'" in cli("run", "hello").stderr
    assert "no flow named 'hello'" in cli("delete", "flow", "hello").stderr


@pytest.fixture(params=["sqlite", "graphql"])
def retry_world(request: pytest.FixtureRequest, tmp_path: Path, clean_env: dict[str, str],
                flows_dir: Path) -> Iterator[World]:
    """Both backends; Server without its 30-s guard against a second Submitted, which would hold
    each retry back until 30 s after the claim before it (as it does on a real Server)."""
    if request.param == "sqlite":
        yield World("sqlite", tmp_path, clean_env, flows_dir)
        return
    with PrefectServerDouble(submitted_guard_seconds=0) as double:
        yield World("graphql", tmp_path, clean_env, flows_dir, double)


def test_a_failed_run_is_retried_when_due_until_its_retries_run_out(retry_world: World, test_flows: Any,
                                                                     tmp_path: Path) -> None:
    world = retry_world
    attempts = tmp_path / "attempts.txt"
    recovers = world.run(world.flow(test_flows.flaky, retries=2, retry_delay=0.5),
                         parameters={"path": str(attempts), "failures": 2})
    gives_up = world.run(world.flow(test_flows.fail, retries=1))
    agent = _agent_process(world)  # the retries come due while it runs
    try:
        done = world.wait_for(lambda: all(la.is_final(world.state(r)) for r in (recovers, gives_up)), timeout=60)
    finally:
        agent.terminate()
        err = agent.communicate(timeout=60)[1]
    assert done, (world.history(recovers), world.history(gives_up), err[-3000:])
    assert world.state(recovers) == "Success" and len(attempts.read_text().splitlines()) == 3
    assert world.history(recovers)[2:] == ["Submitted", "Running", "Retrying"] * 2 + ["Submitted", "Running", "Success"]
    logs = world.logs(recovers)
    assert "Beginning flow run 'flaky', attempt 3 of 3" in logs
    assert any(line.startswith("Flow run RETRYING: Attempt 1 of 3 failed (RuntimeError: failing on attempt 1)")
               for line in logs), logs
    assert world.state(gives_up) == "Failed"
    assert world.message(gives_up) == "ValueError: boom from the flow (attempt 2 of 2: no retries left)"
    assert world.history(gives_up).count("Retrying") == 1
    backend = la.open_backend(la.resolve_settings({"api": world.api}))
    try:  # never started before it was due (Server's claims may be written 0.3 s ahead, launches never)
        states = backend.get_state_history(recovers)
    finally:
        backend.close()
    retried_at = [la._parse_time(stamp) for state, _, stamp in states if state == "Retrying"]
    started_at = [la._parse_time(stamp) for state, _, stamp in states if state == "Running"][1:]
    assert len(retried_at) == len(started_at) == 2
    assert all(start - retry >= timedelta(seconds=0.45) for retry, start in zip(retried_at, started_at))


@pytest.mark.parametrize("world", ["sqlite", "graphql"], indirect=True)
def test_parameters_a_flow_does_not_have_or_needs_are_refused_when_the_run_is_created(
    world: World, test_flows: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in world.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(world.cwd)
    for fn in (test_flows.hello, test_flows.needs, test_flows.takes_anything):
        la.Flow(fn.__name__, fn).deploy("P", labels=["test"], api=world.api)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return run_in_process(["run", *args, "--label", "test", "--api", world.api], env=world.env, cwd=world.cwd)

    typo = run("hello", "--param", "nmae=you")
    assert typo.returncode == 1 and "flow 'hello' has no parameter 'nmae'; its parameters are name" in typo.stderr
    missing = run("needs")
    assert missing.returncode == 1 and "flow 'needs' needs parameter 'day': give it with --param day=JSON" in \
        missing.stderr
    assert run("needs", "--param", "day=1").returncode == 0
    anything = run("takes_anything", "--param", "color=blue")  # **options: any parameter goes
    assert anything.returncode == 0, anything.stderr
    assert world.agent("--once").returncode == 0
    assert "options ['color']" in world.logs(anything.stdout.strip())
    if world.kind == "graphql":  # registered by another tool, declaring its parameters: checked too
        other = world.server.add_flow("other", None, labels=["test"], parameters=[
            {"name": "size", "slug": "size", "default": 1, "required": False,
             "type": "prefect.core.parameter.Parameter", "outputs": "typing.Any", "tags": [], "__version__": "1.4.1"}])
        assert other and "flow 'other' has no parameter 'colour'" in run("other", "--param", "colour=1").stderr


def test_watch_says_why_nobody_claims_a_run(embedded: World, test_flows: Any, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    run_id = embedded.run(embedded.flow(test_flows.hello, labels=("test", "gpu")))
    monkeypatch.setattr(la, "WATCH_NOTE_SECONDS", 0.2)
    threading.Timer(1.5, lambda: la.cancel_flow_run(run_id, api=embedded.api)).start()  # then it ends, Cancelled
    backend = la.open_backend(la.resolve_settings({"api": embedded.api}))
    try:
        code = la._watch_run(backend, run_id, la.resolve_settings({"api": embedded.api, "hostname_label": False}))
    finally:
        backend.close()
    out = capsys.readouterr().out
    assert code == 1 and "is Cancelled" in out
    assert "is not claimed yet: an agent here would not: the agent lacks label(s) gpu, test" in out


def test_why_explains_each_scheduled_run(embedded: World, test_flows: Any) -> None:
    gpu = embedded.run(embedded.flow(test_flows.hello, labels=("test", "gpu")))
    later = embedded.run(embedded.flow(test_flows.noop, labels=("test",)),
                         at=datetime.now(timezone.utc) + timedelta(hours=2))
    gone_flow = embedded.flow(test_flows.fail, labels=("test",))
    (embedded.storage_dir / "fail.prefect").unlink()
    gone = embedded.run(gone_flow)
    ready = embedded.run(embedded.flow(test_flows.show_env, labels=("test",)))
    output = run_cli("why", "-l", "test", env=embedded.env, check=True).stdout
    lines = {line.split()[0]: line for line in output.splitlines()[1:]}
    assert "lacks label(s) gpu (start it with -l gpu)" in lines[gpu]
    assert "not due yet: due in 1 h 59 min" in lines[later] or "not due yet: due in 2 h at" in lines[later]
    assert f"does not exist on host {HOST}" in lines[gone]
    assert lines[ready].endswith("would run it")
    single = run_cli("why", gpu, "-l", "test", "-l", "gpu", env=embedded.env, check=True).stdout
    assert single.splitlines()[1].endswith("would run it")


def test_cancel_a_scheduled_run(embedded: World, test_flows: Any) -> None:
    run_id = embedded.run(embedded.flow(test_flows.hello))
    assert run_cli("cancel", run_id, env=embedded.env, check=True).stdout.strip() == "Cancelled"
    embedded.agent("--once")
    assert embedded.history(run_id) == ["Pending", "Scheduled", "Cancelled"]


def test_three_agents_share_one_database_and_run_each_run_once(embedded: World, test_flows: Any,
                                                               tmp_path: Path) -> None:
    marker = tmp_path / "starts.txt"
    flow_id = embedded.flow(test_flows.record_start)
    run_ids = [embedded.run(flow_id, parameters={"path": str(marker)}) for _ in range(60)]  # soak.py: more
    agents = [_agent_process(embedded, "--once", "-n", f"agent-{n}") for n in range(3)]
    errors = [agent.communicate(timeout=240)[1] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0, 0], errors
    assert len(marker.read_text().split()) == 60
    for run_id in run_ids:
        assert embedded.history(run_id) == ["Pending", "Scheduled", "Submitted", "Running", "Success"]
    took = [error.count("finished: Success") for error in errors]
    assert sum(took) == 60
    print(f"\n3 agents x 60 runs: runs per agent {took}, duplicates 0, lost 0")


@pytest.fixture
def seeded_db(embedded: World, test_flows: Any) -> tuple[World, Path]:
    embedded.run(embedded.flow(test_flows.hello))
    embedded.db.close()
    return embedded, Path(la._sqlite_path(embedded.api))


def _snapshot(path: Path) -> bytes:
    return path.read_bytes()


def test_corrupt_database_gives_one_clear_line(seeded_db: tuple[World, Path]) -> None:
    world, path = seeded_db
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    path.write_bytes(b"this is not a database at all" * 200)
    before = _snapshot(path)
    result = run_cli("runs", env=world.env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "is corrupt or not a database" in result.stderr and "Traceback" not in result.stderr
    assert _snapshot(path) == before


def test_newer_schema_is_refused_and_left_alone(seeded_db: tuple[World, Path]) -> None:
    world, path = seeded_db
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA user_version = 99")
    connection.close()
    before = _snapshot(path)
    result = run_cli("start", "--once", env=world.env)
    assert result.returncode == 1
    assert "schema version 99, newer than this local_agent" in result.stderr
    assert "Traceback" not in result.stderr and _snapshot(path) == before


def test_locked_database_gives_one_clear_line(seeded_db: tuple[World, Path]) -> None:
    world, path = seeded_db
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        env = {**world.env, "PREFECT__CLOUD__REQUEST_TIMEOUT": "0.5"}
        result = run_cli("run", "hello", env=env)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.returncode == 1
    assert "is locked by another process (waited 0.5 s); try again" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert len(world.db.list_flow_runs()) == 1  # nothing was added


def _make_read_only(*paths: Path) -> Callable[[], None]:
    """Make files and directories read-only even for root (immutable); return the undo."""
    if os.geteuid() != 0:
        modes = {path: path.stat().st_mode for path in paths}
        for path in paths:
            path.chmod(0o555 if path.is_dir() else 0o444)
        return lambda: [path.chmod(mode) for path, mode in modes.items()] and None
    subprocess.run(["chattr", "+i", *map(str, paths)], check=True)
    return lambda: subprocess.run(["chattr", "-i", *map(str, paths)], check=True) and None


def test_read_only_database_gives_one_clear_line(seeded_db: tuple[World, Path]) -> None:
    world, path = seeded_db
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    before = _snapshot(path)
    undo = _make_read_only(path, path.parent)
    try:
        listing = run_cli("runs", env=world.env)
        creating = run_cli("run", "hello", env=world.env)
    finally:
        undo()
    for result in (listing, creating):
        assert result.returncode == 1, result.stdout
        assert f"cannot write database {path}" in result.stderr and "needs write access" in result.stderr
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert _snapshot(path) == before


# --- The agent's parts, without processes ---------------------------------------------------


NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def outcome(reported: Any = None, how: str = "exited with code 1", **overrides: Any) -> Any:
    """_decide_outcome with every input named, the ones a case does not care about neutral."""
    inputs: dict[str, Any] = {"stopping": "", "lost": False, "timeout": None, "last_output": "", "pid": 42,
                              "host": "h1", "now": NOW}
    return la._decide_outcome(reported, how, **{**inputs, **overrides})


def test_a_final_state_the_process_reported_always_wins() -> None:
    success = la.make_state("Success", "All reference tasks succeeded.")
    delivered = outcome((success, True), "exited with code 0")
    assert (delivered.result, delivered.state, delivered.note) == ("Success", None, "")  # nothing to write
    undelivered = outcome((success, False), "was killed by SIGKILL", stopping="shutdown", lost=True)
    assert (undelivered.result, undelivered.state) == ("Success", success)  # the agent delivers it
    assert outcome((None, False)).result == "NotRun"  # the flow never ran; the process said so


def test_a_run_the_agent_stopped_is_described_by_why_it_stopped_it() -> None:
    timed_out = outcome(stopping="timeout", timeout=2.5, how="was killed by SIGTERM")
    assert timed_out.state["type"] == "Failed"
    assert timed_out.state["message"] == "Flow run timed out after 2.5 s; its process was killed by SIGTERM."
    cancelled = outcome(stopping="cancel", how="was killed by SIGTERM")
    assert (cancelled.result, cancelled.state["message"]) == (
        "Cancelled", "Flow run was cancelled; its process was killed by SIGTERM.")
    handed_back = outcome(stopping="shutdown", how="was killed by SIGTERM")
    assert handed_back.state["type"] == "Scheduled" and handed_back.level == "WARNING"
    assert handed_back.state["start_time"] == la._format_time(NOW)  # due again at once, for any agent
    assert handed_back.state["message"] == "The agent on host h1 shut down before this run finished; rescheduled."
    assert handed_back.note.endswith("(its process was killed by SIGTERM)")


def test_a_process_that_ended_without_a_final_state_fails_the_run_saying_how() -> None:
    crashed = outcome(how="exited with code 7", last_output="about to exit hard")
    assert crashed.result == "Failed" and crashed.level == "ERROR"
    assert crashed.state["message"] == ("Flow-run process PID 42 on host h1 exited with code 7 before reporting "
                                        "a final state. Last output: about to exit hard")
    assert crashed.note == crashed.state["message"]
    lost = outcome(how=la._describe_exit(None), lost=True)
    assert lost.state["message"].startswith("The agent on host h1 restarted and the flow-run process PID 42 was "
                                            "lost: it ended while no agent watched it")
    long_output = outcome(last_output="x " * 3000)
    assert len(long_output.state["message"]) <= 2000 and len(long_output.note) > 2000  # the log keeps it whole


def flow_run(run_id: str, start_in: float = 0.0) -> la.FlowRun:
    start = datetime.now(timezone.utc) + timedelta(seconds=start_in)
    return la.FlowRun(id=run_id, version=1, state="Scheduled", serialized_state=la.make_state("Scheduled",
                      start_time=start), flow_id="f", flow_name="flow")


def ledger(book: la.RunBook) -> dict[str, Any]:
    return dict(json.loads((book.directory / "ledger.json").read_text()))


def test_the_run_book_moves_runs_through_their_phases_and_counts_slots(tmp_path: Path) -> None:
    book = la.RunBook(tmp_path, limit=3, logger=logging.getLogger("test"))
    (tmp_path / "runs").mkdir()
    now, later = flow_run("now"), flow_run("later", start_in=60)
    book.fetched(later)
    book.fetched(now)
    assert book.busy == 2 and book.free_slots() == 1 and book.is_taken("now")
    assert [run.id for run in book.due(datetime.now(timezone.utc))] == ["now"]  # "later" is not due yet
    tokens = book.claiming([now])
    assert ledger(book)["claims"] == {"now": tokens[0]}  # on disk before the claim is written
    assert book.busy == 1 and not book.is_taken("now")  # a claim in flight holds no slot, as before
    book.claimed("now", 2)
    assert book.to_launch(datetime.now(timezone.utc)) == [(now, 2)]
    assert book.next_start(claim_lead=0.3) == now.start_time  # launched at its start, not before
    job = la._Job("now", flow_name="flow", version=2, pid=os.getpid(), runs_dir=tmp_path / "runs", started_at=1.0)
    book.launched(job)
    assert book.phase("now") == la.LAUNCHED and book.jobs == [job]
    assert book.next_start(claim_lead=0.3) == later.start_time - timedelta(seconds=0.3)  # claimed a bit early
    assert ledger(book) == {"runs": {"now": job.ledger_entry()}, "claims": {}}  # the process replaces the claim
    assert [run.id for run, _ in book.release_unstarted()] == []  # "later" was never claimed: just forgotten
    assert book.phase("later") == "" and book.busy == 1
    book.settled("now")
    assert book.busy == 0 and book.free_slots() == 3
    # No claim without the ledger on disk: when it cannot be written, the runs are left alone.
    unwritable = la.RunBook(tmp_path / "no-such-directory", limit=None, logger=logging.getLogger("test"))
    unwritable.fetched(later)
    assert unwritable.claiming([later]) is None
    assert unwritable.phase("later") == "" and unwritable.failing


def test_the_run_book_reads_back_its_ledger_and_sets_a_damaged_one_aside(tmp_path: Path) -> None:
    book = la.RunBook(tmp_path, limit=None, logger=logging.getLogger("test"))
    (tmp_path / "ledger.json").write_text(json.dumps({
        "runs": {"a": {"pid": 123, "flow_name": "f", "offset": 7, "stopping": "cancel"}, "bad": {"no": "pid"}},
        "claims": {"b": "token"},
    }))
    jobs, claims = book.load()
    assert [(job.run_id, job.pid, job.offset, job.stopping, job.adopted) for job in jobs] == [
        ("a", 123, 7, "cancel", True)]
    assert claims == {"b": "token"}
    (tmp_path / "ledger.json").write_text("{torn")
    assert book.load() == ([], {})
    assert (tmp_path / "ledger.json.bad").read_text() == "{torn"


def test_step_connects_once_the_api_answers_and_then_polls(api_world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    server = api_world.server
    server.set_down(True)
    agent = stepped_agent(api_world, monkeypatch, max_polls=2)
    try:
        # While the API fails the agent tries again about once a second: it resumes within one.
        assert 0.5 <= agent.step() <= 1.0 and agent.phase == la.CONNECTING
        server.set_down(False)
        assert agent.step() == 0 and agent.phase == la.RUNNING
        agent.step()
        assert len(server.root_calls("get_runs_in_queue")) == 1
        assert isinstance(agent.clock, JumpingClock)
        agent.clock.offset += la.POLL_BACKOFF[1]  # the backoff after an empty poll
        agent.step()
        assert len(server.root_calls("get_runs_in_queue")) == 2 and agent.phase == la.DRAINING  # --max-polls 2
        agent.step()
        assert agent.phase == la.DONE
    finally:
        agent.close()


# --- The command line and the module ---------------------------------------------------


@pytest.mark.parametrize("args", [
    ["start", "--bogus"],
    ["start", "--max-polls", "many"],
    ["start", "--timeout", "-5"],
    ["start", "-e", "NO_EQUALS_SIGN"],
    ["start", "--limit"],
    ["run"],
    ["run", "flow", "--param", "novalue"],
    ["logs"],
    ["nonsense"],
    [],
    ["execute"],
    ["start", "--max-polls", "0"],
    ["start", "--limit", "0"],
    ["start", "--api", "ftp://host"],
    ["start", "--log-level", "LOUD"],
    ["start", "--agent-address", "localhost"],
    ["run", "flow", "--at", "tomorrow"],
    ["runs", "--limit", "x"],
    ["start", "--timeout", "0"],  # "no timeout" is said by leaving it out, not by 0
    ["start", "-n", ""],
    ["run", "flow", "--at", "+100000000d"],
    ["run", "flow", "--at", "9999-12-31T23:59:59-12:00"],  # in UTC, the year 10000
    ["runs", "--limit", "1" + "0" * 30],
    ["runs", "--state", "Bogus"],
])
def test_usage_errors_exit_2_with_one_line(args: list[str], clean_env: dict[str, str]) -> None:
    result = run_cli(*args, env=clean_env)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "error:" in result.stderr and "Traceback" not in result.stderr


def test_version_and_help(clean_env: dict[str, str]) -> None:
    assert run_cli("--version", env=clean_env, check=True).stdout.strip() == f"local_agent {la.__version__}"
    assert run_cli("start", "--version", env=clean_env, check=True).stdout.strip() == f"local_agent {la.__version__}"
    help_text = run_cli("start", "--help", env=clean_env, check=True).stdout
    for flag in ("--token", "--key", "--api", "--label", "--name", "--env", "--import-path", "--show-flow-logs",
                 "--no-hostname-label", "--max-polls", "--max-poll-interval", "--agent-address",
                 "--no-cloud-logs", "--log-level", "--verbose", "--once", "--limit", "--timeout", "--grace"):
        assert flag in help_text


def test_python_dash_m_and_main_in_process(clean_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    module = subprocess.run([sys.executable, "-m", "local_agent", "--version"], cwd=AGENT.parent, env=clean_env,
                            capture_output=True, text=True, timeout=60)
    assert module.stdout.strip() == f"local_agent {la.__version__}"
    assert la.main(["runs"]) == 0
    assert capsys.readouterr().out.startswith("ID")
    with pytest.raises(SystemExit) as exit_info:
        la.main(["start", "--bogus"])
    assert exit_info.value.code == 2


def test_importing_the_module_has_no_side_effects() -> None:
    probe = textwrap.dedent("""
        import logging, signal, sys
        before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), logging.getLogger().handlers[:])
        import local_agent
        after = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), logging.getLogger().handlers[:])
        heavy = [name for name in ("sqlite3", "http.client", "ssl", "argparse", "pickle") if name in sys.modules]
        print(before == after, heavy)
    """)
    result = subprocess.run([sys.executable, "-c", probe], cwd=AGENT.parent, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "True []", result.stderr
    # Loaded from its file without being registered in sys.modules, as vendoring tools do.
    by_path = textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("vendored_agent", {str(AGENT)!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(module.slugify("My Flow! v1"))
    """)
    loaded = subprocess.run([sys.executable, "-c", by_path], capture_output=True, text=True, timeout=60)
    assert loaded.stdout.strip() == "my-flow-v1", loaded.stderr


def readme_table(heading: str) -> list[list[str]]:
    """The rows of the first table under a README heading, as lists of cells."""
    section = (AGENT.parent / "README.md").read_text().split(heading + "\n", 1)[1]
    lines = section[section.index("\n|"):].strip().splitlines()
    table = [line for line in itertools.takewhile(lambda line: line.startswith("|"), lines)]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in table[2:]]


def test_the_readme_settings_table_is_the_settings_table() -> None:
    rows = readme_table("## Settings")
    assert len(rows) == len(la._OPTIONS)
    aliases = {"level": {"-v"}}  # -v is --log-level DEBUG
    for option in la._OPTIONS:
        found = [row for row in rows if row[2].startswith(f"`{option.keys[0]}`")]
        assert len(found) == 1, f"no README row for the setting {option.name}"
        _, flags, keys, default = found[0]
        assert [key for key in re.findall(r"`([a-z_.]+)`", keys) if "." in key or key == "home_dir"] == list(
            option.keys), option.name
        assert set(re.findall(r"(?<![\w-])-{1,2}[a-z][a-z-]*", flags)) == set(option.flags) | aliases.get(
            option.name, set()), option.name
        assert default == la._default_text(option), option.name
        for alias in option.env_aliases:
            assert f"`{alias}`" in keys, (option.name, alias)


def test_start_flags_and_their_help_come_from_the_settings_table(clean_env: dict[str, str]) -> None:
    help_text = " ".join(run_cli("start", "--help", env=clean_env, check=True).stdout.split())
    for option in la._OPTIONS:
        for flag in option.flags:
            assert flag in help_text, flag
    assert "seconds to let flow runs finish after SIGTERM (default: 30)" in help_text
    assert "longest wait between polls (default: 10)" in help_text


def test_all_matches_the_public_names() -> None:
    import inspect

    public = {
        name for name, value in vars(la).items()
        if not name.startswith("_") and not inspect.ismodule(value)
        and getattr(value, "__module__", la.__name__) == la.__name__
        and (inspect.isclass(value) or inspect.isfunction(value))
    }
    documented = set(la.__all__) - {"context"}
    assert public == documented, (public - documented, documented - public)
    for name in la.__all__:
        doc = getattr(la, name).__doc__
        assert doc and doc.strip(), f"{name} has no docstring"


# --- The Prefect API protocol ------------------------------------------------------------


# --- The Prefect API protocol ------------------------------------------------------------


@pytest.fixture
def api_world(tmp_path: Path, clean_env: dict[str, str], flows_dir: Path, server: Any) -> World:
    return World("graphql", tmp_path, clean_env, flows_dir, server)


def test_start_up_and_poll_follow_prefect_1x(api_world: World, test_flows: Any) -> None:
    server = api_world.server
    run_id = api_world.run(api_world.flow(test_flows.hello))
    result = api_world.agent("--once")
    assert result.returncode == 0, result.stderr
    agent_calls = [request for request in server.requests if "local-agent" in request.headers.get("user-agent", "")
                   and request.headers.get("x-prefect-heartbeat-id") is None]
    roots = [request.roots[0] for request in agent_calls]
    assert roots[:5] == ["tenant", "register_agent", "hello", "get_runs_in_queue", "flow_run"]
    registration = agent_calls[1].variables["input"]
    assert registration == {"type": "LocalAgent", "name": "agent", "labels": ["test", "local"],
                            "tenant_id": server.tenant_id, "agent_config_id": None}
    agent_id = server.agents()[0]["id"]
    after_registration = [r for r in server.requests[2:] if r.roots[0] in ("hello", "get_runs_in_queue")]
    assert all(r.headers.get("x-prefect-agent-id") == agent_id for r in after_registration)
    assert all(r.variables_as_text for r in agent_calls)  # sent as a JSON string, like Prefect
    writes = server.root_calls("set_flow_run_states")
    claim = next(r for r in writes if r.variables["input"]["states"][0]["state"]["type"] == "Submitted")
    submitted = claim.variables["input"]["states"][0]
    assert submitted["version"] == 1 and submitted["state"]["state"]["type"] == "Scheduled"
    assert server.run(run_id)["agent_id"] == agent_id
    poll = server.root_calls("get_runs_in_queue")[0].variables["input"]
    assert poll["labels"] == ["test", "local"] and poll["tenant_id"] == server.tenant_id


def test_polls_prefetch_ten_seconds_ahead(api_world: World) -> None:
    api_world.agent("--max-polls", "1", real=True)  # its own process and clock
    poll = api_world.server.root_calls("get_runs_in_queue")[0]
    ahead = la._parse_time(poll.variables["input"]["before"]).timestamp() - poll.time  # against its arrival
    assert 9 < ahead <= 10  # ten seconds ahead of the moment it was sent, however loaded the machine


SECRET = "hunter2-hunter2-hunter2"


@WARM_TOO
def test_secrets_never_reach_the_api_the_database_or_the_output(world: World, test_flows: Any) -> None:
    run_id = world.run(world.flow(test_flows.leak_secrets))
    result = world.agent("--once", "-v", "-f", "-t", TOKEN, "-e", f"MY_SECRET={SECRET}")
    assert result.returncode == 1, result.stderr
    message = world.message(run_id)
    assert message == "RuntimeError: token [REDACTED] secret [REDACTED]", message
    logs = "\n".join(world.logs(run_id))
    assert "x" * 100 in logs and "y" * 100 in logs and "logging [REDACTED]" in logs
    stored = b"".join(path.read_bytes() for path in world.storage_dir.parent.rglob("*") if path.is_file())
    for secret in (TOKEN, SECRET):
        for text in (logs, message, result.stdout, result.stderr):
            assert secret[:8] not in text  # not whole, and not in halves across a cut
        assert secret[:8].encode() not in stored  # the database, the spool, the ledger
    if world.kind == "graphql":
        sent = json.dumps([request.variables for request in world.server.requests])
        assert TOKEN[:8] not in sent and SECRET[:8] not in sent


def test_the_outbox_redacts_every_line_and_state_message_before_it_is_spooled_or_sent(tmp_path: Path) -> None:
    db = la.SQLiteBackend(str(tmp_path / "db.sqlite"))
    flow_id = db.register_flow(db.ensure_project("p"), la.serialize_flow(la.Flow("f", print), "/f", []))
    run_id = db.create_flow_run(flow_id, parameters={}, labels=None, scheduled_start_time=None, idempotency_key="k")
    spool = tmp_path / "spool.jsonl"
    outbox = la._Outbox(db, spool, logging.getLogger("test"), la._Redactor([SECRET]))
    outbox.log(run_id, f"a line with {SECRET} in it")
    outbox.state(run_id, la.make_state("Failed", f"a message with {SECRET} in it"), None)
    assert SECRET not in spool.read_text()  # not even on disk for a moment
    outbox.close()
    run = db.get_flow_run(run_id)
    assert run is not None and run.state_message == "a message with [REDACTED] in it"
    assert [line.message for line in db.get_run_logs(run_id)] == ["a line with [REDACTED] in it"]
    db.close()


def test_output_offsets_in_the_spool_still_count_once_their_lines_are_delivered(tmp_path: Path) -> None:
    """A restarted agent reads a run's output on from the spool's furthest line, even when the
    spool's lines were already sent by the time it adopts the run (no line twice)."""
    db = la.SQLiteBackend(str(tmp_path / "db.sqlite"))
    flow_id = db.register_flow(db.ensure_project("p"), la.serialize_flow(la.Flow("f", print), "/f", []))
    run_id = db.create_flow_run(flow_id, parameters={}, labels=None, scheduled_start_time=None, idempotency_key="k")
    spool = tmp_path / "spool.jsonl"
    spool.write_text(json.dumps({"k": "log", "r": run_id, "t": "2026-01-01T00:00:00+00:00", "l": "INFO",
                                 "n": "output", "m": "before the crash", "o": 120}) + "\n")
    outbox = la._Outbox(db, spool, logging.getLogger("test"))
    try:
        assert outbox.flush(10) and outbox.pending == 0  # delivered before anyone asked
        assert outbox.resume_offset(run_id) == 120
    finally:
        outbox.close()
        db.close()


def test_lines_delivered_before_a_crash_are_not_sent_again_by_the_next_start(tmp_path: Path) -> None:
    """The spool is emptied only once everything is delivered; what was delivered before a
    crash, while newer lines still waited, is marked so, and the next start does not resend it."""
    db = la.SQLiteBackend(str(tmp_path / "db.sqlite"))
    flow_id = db.register_flow(db.ensure_project("p"), la.serialize_flow(la.Flow("f", print), "/f", []))
    run_id = db.create_flow_run(flow_id, parameters={}, labels=None, scheduled_start_time=None, idempotency_key="k")
    sending, go_on = threading.Event(), threading.Event()

    class SlowAPI:  # the API takes its time with the first batch
        def __getattr__(self, name: str) -> Any:
            return getattr(db, name)

        def write_run_logs(self, logs: Any) -> None:
            sending.set()
            assert go_on.wait(10)
            db.write_run_logs(logs)

    spool = tmp_path / "spool.jsonl"
    crashed = la._Outbox(SlowAPI(), spool, logging.getLogger("test"))  # type: ignore[arg-type]
    crashed.log(run_id, "delivered before the crash")
    assert sending.wait(10)
    crashed.log(run_id, "read, not yet released", offset=20)  # held: the ledger is not saved yet
    go_on.set()
    deadline = time.monotonic() + 10
    while "delivered before the crash" not in [line.message for line in db.get_run_logs(run_id)] or \
            '"k":"sent"' not in spool.read_text().replace(" ", ""):
        assert time.monotonic() < deadline, "never delivered"
        time.sleep(0.02)
    assert spool.read_text().count("delivered before the crash") == 1  # still in the spool file
    # The agent dies here; the next start loads the spool.
    restarted = la._Outbox(db, spool, logging.getLogger("test"))
    try:
        assert restarted.flush(10)
        messages = [line.message for line in db.get_run_logs(run_id)]
        assert messages == ["delivered before the crash", "read, not yet released"]  # each once
    finally:
        restarted.close()
        crashed._closed.set()
        crashed._wake.set()
        db.close()


def test_the_agents_files_are_private_whatever_the_umask(
    embedded: World, test_flows: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "private-home"
    flow = la.Flow("talk_slowly", test_flows.talk_slowly)
    path = la.store_flow(flow, embedded.storage_dir)
    previous = os.umask(0o022)
    try:
        db = la.SQLiteBackend(str(home / "agent.db"))  # a new database, made under that umask
        flow_id = db.register_flow(db.ensure_project("p"), la.serialize_flow(flow, path, ["test"]))
        run_id = db.create_flow_run(flow_id, parameters={"seconds": 0.5}, labels=None, scheduled_start_time=None,
                                    idempotency_key="k")
        agent = stepped_agent(embedded, monkeypatch, home_dir=str(home), flow_dirs=[str(embedded.storage_dir)],
                              api=f"sqlite:///{home / 'agent.db'}", once=True)
        job_modes: dict[Path, int] = {}
        try:
            drive(agent, lambda: bool(agent.book.jobs) and agent.book.jobs[0].out_path.exists())
            job_modes = file_modes(list(agent.book.runs_dir.iterdir()))  # the run's output, while it runs
            drive(agent, lambda: agent.phase == la.DONE)
        finally:
            agent.close()
    finally:
        os.umask(previous)
    assert db.get_flow_run(run_id).state == "Success"  # type: ignore[union-attr]
    db.close()
    private = [home, home / "agents", *home.glob("agents/*"), *home.glob("agents/*/runs")]
    assert {path: oct(path.stat().st_mode & 0o777) for path in private} == {path: "0o700" for path in private}
    files = [*home.glob("agents/*/*.json*"), *home.glob("agents/*/lock"), *home.glob("agent.db*")]
    assert job_modes and len(files) >= 3
    modes = {path: oct(path.stat().st_mode & 0o777) for path in files}
    modes.update({path: oct(mode) for path, mode in job_modes.items()})
    assert modes == {path: "0o600" for path in modes}, modes


def file_modes(paths: list[Path]) -> dict[Path, int]:
    """The modes of the files that still exist (a run's files go once it is settled)."""
    found = {}
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            found[path] = path.stat().st_mode & 0o777
    return found


def world_done(world: World, run_id: str) -> bool:
    return world.state(run_id) in ("Success", "Failed")


@pytest.mark.parametrize("source", ["flag", "env", "config"])
def test_token_reaches_the_api_and_never_the_output(api_world: World, test_flows: Any, tmp_path: Path,
                                                    source: str) -> None:
    run_id = api_world.run(api_world.flow(test_flows.show_env), parameters={"key": "PREFECT__CLOUD__AUTH_TOKEN"})
    env, args = dict(api_world.env), ["--once", "-v", "-f"]
    if source == "flag":
        args += ["-t", TOKEN]
    elif source == "env":
        env["PREFECT__CLOUD__API_KEY"] = TOKEN
    else:
        config = tmp_path / "config.toml"
        config.write_text(f'[cloud.agent]\nauth_token = "{TOKEN}"\n')
        config.chmod(0o600)
        env["PREFECT__USER_CONFIG_PATH"] = str(config)
    result = api_world.agent(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr
    expected = {"flag": "the --token flag", "env": "environment variable PREFECT__CLOUD__API_KEY",
                "config": f"config file {tmp_path / 'config.toml'} (cloud.agent.auth_token)"}[source]
    assert f"Token: given by {expected}" in result.stderr
    headers = [request.headers.get("authorization") for request in api_world.server.requests]
    assert headers and all(header == f"Bearer {TOKEN}" for header in headers)  # the child's writes too
    assert api_world.state(run_id) == "Success"
    # The flow printed the variable it got through the environment: the agent blanked it out.
    assert "PREFECT__CLOUD__AUTH_TOKEN=[REDACTED]" in api_world.logs(run_id)


def test_cloud_key_uses_auth_info_and_a_bad_key_is_one_clear_line(tmp_path: Path, clean_env: dict[str, str],
                                                                  flows_dir: Path) -> None:
    with PrefectServerDouble(cloud=True, require_token=TOKEN) as cloud:
        world = World("graphql", tmp_path, clean_env, flows_dir, cloud)
        good = world.agent("--max-polls", "1", "-k", TOKEN)
        assert good.returncode == 0, good.stderr
        assert [r.roots[0] for r in cloud.requests[:3]] == ["auth_info", "register_agent", "hello"]
        assert all(r.headers.get("x-prefect-tenant-id") == cloud.tenant_id for r in cloud.requests[1:])
        bad = world.agent("--max-polls", "1", "-k", "wrong-key")
        assert bad.returncode == 1
        errors = [line for line in bad.stderr.splitlines() if "error" in line.lower()]
        refused = f"the API at {cloud.url} refused the token: AuthenticationError: Forbidden"
        assert errors == [f"local_agent: error: {refused}"]
        assert "wrong-key" not in bad.stdout + bad.stderr


def test_agent_address_serves_health_and_poke(api_world: World, test_flows: Any) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    agent = subprocess.Popen(
        [sys.executable, str(AGENT), "start", "--api", api_world.api, "-l", "test", "--no-hostname-label",
         "--agent-address", f"http://127.0.0.1:{port}", "--max-poll-interval", "60", "--max-polls", "4"],
        env=api_world.env, cwd=api_world.cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        health = None
        deadline = time.monotonic() + 20
        while health is None and time.monotonic() < deadline:
            try:
                health = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).read()
            except OSError:
                time.sleep(0.1)
        assert health == b"{}"
        server = api_world.server
        assert server.wait_for(lambda: len(server.root_calls("get_runs_in_queue")) >= 3, timeout=20)
        # Backed off now (0.25 + 0.5 + 1 s, then 2 s): a poke makes it poll at once.
        run_id = api_world.run(api_world.flow(test_flows.noop))
        poked_at = time.monotonic()
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/api/poke", timeout=2).read() == b"{}"
        assert server.wait_for(lambda: server.run(run_id)["state"] != "Scheduled", timeout=20)
        assert time.monotonic() - poked_at < 1.5  # the backoff would have waited 2 s or more
        assert agent.wait(timeout=30) == 0
    finally:
        agent.kill()
        agent.communicate()
    assert api_world.state(run_id) == "Success"


def test_the_agent_address_answers_before_the_api_and_says_why_it_is_unhealthy(
    api_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    server = api_world.server
    server.set_down(True)
    agent = stepped_agent(api_world, monkeypatch, agent_address=f"http://[::1]:{port}")
    url = f"http://[::1]:{port}/api/health"
    try:
        assert urllib.request.urlopen(url, timeout=5).read() == b"{}"  # up before the API answered once
        agent.step()
        assert agent.phase == la.CONNECTING
        assert isinstance(agent.clock, JumpingClock)
        agent.clock.offset += la.HEALTH_STALE_SECONDS + 1
        with pytest.raises(urllib.error.HTTPError) as unhealthy:
            urllib.request.urlopen(url, timeout=5)
        with unhealthy.value as answer:
            assert answer.code == 503
            reason = json.loads(answer.read())["reason"]
        assert reason.startswith("the agent has not reached the API for 61 s: the API at http:"), reason
        # Idle clients take no more than their share of threads, and lose the agent nothing.
        def handlers() -> int:
            return sum(thread.name == "agent-address-client" for thread in threading.enumerate())

        idle = [socket.create_connection(("::1", port)) for _ in range(3 * la.ENDPOINT_MAX_CONNECTIONS)]
        assert api_world.wait_for(lambda: handlers() == la.ENDPOINT_MAX_CONNECTIONS, timeout=5), handlers()
        time.sleep(0.2)
        assert handlers() == la.ENDPOINT_MAX_CONNECTIONS  # the rest were turned away, not queued
        for connection in idle:
            connection.close()
        server.set_down(False)
        drive(agent, lambda: agent.phase == la.RUNNING and bool(server.root_calls("get_runs_in_queue")))
        assert api_world.wait_for(lambda: health_of(url) == (200, b"{}"), timeout=5)
    finally:
        agent.close()


def health_of(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()
    except OSError:
        return 0, b""


def test_api_errors_never_kill_the_loop(api_world: World, test_flows: Any) -> None:
    server = api_world.server
    run_id = api_world.run(api_world.flow(test_flows.hello))
    server.fail_next(2, status=500, only_root="get_runs_in_queue")
    server.fail_next(1, body=b"<html>proxy error</html>", status=200, only_root="get_runs_in_queue")
    server.fail_next(1, graphql_error="Unable to complete operation. An internal API error occurred.",
                     code="API_ERROR", only_root="flow_run")
    result = api_world.agent("--max-polls", "8", "--max-poll-interval", "0.5")
    assert result.returncode == 0, result.stderr
    assert api_world.state(run_id) == "Success"
    assert "answered HTTP 500" in result.stderr and "not JSON" in result.stderr
    assert result.stderr.count("The API answers again.") >= 1


def test_deploy_registers_a_flow_that_server_accepts_and_the_agent_runs(
    api_world: World, test_flows: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = api_world.server
    for key, value in api_world.env.items():
        monkeypatch.setenv(key, value)
    flow = la.Flow("Deployed Flow", test_flows.hello)
    flow_id = flow.deploy("My Project", labels=["test"], api=server.url)
    assert flow.deploy("My Project", api=server.url) == flow_id  # unchanged: the same version
    stored = server.flow(flow_id)
    assert stored["storage"]["type"] == "Local"
    assert stored["storage"]["flows"] == {"Deployed Flow": str(api_world.storage_dir / "deployed-flow.prefect")}
    assert sorted(stored["run_config"]["labels"]) == ["deployed-flow", "local", "test"]
    run_id = la.create_flow_run("Deployed Flow", {"name": "API"}, labels=["test"], api=server.url)
    assert server.run(run_id)["parameters"] == {"name": "API"}
    assert la.list_flows(api=server.url)[0].name == "Deployed Flow"
    api_world.agent("--once")
    assert api_world.state(run_id) == "Success"
    assert "Hello, API!" in [line.message for line in la.get_run_logs(run_id, api=server.url)]
    assert [run.id for run in la.list_flow_runs(state="Success", api=server.url)] == [run_id]


def test_commands_work_against_the_api(api_world: World, test_flows: Any) -> None:
    api_world.flow(test_flows.hello, labels=("test",))
    env = {**api_world.env, "PREFECT__CLOUD__API": api_world.api}
    run_id = run_cli("run", "hello", "--param", "name=Server", env=env, check=True).stdout.strip()
    assert api_world.server.run(run_id)["labels"] == ["test"]
    why = run_cli("why", run_id, env=env, check=True).stdout
    assert "lacks label(s) test" in why
    api_world.agent("--once")
    assert run_id in run_cli("runs", "--flow", "hello", env=env, check=True).stdout
    assert "Hello, Server!" in run_cli("logs", run_id, env=env, check=True).stdout
    assert "hello" in run_cli("flows", env=env, check=True).stdout
    other = api_world.run(api_world.flow(test_flows.noop))
    assert run_cli("cancel", other, env=env, check=True).stdout.strip() == "Cancelled"


def test_two_agents_on_server_run_each_run_once(api_world: World, test_flows: Any, tmp_path: Path) -> None:
    marker = tmp_path / "starts.txt"
    flow_id = api_world.flow(test_flows.record_start)
    run_ids = [api_world.run(flow_id, parameters={"path": str(marker)}) for _ in range(40)]
    agents = [_agent_process(api_world, "--once", "-n", f"agent-{n}") for n in range(2)]
    errors = [agent.communicate(timeout=120)[1] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], errors
    assert len(marker.read_text().split()) == 40
    assert all(api_world.state(run_id) == "Success" for run_id in run_ids)


# --- Never lose or double a run -------------------------------------------------------


#: Agents a test started as processes: one a failing test left running is killed after it.
_AGENT_PROCESSES: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_agent_outlives_its_test() -> Iterator[None]:
    yield
    while _AGENT_PROCESSES:
        agent = _AGENT_PROCESSES.pop()
        if agent.poll() is None:
            agent.kill()
            agent.wait(30)


def _agent_process(world: World, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    agent = subprocess.Popen(
        [sys.executable, str(AGENT), "start", "--api", world.api, "-l", "test", "--no-hostname-label",
         *world.start_args, *args],
        env=env or world.env, cwd=world.cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _AGENT_PROCESSES.append(agent)
    return agent


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_fenced_claims_run_each_run_once_on_a_server_without_locks(
    tmp_path: Path, clean_env: dict[str, str], flows_dir: Path, test_flows: Any
) -> None:
    # An older Server (before 2021-10) has no duplicate-Submitted guard and never checks versions.
    with PrefectServerDouble(submitted_guard_seconds=0) as server:
        world = World("graphql", tmp_path, clean_env, flows_dir, server)
        marker = tmp_path / "starts.txt"
        flow_id = world.flow(test_flows.record_start)
        run_ids = [world.run(flow_id, parameters={"path": str(marker)}) for _ in range(60)]
        agents = [_agent_process(world, "--once", "-n", f"agent-{n}") for n in range(4)]
        errors = [agent.communicate(timeout=180)[1] for agent in agents]
        assert [agent.returncode for agent in agents] == [0, 0, 0, 0], errors
        assert len(marker.read_text().split()) == 60  # no run executed twice, none lost
        claims = 0
        for run_id in run_ids:
            history = world.history(run_id)
            assert history.count("Running") == 1 and history[-1] == "Success", history
            claims += history.count("Submitted")
        print(f"\n4 agents x 60 runs on a lock-less Server: {claims - 60} losing claims, 0 duplicates, 0 lost")


def test_a_claim_whose_answer_was_lost_still_counts(api_world: World, test_flows: Any) -> None:
    server = api_world.server
    run_id = api_world.run(api_world.flow(test_flows.hello))
    # The Submitted write lands but the connection drops before the answer: the agent
    # cannot tell, writes it again (Server refuses: already submitted), and reads back.
    server.fail_next(1, drop_connection=True, only_root="set_flow_run_states", after_processing=True)
    result = api_world.agent("--once")
    assert result.returncode == 0, result.stderr
    assert api_world.history(run_id)[-3:] == ["Submitted", "Running", "Success"]


@WARM_TOO
def test_agent_killed_mid_run_adopts_the_run_on_restart(world: World, test_flows: Any) -> None:
    # 5 s: the restarted agent must find the process still running, even on a loaded machine.
    run_id = world.run(world.flow(test_flows.talk_slowly), parameters={"seconds": 5.0})
    agent = _agent_process(world)
    assert world.wait_for(lambda: world.state(run_id) == "Running", timeout=30)
    assert world.wait_for(lambda: "logged before the wait" in world.logs(run_id), timeout=10)
    # Killed once the agent knows those lines arrived: a batch the API stored in the instant before
    # the agent heard so is sent again after a restart (at least once; the API cannot tell).
    spools = list((world.storage_dir.parent / "agents").glob("*/spool.jsonl"))
    assert world.wait_for(lambda: all(la._spool_pending(spool) == 0 for spool in spools), timeout=10)
    agent.kill()  # kill -9: no drain, no goodbye
    agent.communicate()
    restarted = world.agent("--once")
    assert restarted.returncode == 0, restarted.stderr
    assert "Adopting flow run" in restarted.stderr
    assert world.state(run_id) == "Success"
    logs = world.logs(run_id)
    assert "after the wait" in logs  # written while no agent was watching, shipped after
    assert logs.count("before the wait") == 1
    assert any(line.startswith("Agent agent restarted and adopted process PID") for line in logs)


def test_process_lost_while_the_agent_was_down_fails_the_run(world: World, test_flows: Any,
                                                             tmp_path: Path) -> None:
    pids = tmp_path / "pids.txt"
    run_id = world.run(world.flow(test_flows.spawn_and_sleep), parameters={"pid_file": str(pids)})
    agent = _agent_process(world)
    assert world.wait_for(lambda: pids.exists() and pids.read_text().strip() != "", timeout=30)
    agent.kill()
    agent.communicate()
    flow_pid = int(pids.read_text().split()[0])
    os.killpg(flow_pid, signal.SIGKILL)
    restarted = world.agent("--once")
    assert restarted.returncode == 1  # --once: the run it settled did not succeed
    assert world.state(run_id) == "Failed"
    assert f"restarted and the flow-run process PID {flow_pid} was lost" in world.message(run_id)


@pytest.mark.parametrize("step", ["_finish", "settled", "save after settling", "remove_files", "remove_files done"])
def test_an_agent_killed_at_any_step_of_settling_a_run_never_overwrites_its_final_state(
    world: World, test_flows: Any, step: str
) -> None:
    run_id = world.run(world.flow(test_flows.hello))
    script = AGENT.parent / "benchmarks" / "crashing_agent.py"  # kills itself at that step (shared with soak.py)
    agent = subprocess.run(
        [sys.executable, str(script), str(AGENT.parent), "start", "--api", world.api, "-l", "test",
         "--no-hostname-label", "--once"],
        env={**world.env, "CRASH_AT": step}, cwd=world.cwd, capture_output=True, text=True, timeout=60)
    assert agent.returncode == -signal.SIGKILL, agent.stderr  # it died at that step
    assert world.state(run_id) == "Success"  # the flow-run process reported it
    restarted = world.agent("--once")
    assert restarted.returncode == 0, restarted.stderr
    assert world.wait_for(lambda: world.history(run_id)[-1] == "Success")
    history = world.history(run_id)
    assert "Failed" not in history and history.count("Success") == 1, history
    assert not list((world.storage_dir.parent / "agents").glob("*/runs/*"))  # nothing left behind


def test_a_removed_runs_directory_neither_fails_a_run_nor_the_runs_after_it(
    world: World, test_flows: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = world.run(world.flow(test_flows.talk_slowly), parameters={"seconds": 1.0})
    agent = stepped_agent(world, monkeypatch)
    try:
        drive(agent, lambda: "logged before the wait" in world.logs(first))
        shutil.rmtree(agent.book.runs_dir)  # its result file cannot be written now
        drive(agent, lambda: first not in {job.run_id for job in agent.book.jobs})
        second = world.run(world.flow(test_flows.hello))
        drive(agent, lambda: agent.results.get(second) is not None)
        drive(agent, lambda: world.state(first) == "Success" and world.state(second) == "Success", budget=10)
    finally:
        agent.close()
    assert "Failed" not in world.history(first)  # it reported Success itself; the agent's guess did not win
    assert agent.results[first] == "Success"  # and the agent says so too (--once's exit code reads this)
    assert "Hello, world!" in world.logs(second)  # the agent made its directories again


class FullDatabase(la.SQLiteBackend):
    """The embedded database on a disk with no room left: every connection may grow no more."""

    full = True

    def _open(self) -> sqlite3.Connection:
        connection = super()._open()
        self._limit(connection)
        return connection

    def _limit(self, connection: sqlite3.Connection) -> None:
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
        connection.execute(f"PRAGMA max_page_count = {pages if self.full else 1073741823}")

    def make_room(self) -> None:
        self.full = False
        for connection in self._connections:
            self._limit(connection)


def test_a_final_state_a_process_delivered_but_could_not_mark_delivered_is_not_written_again(
    world: World, test_flows: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = world.run(world.flow(test_flows.hello))
    agent = stepped_agent(world, monkeypatch, once=True)
    try:
        drive(agent, lambda: bool(agent.book.jobs))
        job = agent.book.jobs[0]
        assert job.process is not None and job.process.wait(30) == 0  # ended; the agent has not looked yet
        result = json.loads(job.result_path.read_text())
        assert result["delivered"] is True and result["state"]["type"] == "Success"
        # As if the disk had refused the second write: the file still says "not delivered".
        job.result_path.write_text(json.dumps({**result, "delivered": False}))
        drive(agent, lambda: agent.phase == la.DONE)
    finally:
        agent.close()
    history = world.history(run_id)
    assert history.count("Success") == 1, history
    assert agent.results == {run_id: "Success"}


def test_a_full_database_is_a_transient_error_and_no_final_state_is_dropped(tmp_path: Path) -> None:
    setup = la.SQLiteBackend(str(tmp_path / "small.db"))
    flow_id = setup.register_flow(setup.ensure_project("p"), la.serialize_flow(la.Flow("f", print), "/f", []))
    run_id = setup.create_flow_run(flow_id, parameters={}, labels=None, scheduled_start_time=None,
                                   idempotency_key="k")
    setup.close()
    db = FullDatabase(str(tmp_path / "small.db"))
    with pytest.raises(la.APIError) as refused:
        db.write_run_logs([{"flow_run_id": run_id, "message": "x" * 100_000}])
    assert refused.value.transient, refused.value
    assert "database or disk is full" in str(refused.value) and "rollback" not in str(refused.value)
    outbox = la._Outbox(db, logger=logging.getLogger("test"))
    outbox.log(run_id, "y" * 100_000)
    outbox.state(run_id, la.make_state("Success", "All reference tasks succeeded."), None)
    try:
        assert not outbox.flush(1.5)  # held back, not dropped
        assert outbox.pending == 2 and db.get_flow_run(run_id).state == "Scheduled"  # type: ignore[union-attr]
        db.make_room()
        assert outbox.flush(10)
    finally:
        outbox.close()
    assert db.get_flow_run(run_id).state == "Success"  # type: ignore[union-attr]
    assert "y" * 100_000 in [line.message for line in db.get_run_logs(run_id)]
    db.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MB file system (tmpfs), for the agent's home: the tests fill it up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"the disk-full tests mount a 4 MB tmpfs, which needs root: {mounted.stderr}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Fill a file system to the last byte; the file that did it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:  # unbuffered: nothing left over to fail on close
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


def test_a_full_disk_under_the_agents_home_stops_new_claims_until_there_is_room(
    world: World, test_flows: Any, small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = world.run(world.flow(test_flows.talk_slowly), parameters={"seconds": 1.0})
    agent = stepped_agent(world, monkeypatch, home_dir=str(small_disk), flow_dirs=[str(world.storage_dir)])
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    agent.logger.addHandler(handler)
    agent.logger.setLevel(logging.INFO)
    try:
        drive(agent, lambda: "logged before the wait" in world.logs(running))
        filler = fill(small_disk)
        waiting = world.run(world.flow(test_flows.hello))
        drive(agent, lambda: world.state(running) == "Success" and not agent.book.jobs)  # still watched
        drive(agent, lambda: False, budget=1, must=False)
        assert world.state(waiting) == "Scheduled"  # never claimed while the disk is full
        said = [record.getMessage() for record in records if record.levelno >= logging.ERROR]
        assert len([line for line in said if "bytes are free under" in line]) == 1, said  # said once
        assert len(said) == len(set(line.split(" (")[0] for line in said)), said  # each problem once
        filler.unlink()  # room again
        drive(agent, lambda: world.state(waiting) == "Success")
    finally:
        agent.logger.removeHandler(handler)
        agent.logger.setLevel(logging.NOTSET)
        agent.close()
    assert "Failed" not in world.history(running)
    assert any("claiming runs again" in record.getMessage() for record in records)


def test_a_claim_left_unstarted_by_a_killed_agent_is_handed_back(embedded: World, test_flows: Any) -> None:
    run_id = embedded.run(embedded.flow(test_flows.hello))
    run = embedded.db.get_flow_run(run_id)
    assert run is not None
    # What an agent killed between writing its claim and starting the process leaves behind.
    token = "f" * 32
    claim = la.make_state("Submitted", "Submitted for execution by agent agent", previous=run.serialized_state,
                          context={"claim": token})
    embedded.db.set_flow_run_state(run_id, claim, run.version)
    directory = embedded.storage_dir.parent / "agents" / f"agent-{la._short_hash(embedded.api.encode())}"
    directory.mkdir(parents=True)
    (directory / "ledger.json").write_text(json.dumps({"runs": {}, "claims": {run_id: token}}))
    result = embedded.agent("--max-polls", "3")
    assert result.returncode == 0, result.stderr
    history = embedded.history(run_id)
    assert history[-5:] == ["Submitted", "Scheduled", "Submitted", "Running", "Success"], history
    assert any("stopped after claiming this run and before starting it" in line for line in embedded.logs(run_id))


@pytest.mark.parametrize("mode", ["500", "drop"])
def test_an_outage_in_a_burst_loses_nothing(api_world: World, test_flows: Any, mode: str) -> None:
    server = api_world.server
    flow_id = api_world.flow(test_flows.talk_slowly)
    run_ids = [api_world.run(flow_id, parameters={"seconds": 1.0}) for _ in range(8)]
    agent = _agent_process(api_world)
    try:
        assert server.wait_for(lambda: all("before the wait" in api_world.logs(r) for r in run_ids), timeout=60)
        server.set_down(True, mode=mode)  # the flows print again while it is down: the agent must hold it
        time.sleep(2)  # longer than the flows' wait: they finish while the API is down
        late = api_world.run(flow_id, parameters={"seconds": 0.0})  # created while the agent cannot see it
        server.set_down(False)
        back = time.monotonic()
        assert server.wait_for(lambda: len(server.requests) and server.requests[-1].status == 200, timeout=10)
        resumed = time.monotonic() - back
        run_ids.append(late)
        assert server.wait_for(lambda: all(server.run(r)["state"] == "Success" for r in run_ids), timeout=90)

        def complete(run_id: str) -> bool:
            logs = api_world.logs(run_id)
            return logs.count("before the wait") == 1 and logs.count("after the wait") == 1

        assert server.wait_for(lambda: all(complete(run_id) for run_id in run_ids), timeout=30)
    finally:
        agent.terminate()
        _, errors = agent.communicate(timeout=60)
    assert agent.returncode == 0, errors
    assert "Holding" in errors and "The API takes writes again" in errors and "The API answers again." in errors
    print(f"\noutage ({mode}) mid-burst: runs lost 0, log lines lost 0, resumed in {resumed:.2f} s")
    assert resumed < 5  # about a second (see the step test); generous here, where other tests run too


@WARM_TOO
def test_each_way_a_flow_run_process_can_die_ends_failed_with_the_reason(
    world: World, test_flows: Any, flows_dir: Path
) -> None:
    (flows_dir / "breaks_on_import.py").write_text("def flow():\n    pass\n")
    breaks = importlib.import_module("breaks_on_import")
    runs = {
        "exception": world.run(world.flow(test_flows.fail)),
        "sys.exit": world.run(world.flow(test_flows.exit_code), parameters={"code": 3}),
        "os._exit": world.run(world.flow(test_flows.hard_exit), parameters={"code": 7}),
        "SIGKILL": world.run(world.flow(test_flows.kill_self), parameters={"signal_number": 9}),
        "segfault": world.run(world.flow(test_flows.segfault)),
        "corrupt file": world.run(world.flow(test_flows.noop, name="corrupt")),
        "import error": world.run(world.flow(breaks.flow, name="breaks")),
        "hang": world.run(world.flow(test_flows.sleep), parameters={"seconds": 60}),
    }
    (world.storage_dir / "corrupt.prefect").write_bytes(b"\x80\x04not a pickle")
    (flows_dir / "breaks_on_import.py").write_text("raise ImportError('broken on purpose')\n")
    started = time.monotonic()
    result = world.agent("--once", "--timeout", "2")
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    expected = {
        "exception": "ValueError: boom from the flow",
        "sys.exit": "SystemExit: 3",
        "os._exit": "exited with code 7",
        "SIGKILL": "killed by SIGKILL (the out-of-memory killer may have ended it)",
        "segfault": "crashed with a segmentation fault (SIGSEGV)",
        "corrupt file": "is corrupt or unreadable here",
        "import error": "ImportError: broken on purpose",
        "hang": "timed out after 2 s",
    }
    for mode, run_id in runs.items():
        assert world.state(run_id) == "Failed", mode
        assert expected[mode] in world.message(run_id), (mode, world.message(run_id))
    assert "about to exit hard" in world.message(runs["os._exit"])  # the last output lines


@WARM_TOO
def test_limit_never_runs_more_than_the_free_slots(world: World, test_flows: Any, tmp_path: Path) -> None:
    marker = tmp_path / "intervals.txt"
    flow_id = world.flow(test_flows.interval)
    for _ in range(6):
        world.run(flow_id, parameters={"path": str(marker), "seconds": 1.0})
    result = world.agent("--once", "--limit", "2")
    assert result.returncode == 0, result.stderr
    intervals = [tuple(map(float, line.split())) for line in marker.read_text().splitlines()]
    assert len(intervals) == 6
    most = max(sum(start <= moment < end for start, end in intervals) for moment, _ in intervals)
    # Never more than the limit. (Exactly two at once is likely, not certain: on a loaded
    # machine one run may end before the other's interpreter has started.)
    assert most <= 2


def stepped_agent(world: World, monkeypatch: pytest.MonkeyPatch, **options: Any) -> la.LocalAgent:
    """An agent in this process on a JumpingClock, opened and ready for its test to call step()."""
    monkeypatch.chdir(world.cwd)  # flow-run processes import the test flows from here
    flags = {"api": world.api, "labels": ["test"], "hostname_label": False,
             **({"preload": ["local_agent"]} if world.warm else {}), **options}
    agent = la.LocalAgent(la.resolve_settings(flags), clock=JumpingClock())
    agent.open()
    return agent


def drive(agent: la.LocalAgent, until: Callable[[], bool], budget: float = 30, *, must: bool = True) -> None:
    """Run the agent's loop, round by round on the real clock, until ``until()`` or it is done.

    Reaching neither within ``budget`` seconds fails the test, unless ``must`` is false.
    """
    deadline = time.monotonic() + budget
    while not until() and agent.phase != la.DONE:
        if time.monotonic() >= deadline:
            assert not must, f"not reached within {budget} s; the agent is {agent.phase}"
            return
        agent._wait(min(agent.step(), 0.05))


@WARM_TOO
def test_cancelling_a_running_run_stops_its_process_group(world: World, test_flows: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pids = tmp_path / "pids.txt"
    run_id = world.run(world.flow(test_flows.spawn_and_sleep), parameters={"pid_file": str(pids)})
    agent = stepped_agent(world, monkeypatch, once=True)
    try:
        drive(agent, lambda: pids.exists() and pids.read_text().strip() != "")
        flow_pid, grandchild = map(int, pids.read_text().split())
        assert run_cli("cancel", run_id, "--api", world.api, env=world.env, check=True).stdout.strip() == "Cancelling"
        assert isinstance(agent.clock, JumpingClock)
        agent.clock.offset += la.WATCH_SECONDS  # the agent looks at its runs every WATCH_SECONDS
        drive(agent, lambda: agent.phase == la.DONE)
    finally:
        agent.close()
    assert world.state(run_id) == "Cancelled"
    assert agent.results == {run_id: "Cancelled"}
    assert not _alive(flow_pid) and not _alive(grandchild)
    assert any("Cancellation requested" in line for line in world.logs(run_id))


@WARM_TOO
def test_sigterm_drains_then_hands_unfinished_runs_back(world: World, test_flows: Any, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pids = tmp_path / "pids.txt"
    slow = world.run(world.flow(test_flows.spawn_and_sleep), parameters={"pid_file": str(pids)})
    quick = world.run(world.flow(test_flows.sleep), parameters={"seconds": 1.0})
    agent = stepped_agent(world, monkeypatch, grace=3)
    try:
        drive(agent, lambda: world.state(quick) == "Running" and pids.exists() and pids.read_text() != "")
        flow_pid, grandchild = map(int, pids.read_text().split())
        agent.stop(signal.SIGTERM)  # what the agent's SIGTERM handler does
        drive(agent, lambda: agent.phase == la.HURRYING)
        drive(agent, lambda: world.state(quick) == "Success")  # finished within the grace period
        assert agent.book.phase(slow) == la.LAUNCHED and not agent.book.jobs[0].stopping
        assert isinstance(agent.clock, JumpingClock)
        agent.clock.offset += 3  # the grace period is over
        drive(agent, lambda: agent.phase == la.DONE)
    finally:
        agent.close()
    assert world.state(slow) == "Scheduled"  # handed back for another agent
    assert "shut down before this run finished" in world.message(slow)
    assert not _alive(flow_pid) and not _alive(grandchild)  # no orphans left behind


def test_sigterm_hands_back_a_run_claimed_and_not_yet_started(
    api_world: World, test_flows: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Server a run is claimed a little before its start time; a stop in between hands it back."""
    marker = tmp_path / "started.txt"
    due = datetime.now(timezone.utc) + timedelta(seconds=5)
    run_id = api_world.run(api_world.flow(test_flows.record_start), parameters={"path": str(marker)}, at=due)
    monkeypatch.setattr(la, "CLAIM_SETTLE_SECONDS", 0.0)  # the claim's read-back, at once: the clock stays put
    agent = stepped_agent(api_world, monkeypatch)
    try:
        drive(agent, lambda: agent.book.phase(run_id) == la.DUE)  # prefetched
        assert isinstance(agent.clock, JumpingClock)
        agent.clock.offset += (due - agent.clock.now()).total_seconds() - 0.15  # within the claim lead
        drive(agent, lambda: agent.book.phase(run_id) == la.CLAIMED)
        assert api_world.state(run_id) == "Submitted"
        agent.stop(signal.SIGTERM)
        agent.clock.offset += 1  # its start has come, and a signal came between two rounds:
        agent._launch_due()  # nothing is launched after a stop signal, whatever the round had begun
        assert agent.book.phase(run_id) == la.CLAIMED
        drive(agent, lambda: agent.phase == la.DONE)
    finally:
        agent.close()
    assert api_world.state(run_id) == "Scheduled"
    assert "shut down before starting this run; rescheduled" in api_world.message(run_id)
    assert not marker.exists()  # never started


#: Kills the agent just as it saves the output offsets it read, after anything not held back
#: has had time to reach the API: then each output line must reach the run's log once.
DIES_RECORDING_OFFSETS = '''
import os, signal, sys, time
sys.path.insert(0, sys.argv.pop(1))
import local_agent as la

read = la._Job.read_output
save = la.RunBook.save
state = {"lines": False}


def reading(self, *args, **kwargs):
    lines = read(self, *args, **kwargs)
    state["lines"] = state["lines"] or any("before the wait" in line.message for line, _ in lines)
    return lines


def saving(self):
    if state["lines"]:
        time.sleep(0.5)  # the outbox sends whatever it may send now
        os.kill(os.getpid(), signal.SIGKILL)
    return save(self)


la._Job.read_output = reading
la.RunBook.save = saving
sys.exit(la.main(sys.argv[1:]))
'''


class _CrashError(Exception):
    """The agent dies here (as kill -9 would: nothing after this point is saved)."""


@WARM_TOO
def test_a_process_started_just_before_the_agent_died_is_adopted_not_run_again(
    world: World, test_flows: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between starting a process and recording it in its ledger: the next start finds the process."""
    marker = tmp_path / "starts.txt"
    run_id = world.run(world.flow(test_flows.interval), parameters={"path": str(marker), "seconds": 1.0})
    agent = stepped_agent(world, monkeypatch)

    def die(job: Any) -> None:
        raise _CrashError

    monkeypatch.setattr(agent.book, "launched", die)
    try:
        with pytest.raises(_CrashError):
            drive(agent, lambda: False)
    finally:
        agent.close()
    assert not marker.exists()  # still running
    restarted = world.agent("--once")
    assert restarted.returncode == 0, restarted.stderr
    assert f"Adopting flow run {run_id}, started by this agent's last start just before it stopped" in \
        restarted.stderr
    assert world.state(run_id) == "Success"
    assert len(marker.read_text().splitlines()) == 1  # it ran once


@WARM_TOO
def test_output_reaches_the_log_once_when_the_agent_dies_recording_how_far_it_read(
    world: World, test_flows: Any, tmp_path: Path
) -> None:
    run_id = world.run(world.flow(test_flows.talk_slowly), parameters={"seconds": 1.5})
    script = tmp_path / "dies_recording_offsets.py"
    script.write_text(DIES_RECORDING_OFFSETS)
    agent = subprocess.run(
        [sys.executable, str(script), str(AGENT.parent), "start", "--api", world.api, "-l", "test",
         "--no-hostname-label"], env=world.env, cwd=world.cwd, capture_output=True, text=True, timeout=60)
    assert agent.returncode == -signal.SIGKILL, agent.stderr
    restarted = world.agent("--once")
    assert restarted.returncode == 0, restarted.stderr
    logs = world.logs(run_id)
    assert world.state(run_id) == "Success"
    assert logs.count("before the wait") == 1 and logs.count("logged before the wait") == 1, logs
    assert logs.count("after the wait") == 1, logs


def test_a_second_sigterm_skips_the_grace_period(world: World, test_flows: Any, tmp_path: Path) -> None:
    """The agent's own process and its signal handlers: the first SIGTERM drains, the second hurries."""
    pids = tmp_path / "pids.txt"
    run_id = world.run(world.flow(test_flows.spawn_and_sleep), parameters={"pid_file": str(pids)})
    agent = _agent_process(world, "--grace", "60")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(agent.stderr.readline, "")), daemon=True)
    reader.start()
    assert world.wait_for(lambda: pids.exists() and pids.read_text().strip() != "", timeout=30)
    flow_pid, grandchild = map(int, pids.read_text().split())
    agent.send_signal(signal.SIGTERM)
    # Two signals sent at once arrive as one: send the second once the first was heard.
    assert world.wait_for(lambda: any("SIGTERM received: the agent is shutting down." in line for line in lines))
    assert _alive(flow_pid)  # draining: the flow keeps running
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=60) == 0, "".join(lines)
    reader.join(10)
    agent.stderr.close()
    assert any("Second signal received: stopping flow runs now." in line for line in lines)
    assert world.state(run_id) == "Scheduled"
    assert not _alive(flow_pid) and not _alive(grandchild)


def test_undelivered_writes_wait_in_the_spool_for_the_next_start(api_world: World, test_flows: Any) -> None:
    server = api_world.server
    run_id = api_world.run(api_world.flow(test_flows.talk_slowly), parameters={"seconds": 1.0})
    agent = _agent_process(api_world)
    assert server.wait_for(lambda: server.run(run_id)["state"] == "Running", timeout=30)
    server.set_down(True)
    time.sleep(2.0)  # the flow finishes while the API is down
    agent.terminate()
    _, errors = agent.communicate(timeout=60)
    assert "could not be delivered; they are kept in" in errors
    assert "after the wait" not in api_world.logs(run_id)
    server.set_down(False)
    again = api_world.agent("--max-polls", "2")
    assert "left over from the last run" in again.stderr
    assert server.wait_for(lambda: "after the wait" in api_world.logs(run_id), timeout=10)
    assert api_world.state(run_id) == "Success"


def test_subreaper_adopts_and_reaps_orphaned_grandchildren(embedded: World, test_flows: Any, tmp_path: Path) -> None:
    pid_file = tmp_path / "orphan.pid"
    embedded.run(embedded.flow(test_flows.orphan_maker), parameters={"pid_file": str(pid_file)})
    agent = _agent_process(embedded, "--subreaper", "--max-polls", "40")
    try:
        assert embedded.wait_for(lambda: pid_file.exists() and pid_file.read_text().strip() != "")
        orphan = int(pid_file.read_text())
        # Its parent, the flow-run process, ends at once: the agent, not init, becomes its parent...
        assert embedded.wait_for(lambda: _parent_of(orphan) == agent.pid or not os.path.exists(f"/proc/{orphan}"),
                                 timeout=10)
        assert _parent_of(orphan) == agent.pid, "the orphan was not adopted by the agent"
        # ...and reaps it when it ends, so no zombie is left.
        assert embedded.wait_for(lambda: not os.path.exists(f"/proc/{orphan}"), timeout=10), "left a zombie"
    finally:
        agent.kill()
        agent.communicate()


_API_FAULTS = {
    "HTTP 500": ({"status": 500}, "answered HTTP 500"),
    "HTTP 502 HTML": ({"status": 502, "body": b"<html>Bad Gateway</html>"},
                      "answered HTTP 502 with a body that is not JSON"),
    "HTTP 401": ({"status": 401}, "refused the token (HTTP 401)"),
    "HTTP 403": ({"status": 403}, "refused the token (HTTP 403)"),
    "HTTP 400": ({"status": 400, "body": b'{"errors": [{"message": "Cannot query field"}]}'},
                 "rejected the request (HTTP 400): Cannot query field"),
    "not JSON": ({"status": 200, "body": b"proxy says hello"}, "answered HTTP 200 with a body that is not JSON"),
    "GraphQL error": ({"graphql_error": "Unable to complete operation.", "code": "API_ERROR"},
                      "API error: Unable to complete operation."),
    "no data": ({"status": 200, "body": b'{"data": {}}'}, "malformed API answer: get_runs_in_queue is NoneType"),
    "wrong type": ({"status": 200, "body": b'{"data": {"get_runs_in_queue": {"flow_run_ids": "x"}}}'},
                   "malformed API answer: flow_run_ids is str"),
    "null data": ({"status": 200, "body": b'{"data": null}'}, "malformed API answer: the answer's data is NoneType"),
    "dropped": ({"drop_connection": True}, "lost the connection to"),
    "too slow": ({"delay": 2.5}, "timed out"),
    "huge body": ({"status": 200, "body": b" " * (33 * 1024 * 1024)}, "sent an answer over 33554432 bytes"),
}


@pytest.mark.parametrize("fault", sorted(_API_FAULTS))
def test_bad_api_answers_are_one_clear_line_and_lose_no_run(api_world: World, test_flows: Any, fault: str) -> None:
    """The bad-input matrix, API part: each answer is named once, and the run still runs."""
    options, message = _API_FAULTS[fault]
    run_id = api_world.run(api_world.flow(test_flows.hello))
    api_world.server.fail_next(2, only_root="get_runs_in_queue", **options)
    env = {**api_world.env, "PREFECT__CLOUD__REQUEST_TIMEOUT": "1"}
    result = api_world.agent("--once", env=env)
    assert result.returncode == 0, result.stderr
    assert api_world.state(run_id) == "Success"
    problems = [line for line in result.stderr.splitlines() if "retrying" in line]
    assert len(problems) == 1 and message in problems[0], problems  # once per change, not per retry
    assert "Traceback" not in result.stderr


_BAD_STORAGE = {
    "no storage": (None, "has no storage; register it with Local storage"),
    "S3": ({"type": "S3", "bucket": "b"}, "uses S3 storage; this agent runs only Local storage"),
    "no type": ({"flows": {}}, "uses unknown storage"),
    "no flows": ({"type": "Local", "directory": "/tmp"}, "names no file for it"),
    "flows not a table": ({"type": "Local", "directory": "/tmp", "flows": ["x"]}, "names no file for it"),
}


@pytest.mark.parametrize("case", sorted(_BAD_STORAGE))
def test_bad_storage_is_one_clear_line_and_the_run_is_left_unclaimed(
    api_world: World, test_flows: Any, case: str
) -> None:
    """The bad-input matrix, storage part: the agent says once what is wrong and claims nothing,
    so an agent that can run the flow still may; nothing is unpickled."""
    storage, message = _BAD_STORAGE[case]
    run_id = api_world.run(api_world.flow(test_flows.hello, storage=storage))
    result = api_world.agent("--once")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert api_world.state(run_id) == "Scheduled"
    leaving = [line for line in result.stderr.splitlines() if f"Leaving flow run {run_id}" in line]
    assert len(leaving) == 1 and message in leaving[0], result.stderr


@pytest.mark.parametrize("place", ["/etc/passwd", "{flows}/../../etc/passwd", "{other}/hello.prefect"])
def test_a_flow_file_outside_the_operators_directories_is_never_loaded_nor_claimed(
    world: World, test_flows: Any, tmp_path: Path, place: str
) -> None:
    """The storage JSON comes from whoever registered the flow: its directory is not a permission."""
    other = tmp_path / "other"
    la.store_flow(la.Flow("hello", test_flows.hello), other)  # a real flow file, in a place nobody named
    path = place.format(flows=world.storage_dir, other=other)
    storage = {**la.local_storage("hello", path), "directory": "/"}
    run_id = world.run(world.flow(test_flows.hello, storage=storage))
    result = world.agent("--once")
    assert result.returncode == 0, result.stderr
    assert world.history(run_id) == ["Pending", "Scheduled"]  # not claimed: left for another agent
    assert result.stderr.count(f"Leaving flow run {run_id} to another agent") == 1
    assert "add its directory with --flows-dir (setting cloud.agent.flow_dirs)" in result.stderr
    why = run_cli("why", run_id, "--api", world.api, "-l", "test", env=world.env, check=True).stdout
    assert "is not under a directory this agent loads flows from" in why
    # The flow-run process checks again, whatever an agent decided.
    child = subprocess.run([sys.executable, str(AGENT), "execute", "flow-run"], cwd=world.cwd, capture_output=True,
                           text=True, timeout=60, env={**world.env, "PREFECT__CLOUD__API": world.api,
                                                       "PREFECT__CONTEXT__FLOW_RUN_ID": run_id})
    assert child.returncode == 1, child.stdout + child.stderr
    assert world.state(run_id) == "Failed"
    assert "is not under a directory this agent loads flows from" in world.message(run_id)
    if place.startswith("{other}"):  # the operator names it: now it runs
        assert world.agent("--once", "--flows-dir", str(other), "-n", "trusting").returncode == 0
        new_run = world.run(world.flow(test_flows.hello, storage=storage))
        assert world.agent("--once", "--flows-dir", str(other), "-n", "trusting").returncode == 0
        assert world.state(new_run) == "Success"


# --- The warm template (--preload) ------------------------------------------------------
#
# Runs forked from a warm template keep every guarantee of a fresh interpreter: the tests
# marked WARM_TOO above run both ways. These test what only the template can get wrong.


@pytest.mark.parametrize("world", ["sqlite", "sqlite+warm"], indirect=True)
def test_a_forked_run_is_a_process_of_its_own_as_a_fresh_one_is(world: World, test_flows: Any,
                                                                 tmp_path: Path) -> None:
    facts_file = tmp_path / "facts.jsonl"
    flow_id = world.flow(test_flows.identify)
    run_ids = [world.run(flow_id, parameters={"path": str(facts_file)}) for _ in range(3)]
    preload = ("--preload", "test_flows") if world.warm else ()
    result = world.agent("--once", *preload)
    assert result.returncode == 0, result.stderr + "\n".join(f"{run}: {world.message(run)} {world.logs(run)}"
                                                            for run in run_ids)
    facts = [json.loads(line) for line in facts_file.read_text().splitlines()]
    assert sorted(fact["run_id"] for fact in facts) == sorted(run_ids)  # each ran, once
    for fact in facts:
        assert fact["sid"] == fact["pgid"] == fact["pid"]  # its own session and process group
        assert fact["calls"] == 1  # module state is the template's copy, never a sibling's
        assert fact["stdin"] == "/dev/null" and fact["stdout"] == fact["stderr"]
        assert fact["stdout"].endswith(f"{fact['run_id']}.out")
        assert fact["sigint"] == "default_int_handler" and fact["sigterm_default"]
        assert fact["argv"] == ["execute", "flow-run"]
        assert fact["cwd"] == str(world.cwd)
        assert {"identified", "identified on stderr"} <= set(world.logs(fact["run_id"]))  # its output, in its log
        assert ("template" in fact["parent"]) is world.warm, fact["parent"]  # forked by the template, or not
    assert len({fact["pid"] for fact in facts}) == 3 and len({fact["random"] for fact in facts}) == 3


def test_a_run_that_sets_what_python_reads_only_at_start_gets_a_fresh_interpreter(
    api_world: World, test_flows: Any, tmp_path: Path
) -> None:
    facts_file = tmp_path / "facts.jsonl"
    run_configs = {"plain": {"type": "LocalRun", "env": {"FROM_RUN_CONFIG": "yes"}},
                   "hash seed": {"type": "LocalRun", "env": {"PYTHONHASHSEED": "7"}}}
    runs = {}
    for key, run_config in run_configs.items():
        name = f"identify {key}"
        path = la.store_flow(la.Flow(name, test_flows.identify), api_world.storage_dir)
        flow_id = api_world.server.add_flow(name, la.local_storage(name, path), labels=["test"], run_config=run_config)
        runs[key] = api_world.run(flow_id, parameters={"path": str(facts_file)})
    result = api_world.agent("--once", "--preload", "local_agent", "-v")
    assert result.returncode == 0, result.stderr + "\n".join(f"{run}: {api_world.message(run)} {api_world.logs(run)}"
                                                            for run in runs.values())
    assert facts_file.exists(), result.stderr[-3000:]
    parents = {fact["run_id"]: fact["parent"] for fact in map(json.loads, facts_file.read_text().splitlines())}
    assert "template" in parents[runs["plain"]]
    assert "template" not in parents[runs["hash seed"]]
    assert f"Flow run {runs['hash seed']} starts in a fresh interpreter: it sets PYTHONHASHSEED" in result.stderr


def test_a_preload_that_cannot_work_stops_the_start_with_one_line(embedded: World, tmp_path: Path) -> None:
    (embedded.cwd / "starts_a_thread.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    cases = {
        "no_such_module": "the warm template of --preload no_such_module failed: --preload no_such_module cannot "
                          "be imported: ModuleNotFoundError: No module named 'no_such_module'",
        "starts_a_thread": "started threads (Thread-1 (sleep)), which a forked process would not have",
    }
    for module, message in cases.items():
        result = embedded.agent("--once", "--preload", module, real=True)
        assert result.returncode == 1, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    bad = embedded.agent("--once", "--preload", "not a module", real=True)
    assert bad.returncode == 2 and "must name a Python module" in bad.stderr


def _template_of(agent: la.LocalAgent) -> Any:
    template = agent._template
    assert template is not None and template.ready, template and template.problem
    return template


@pytest.mark.parametrize("world", ["sqlite+warm"], indirect=True)
def test_code_changed_since_the_template_imported_it_is_run_as_changed(
    world: World, test_flows: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fresh interpreter runs the code on disk; so does a warm one: a changed module replaces the template."""
    (world.cwd / "versioned.py").write_text("VALUE = 1\n")
    flow_id = world.flow(test_flows.show_version)
    agent = stepped_agent(world, monkeypatch, preload=["local_agent", "versioned"])
    try:
        first_template = _template_of(agent).pid
        runs = [world.run(flow_id)]
        drive(agent, lambda: world.state(runs[0]) == "Success")
        (world.cwd / "versioned.py").write_text("VALUE = 'two'\n")
        runs.append(world.run(flow_id))
        drive(agent, lambda: world.state(runs[1]) == "Success")
        drive(agent, lambda: agent._template is not None and agent._template.ready)
        runs.append(world.run(flow_id))
        drive(agent, lambda: world.state(runs[2]) == "Success" and not agent.book.jobs)  # its output read
        assert _template_of(agent).pid != first_template
    finally:
        agent.close()
    assert [line for line in world.logs(runs[0]) if line.startswith("version")] == ["version 1"]
    assert [line for line in world.logs(runs[1]) if line.startswith("version")] == ["version two"]
    assert [line for line in world.logs(runs[2]) if line.startswith("version")] == ["version two"]
    assert "versioned.py changed since the template imported it" in caplog.text


@pytest.mark.parametrize("world", ["sqlite+warm", "graphql+warm"], indirect=True)
def test_a_template_that_dies_or_hangs_loses_no_run_and_runs_none_twice(
    world: World, test_flows: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "starts.txt"
    slow = world.run(world.flow(test_flows.talk_slowly), parameters={"seconds": 1.5})
    record = world.flow(test_flows.record_start)
    monkeypatch.setattr(la, "TEMPLATE_FORK_SECONDS", 1.0)
    agent = stepped_agent(world, monkeypatch)
    try:
        dying = _template_of(agent)
        drive(agent, lambda: "logged before the wait" in world.logs(slow))
        os.kill(dying.pid, signal.SIGKILL)  # the run it forked goes on, and is settled from its result file
        drive(agent, lambda: world.state(slow) == "Success")
        assert isinstance(agent.clock, JumpingClock)
        agent.clock.offset += la.TEMPLATE_RETRY_SECONDS
        after_death = world.run(record, parameters={"path": str(marker)})
        drive(agent, lambda: world.state(after_death) == "Success")  # fresh, while a new template starts
        drive(agent, lambda: agent._template is not None and agent._template.ready)
        hanging = _template_of(agent)
        os.kill(hanging.pid, signal.SIGSTOP)  # it will never answer
        after_hang = world.run(record, parameters={"path": str(marker)})
        drive(agent, lambda: world.state(after_hang) == "Success")
        assert hanging.process is not None and hanging.process.poll() == -signal.SIGKILL
        # A template that forks a run but whose answer never arrives: the agent gives up on it and
        # starts the run afresh; the forked child, never told to go, runs nothing.
        agent.clock.offset += la.TEMPLATE_RETRY_SECONDS
        drive(agent, lambda: agent._template is not None and agent._template.ready)
        mute = _template_of(agent)
        take = mute._take
        monkeypatch.setattr(mute, "_take", lambda message: None if "pid" in message else take(message))
        # (it takes longer than the agent waits: a child that wrongly went ahead would still be running)
        after_mute = world.run(world.flow(test_flows.interval), parameters={"path": str(marker), "seconds": 1.5})
        drive(agent, lambda: world.state(after_mute) == "Success" and not agent.book.jobs)
        assert mute.process is not None and mute.process.poll() == -signal.SIGKILL
    finally:
        agent.close()
    assert "logged before the wait" in world.logs(slow) and "after the wait" in world.logs(slow)
    time.sleep(1.0)  # time enough for a forked child that wrongly went ahead to write its line
    assert len(marker.read_text().splitlines()) == 3, marker.read_text()  # each ran once


# --- Real Prefect 1.x flows -------------------------------------------------------------
#
# These need prefect 1.4.1, which the tests install once into a virtualenv they cache (the
# pins that still install and work today: current marshmallow and pendulum break 1.4.1).
# Without a package index they fail saying so; nothing is skipped.

PREFECT1_PINS = """prefect==1.4.1
marshmallow==3.18.0
marshmallow-oneofschema==3.0.1
pendulum==2.1.2
python-box==6.0.2
click==8.1.3
cloudpickle==2.2.0
croniter==1.3.7
dask==2022.12.1
distributed==2022.12.1
docker==6.0.1
msgpack==1.0.5
packaging==21.3
python-dateutil==2.8.2
python-slugify==6.1.2
pytz==2022.7
requests==2.28.1
urllib3==1.26.13
toml==0.10.2
tabulate==0.9.0
PyYAML==6.0.1
importlib-resources==5.10.2
mypy-extensions==0.4.3
tornado==6.2
"""
#: Where the virtualenv is kept between runs (read once, before any test moves HOME).
TEST_CACHE = Path(os.environ.get("LOCAL_AGENT_TEST_CACHE") or Path.home() / ".cache" / "local_agent-tests")


@pytest.fixture(scope="session")
def prefect1_python() -> str:
    """A Python with prefect 1.4.1: made once (under a lock, for parallel workers), then reused."""
    import fcntl

    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-{la._short_hash(PREFECT1_PINS.encode())}"
    venv = TEST_CACHE / f"prefect-1.4.1-{tag}"
    python = venv / "bin" / "python"
    check = "from prefect.engine.state import Scheduled; Scheduled().serialize()"
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    with open(TEST_CACHE / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists() and subprocess.run([str(python), "-c", check], capture_output=True).returncode == 0:
            return str(python)
        shutil.rmtree(venv, ignore_errors=True)
        pins = TEST_CACHE / f"{venv.name}-constraints.txt"
        pins.write_text(PREFECT1_PINS)
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c", str(pins),
                  "prefect==1.4.1"],
                 [str(python), "-c", check]]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                pytest.fail(f"the real-Prefect tests need prefect 1.4.1 in a virtualenv at {venv}, and "
                            f"`{' '.join(step)}` failed: {(done.stderr or done.stdout)[-1500:]}", pytrace=False)
    return str(python)


PREFECT_FLOW = """
import sys
import prefect
from prefect import Flow, Parameter, task
from prefect.run_configs import LocalRun


@task
def say(name):
    prefect.context.logger.info("hi %s", name)
    prefect.context.logger.info("heartbeat from a %s", prefect.context.config.cloud.heartbeat_mode)
    print("printed", name)
    return name


@task
def fail_if(name):
    if name == "boom":
        raise ValueError("boom from a task")


@task
def where():
    import os
    prefect.context.logger.info("FROM_RUN_CONFIG=%s cwd=%s", os.environ.get("FROM_RUN_CONFIG"), os.getcwd())
    # Prefect's configuration reads PREFECT__* variables: from the run's own environment, also when forked.
    prefect.context.logger.info("prefect.config says %s", prefect.context.config.get("from_run_config"))


with Flow("prefect-hello", run_config=LocalRun(labels=["test"])) as flow:
    fail_if(say(Parameter("name", default="world")))

if __name__ == "__main__":
    prefect.Client().create_project("P")
    if len(sys.argv) > 1 and sys.argv[1] == "script":  # stored as this very script, found by name when run
        from prefect.storage import Local
        flow.storage = Local(stored_as_script=True, path=__file__, add_default_labels=False)
    elif len(sys.argv) > 1:  # the run-config variant: LocalRun(env, working_dir), or a config of another kind
        from prefect.run_configs import DockerRun
        flow = Flow("prefect-docker" if sys.argv[1] == "docker" else "prefect-where", tasks=[where])
        flow.run_config = (DockerRun(labels=["test"]) if sys.argv[1] == "docker" else
                           LocalRun(env={"FROM_RUN_CONFIG": "yes", "PREFECT__FROM_RUN_CONFIG": "yes"},
                                    working_dir=sys.argv[1], labels=["test"]))
    print(flow.register(project_name="P", add_default_labels=False))
"""


def register_prefect_flow(world: World, python: str, tmp_path: Path, *variant: str) -> tuple[str, dict[str, str]]:
    """Register PREFECT_FLOW with Prefect 1.4.1's own client (Local storage); its id, and the
    environment a Prefect 1.x user would run agents with."""
    env = {**world.env, "PREFECT__BACKEND": "server", "PREFECT__SERVER__ENDPOINT": world.api,
           "PREFECT__CLOUD__API": world.api}
    script = tmp_path / "prefect_hello.py"
    script.write_text(PREFECT_FLOW)
    done = subprocess.run([python, str(script), *variant], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1], env


def prefect_run_facts(server: Any, run_id: str) -> tuple[list[str], dict[str, str], list[dict[str, Any]]]:
    """A run's state sequence, its task runs' final states by task slug, and its log rows."""
    states = [state["type"] for state in server.states(run_id)]
    task_states = {row["task_slug"] if "task_slug" in row else str(row.get("task_id")): row["state"]
                   for row in server.task_runs(run_id)}
    return states, task_states, server.logs(run_id)


@pytest.mark.parametrize("preload", [(), ("--preload", "prefect")], ids=["fresh", "warm"])
@pytest.mark.parametrize("name", ["you", "boom"])
def test_a_real_prefect_flow_runs_on_prefects_engine_with_its_task_runs_and_logs_once(
    api_world: World, prefect1_python: str, tmp_path: Path, name: str, preload: tuple[str, ...]
) -> None:
    server = api_world.server
    flow_id, env = register_prefect_flow(api_world, prefect1_python, tmp_path)
    run_id = str(server.add_flow_run(flow_id, parameters={"name": name}))
    result = run_in_process(["start", "--once", "-l", "test", "--no-hostname-label", "--python", prefect1_python,
                             *preload], env=env, cwd=tmp_path)
    assert "Flow runs use" in result.stderr and "with prefect cloudpickle" in result.stderr
    assert ("Flow runs fork from a warm process" in result.stderr) is bool(preload)
    assert "fresh interpreter" not in result.stderr
    states, task_states, logs = prefect_run_facts(server, run_id)
    assert server.server_errors == []
    messages = [log["message"] for log in logs]
    if name == "you":
        assert result.returncode == 0, result.stderr
        assert states == ["Pending", "Scheduled", "Submitted", "Running", "Success"]
        assert sorted(task_states.values()) == ["Success", "Success", "Success"]
    else:
        assert states[-1] == "Failed" and server.run(run_id)["state_message"] == "Some reference tasks failed."
        assert sorted(task_states.values()) == ["Failed", "Success", "Success"]  # fail_if; say and name ran
    for line in ("Beginning Flow run for 'prefect-hello'", f"hi {name}", f"printed {name}"):
        assert messages.count(line) == 1, (line, messages)  # shipped once: by Prefect, or (a print) by the agent
    task_logs = [log for log in logs if log["message"] == f"hi {name}"]
    assert task_logs[0]["task_run_id"] in {row["id"] for row in server.task_runs(run_id)}
    if preload:  # a forked run beats its heartbeat from a thread, at once, not from a second Prefect process
        assert any(run_id in request.query + json.dumps(request.variables) for request in
                   server.root_calls("update_flow_run_heartbeat")), "no heartbeat"
    assert f"heartbeat from a {'thread' if preload else 'process'}" in messages


def test_prefect_runs_go_to_an_agent_that_can_run_them_with_their_run_config(
    api_world: World, prefect1_python: str, tmp_path: Path
) -> None:
    server = api_world.server
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    flow_id, env = register_prefect_flow(api_world, prefect1_python, tmp_path, str(workdir))
    run_id = str(server.add_flow_run(flow_id))
    docker_flow, _ = register_prefect_flow(api_world, prefect1_python, tmp_path, "docker")
    docker_run = str(server.add_flow_run(docker_flow))
    argv = ["start", "--once", "-l", "test", "--no-hostname-label"]
    # An agent whose Python has no prefect claims neither: another agent may run them.
    without = run_in_process(argv, env=env, cwd=tmp_path)
    assert without.returncode == 0, without.stderr
    assert server.run(run_id)["state"] == "Scheduled" and server.run(docker_run)["state"] == "Scheduled"
    assert f"Leaving flow run {run_id} to another agent: its flow was stored by Prefect, and the flow-run " \
           "Python has no prefect" in without.stderr
    assert f"Leaving flow run {docker_run} to another agent: its flow has a DockerRun run config" in without.stderr
    # One with prefect runs the LocalRun one, with its variables and working directory, also
    # forked from a warm template that imported prefect with the agent's environment.
    able = run_in_process([*argv, "--python", prefect1_python, "-n", "able", "--preload", "prefect"], env=env,
                          cwd=tmp_path)
    assert able.returncode == 0, able.stderr
    assert "Flow runs fork from a warm process" in able.stderr and "fresh interpreter" not in able.stderr
    assert server.run(run_id)["state"] == "Success" and server.run(docker_run)["state"] == "Scheduled"
    messages = [log["message"] for log in server.logs(run_id)]
    assert f"FROM_RUN_CONFIG=yes cwd={workdir}" in messages and "prefect.config says yes" in messages


def test_a_real_prefect_flow_stored_as_a_script_runs_from_where_the_operator_keeps_code(
    api_world: World, prefect1_python: str, tmp_path: Path
) -> None:
    server = api_world.server
    project = tmp_path / "project"  # the agent's working directory: the operator's code
    project.mkdir()
    flow_id, env = register_prefect_flow(api_world, prefect1_python, project, "script")
    assert server.flow(flow_id)["storage"]["stored_as_script"] is True
    run_id = str(server.add_flow_run(flow_id, parameters={"name": "script"}))
    argv = ["start", "--once", "-l", "test", "--no-hostname-label", "--python", prefect1_python]
    other = tmp_path / "elsewhere"
    other.mkdir()
    elsewhere = run_in_process(argv, env=env, cwd=other)  # not where the script is: not trusted
    assert server.run(run_id)["state"] == "Scheduled", server.run(run_id)["state_message"]
    assert "add its directory with --flows-dir (setting cloud.agent.flow_dirs) or -p/--import-path" in elsewhere.stderr
    here = run_in_process([*argv, "-n", "in-project"], env=env, cwd=project)
    assert here.returncode == 0, [log["message"] for log in server.logs(run_id)]
    assert server.run(run_id)["state"] == "Success", server.run(run_id)["state_message"]
    assert "hi script" in [log["message"] for log in server.logs(run_id)]


def test_a_mixed_fleet_of_prefects_agent_and_ours_runs_each_run_once(
    api_world: World, prefect1_python: str, tmp_path: Path
) -> None:
    """Prefect 1.4.1's LocalAgent and ours on the same labels and API; ours without prefect too."""
    server = api_world.server
    flow_id, env = register_prefect_flow(api_world, prefect1_python, tmp_path)
    run_ids = [str(server.add_flow_run(flow_id, parameters={"name": f"run-{n}"})) for n in range(20)]
    theirs = subprocess.Popen([str(Path(prefect1_python).parent / "prefect"), "agent", "local", "start", "-l", "test",
                               "--no-hostname-label"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    ours = [subprocess.Popen([sys.executable, str(AGENT), "start", "-l", "test", "--no-hostname-label", "-n", name,
                              *python], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
            for name, python in (("with-prefect", ["--python", prefect1_python]), ("without-prefect", []))]
    try:
        assert api_world.wait_for(lambda: all(server.run(run_id)["state"] in la.FINAL_STATES for run_id in run_ids),
                                  timeout=120)
    finally:
        for agent in (theirs, *ours):
            agent.terminate()
        theirs.wait(30)
        errors = [agent.communicate(timeout=60)[1] for agent in ours]
    assert all(server.run(run_id)["state"] == "Success" for run_id in run_ids)
    for n, run_id in enumerate(run_ids):
        messages = [log["message"] for log in server.logs(run_id)]
        assert messages.count(f"hi run-{n}") == 1, messages  # its tasks ran once
        assert [state["type"] for state in server.states(run_id)].count("Running") == 1
    assert "finished: " not in errors[1]  # the agent without prefect ran none of them


def test_flows_deployed_from_this_file_are_whole_to_prefects_tools(
    api_world: World, test_flows: Any, prefect1_python: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Their parameters and body are Prefect tasks: Prefect's client sees the parameters, and the
    run's task runs end as the flow did."""
    server = api_world.server
    for key, value in api_world.env.items():
        monkeypatch.setenv(key, value)
    flow_id = la.Flow("hello", test_flows.hello).deploy("P", labels=["test"], api=server.url)
    view = subprocess.run(
        [prefect1_python, "-c", "import sys; from prefect.backend import FlowView; "
         "print(sorted(p.name for p in FlowView.from_flow_id(sys.argv[1]).flow.parameters()))", flow_id],
        env={**api_world.env, "PREFECT__BACKEND": "server", "PREFECT__SERVER__ENDPOINT": server.url},
        capture_output=True, text=True, timeout=120)
    assert view.stdout.strip() == "['name']", view.stderr[-2000:]
    good = la.create_flow_run("hello", {"name": "tasks"}, labels=["test"], api=server.url)
    fail_id = la.Flow("fail", test_flows.fail).deploy("P", labels=["test"], api=server.url)
    assert fail_id
    bad = la.create_flow_run("fail", labels=["test"], api=server.url)
    assert api_world.agent("--once").returncode == 1  # one of the two failed
    assert sorted(row["state"] for row in server.task_runs(good)) == ["Success", "Success"]  # name, body
    assert [row["state"] for row in server.task_runs(bad)] == ["Failed"]  # no parameters: the body alone


def test_a_real_prefect_flow_runs_on_the_embedded_database_on_prefects_local_runner(
    embedded: World, prefect1_python: str, tmp_path: Path
) -> None:
    """No Prefect API to report to: the flow runs on Prefect's local runner, the agent reports it."""
    script = tmp_path / "prefect_hello.py"
    script.write_text(PREFECT_FLOW + textwrap.dedent("""
        def build():
            import json
            from prefect.serialization.storage import StorageSchema
            from prefect.storage import Local
            flow.storage = Local(add_default_labels=False)
            flow.storage.add_flow(flow)
            flow.storage.build()
            print(json.dumps(StorageSchema().dump(flow.storage)))
    """))
    built = subprocess.run([prefect1_python, "-c", "import prefect_hello; prefect_hello.build()"], cwd=tmp_path,
                           env=embedded.env, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    storage = json.loads(built.stdout.strip().splitlines()[-1])
    serialized = {**la.serialize_flow(la.Flow("prefect-hello", print), "/unused", ["test"]), "storage": storage}
    flow_id = embedded.db.register_flow(embedded.project, serialized)
    failing = embedded.run(flow_id, parameters={"name": "boom"})
    run_id = embedded.run(flow_id, parameters={"name": "embedded"})
    result = embedded.agent("--once", "--python", prefect1_python, "--preload", "prefect")
    assert result.returncode == 1, result.stderr  # one of the two failed
    assert "Flow runs fork from a warm process" in result.stderr and "fresh interpreter" not in result.stderr
    assert embedded.history(run_id) == ["Pending", "Scheduled", "Submitted", "Running", "Success"]
    assert embedded.state(failing) == "Failed" and "Some reference tasks failed" in embedded.message(failing)
    logs = embedded.logs(run_id)
    for line in ("hi embedded", "printed embedded", "Task 'say': Starting task run..."):
        assert logs.count(line) == 1, (line, logs)  # Prefect's records and prints, each once
    assert not [line for line in logs if line.endswith("| hi embedded")], logs  # not again as console output


def test_a_real_prefect_flow_run_alone_by_execute_flow_run_ships_each_record_once(
    api_world: World, prefect1_python: str, tmp_path: Path
) -> None:
    """``local_agent.py execute flow-run`` with no agent: it ships its own output, Prefect its records."""
    server = api_world.server
    flow_id, env = register_prefect_flow(api_world, prefect1_python, tmp_path)
    run_id = str(server.add_flow_run(flow_id, parameters={"name": "alone"}))
    child_env = {**env, "PREFECT__CONTEXT__FLOW_RUN_ID": run_id, "PREFECT__CONTEXT__FLOW_ID": flow_id,
                 "PREFECT__ENGINE__FLOW_RUNNER__DEFAULT_CLASS": "prefect.engine.cloud.CloudFlowRunner",
                 "PREFECT__ENGINE__TASK_RUNNER__DEFAULT_CLASS": "prefect.engine.cloud.CloudTaskRunner"}
    done = subprocess.run([prefect1_python, str(AGENT), "execute", "flow-run"], env=child_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert server.run(run_id)["state"] == "Success"
    assert api_world.wait_for(lambda: "Flow run SUCCESS: all reference tasks succeeded" in api_world.logs(run_id))
    messages = api_world.logs(run_id)
    for line in ("Beginning Flow run for 'prefect-hello'", "hi alone"):
        assert messages.count(line) == 1, (line, messages)


def test_a_real_prefect_flow_reaches_the_api_as_under_prefects_own_agent(
    tmp_path: Path, clean_env: dict[str, str], flows_dir: Path, prefect1_python: str
) -> None:
    """The same flow and run, once under Prefect 1.4.1's LocalAgent and once under ours."""
    facts = {}
    for who in ("prefect", "ours"):
        with PrefectServerDouble() as server:
            world = World("graphql", tmp_path / who, clean_env, flows_dir, server)
            (tmp_path / who).mkdir()
            flow_id, env = register_prefect_flow(world, prefect1_python, tmp_path / who)
            run_id = str(server.add_flow_run(flow_id, parameters={"name": "both"}))
            if who == "prefect":
                agent = subprocess.Popen(
                    [str(Path(prefect1_python).parent / "prefect"), "agent", "local", "start", "-l", "test",
                     "--no-hostname-label"], env=env, cwd=tmp_path / who, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
                try:
                    assert world.wait_for(lambda run_id=run_id: server.run(run_id)["state"] in la.FINAL_STATES,
                                          timeout=90)
                    time.sleep(2)  # its last log batch
                finally:
                    agent.terminate()
                    agent.wait(30)
            else:
                result = run_in_process(["start", "--once", "-l", "test", "--no-hostname-label", "--python",
                                         prefect1_python], env=env, cwd=tmp_path / who)
                assert result.returncode == 0, result.stderr
            facts[who] = prefect_run_facts(server, run_id)
    (prefect_states, prefect_tasks, prefect_logs), (our_states, our_tasks, our_logs) = facts["prefect"], facts["ours"]
    assert our_states == prefect_states
    assert sorted(our_tasks.values()) == sorted(prefect_tasks.values())
    assert len(our_logs) <= 1.5 * len(prefect_logs), (len(our_logs), len(prefect_logs))
    print(f"\nPrefect's agent: {prefect_states}, {len(prefect_logs)} log rows; ours: {len(our_logs)} log rows")


def test_a_stored_object_that_cannot_run_fails_clearly(api_world: World) -> None:
    import pickle

    api_world.storage_dir.mkdir(parents=True, exist_ok=True)
    flow_file = api_world.storage_dir / "not-runnable.prefect"
    flow_file.write_bytes(pickle.dumps({"name": "not runnable"}))  # a dict: no run(), not callable
    storage = la.local_storage("not runnable", str(flow_file))
    run_id = api_world.run(api_world.server.add_flow("not runnable", storage, labels=["test"]))
    api_world.agent("--once")
    assert api_world.state(run_id) == "Failed"
    assert "the stored dict is not callable and has no run()" in api_world.message(run_id)


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return 0



# --- Schedules -----------------------------------------------------------------------------


def _auto_runs(world: World) -> list[sqlite3.Row]:
    """The embedded scheduler's runs, earliest first."""
    return world.db._read("SELECT * FROM flow_run WHERE auto_scheduled = 1 ORDER BY scheduled_start_time")


def _flow_summary(world: World, name: str) -> la.FlowSummary:
    flow = world.db.find_flow(name)
    assert flow is not None
    return flow


def test_a_deployed_schedule_creates_its_next_ten_runs_once(embedded: World, test_flows: Any) -> None:
    schedule = la.Schedule([la.CronClock("*/5 * * * *", "Europe/Berlin", parameter_defaults={"name": "cron"}),
                            la.IntervalClock(timedelta(hours=1), labels=["hourly"])])
    before = datetime.now(timezone.utc)
    embedded.flow(test_flows.hello, schedule=schedule)
    rows = _auto_runs(embedded)
    expected = schedule.next(10, before)
    # The same events, give or take the first one if a five-minute mark passed meanwhile.
    got = sorted((la._parse_time(row["scheduled_start_time"]), row["parameters"], json.loads(row["labels"]))
                 for row in rows)
    if got[0][0] != expected[0].start_time:  # a five-minute mark passed since ``before``
        expected = schedule.next(10, got[0][0] - timedelta(microseconds=1))
    assert got == sorted((event.start_time, json.dumps(event.parameter_defaults), event.labels or ["test"])
                         for event in expected)
    assert all(row["state"] == "Scheduled" for row in rows)
    # Every agent and command may top up: more rounds, from other connections too, add nothing.
    others = [la.SQLiteBackend(la._sqlite_path(embedded.api)) for _ in range(3)]
    threads = [threading.Thread(target=other.top_up_schedules, args=(datetime.now(timezone.utc),)) for other in others]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    embedded.db.top_up_schedules(datetime.now(timezone.utc))
    assert [row["id"] for row in _auto_runs(embedded)] == [row["id"] for row in rows]
    for other in others:
        other.close()


def test_agents_that_top_up_at_once_make_each_scheduled_run_once(embedded: World, test_flows: Any) -> None:
    """Two agents that both found a schedule short of runs write the same events: the idempotency
    key (flow, time, the clock's parameters) keeps one run per time."""
    schedule = la.Schedule([la.CronClock("*/5 * * * *", parameter_defaults={"name": "a"}),
                            la.CronClock("*/5 * * * *", parameter_defaults={"name": "b"})])
    flow_id = embedded.flow(test_flows.hello, schedule=schedule)
    embedded.db._write(lambda db: embedded.db._delete_auto_scheduled(db, flow_id))  # as if all were taken
    text = embedded.db._read("SELECT schedule FROM flow WHERE id = ?", (flow_id,))[0][0]
    now = datetime.now(timezone.utc)
    events = schedule.next(10, now)
    others = [la.SQLiteBackend(la._sqlite_path(embedded.api)) for _ in range(2)]
    try:
        for backend in others:  # as each would, having read the same state before either wrote
            backend._write(functools.partial(backend._create_scheduled_runs, flow_id=flow_id, events=events, now=now,
                                             schedule=text))
    finally:
        for backend in others:
            backend.close()
    rows = _auto_runs(embedded)
    assert sorted((row["scheduled_start_time"], row["parameters"]) for row in rows) == sorted(
        (la._format_time(event.start_time), json.dumps(event.parameter_defaults)) for event in events)
    assert len({(row["scheduled_start_time"], row["parameters"]) for row in rows}) == 10  # both clocks, once each


def test_a_top_up_that_read_a_schedule_before_it_was_turned_off_creates_nothing(embedded: World,
                                                                               test_flows: Any) -> None:
    clock = la.IntervalClock(timedelta(minutes=5))
    flow_id = embedded.flow(test_flows.hello, schedule=clock)
    text = embedded.db._read("SELECT schedule FROM flow WHERE id = ?", (flow_id,))[0][0]
    now = datetime.now(timezone.utc)
    events = la.Schedule([clock]).next(10, now)  # computed, then the schedule goes off before the write
    embedded.db.set_schedule_active(_flow_summary(embedded, "hello"), False)
    embedded.db._write(functools.partial(embedded.db._create_scheduled_runs, flow_id=flow_id, events=events,
                                         now=now, schedule=text))
    assert _auto_runs(embedded) == []
    run_cli("schedule", "hello", "--every", "7m", env=embedded.env, check=True)  # another schedule now
    embedded.db._write(lambda db: embedded.db._delete_auto_scheduled(db, flow_id))
    embedded.db._write(functools.partial(embedded.db._create_scheduled_runs, flow_id=flow_id, events=events,
                                         now=now, schedule=text))
    assert _auto_runs(embedded) == []  # the old schedule's times are not the new one's


def test_the_scheduler_tops_up_as_time_passes_and_skips_what_it_made(embedded: World, test_flows: Any) -> None:
    flow_id = embedded.flow(test_flows.hello, schedule=la.IntervalClock(timedelta(minutes=10)))
    first = _auto_runs(embedded)
    later = la._parse_time(first[3]["scheduled_start_time"]) + timedelta(seconds=1)  # 4 of the 10 are past
    next_due = embedded.db.top_up_schedules(later)
    rows = _auto_runs(embedded)
    times = [la._parse_time(row["scheduled_start_time"]) for row in rows]
    assert len(rows) == 14 and len(set(times)) == 14
    assert all(b - a == timedelta(minutes=10) for a, b in itertools.pairwise(times))
    assert next_due is not None and later < next_due <= times[-5]  # again by the time half are used
    assert {row["flow_id"] for row in rows} == {flow_id}


def test_turning_a_schedule_off_deletes_its_future_runs_only(embedded: World, test_flows: Any) -> None:
    embedded.flow(test_flows.hello, schedule=la.CronClock("0 * * * *"))
    ad_hoc = embedded.run(embedded.db.find_flow("hello").id, at=datetime.now(timezone.utc) + timedelta(hours=1))
    assert len(_auto_runs(embedded)) == 10
    flow = _flow_summary(embedded, "hello")
    assert embedded.db.set_schedule_active(flow, False)
    assert _auto_runs(embedded) == []
    assert embedded.state(ad_hoc) == "Scheduled"
    assert not _flow_summary(embedded, "hello").schedule_active
    embedded.db.top_up_schedules(datetime.now(timezone.utc))
    assert _auto_runs(embedded) == []
    assert embedded.db.set_schedule_active(flow, True)
    assert len(_auto_runs(embedded)) == 10


def test_a_run_deleted_before_its_claim_is_a_lost_race_not_an_error(embedded: World, test_flows: Any) -> None:
    embedded.flow(test_flows.hello, schedule=la.CronClock("0 * * * *"))
    run = embedded.db.get_flow_run(_auto_runs(embedded)[0]["id"])
    assert run is not None
    embedded.db.set_schedule_active(_flow_summary(embedded, "hello"), False)  # deletes it
    submitted = la.make_state("Submitted", "claim", previous=run.serialized_state)
    assert embedded.db.claim_flow_runs([(run, submitted)]) == [None]


def test_a_new_version_replaces_the_old_versions_scheduled_runs(embedded: World, test_flows: Any) -> None:
    old = embedded.flow(test_flows.hello, schedule=la.CronClock("0 * * * *"))
    new = embedded.flow(test_flows.hello, schedule=la.CronClock("30 * * * *"))
    rows = _auto_runs(embedded)
    assert old != new and {row["flow_id"] for row in rows} == {new}
    assert {la._parse_time(row["scheduled_start_time"]).minute for row in rows} == {30}
    assert len(rows) == 10


def test_schedule_command_sets_shows_and_turns_off_a_schedule(embedded: World, test_flows: Any) -> None:
    embedded.flow(test_flows.hello)
    result = run_cli("schedule", "hello", "--cron", "0 9 * * mon-fri", "--timezone", "America/New_York",
                     "--param", "name=\"cron\"", env=embedded.env, check=True)
    assert result.stdout.startswith("Flow hello runs on cron '0 9 * * mon-fri' America/New_York\nNext runs: ")
    rows = _auto_runs(embedded)
    new_york = la._zoneinfo("America/New_York")
    local_times = [la._parse_time(row["scheduled_start_time"]).astimezone(new_york) for row in rows]
    assert len(rows) == 10 and {(t.hour, t.minute) for t in local_times} == {(9, 0)}
    assert {t.weekday() for t in local_times} <= {0, 1, 2, 3, 4}
    assert {row["parameters"] for row in rows} == {'{"name": "cron"}'}
    # The flow group's schedule outlives a new version, as on Server.
    embedded.flow(test_flows.hello)
    assert len(_auto_runs(embedded)) == 10
    listed = json.loads(run_cli("flows", "-o", "json", env=embedded.env, check=True).stdout)
    assert set(listed[0]) == FLOW_KEYS
    assert listed[0]["schedule"] == "cron '0 9 * * mon-fri' America/New_York"
    assert listed[0]["schedule_active"] is True
    assert la._parse_time(listed[0]["next_run"]) == la._parse_time(_auto_runs(embedded)[0]["scheduled_start_time"])
    table = run_cli("flows", env=embedded.env, check=True).stdout
    assert "SCHEDULE" in table and "cron '0 9 * * mon-fri' America/New_York" in table
    result = run_cli("schedule", "hello", "--every", "90m", "--anchor", "2026-01-01T00:15:00+00:00",
                     "--timezone", "UTC", env=embedded.env, check=True)
    assert "every 1 h 30 min from 2026-01-01 00:15:00 UTC" in result.stdout
    times = [la._parse_time(row["scheduled_start_time"]) for row in _auto_runs(embedded)]
    assert len(times) == 10 and all((t - datetime(2026, 1, 1, 0, 15, tzinfo=timezone.utc)) % timedelta(minutes=90)
                                    == timedelta(0) for t in times)
    result = run_cli("schedule", "hello", "--off", env=embedded.env, check=True)
    assert "is off" in result.stdout and _auto_runs(embedded) == []
    assert "(off)" in run_cli("flows", env=embedded.env, check=True).stdout
    run_cli("schedule", "hello", "--on", env=embedded.env, check=True)
    assert len(_auto_runs(embedded)) == 10


@pytest.mark.parametrize(("args", "code", "message"), [
    (("--cron", "0 26 * * *"), 2, "argument --cron: field 'hour' (26): 26 is out of range 0-23"),
    (("--cron", "0 9 * *"), 2, "has 4 fields; expected 5"),
    (("--cron", "@reboot"), 2, "argument --cron:"),
    (("--every", "5x"), 2, "'5x' is not a duration; use 90s, 15m, 1h30m, 1d or 2w"),
    (("--every", "0s"), 2, "'0s' is not a duration from 1 µs to 100 years"),
    (("--every", "0.0000001s"), 2, "is not a duration from 1 µs to 100 years"),
    (("--cron", "0 0 30 2 *"), 1, "the schedule never fires: cron '0 0 30 2 *'"),
    (("--cron", "@daily", "--timezone", "Mars/Olympus"), 2, "unknown time zone 'Mars/Olympus'"),
    (("--cron", "@daily", "--every", "1h"), 2, "not allowed with argument"),
    (("--cron", "@daily", "--anchor", "+1h"), 1, "--anchor goes with --every"),
    (("--cron", "@daily", "--param", "nope=1"), 1, "flow 'hello' has no parameter 'nope'"),
    (("--on",), 1, "flow 'hello' has no schedule to turn on"),
])
def test_schedule_command_refuses_bad_input_with_one_line(embedded: World, test_flows: Any, args: tuple[str, ...],
                                                          code: int, message: str) -> None:
    embedded.flow(test_flows.hello)
    result = run_cli("schedule", "hello", *args, env=embedded.env)
    assert result.returncode == code, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert _auto_runs(embedded) == []


@pytest.mark.parametrize("clock", [
    {"type": "CronClock", "cron": "0 0 30 2 *"},  # never fires (Prefect raises in next())
    {"type": "CronClock", "cron": "0 9 * * *", "parameter_defaults": ["not", "an", "object"]},
    {"type": "IntervalClock", "interval": 10**20},  # overflows datetime arithmetic
    {"type": "RRuleClock", "rrule_obj": {}},  # a clock this file cannot follow
])
def test_a_schedule_the_database_holds_but_cannot_be_followed_breaks_nothing(embedded: World, test_flows: Any,
                                                                            clock: dict[str, Any]) -> None:
    flow = la.Flow("odd", test_flows.hello)
    serialized = la.serialize_flow(flow, str(la.store_flow(flow, embedded.storage_dir)), ["test"])
    serialized["schedule"] = {"clocks": [clock]}  # as another program (or a Server's dump) may have written it
    embedded.db.register_flow(embedded.project, serialized)
    run_id = embedded.run(embedded.flow(test_flows.hello))
    result = embedded.agent("--once")  # tops up (and logs why it cannot), runs what is due
    assert result.returncode == 0 and embedded.state(run_id) == "Success", result.stderr
    assert "Cannot schedule runs of flow" in result.stderr and _auto_runs(embedded) == []
    listed = json.loads(run_cli("flows", "-o", "json", env=embedded.env, check=True).stdout)
    assert {flow["name"]: flow["next_run"] for flow in listed}["odd"] is None
    assert "Traceback" not in run_cli("schedule", "odd", env=embedded.env).stderr
    dashboard = la._Dashboard(la.resolve_settings({"api": embedded.api}), mode="ui", on_loopback=True)
    assert dashboard.get("/api/flows", {})[0] == 200


def test_a_schedule_needs_every_required_parameter(embedded: World, test_flows: Any) -> None:
    embedded.flow(test_flows.record_start)
    result = run_cli("schedule", "record_start", "--every", "1h", env=embedded.env)
    assert result.returncode == 1 and "needs parameter 'path'" in result.stderr, result.stderr
    run_cli("schedule", "record_start", "--every", "1h", "--param", "path=\"x\"", env=embedded.env, check=True)
    assert len(_auto_runs(embedded)) == 10


def test_agents_run_each_scheduled_time_once(embedded: World, test_flows: Any, tmp_path: Path) -> None:
    """Three agents share one database and a schedule every 2 s: each time runs exactly once, none is skipped."""
    marker = tmp_path / "starts.txt"
    clock = la.IntervalClock(timedelta(seconds=2), parameter_defaults={"path": str(marker)})
    embedded.flow(test_flows.record_start, schedule=clock)
    agents = [_agent_process(embedded, "-n", f"agent-{n}", "--limit", "4") for n in range(3)]
    finished = lambda: embedded.db._read(  # noqa: E731
        "SELECT count(*) FROM flow_run WHERE auto_scheduled = 1 AND state = 'Success'")[0][0]
    assert embedded.wait_for(lambda: finished() >= 12, timeout=120), [a.poll() for a in agents]
    embedded.db.set_schedule_active(_flow_summary(embedded, "record_start"), False)
    for agent in agents:
        agent.send_signal(signal.SIGTERM)
    errors = [agent.communicate(timeout=60)[1] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0, 0], errors
    rows = _auto_runs(embedded)
    times = [la._parse_time(row["scheduled_start_time"]) for row in rows]
    assert len(set(times)) == len(times)  # one run per scheduled time
    assert all(b - a == timedelta(seconds=2) for a, b in itertools.pairwise(times))  # none skipped
    succeeded = [row for row in rows if row["state"] == "Success"]
    for row in succeeded:
        assert embedded.history(row["id"]) == ["Pending", "Scheduled", "Submitted", "Running", "Success"]
    assert len(marker.read_text().split()) == len(succeeded)  # each ran once
    took = [error.count("finished: Success") for error in errors]
    print(f"\n3 agents, a schedule every 2 s: {len(succeeded)} runs, per agent {took}, duplicates 0, gaps 0")


def test_an_agent_tops_up_the_schedules_as_its_clock_moves(embedded: World, test_flows: Any) -> None:
    clock = JumpingClock()
    embedded.flow(test_flows.noop, schedule=la.IntervalClock(timedelta(minutes=1)))
    # An agent without the runs' labels: it tops up the schedule and takes nothing.
    settings = la.resolve_settings({"api": embedded.api, "labels": ["elsewhere"], "hostname_label": False},
                                   environ=embedded.env)
    agent = la.LocalAgent(settings, clock=clock)
    agent.open()
    try:
        agent.step()
        assert len(_auto_runs(embedded)) == 10
        clock.offset = 7 * 60.0  # seven of them are past now
        for _ in range(3):
            agent._next_poll = 0.0
            agent.step()
        upcoming = [row for row in _auto_runs(embedded)
                    if la._parse_time(row["scheduled_start_time"]) > clock.now()]
        assert len(upcoming) == 10
    finally:
        agent.stop()
        agent.close()


def test_a_database_of_schema_1_is_brought_up_to_date(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as connection:
        connection.executescript(la._SCHEMA_CHANGES[1])
        connection.execute(f"PRAGMA application_id={la._APPLICATION_ID}")
        connection.execute("PRAGMA user_version=1")
        connection.execute("INSERT INTO project (id, name, created) VALUES ('p', 'old', '2026-01-01')")
    connection.close()
    backend = la.SQLiteBackend(str(path))
    try:
        assert backend._read("PRAGMA user_version")[0][0] == la._SCHEMA_VERSION
        assert backend.ensure_project("old") == "p"
        flow = la.Flow("f", print, schedule=la.CronClock("@hourly"))
        flow_id = backend.register_flow("p", la.serialize_flow(flow, str(tmp_path / "f.prefect"), ["x"]))
        assert backend.find_flow("f").schedule_active and backend.find_flow("f").id == flow_id
        assert len(backend._read("SELECT id FROM flow_run WHERE auto_scheduled = 1")) == 10
    finally:
        backend.close()


def test_a_flow_pickled_before_schedules_loads_without_one(tmp_path: Path) -> None:
    import pickle

    flow = la.Flow("old", print)
    del flow.__dict__["schedule"]  # what a flow pickled by an older release holds
    restored = pickle.loads(pickle.dumps(flow))
    assert restored.schedule is None
    assert la.serialize_flow(restored, str(tmp_path / "old.prefect"), [])["schedule"] is None


def _server_query(server: Any, document: str) -> Any:
    """Ask the Server double over its GraphQL API, as any client would."""
    backend = la.GraphQLBackend(server.url)
    try:
        return backend.graphql(document)
    finally:
        backend.close()


def _server_auto_runs(server: Any, flow_id: str) -> list[dict[str, Any]]:
    where = '{ flow_id: { _eq: "%s" }, auto_scheduled: { _eq: true } }' % flow_id
    answer = _server_query(server, "query { flow_run(where: %s, order_by: { scheduled_start_time: asc }) "
                                   "{ scheduled_start_time parameters state } }" % where)
    return list(answer["flow_run"])


def test_server_gets_the_schedule_in_the_flow_json_and_creates_the_runs(api_world: World, test_flows: Any) -> None:
    server = api_world.server
    schedule = la.Schedule([la.CronClock("0 9 * * *", "Europe/Berlin", parameter_defaults={"name": "cron"})])
    flow = la.Flow("hello", test_flows.hello, labels=["test"], schedule=schedule)
    before = datetime.now(timezone.utc)
    flow_id = flow.deploy("tests", api=server.url)
    stored = server.flow(flow_id)
    assert stored["schedule"] == schedule.to_prefect() and stored["is_schedule_active"]
    assert server.root_calls("set_schedule_active")
    runs = _server_auto_runs(server, flow_id)
    assert [la._parse_time(run["scheduled_start_time"]) for run in runs] == [
        event.start_time for event in schedule.next(10, before)]
    assert all(run["parameters"] == {"name": "cron"} and run["state"] == "Scheduled" for run in runs)
    listed = json.loads(run_cli("flows", "-o", "json", "--api", server.url, env=api_world.env, check=True).stdout)
    assert listed[0]["schedule"] == "cron '0 9 * * *' Europe/Berlin" and listed[0]["schedule_active"]


def test_server_is_not_sent_an_interval_it_would_refuse(api_world: World, test_flows: Any) -> None:
    flow = la.Flow("hello", test_flows.hello, labels=["test"], schedule=la.IntervalClock(30))
    with pytest.raises(la.AgentError, match="refuses intervals shorter than a minute"):
        flow.deploy("tests", api=api_world.server.url)
    assert not api_world.server.root_calls("create_flow_from_compressed_string")


def test_schedule_command_on_server_uses_its_flow_group_schedule(api_world: World, test_flows: Any) -> None:
    server = api_world.server
    flow_id = la.Flow("hello", test_flows.hello, labels=["test"]).deploy("tests", api=server.url)
    result = run_cli("schedule", "hello", "--every", "2h", "--timezone", "Asia/Kolkata", "--api", server.url,
                     env=api_world.env)
    assert result.returncode == 0, result.stderr
    answer = _server_query(server, 'query { flow_by_pk(id: "%s") { flow_group { schedule } } }' % flow_id)
    clock = answer["flow_by_pk"]["flow_group"]["schedule"]["clocks"][0]
    assert clock["interval"] == 2 * 3600 * 10**6 and clock["start_date"]["tz"] == "Asia/Kolkata"
    assert len(_server_auto_runs(server, flow_id)) == 10
    assert "every 2 h" in result.stdout
    for args, message in ((("--every", "30s"), "60 s or more"),
                          (("--every", "1h", "--anchor", "+1h"), "leave out --anchor")):
        refused = run_cli("schedule", "hello", *args, "--api", server.url, env=api_world.env)
        assert refused.returncode == 1 and message in refused.stderr, refused.stderr
    run_cli("schedule", "hello", "--off", "--api", server.url, env=api_world.env, check=True)
    assert server.root_calls("set_schedule_inactive")
    assert _server_auto_runs(server, flow_id) == []


def test_where_prefect_loops_forever_a_schedule_goes_on() -> None:
    # Prefect 1.4.1 never returns here (a minutely job asked for its times on a fall-back day
    # before the repeated hour); this file goes on after the last time it gave.
    after = datetime(2026, 11, 1, 4, 0, tzinfo=timezone.utc)  # 00:00 EDT, America/New_York
    schedule = la.Schedule([la.CronClock("* * * * *", "America/New_York")])
    times = [event.start_time for event in schedule.next(500, after)]
    assert len(times) == 500 and times == sorted(set(times))
    first_hour = {after + timedelta(hours=1, minutes=minute) for minute in range(60)}  # 01:xx EDT, 05:xx UTC
    assert not first_hour & set(times)  # the repeated hour fires on its second occurrence only, as in Prefect
    assert times[:60] == [after + timedelta(minutes=minute) for minute in range(1, 60)] + [after + timedelta(hours=2)]
    assert all(b - a == timedelta(minutes=1) for a, b in itertools.pairwise(times[59:]))


def test_json_logs_are_one_object_a_line_naming_the_run(embedded: World, test_flows: Any) -> None:
    run_id = embedded.run(embedded.flow(test_flows.hello))
    failing = embedded.run(embedded.flow(test_flows.fail))
    result = embedded.agent("--once", "--log-format", "json", "-f")
    entries = [json.loads(line) for line in result.stderr.splitlines()]  # every line is an object
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    finished = {entry["flow_run_id"]: entry for entry in entries if "finished:" in entry["message"]}
    assert finished[run_id]["flow_name"] == "hello" and finished[failing]["flow_name"] == "fail"
    assert finished[failing]["level"] == "INFO" and la._parse_time(finished[run_id]["time"])
    echoed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    printed = [entry for entry in echoed if entry["message"] == "printed by the flow"]
    assert printed and printed[0]["flow_run_id"] == run_id and printed[0]["flow_name"] == "hello"
    bad = run_cli("start", "--log-format", "yaml", env=embedded.env)
    assert bad.returncode == 2 and "argument --log-format: the value must be text or json; got 'yaml'" in bad.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_metrics_count_what_the_agent_did_in_prometheus_format(embedded: World, test_flows: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client.parser import text_string_to_metric_families  # a test-only dependency (.ci/run)

    ok, failing = embedded.run(embedded.flow(test_flows.hello)), embedded.run(embedded.flow(test_flows.fail))
    slow = embedded.run(embedded.flow(test_flows.sleep), parameters={"seconds": 30})
    cancelled = embedded.run(embedded.flow(test_flows.sleep, name="sleepy"), parameters={"seconds": 30})
    port = _free_port()
    agent = stepped_agent(embedded, monkeypatch, agent_address=f"http://127.0.0.1:{port}", timeout=3, limit=8)
    try:
        drive(agent, lambda: embedded.state(cancelled) == "Running")
        embedded.db.cancel_flow_run(cancelled)
        agent._next_watch = 0.0  # look at once, not within WATCH_SECONDS
        drive(agent, lambda: len(agent.results) == 4)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = answer.read().decode()
    finally:
        agent.stop()
        drive(agent, lambda: False, must=False, budget=20)
        agent.close()
    families = {family.name: family for family in text_string_to_metric_families(text)}

    def value(metric: str, **labels: str) -> float:
        family = re.sub(r"_(total|count|sum|bucket)$", "", metric)
        return next(sample.value for sample in families[family].samples
                    if sample.name == metric and sample.labels == labels)

    assert {embedded.state(run) for run in (ok, failing, slow)} == {"Success", "Failed"}
    assert embedded.state(cancelled) == "Cancelled"
    assert value("local_agent_runs_claimed_total") == value("local_agent_runs_launched_total") == 4
    assert value("local_agent_runs_finished_total", state="Success") == 1
    assert value("local_agent_runs_finished_total", state="Failed") == 2  # one raised, one timed out
    assert value("local_agent_runs_finished_total", state="Cancelled") == 1
    assert value("local_agent_runs_timed_out_total") == 1 and value("local_agent_runs_cancelled_total") == 1
    assert value("local_agent_claims_lost_total") == 0 and value("local_agent_runs_handed_back_total") == 0
    assert value("local_agent_polls_total") >= 1 and value("local_agent_poll_errors_total") == 0
    assert value("local_agent_run_duration_seconds_count") == 4
    assert value("local_agent_run_duration_seconds_bucket", le="+Inf") == 4
    assert value("local_agent_api_request_duration_seconds_count", operation="get_runs_in_queue") >= 1
    assert value("local_agent_api_request_duration_seconds_count", operation="claim_flow_runs") >= 1
    assert value("local_agent_api_request_duration_seconds_count", operation="write_run_logs") >= 1
    assert value("local_agent_running_processes") == 0 and value("local_agent_free_slots") == 8
    assert value("local_agent_spool_entries") == 0 and value("local_agent_spool_bytes") == 0
    assert 0 <= value("local_agent_seconds_since_last_poll") < 60
    assert abs(value("local_agent_start_time_seconds") - time.time()) < 300
    assert value("local_agent_info", version=la.__version__, **{"name": "agent"}) == 1


# --- Service files -------------------------------------------------------------------------


def _unit_environment(unit: str) -> dict[str, str]:
    """What systemd gives ExecStart: the Environment= lines, then the EnvironmentFile=."""
    import shlex

    environment: dict[str, str] = {}
    for line in unit.splitlines():
        key, _, value = line.partition("=")
        if key == "Environment":
            name, _, setting = shlex.split(value)[0].partition("=")
            environment[name] = setting
        elif key == "EnvironmentFile":
            for pair in Path(shlex.split(value)[0]).read_text().splitlines():
                name, _, setting = pair.partition("=")
                environment[name] = setting
    return environment


def test_install_systemd_writes_a_unit_systemd_accepts_that_runs_the_agent(tmp_path: Path, clean_env: dict[str, str],
                                                                          flows_dir: Path) -> None:
    import shlex

    systemd_analyze = shutil.which("systemd-analyze")
    assert systemd_analyze, "systemd-analyze is missing: apt-get install systemd (it checks the unit)"
    unit_path, token_file = tmp_path / "local-agent.service", tmp_path / "agent.env"
    with PrefectServerDouble(cloud=True, require_token=TOKEN) as cloud:
        result = run_cli("install", "systemd", "--write", str(unit_path), "--token-file", str(token_file),
                         "-k", TOKEN, "-a", cloud.url, "-l", "test", "--no-hostname-label", "--grace", "90",
                         "--max-polls", "2", env=clean_env, cwd=flows_dir)
        assert result.returncode == 0, result.stderr
        assert "systemctl daemon-reload && systemctl enable --now local-agent" in result.stdout
        unit = unit_path.read_text()
        assert TOKEN not in unit and TOKEN not in result.stdout + result.stderr
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        assert token_file.read_text() == f"PREFECT__CLOUD__AGENT__AUTH_TOKEN={TOKEN}\n"
        for line in ("Restart=on-failure", "KillSignal=SIGTERM", "KillMode=process", "TimeoutStopSec=120",
                     f"WorkingDirectory={flows_dir}", f"EnvironmentFile={token_file}", "WantedBy=multi-user.target"):
            assert line in unit.splitlines(), line
        verified = subprocess.run([systemd_analyze, "verify", str(unit_path)], capture_output=True, text=True,
                                  timeout=60)
        assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
        # What systemd would run, with what it would give it: the agent gets its token from the file.
        command = shlex.split(next(line for line in unit.splitlines() if line.startswith("ExecStart="))[10:])
        assert command[:3] == [sys.executable, str(AGENT), "start"] and "-k" not in command
        environment = {"PATH": os.environ["PATH"], "HOME": clean_env["HOME"], **_unit_environment(unit)}
        ran = subprocess.run(command, env=environment, cwd=flows_dir, capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stderr
        assert cloud.root_calls("get_runs_in_queue")  # authenticated with the token from the file
    user_unit = run_cli("install", "systemd", "--user", "-l", "test", env=clean_env, check=True).stdout
    assert "WantedBy=default.target" in user_unit and "User=" not in user_unit


def test_install_supervisor_writes_a_program_supervisord_reads(tmp_path: Path, clean_env: dict[str, str],
                                                              flows_dir: Path) -> None:
    from supervisor.options import ServerOptions  # a test-only dependency (.ci/run)

    token_file = tmp_path / "agent.toml"
    result = run_cli("install", "supervisor", "-t", TOKEN, "--token-file", str(token_file), "-l", "etl jobs",
                     "--grace", "45", env=clean_env, cwd=flows_dir)
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout and TOKEN in token_file.read_text()
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    config = tmp_path / "supervisord.conf"
    config.write_text(f"[supervisord]\nlogfile={tmp_path}/supervisord.log\npidfile={tmp_path}/supervisord.pid\n\n"
                      + result.stdout)
    options = ServerOptions()
    options.realize(args=["-c", str(config)])
    program = options.process_group_configs[0].process_configs[0]
    assert program.name == "local-agent-agent"
    assert program.command == f"{sys.executable} {AGENT} start -l 'etl jobs' --grace 45"
    assert program.stopsignal == signal.SIGTERM and program.stopwaitsecs == 75
    assert program.directory == str(flows_dir) and not program.stopasgroup and not program.killasgroup
    assert program.environment["PREFECT__USER_CONFIG_PATH"] == str(token_file)
    assert program.environment["PREFECT__HOME_DIR"] == str(Path(clean_env["PREFECT__HOME_DIR"]))
    assert la.resolve_settings({}, environ=program.environment).token == TOKEN  # the agent reads it there


def test_install_keeps_the_token_off_the_command_line_and_checks_its_file(tmp_path: Path,
                                                                          clean_env: dict[str, str]) -> None:
    refused = run_cli("install", "systemd", "-t", TOKEN, env=clean_env)
    assert refused.returncode == 1 and "must not go on the service's command line: give --token-file" in \
        refused.stderr and TOKEN not in refused.stderr
    loose = tmp_path / "loose.env"
    loose.write_text(f"PREFECT__CLOUD__AGENT__AUTH_TOKEN={TOKEN}\n")
    loose.chmod(0o644)
    refused = run_cli("install", "systemd", "-t", TOKEN, "--token-file", str(loose), env=clean_env)
    assert refused.returncode == 1 and f"chmod 600 {loose}" in refused.stderr
    config = tmp_path / "config.toml"
    config.write_text(f'[cloud.agent]\nauth_token = "{TOKEN}"\n')
    config.chmod(0o640)
    env = {**clean_env, "PREFECT__USER_CONFIG_PATH": str(config)}
    refused = run_cli("install", "systemd", env=env)
    assert refused.returncode == 1 and f"chmod 600 {config}" in refused.stderr
    config.chmod(0o600)
    unit = run_cli("install", "systemd", env=env, check=True).stdout
    assert f"Environment=PREFECT__USER_CONFIG_PATH={config}" in unit and TOKEN not in unit
    bad = run_cli("install", "launchd", env=clean_env)
    assert bad.returncode == 2 and "invalid choice: 'launchd'" in bad.stderr
    # Attached short forms, the dashboard's token and secret --env values stay off the command line too.
    token_file = tmp_path / "agent.env"
    unit = run_cli("install", "--user", "systemd", f"-t{TOKEN}", "--ui-token", "ui-secret-5678", "--token-file",
                   str(token_file), "-l", "x", env=clean_env, check=True).stdout
    assert TOKEN not in unit and "ui-secret-5678" not in unit and " start -l x" in unit and "systemd" not in \
        unit.split("ExecStart=")[1].splitlines()[0]
    assert token_file.read_text() == (f"PREFECT__CLOUD__AGENT__AUTH_TOKEN={TOKEN}\n"
                                      "PREFECT__CLOUD__AGENT__UI_TOKEN=ui-secret-5678\n")
    for secret_env in (["-eDB_PASSWORD=hunter2"], ["-e", "DB_PASSWORD=hunter2"], ["--env=API_KEY=abc"]):
        refused = run_cli("install", "systemd", *secret_env, env=clean_env)
        assert refused.returncode == 1 and "looks secret" in refused.stderr and "hunter2" not in refused.stderr


def test_install_writes_units_systemd_reads_as_meant_from_awkward_places(tmp_path: Path,
                                                                        clean_env: dict[str, str]) -> None:
    systemd_analyze = shutil.which("systemd-analyze")
    assert systemd_analyze, "systemd-analyze is missing: apt-get install systemd (it checks the unit)"
    awkward = tmp_path / "dir with space 100%"
    awkward.mkdir()
    unit_path = awkward / "local-agent.service"
    env = {**clean_env, "PREFECT__CLOUD__AGENT__NAME": "pay$day 50%"}
    run_cli("install", "systemd", "-t", TOKEN, "--token-file", str(awkward / "token.env"), "-l", "a b",
            "--write", str(unit_path), env=env, cwd=awkward, check=True)
    verified = subprocess.run([systemd_analyze, "verify", str(unit_path)], capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
    unit = unit_path.read_text()
    assert f"WorkingDirectory={str(awkward).replace('%', '%%')}" in unit.splitlines()
    assert 'Environment="PREFECT__CLOUD__AGENT__NAME=pay$day 50%%"' in unit.splitlines()
    assert "-l \"a b\"" in unit


def test_status_shows_the_agents_of_the_home_directory(embedded: World, test_flows: Any) -> None:
    port = _free_port()
    run_id = embedded.run(embedded.flow(test_flows.sleep), parameters={"seconds": 8})
    watched = _agent_process(embedded, "-n", "watched", "--agent-address", f"http://127.0.0.1:{port}")
    assert embedded.wait_for(lambda: embedded.state(run_id) == "Running", timeout=60)
    quiet = _agent_process(embedded, "-n", "quiet")  # started after: the run is the other's
    try:
        assert embedded.wait_for(lambda: len(list((embedded.storage_dir.parent / "agents").glob("quiet-*/agent.json")))
                                 == 1, timeout=60)
        agents = {agent["name"]: agent for agent in json.loads(run_cli("status", "-o", "json", env=embedded.env,
                                                                          check=True).stdout)}
        assert agents["watched"]["running"] and agents["watched"]["pid"] == watched.pid
        assert agents["watched"]["runs"] == 1 and agents["watched"]["last_poll_seconds_ago"] is not None
        assert agents["watched"]["undelivered"] == 0 and agents["watched"]["api"].startswith("embedded database ")
        assert agents["quiet"]["running"] and agents["quiet"]["pid"] == quiet.pid and agents["quiet"]["runs"] == 0
        table = run_cli("status", env=embedded.env, check=True).stdout.splitlines()
        assert table[0].split() == ["NAME", "STATE", "PID", "SINCE", "RUNS", "LAST", "POLL", "SPOOL", "API"]
        version = run_cli("status", "--version", env=embedded.env, check=True).stdout.strip()
        assert version == f"local_agent {la.__version__}"
        assert any(line.split()[:3] == ["watched", "running", str(watched.pid)] for line in table[1:])
    finally:
        for agent in (watched, quiet):
            agent.send_signal(signal.SIGINT)
            agent.send_signal(signal.SIGINT)  # the second skips the grace
            agent.communicate(timeout=60)
    agents = {agent["name"]: agent for agent in json.loads(run_cli("status", "-o", "json", env=embedded.env,
                                                                      check=True).stdout)}
    assert not agents["watched"]["running"] and agents["watched"]["pid"] is None


# --- The dashboard -------------------------------------------------------------------------


class _UI:
    """``local_agent.py ui`` in a process of its own, and requests to it."""

    def __init__(self, world: World, *args: str) -> None:
        for _ in range(3):  # a free port may be taken by another test before the dashboard binds it
            self.port = _free_port()
            self.base = f"http://127.0.0.1:{self.port}"
            self.process = subprocess.Popen(
                [sys.executable, str(AGENT), "ui", "--api", world.api, "--address", self.base, *args],
                env=world.env, cwd=world.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _AGENT_PROCESSES.append(self.process)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    self.get("/api/status")
                    return
                except OSError:
                    time.sleep(0.1)
            assert self.process.poll() is not None, "the dashboard did not answer within 30 s"
            output = self.process.communicate(timeout=30)
            assert "cannot listen" in output[1], output
        raise AssertionError("the dashboard did not answer within 30 s")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=10) as answer:
            return json.loads(answer.read())

    def post(self, path: str, body: Any, token: str | None = None,
             content_type: str = "application/json") -> tuple[int, Any]:
        headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
        request = urllib.request.Request(self.base + path, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.loads(error.read())

    def close(self) -> None:
        self.process.terminate()
        self.process.communicate(timeout=30)


def test_the_dashboard_api_pages_filters_and_creates_and_cancels_runs(embedded: World, test_flows: Any) -> None:
    flow_id = embedded.flow(test_flows.hello, schedule=la.CronClock("0 9 * * *", "Europe/Berlin"))
    done = [embedded.run(flow_id, parameters={"name": f"n{n}"}) for n in range(5)]
    assert embedded.agent("--once").returncode == 0
    for n in range(115):
        embedded.run(flow_id, parameters={"name": f"later{n}"}, at=datetime.now(timezone.utc) - timedelta(days=1))
    ui = _UI(embedded)
    try:
        status = ui.get("/api/status")
        assert status["mode"] == "ui" and status["can_write"] and not status["needs_token"]
        pages = [ui.get(f"/api/runs?page={page}&per_page=50") for page in (1, 2, 3)]
        assert [len(page["runs"]) for page in pages] == [50, 50, 30]  # 5 done, 115 due, 10 scheduled
        assert [page["has_more"] for page in pages] == [True, True, False]
        ids = [run["id"] for page in pages for run in page["runs"]]
        assert len(set(ids)) == 130 and set(done) <= set(ids)
        upcoming = [run for run in pages[2]["runs"] if la._parse_time(run["scheduled_start_time"]) > la._utcnow()]
        assert len(upcoming) == 10 and upcoming == sorted(upcoming, key=lambda run: run["scheduled_start_time"])
        succeeded = ui.get("/api/runs?state=Success")["runs"]
        assert {run["id"] for run in succeeded} == set(done) and all(run["end_time"] for run in succeeded)
        name = succeeded[0]["name"]
        assert name in [run["name"] for run in ui.get(f"/api/runs?q={name}")["runs"]]
        assert ui.get("/api/runs?flow=no-such-flow")["runs"] == []
        assert ui.get("/api/runs?q=_")["runs"] == [] and ui.get("/api/runs?q=%25")["runs"] == []  # taken literally
        facts = ui.get(f"/api/runs/{done[0]}")
        assert [state["state"] for state in facts["states"]] == ["Pending", "Scheduled", "Submitted", "Running",
                                                                  "Success"]
        logs = ui.get(f"/api/runs/{done[0]}/logs?after=0")
        assert logs["final"] and logs["next"] == facts["log_lines"] == len(logs["lines"]) > 0
        assert "Hello, n0!" in [line["message"] for line in logs["lines"]]
        assert ui.get(f"/api/runs/{done[0]}/logs?after={logs['next']}")["lines"] == []
        flows = ui.get("/api/flows")
        assert flows[0]["schedule"] == "cron '0 9 * * *' Europe/Berlin" and flows[0]["next_run"]
        assert flows[0]["parameters"] == [{"name": "name", "default": "world", "required": False}]
        assert ui.get("/api/agents")[0]["last_queried"]
        code, created = ui.post("/api/runs", {"flow": "hello", "parameters": {"name": "web"}})
        assert code == 201 and embedded.db.get_flow_run(created["id"]).parameters == {"name": "web"}
        code, refused = ui.post("/api/runs", {"flow": "hello", "parameters": {"nmae": "typo"}})
        assert code == 400 and "has no parameter 'nmae'" in refused["error"]
        code, cancelled = ui.post(f"/api/runs/{created['id']}/cancel", {})
        assert code == 200 and cancelled["state"] == "Cancelled" and embedded.state(created["id"]) == "Cancelled"
        code, again = ui.post(f"/api/runs/{created['id']}/cancel", {})
        assert code == 400 and "has already finished (Cancelled)" in again["error"]
        code, _ = ui.post("/api/runs", {"flow": "hello"}, content_type="text/plain")
        assert code == 415  # a page of another site cannot post JSON here without asking first
        with socket.create_connection(("127.0.0.1", ui.port), timeout=10) as raw:  # a length that lies
            raw.sendall(f"POST /api/runs HTTP/1.1\r\nHost: 127.0.0.1:{ui.port}\r\nContent-Type: application/json"
                        "\r\nContent-Length: -5\r\n\r\n".encode())
            assert raw.recv(200).startswith(b"HTTP/1.0 400")
        rebound = urllib.request.Request(ui.base + "/api/runs", headers={"Host": f"attacker.example:{ui.port}"})
        with pytest.raises(urllib.error.HTTPError) as wrong_host:
            urllib.request.urlopen(rebound, timeout=10)
        with wrong_host.value:
            assert wrong_host.value.code == 421
        with pytest.raises(urllib.error.HTTPError) as missing:
            ui.get("/api/runs/no-such-run")
        with missing.value:
            assert missing.value.code == 404
        with urllib.request.urlopen(ui.base + "/", timeout=10) as page:
            assert page.headers["Content-Type"] == "text/html; charset=utf-8" and b"local_agent" in page.read()
    finally:
        ui.close()


def test_dashboard_writes_need_the_ui_token(embedded: World, test_flows: Any) -> None:
    embedded.flow(test_flows.hello)
    ui = _UI(embedded, "--ui-token", "ui-secret-1234")
    try:
        assert ui.get("/api/status")["needs_token"]
        code, refused = ui.post("/api/runs", {"flow": "hello"})
        assert code == 403 and "needs the --ui-token" in refused["error"]
        assert ui.post("/api/runs", {"flow": "hello"}, token="wrong")[0] == 403
        assert ui.post("/api/runs", {"flow": "hello"}, token="ui-secret-1234")[0] == 201
    finally:
        ui.close()
    # Off loopback and with no token, it serves reads only.
    dashboard = la._Dashboard(la.resolve_settings({"api": embedded.api}), mode="ui", on_loopback=False)
    assert not dashboard.can_write and not dashboard.status()["can_write"]
    with pytest.raises(la._HTTPError) as refused_write:
        dashboard.post("/api/runs", b'{"flow": "hello"}', "")
    assert refused_write.value.status == 403 and "not on loopback" in str(refused_write.value)


# --- Schedules: the same times as Prefect 1.4.1's own clocks -----------------------------
#
# (Paste below the "Real Prefect 1.x flows" section: it uses the prefect1_python fixture. It
# needs no imports beyond the file's own: contextlib, json, os, re, signal, subprocess, Iterator,
# datetime, timedelta, timezone, Path, Any, pytest and the `la` alias.)
#
# Every case is a schedule described once, neutrally (SCHEDULE_CASES). We build it with
# la.CronClock / la.IntervalClock / la.Schedule; Prefect 1.4.1 builds it with its own
# CronClock / IntervalClock / Schedule. One venv process per test process (PREFECT_SCHEDULE_ORACLE,
# fed JSON lines on stdin) then
#   * loads our to_prefect() JSON with ScheduleSchema().load and computes .next(n, after, return_events=True),
#   * dumps its own schedule with ScheduleSchema().dump (which our to_prefect() must equal) and
#     computes the times of that dump (reused when the two JSON documents are equal),
#   * for an interval under a minute, which Prefect refuses to serialize, computes its own schedule.
# The test compares start times (UTC ISO), parameter_defaults and labels, event by event: ours,
# and la.Schedule.from_prefect(<Prefect's dump>). Where Prefect 1.4.1 never returns (minutely jobs
# on fall-back days), the events it yielded before looping are compared, and ours must go on.

PREFECT_SCHEDULE_ORACLE = r'''
import datetime as dt
import json
import queue
import signal
import sys
import threading

import pendulum
from prefect.schedules import Schedule
from prefect.schedules.clocks import CronClock, IntervalClock
from prefect.serialization.schedule import ScheduleSchema


class Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise Hang()


signal.signal(signal.SIGALRM, _alarm)


def error(exc):
    return "%s: %s" % (type(exc).__name__, exc)


def instant(text):
    return pendulum.instance(dt.datetime.fromisoformat(text))


def build(spec):
    """Prefect's own schedule for a case's neutral description."""
    clocks = []
    for c in spec["clocks"]:
        tz = c["tz"]
        options = dict(parameter_defaults=c.get("params"), labels=c.get("labels"))
        if c["kind"] == "cron":
            if c.get("start"):
                start = instant(c["start"]).in_tz(tz)
            else:  # the zone of a CronClock is its start_date's (none: UTC)
                start = None if tz == "UTC" else pendulum.datetime(2000, 1, 1, tz=tz)
            clocks.append(CronClock(c["cron"], start_date=start, day_or=c.get("day_or", True), **options))
        else:
            anchor = c.get("anchor")
            if anchor is None:  # local_agent's default anchor: midnight, 2019-01-01, in the clock's zone
                start = None if tz == "UTC" else pendulum.datetime(2019, 1, 1, tz=tz)
            else:
                start = instant(anchor).in_tz(tz)
            clocks.append(IntervalClock(dt.timedelta(seconds=c["seconds"]), start_date=start, **options))
    return Schedule(clocks=clocks)


def row(event):
    return [event.start_time.astimezone(dt.timezone.utc).isoformat(), event.parameter_defaults, event.labels]


def times(schedule, case):
    """schedule.next(n, after, return_events=True); where Prefect loops forever, the events it
    yielded before the guard fired."""
    seen = []
    produce = schedule._get_clock_events

    def recording(after=None):
        for event in produce(after=after):
            seen.append(event)
            yield event

    schedule._get_clock_events = recording
    signal.setitimer(signal.ITIMER_REAL, case.get("timeout", 15))
    try:
        events = schedule.next(case["n"], after=instant(case["after"]), return_events=True)
    except Hang:
        return {"hang": [row(e) for e in seen]}
    except Exception as exc:  # CroniterBadDateError: no next date within 50 years
        return {"error": error(exc)}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return {"events": [row(e) for e in events]}


def answer(request):
    if "expressions" in request:  # accepted (None) or Prefect's error, per expression
        verdicts = {}
        for expr in request["expressions"]:
            try:
                CronClock(expr)
                verdicts[expr] = None
            except Exception as exc:  # ValueError, or NameError from croniter for L-5
                verdicts[expr] = error(exc)
        return {"id": request["id"], "verdicts": verdicts}
    case, out, computed = request["case"], {"id": request["id"]}, {}

    def times_of(data):
        key = json.dumps(data, sort_keys=True)
        if key not in computed:
            try:
                computed[key] = times(ScheduleSchema().load(data), case)
            except Hang:
                raise
            except Exception as exc:
                computed[key] = {"load_error": error(exc)}
        return computed[key]

    try:
        native = build(case["spec"])
    except Exception as exc:
        out["build_error"] = error(exc)
        native = None
    if native is not None:
        try:
            out["dump"] = ScheduleSchema().dump(native)
        except Exception as exc:  # an interval under a minute
            out["dump_error"] = error(exc)
            out["native"] = times(native, case)
    if request.get("ours") is not None:
        out["ours"] = times_of(request["ours"])
    if "dump" in out:
        out["dump_times"] = times_of(out["dump"])
    return out


def read(requests):
    for line in sys.stdin:
        requests.put(json.loads(line))
    requests.put(None)


def main():
    # requests are read by a thread, so a writer never blocks while we write answers
    requests = queue.Queue()
    threading.Thread(target=read, args=(requests,), daemon=True).start()
    print(json.dumps({"ready": True}), flush=True)
    while True:
        request = requests.get()
        if request is None:
            return
        try:
            out = answer(request)
        except Hang:  # (the guard fired just outside next())
            out = {"id": request["id"], "oracle_error": "timer fired outside next()"}
        except Exception as exc:
            out = {"id": request["id"], "oracle_error": error(exc)}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


main()
'''

#: DST transitions of 2026 (UTC): (spring forward, fall back). Dublin's are London's.
DST_EDGES = {
    "America/New_York": ("2026-03-08T07:00:00", "2026-11-01T06:00:00"),
    "Europe/London": ("2026-03-29T01:00:00", "2026-10-25T01:00:00"),
    "Europe/Dublin": ("2026-03-29T01:00:00", "2026-10-25T01:00:00"),
    "Australia/Sydney": ("2026-10-03T16:00:00", "2026-04-04T16:00:00"),
}
#: after (UTC) for the zones without DST; Kolkata's has microseconds (Prefect rounds up a second)
PLAIN_AFTERS = {"UTC": "2026-02-28T23:30:00+00:00", "Asia/Kolkata": "2026-02-27T18:29:59.500000+00:00"}

# (expression, density): "m" fires many times an hour (after = 4 h before each DST edge),
# "s" every few seconds (40 min before), "h" many times a day (30 h before each edge),
# "d" daily or rarer (30 h before the first edge of 2026: 500 events cover both edges).
# Lists, ranges, steps, names, aliases, L and #, day-of-month OR day-of-week, six fields (seconds).
CRON_EXPRESSIONS = [
    ("* * * * *", "m"), ("*/15 * * * *", "m"), ("0-59/7 * * * *", "m"), ("* * * * * */10", "s"),
    ("0,30 * * * *", "h"), ("0 * * * *", "h"), ("0 */2 * * *", "h"), ("* 2 * * *", "h"), ("15 1,2,3 * * *", "h"),
    ("0,30 1-3 * * *", "h"), ("0 9-17 * * mon-fri", "h"), ("@hourly", "h"),
    ("0 2 * * *", "d"), ("30 2 * * *", "d"), ("0 1 * * *", "d"), ("30 1 * * *", "d"), ("0 3 * * *", "d"),
    ("59 23 * * *", "d"), ("0 12 * * 1-5", "d"), ("0 0 * * 7", "d"), ("0 6 * * sat,sun", "d"),
    ("0 0 * * fri-sun", "d"), ("0 0 * * */3", "d"), ("0 0 L * *", "d"), ("0 0 15,L * *", "d"),
    ("0 0 13 * 5", "d"), ("0 10 * * 1#2", "d"), ("0 10 * * L5", "d"), ("0 0 1 jan-mar,oct-dec *", "d"),
    ("0 0 1-31 * 1", "d"), ("30 2 * 3,10 0", "d"), ("0 4 8-14 * *", "d"), ("@daily", "d"), ("@weekly", "d"),
    ("@monthly", "d"), ("@yearly", "d"), ("0 0 29 2 *", "d"), ("0 12 1 7 *", "d"), ("30 1 * * * 0", "d"),
    ("0 0 30 2 *", "d"),  # accepted, but never fires: Prefect's next() raises
]
#: the zones every expression above is compared in
CRON_ZONES = ["UTC", "Asia/Kolkata", "America/New_York", "Europe/London", "Australia/Sydney"]
#: more expressions, compared in UTC and New York only
MORE_CRON_EXPRESSIONS = [
    ("5/20 * * * *", "m"), ("*/5 1-3 * * *", "h"), ("30 * * * *", "h"), ("45 0-23/6 * * *", "h"), ("0 2-4 * * *", "h"),
    ("0 0 * * *", "d"), ("0 0 * * 0", "d"), ("0 0 * * SUN", "d"), ("0 0 * * 1-7/2", "d"), ("0 0 1 * *", "d"),
    ("0 0 31 * *", "d"), ("0 10 * * 5#5", "d"), ("0 0 * JAN,jul *", "d"), ("0 2 1-7 * 0", "d"), ("@midnight", "d"),
    ("@annually", "d"), ("0 0 29 2 1", "d"), ("0 0 * * * 30", "d"), ("0 0 * * 7 0", "d"),
]
#: and these in Europe/Dublin (negative DST in pendulum's data)
DUBLIN_CRON_EXPRESSIONS = [
    ("* * * * *", "m"), ("*/15 * * * *", "m"), ("* * * * * */10", "s"), ("0 * * * *", "h"), ("0,30 1-3 * * *", "h"),
    ("30 1 * * *", "d"), ("0 1 * * *", "d"), ("@weekly", "d"),
]
DAY_AND = ["0 0 13 * 5", "0 0 1-7 * 1", "0 2 1-7 * 0", "30 2 * 3,10 0", "0 0 L * 5", "0 10 1 * 1#2"]
# afters on and around the transition days: the day itself (croniter's fix-up misfires), inside
# the first pass of the repeated hour, half a second before it ends, on and just after the gap
DST_AFTERS = {
    "America/New_York": [
        ("2026-11-01T04:30:00+00:00", ["0 12 * * *", "30 1 * * *", "0 * * * *", "*/15 * * * *"]),
        ("2026-11-01T05:30:00+00:00", ["*/15 * * * *", "0,30 * * * *", "* * * * * */20"]),
        ("2026-11-01T05:59:59.500000+00:00", ["0 * * * *", "* * * * *"]),
        ("2026-03-08T05:30:00+00:00", ["0 12 * * *", "30 2 * * *", "0 2 * * *"]),
        ("2026-03-08T06:59:59+00:00", ["* * * * *", "0 * * * *"]),
        ("2026-03-08T07:00:00.000001+00:00", ["*/15 * * * *", "* * * * * */20"]),
    ],
    "Europe/London": [
        ("2026-10-25T00:30:00+00:00", ["*/15 * * * *", "0 * * * *", "30 1 * * *"]),
        ("2026-10-24T23:30:00+00:00", ["0 12 * * *", "0 * * * *"]),
        ("2026-03-29T01:00:00+00:00", ["0 * * * *", "30 1 * * *"]),
    ],
    "Australia/Sydney": [
        ("2026-04-04T15:30:00+00:00", ["*/15 * * * *", "0 2 * * *"]),
        ("2026-04-04T13:30:00+00:00", ["0 12 * * *"]),
        ("2026-10-03T16:00:00+00:00", ["30 2 * * *", "0 * * * *"]),
    ],
    "Europe/Dublin": [("2026-10-25T00:30:00+00:00", ["*/15 * * * *", "30 1 * * *"])],
}
# Prefect 1.4.1 loops forever on these (SPEC §3.4): the events it gives before looping must be ours
PREFECT_HANGS = [("* * * * *", "America/New_York", "2026-11-01T04:00:00+00:00"),
                 ("* 1 * * *", "Europe/London", "2026-10-24T23:00:00+00:00")]
# CronClock start dates (after = start - 1 s when later than after), in and near DST edges
CRON_STARTS = [
    ("*/15 * * * *", "America/New_York", "2026-11-01T01:30:00-05:00"),
    ("0 * * * *", "America/New_York", "2026-03-08T01:59:59.250000-05:00"),
    ("0 0 * * *", "Europe/London", "2026-10-25T01:00:00+00:00"),
    ("* * * * * *", "Asia/Kolkata", "2026-06-01T12:00:00.500000+05:30"),
    ("0 * * * *", "UTC", "2026-06-01T12:00:00+00:00"),
]
# (seconds, anchor, zone, after): seconds, 15 min, 1 h, 1 d, 25 h, 1 week; wall-clock and absolute
# paths, anchors in gaps and repeated hours, a float number of seconds
INTERVALS = [
    (1, "2026-03-08T01:59:00-05:00", "America/New_York", "2026-03-08T06:58:00+00:00"),
    (30, "2026-10-25T00:50:00+01:00", "Europe/London", "2026-10-24T23:55:00+00:00"),
    (0.5, "2026-01-01T00:00:00+00:00", "UTC", "2026-01-01T00:00:10.250000+00:00"),
    (90, "2026-11-01T00:00:00-04:00", "America/New_York", "2026-11-01T04:00:00+00:00"),
    (900, "2026-03-01T00:00:00-05:00", "America/New_York", "2026-03-07T12:00:00+00:00"),
    (900, "2026-11-01T00:00:00-04:00", "America/New_York", "2026-11-01T03:00:00+00:00"),
    (900, "2026-10-01T00:00:00+10:00", "Australia/Sydney", "2026-10-02T12:00:00+00:00"),
    (3600, "2026-03-01T00:00:00-05:00", "America/New_York", "2026-03-07T00:00:00+00:00"),
    (3600, "2026-11-01T00:30:00-04:00", "America/New_York", "2026-11-01T03:00:00+00:00"),
    (3600, "2026-10-01T00:30:00+01:00", "Europe/London", "2026-10-20T00:00:00+00:00"),
    (3600, "2026-10-24T00:00:00+01:00", "Europe/Dublin", "2026-10-24T20:00:00+00:00"),
    (3600, "2026-03-01T00:00:00+00:00", "Europe/Dublin", "2026-03-28T00:00:00+00:00"),
    (3600, "2026-04-01T00:00:00+11:00", "Australia/Sydney", "2026-04-02T00:00:00+00:00"),
    (3600, "2026-06-01T00:00:00+00:00", "UTC", "2026-05-01T00:00:00+00:00"),  # after < anchor: the anchor first
    (5400, "2026-04-01T00:00:00+11:00", "Australia/Sydney", "2026-04-02T00:00:00+00:00"),
    (86400, "2026-01-01T02:30:00-05:00", "America/New_York", "2026-02-01T00:00:00+00:00"),
    (86400, "2026-01-01T01:30:00-05:00", "America/New_York", "2026-02-01T00:00:00+00:00"),
    (86400, "2026-03-01T00:00:00-05:00", "America/New_York", "2026-03-10T04:00:00+00:00"),
    (86400, "2026-01-01T09:00:00+11:00", "Australia/Sydney", "2026-02-01T00:00:00+00:00"),
    (86400, "2026-01-01T12:00:00+05:30", "Asia/Kolkata", "2026-02-01T00:00:00+00:00"),
    (86400, "2026-01-01T01:30:00+00:00", "Europe/Dublin", "2026-02-01T00:00:00+00:00"),
    (86400, None, "UTC", "2026-03-01T00:00:00+00:00"),
    (86400, None, "America/New_York", "2026-03-01T00:00:00+00:00"),
    (90000, "2026-01-01T00:00:00-05:00", "America/New_York", "2026-02-20T00:00:00+00:00"),
    (90000, "2026-03-01T00:00:00+00:00", "Europe/London", "2026-03-20T00:00:00+00:00"),
    (604800, "2026-01-04T02:30:00-05:00", "America/New_York", "2026-01-01T00:00:00+00:00"),
    (604800, "2026-01-04T01:30:00+00:00", "Europe/London", "2026-02-01T00:00:00+00:00"),
    (604800, "2026-01-04T02:30:00+11:00", "Australia/Sydney", "2026-02-01T00:00:00+00:00"),
    (1800.5, "2026-03-01T00:00:00-05:00", "America/New_York", "2026-03-07T00:00:00+00:00"),
]


def _cron(expr: str, tz: str, **more: Any) -> dict[str, Any]:
    return {"kind": "cron", "cron": expr, "tz": tz, "day_or": True, **more}


def _interval(seconds: float, tz: str, anchor: str | None = None, **more: Any) -> dict[str, Any]:
    return {"kind": "interval", "seconds": seconds, "tz": tz, "anchor": anchor, **more}


# several clocks: Prefect merges their events with heapq.merge and drops an event equal (time,
# parameter_defaults, labels) to the one before it; events of clocks in one zone compare by wall clock
MULTI_CLOCKS = [
    ("weekdays and weekends", "2026-03-01T00:00:00+00:00",
     [_cron("0 9 * * mon-fri", "America/New_York", params={"kind": "weekday"}, labels=["a"]),
      _cron("0 12 * * sat,sun", "America/New_York", params={"kind": "weekend", "n": [1, 2]}, labels=["b"])]),
    ("same instants, other parameters", "2026-01-10T00:00:00+00:00",
     [_cron("0 * * * *", "UTC", params={"x": 1}),
      _interval(3600, "UTC", "2026-01-01T00:00:00+00:00", params={"x": 2})]),
    ("same instants, same parameters", "2026-01-10T00:00:00+00:00",
     [_cron("*/30 * * * *", "UTC", params={"x": 1}, labels=["l"]),
      _cron("0 * * * *", "UTC", params={"x": 1}, labels=["l"]),
      _interval(2700, "UTC", "2026-01-01T00:00:00+00:00", params={"x": 1}, labels=["l"])]),
    ("labels [] and none", "2026-01-10T00:00:00+00:00",
     [_cron("0 * * * *", "UTC", labels=[]), _cron("0 * * * *", "UTC")]),
    ("one zone over a fall-back (wall-clock order)", "2026-11-01T03:00:00+00:00",
     [_cron("0 * * * *", "America/New_York", params={"from": "cron"}),
      _interval(1800, "America/New_York", "2026-11-01T00:15:00-04:00", params={"from": "interval"})]),
    ("one zone over a fall-back, equal events", "2026-10-31T20:00:00+00:00",
     [_cron("0,30 * * * *", "Europe/London"), _interval(1800, "Europe/London", "2026-10-25T00:00:00+01:00")]),
    ("three zones over spring edges", "2026-03-06T00:00:00+00:00",
     [_cron("0 2 * * *", "Australia/Sydney", labels=["syd"]), _cron("30 1 * * *", "Europe/London", labels=["lon"]),
      _interval(604800, "America/New_York", "2026-03-01T02:30:00-05:00", labels=["ny"], params={"w": True}),
      _cron("*/20 * * * *", "Asia/Kolkata", labels=["kol"])]),
]


def _schedule_cases() -> list[dict[str, Any]]:
    """Every comparison: {"id", "spec": {"clocks": [...]}, "after", "n"}, with "timeout" where Prefect
    loops and "deep": False for the expression grid (from_prefect is checked on 50 events there)."""
    cases: list[dict[str, Any]] = []

    def add(label: str, clocks: list[dict[str, Any]], after: str, n: int = 500, **more: Any) -> None:
        cases.append({"id": f"{label} after {after}", "spec": {"clocks": clocks}, "after": after, "n": n, **more})

    def before(edge: str, **delta: float) -> str:
        return (datetime.fromisoformat(edge) - timedelta(**delta)).isoformat() + "+00:00"

    grid = [(tz, CRON_EXPRESSIONS) for tz in CRON_ZONES]
    grid += [("UTC", MORE_CRON_EXPRESSIONS), ("America/New_York", MORE_CRON_EXPRESSIONS)]
    grid += [("Europe/Dublin", DUBLIN_CRON_EXPRESSIONS)]
    for tz, expressions in grid:
        for expr, density in expressions:
            if tz in PLAIN_AFTERS:
                afters = [PLAIN_AFTERS[tz]]
            else:
                spring, fall = DST_EDGES[tz]
                edges = [min(spring, fall)] if density == "d" else [spring, fall]
                back = {"m": {"hours": 4}, "s": {"minutes": 40}}.get(density, {"hours": 30})
                afters = [before(edge, **back) for edge in edges]
            for after in afters:
                add(f"{expr!r} in {tz}", [_cron(expr, tz)], after, deep=False)
    for tz in ("America/New_York", "Australia/Sydney"):
        for expr in DAY_AND:  # day_or=False: day of month AND day of week
            after = before(min(DST_EDGES[tz]), hours=30)
            add(f"{expr!r} day_or=False in {tz}", [_cron(expr, tz, day_or=False)], after)
    for tz, groups in DST_AFTERS.items():
        for after, exprs in groups:
            for expr in exprs:
                add(f"{expr!r} in {tz}", [_cron(expr, tz)], after)
    for expr, tz, after in PREFECT_HANGS:
        add(f"{expr!r} in {tz} (Prefect loops)", [_cron(expr, tz)], after, timeout=1)
    for expr, tz, start in CRON_STARTS:
        add(f"{expr!r} in {tz} from {start}", [_cron(expr, tz, start=start)], "2026-01-01T00:00:00+00:00")
    for seconds, anchor, tz, after in INTERVALS:
        add(f"every {seconds} s in {tz} from {anchor}", [_interval(seconds, tz, anchor)], after)
    for label, after, clocks in MULTI_CLOCKS:
        add(label, clocks, after)
    return cases


SCHEDULE_CASES = _schedule_cases()

# Cron strings Prefect 1.4.1 refuses, and the field our message must name (None: the field count)
BAD_CRON = [
    ("0 24 * * *", "hour"), ("0 26 * * *", "hour"), ("61 * * * *", "minute"), ("-5 * * * *", "minute"),
    ("5-1 * * * *", "minute"), ("0,,5 * * * *", "minute"), ("*/0 * * * *", "minute"), ("H * * * *", "minute"),
    ("0 0 32 * *", "day_of_month"), ("0 0 0 * *", "day_of_month"), ("0 0 ? * *", "day_of_month"),
    ("0 0 LW * *", "day_of_month"), ("0 0 1W * *", "day_of_month"), ("0 0 L-5 * *", "day_of_month"),
    ("0 0 * 13 *", "month"), ("0 0 * 0 *", "month"), ("0 0 * foo *", "month"), ("0 0 * dec-feb *", "month"),
    ("0 0 * * 8", "day_of_week"), ("0 0 * * 5L", "day_of_week"), ("0 0 * * 2#6", "day_of_week"),
    ("0 0 * * 1,2#1", "day_of_week"), ("0 0 * * tue-mon", "day_of_week"), ("* * * * * 60", "second"),
    ("0 0 * *", None), ("0 0 * * * * *", None), ("", None), ("@reboot", None), ("@every 5m", None),
]
# Odd strings Prefect 1.4.1 accepts (besides every expression compared above)
ODD_GOOD_CRON = ["*,5 * * * *", "0 0 * * 6-0", "0 0 l * *", "0 0 1-l * *", "  0   0 * * *  ", "0 0 * * Mon",
                 "0 0 * * 0 0", "0 0 0 * * 7", "@MONTHLY", "0-59 0-23 1-31 1-12 0-7", "1-59/60 * * * *",
                 "0 0 * * 5#5", "0 0 * * 1#1,3#3", "0 0 * * l0", "0 0 30 2 *"]


class _PrefectScheduleOracle:
    """One Prefect 1.4.1 process answering schedule questions (JSON lines, answered in order).
    Run alone, pytest asks all its cases up front so Prefect works while we compute ours;
    under xdist a worker asks for its own cases, one at a time."""

    def __init__(self, python: str, stderr: Path) -> None:
        self.stderr_path = stderr
        self.stderr = open(stderr, "w")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen([python, "-c", PREFECT_SCHEDULE_ORACLE], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.answers: dict[str, dict[str, Any]] = {}
        self.asked: set[str] = set()
        self.count = self.received = 0

    def start(self, wanted: list[dict[str, Any]]) -> None:
        self._read()  # {"ready": true}: Prefect imported
        for case in wanted:
            self.ask(case)

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=30)
            pytest.fail(f"the Prefect 1.4.1 schedule oracle ended (exit {self.process.returncode}): "
                        f"{self.stderr_path.read_text()[-3000:]}", pytrace=False)
        answer: dict[str, Any] = json.loads(line)
        if "oracle_error" in answer:
            pytest.fail(f"the Prefect 1.4.1 schedule oracle failed on {answer['id']}: {answer['oracle_error']}",
                        pytrace=False)
        return answer

    def _send(self, request: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        self.asked.add(request["id"])
        self.count += 1

    def ask(self, case: dict[str, Any]) -> None:
        if case["id"] in self.asked:
            return
        try:
            ours: Any = _la_schedule(case["spec"]).to_prefect()
            json.dumps(ours)
        except Exception:  # reported by the test itself
            ours = None
        self._send({"id": case["id"], "case": case, "ours": ours})

    def answer(self, case: dict[str, Any]) -> dict[str, Any]:
        self.ask(case)
        while case["id"] not in self.answers:
            answer = self._read()
            self.answers[answer["id"]] = answer
            self.received += 1
        return self.answers.pop(case["id"])

    def verdicts(self, expressions: list[str]) -> dict[str, str | None]:
        request_id = f"verdicts {self.count}"
        self._send({"id": request_id, "expressions": expressions})
        while request_id not in self.answers:
            answer = self._read()
            self.answers[answer["id"]] = answer
            self.received += 1
        verdicts: dict[str, str | None] = self.answers.pop(request_id)["verdicts"]
        return verdicts

    def close(self) -> None:
        if self.received < self.count:  # cases nobody will read (pytest -x, a failed fixture)
            self.process.kill()
        if self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.stderr.close()


@pytest.fixture(scope="module")
def prefect_schedules(
    prefect1_python: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[_PrefectScheduleOracle]:
    wanted: list[dict[str, Any]] = []
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # alone: every selected case, in the order they run
        for item in request.session.items:
            callspec = getattr(item, "callspec", None)
            if callspec is not None and "schedule_case" in callspec.params:
                wanted.append(callspec.params["schedule_case"])
    oracle = _PrefectScheduleOracle(prefect1_python, tmp_path_factory.mktemp("schedules") / "prefect.err")
    try:
        oracle.start(wanted)
        yield oracle
    finally:
        oracle.close()


def _la_schedule(spec: dict[str, Any]) -> Any:
    clocks = []
    for c in spec["clocks"]:
        options = {"parameter_defaults": c.get("params"), "labels": c.get("labels")}
        if c["kind"] == "cron":
            start = datetime.fromisoformat(c["start"]) if c.get("start") else None
            clocks.append(la.CronClock(c["cron"], c["tz"], start=start, day_or=c["day_or"], **options))
        else:
            every = c["seconds"] if isinstance(c["seconds"], float) else timedelta(seconds=c["seconds"])
            anchor = datetime.fromisoformat(c["anchor"]) if c.get("anchor") else None
            clocks.append(la.IntervalClock(every, anchor=anchor, timezone=c["tz"], **options))
    return la.Schedule(clocks)


def _rows(events: list[Any]) -> list[list[Any]]:
    rows = []
    for event in events:
        assert event.start_time.utcoffset() == timedelta(0), f"{event} is not in UTC"
        rows.append([event.start_time.astimezone(timezone.utc).isoformat(), event.parameter_defaults, event.labels])
    return rows


def _difference(ours: list[list[Any]], prefects: list[list[Any]]) -> str | None:
    """Where two event lists first differ, readably; None when equal."""
    for index, (mine, theirs) in enumerate(zip(ours, prefects)):
        if mine != theirs:
            before = f" (both give {prefects[index - 1][0]} before it)" if index else ""
            return (f"event {index} differs: Prefect {theirs[0]} {theirs[1]} {theirs[2]}, "
                    f"ours {mine[0]} {mine[1]} {mine[2]}{before}")
    if len(ours) != len(prefects):
        longer, who = (ours, "we") if len(ours) > len(prefects) else (prefects, "Prefect")
        return (f"Prefect gives {len(prefects)} events, we give {len(ours)}; "
                f"{who} go on with {longer[min(len(ours), len(prefects))][0]}")
    return None


def _compare(what: str, ours: Any, prefects: dict[str, Any]) -> str | None:
    """ours: our rows, or the exception our next() raised; prefects: Prefect's answer for one JSON."""
    if "load_error" in prefects:
        return f"{what}: Prefect's ScheduleSchema().load refuses it: {prefects['load_error']}"
    if "error" in prefects:  # e.g. CroniterBadDateError (a ValueError): never fires within 50 years
        if isinstance(ours, ValueError):
            return None
        return f"{what}: Prefect's next() raises {prefects['error']}, ours gives {str(ours)[:300]}"
    if isinstance(ours, BaseException):
        return f"{what}: our next() raises {type(ours).__name__}: {ours}"
    if "hang" in prefects:  # Prefect loops for ever after these; we go on after them
        given = prefects["hang"]
        problem = _difference(ours[:len(given)], given)
        if problem is None and given and not all(row[0] > given[-1][0] for row in ours[len(given):]):
            problem = f"after Prefect's last event {given[-1][0]} we do not go on later: {ours[len(given):][:3]}"
        return None if problem is None else f"{what} (up to where Prefect loops): {problem}"
    problem = _difference(ours, prefects["events"])
    return None if problem is None else f"{what}: {problem}"


@contextlib.contextmanager
def _deadline(seconds: float, what: str) -> Iterator[None]:
    """TimeoutError where ``what`` takes longer than ``seconds`` (a failed test, not a suite that hangs)."""
    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"{what} did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _next_rows(schedule: Any, case: dict[str, Any]) -> Any:
    try:
        with _deadline(10, f"Schedule.next({case['n']}, after={case['after']})"):
            return _rows(schedule.next(case["n"], after=datetime.fromisoformat(case["after"])))
    except (ValueError, TimeoutError) as exc:
        return exc


def _comparable_dump(data: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """A schedule's JSON with the start_date time left out where the case gives none in a zone
    (any start_date serves there: Prefect only needs its zone)."""
    data = json.loads(json.dumps(data))
    for clock, described in zip(data.get("clocks", []), spec["clocks"]):
        if described["kind"] == "cron" and not described.get("start") and isinstance(clock.get("start_date"), dict):
            clock["start_date"]["dt"] = "(any)"
    return data


@pytest.mark.parametrize("schedule_case", SCHEDULE_CASES, ids=[case["id"] for case in SCHEDULE_CASES])
def test_schedules_give_the_times_prefect_1_4_1_gives(
    schedule_case: dict[str, Any], prefect_schedules: _PrefectScheduleOracle
) -> None:
    case = schedule_case
    schedule = _la_schedule(case["spec"])
    ours = _next_rows(schedule, case)
    prefect = prefect_schedules.answer(case)
    assert "build_error" not in prefect, prefect["build_error"]
    problems = []
    try:
        our_json: Any = schedule.to_prefect()
    except Exception as exc:
        our_json = exc
    if "dump_error" in prefect:
        # An interval under a minute: Prefect will not serialize it (Server refuses it; so does our
        # GraphQL backend), while the embedded database keeps it. The times are still Prefect's.
        problems.append(_compare("Prefect's own schedule", ours, prefect["native"]))
    else:
        if isinstance(our_json, BaseException):
            problems.append(f"to_prefect() raises {type(our_json).__name__}: {our_json}")
        else:
            if _comparable_dump(our_json, case["spec"]) != _comparable_dump(prefect["dump"], case["spec"]):
                problems.append(f"to_prefect() gives {json.dumps(our_json, sort_keys=True)}, "
                                f"Prefect's dump {json.dumps(prefect['dump'], sort_keys=True)}")
            problems.append(_compare("through our to_prefect() JSON", ours, prefect["ours"]))
        try:
            theirs = la.Schedule.from_prefect(prefect["dump"])
        except Exception as exc:
            problems.append(f"from_prefect(Prefect's dump) raises {type(exc).__name__}: {exc}")
        else:  # (the grid's cases, for time: their first 50 events; the other cases all 500)
            n = case["n"] if case.get("deep", True) else 50
            expected = {key: value[:n] if key in ("events", "hang") else value
                        for key, value in prefect["dump_times"].items()}
            problems.append(_compare("from_prefect(Prefect's dump)", _next_rows(theirs, {**case, "n": n}), expected))
    problems = [problem for problem in problems if problem]
    if problems:
        pytest.fail(f"{case['id']} (n={case['n']}):\n" + "\n".join(problems), pytrace=False)


def _fields_named(message: str) -> set[str]:
    """The cron fields a message names ("day of month" and "day-of-month" count as day_of_month)."""
    words = re.sub(r"day[ _-]of[ _-](month|week)", r"day_of_\1", message.lower())
    return set(re.findall(r"[a-z_]+", words)) & {"minute", "hour", "day_of_month", "month", "day_of_week", "second"}


def test_cron_strings_prefect_1_4_1_refuses_are_refused_naming_the_field(
    prefect_schedules: _PrefectScheduleOracle,
) -> None:
    good = sorted({expr for expr, _ in CRON_EXPRESSIONS} | set(DAY_AND) | set(ODD_GOOD_CRON))
    verdicts = prefect_schedules.verdicts([expr for expr, _ in BAD_CRON] + good)
    problems = []
    for expr, field in BAD_CRON:
        if verdicts[expr] is None:
            problems.append(f"{expr!r}: Prefect 1.4.1 accepts it (the test's premise is wrong)")
        try:
            la.parse_cron(expr)
        except ValueError as exc:
            named = _fields_named(str(exc))
            if field is None and "field" not in str(exc):
                problems.append(f"{expr!r}: our message does not speak of the number of fields: {exc}")
            elif field is not None and named != {field}:
                problems.append(f"{expr!r}: our message should name the field {field!r} (and no other): {exc}")
        else:
            problems.append(f"{expr!r}: Prefect refuses it ({verdicts[expr]}), we accept it")
    for expr in good:
        try:
            la.parse_cron(expr)
        except ValueError as exc:
            if verdicts[expr] is None:
                problems.append(f"{expr!r}: Prefect 1.4.1 accepts it, we refuse it: {exc}")
        else:
            if verdicts[expr] is not None:
                problems.append(f"{expr!r}: Prefect refuses it ({verdicts[expr]}), we accept it")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.mark.parametrize("data, words", [
    ({"clocks": [{"type": "CronClock", "cron": "0 26 * * *", "start_date": None}]}, "hour"),
    ({"clocks": [{"type": "IntervalClock", "interval": -60000000, "start_date": None}]}, "(?i)interval"),
    ({"clocks": [{"type": "CronClock", "cron": "0 2 * * *", "start_date": {"dt": "2026-01-01T00:00:00",
                                                                          "tz": "Mars/Olympus"}}]}, "Mars/Olympus"),
    ({"clocks": [{"type": "DatesClock", "dates": []}]}, "DatesClock"),
    ({"clocks": "0 2 * * *"}, "clocks"),
    ({}, "clocks"),
])
def test_a_prefect_schedule_we_cannot_follow_is_refused_saying_why(data: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        la.Schedule.from_prefect(data)


# --- The dashboard in a real browser ---------------------------------------------------------
#
# Headless Chromium from Debian's packages, driven over the DevTools protocol by the small
# stdlib client below (a websocket client and a few DevTools calls). Only 127.0.0.1 is
# contacted: Chromium's DevTools endpoint and the agent both listen there.

CHROMIUM = "/usr/bin/chromium"
DEFAULT_TIMEOUT = 10.0
START_TIMEOUT = 30.0
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_EVENTS = 1000


class CDPError(RuntimeError):
    """A DevTools call failed, or the browser went away."""


class CDPTimeoutError(CDPError, TimeoutError):
    """Something did not happen in time."""


# --- The websocket client (RFC 6455, client side, text frames) ---------------------------


class WebSocket:
    """A blocking websocket client: masked text frames out, text messages in."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not url.startswith("ws://"):
            raise CDPError(f"only ws:// URLs are supported, not {url!r}")
        hostport, _, path = url[len("ws://"):].partition("/")
        host, _, port_text = hostport.rpartition(":")
        if host not in ("127.0.0.1", "localhost"):
            raise CDPError(f"refusing to connect to {host!r}: only 127.0.0.1 is allowed")
        self._buffer = bytearray()
        self._closed = False
        try:
            self._sock = socket.create_connection(("127.0.0.1", int(port_text)), timeout=timeout)
        except OSError as exc:
            raise CDPError(f"cannot connect to {url}: {exc}") from exc
        self._handshake(hostport, "/" + path, time.monotonic() + timeout)

    def _handshake(self, hostport: str, path: str, deadline: float) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self._send_all(request.encode(), deadline)
        while b"\r\n\r\n" not in self._buffer:
            self._fill(deadline, "the websocket handshake")
            if len(self._buffer) > 65536:
                raise CDPError("websocket handshake: response headers too long")
        head, _, rest = bytes(self._buffer).partition(b"\r\n\r\n")
        self._buffer = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        if not lines[0].startswith("HTTP/1.1 101"):
            raise CDPError(f"websocket handshake refused: {lines[0]!r}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            raise CDPError(f"websocket handshake: bad Sec-WebSocket-Accept in {head[:300]!r}")

    def _send_all(self, data: bytes, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CDPTimeoutError("timed out sending to the browser")
        self._sock.settimeout(remaining)
        try:
            self._sock.sendall(data)
        except TimeoutError as exc:
            raise CDPTimeoutError("timed out sending to the browser") from exc
        except OSError as exc:
            raise CDPError(f"sending to the browser failed: {exc}") from exc

    def _fill(self, deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CDPTimeoutError(f"timed out waiting for {what}")
        self._sock.settimeout(remaining)
        try:
            chunk = self._sock.recv(1 << 16)
        except TimeoutError as exc:
            raise CDPTimeoutError(f"timed out waiting for {what}") from exc
        except OSError as exc:
            raise CDPError(f"reading from the browser failed: {exc}") from exc
        if not chunk:
            self._closed = True
            raise CDPError(f"the browser closed the connection while waiting for {what}")
        self._buffer += chunk

    def _take(self, count: int, deadline: float, what: str) -> bytes:
        while len(self._buffer) < count:
            self._fill(deadline, what)
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def _send_frame(self, opcode: int, payload: bytes, deadline: float) -> None:
        header = bytearray([0x80 | opcode])
        length = len(payload)
        if length < 126:
            header.append(0x80 | length)
        elif length < 1 << 16:
            header.append(0x80 | 126)
            header += struct.pack("!H", length)
        else:
            header.append(0x80 | 127)
            header += struct.pack("!Q", length)
        mask = os.urandom(4)
        header += mask
        masked = _mask(payload, mask)
        self._send_all(bytes(header) + masked, deadline)

    def send_text(self, text: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Send one text message."""
        if self._closed:
            raise CDPError("the websocket is closed")
        self._send_frame(0x1, text.encode(), time.monotonic() + timeout)

    def recv_text(self, deadline: float, what: str = "a message from the browser") -> str:
        """The next whole text message (fragments joined; pings answered) before ``deadline``."""
        parts: list[bytes] = []
        while True:
            first, second = self._take(2, deadline, what)
            fin, opcode = first & 0x80, first & 0x0F
            length = second & 0x7F
            if length == 126:
                length = struct.unpack("!H", self._take(2, deadline, what))[0]
            elif length == 127:
                length = struct.unpack("!Q", self._take(8, deadline, what))[0]
            mask = self._take(4, deadline, what) if second & 0x80 else b""
            payload = self._take(length, deadline, what)
            if mask:
                payload = _mask(payload, mask)
            if opcode == 0x8:  # close: answer it, then report
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                with contextlib.suppress(CDPError):
                    self._send_frame(0x8, payload[:2], time.monotonic() + 1.0)
                self._closed = True
                raise CDPError(f"the browser closed the websocket (code {code}) while waiting for {what}")
            if opcode == 0x9:  # ping
                self._send_frame(0xA, payload, deadline)
                continue
            if opcode == 0xA:  # pong
                continue
            if opcode not in (0x0, 0x1, 0x2):
                raise CDPError(f"unexpected websocket opcode {opcode}")
            parts.append(payload)
            if fin:
                return b"".join(parts).decode("utf-8", errors="replace")

    def close(self) -> None:
        """Send a close frame (best effort) and close the socket."""
        if not self._closed:
            with contextlib.suppress(CDPError, OSError):
                self._send_frame(0x8, struct.pack("!H", 1000), time.monotonic() + 1.0)
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()


def _mask(payload: bytes, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask``, fast for large payloads."""
    repeated = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


# --- The browser -------------------------------------------------------------------------


class Browser:
    """One headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, process: subprocess.Popen[bytes], profile: str, port: int, ws: WebSocket) -> None:
        self.process = process
        self.profile = profile
        self.port = port
        self._ws = ws
        self._next_id = 0
        #: DevTools events received so far (newest last, at most _MAX_EVENTS).
        self.events: list[dict[str, Any]] = []
        self.stderr_lines: list[str] = []
        self.pumping: threading.Thread | None = None  # the thread that drains Chromium's stderr

    # Starting and stopping.

    @classmethod
    def start(cls, width: int = 1280, height: int = 800, timeout: float = START_TIMEOUT,
              executable: str = CHROMIUM) -> Browser:
        """Start Chromium at ``width`` x ``height`` and connect to its first page."""
        if not os.path.exists(executable):
            raise CDPError(f"{executable} not found: apt-get install -y chromium")
        profile = tempfile.mkdtemp(prefix="cdp-profile-")
        args = [
            executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--window-size={width},{height}",
            "about:blank",
        ]
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, start_new_session=True)
        lines: queue.Queue[str | None] = queue.Queue()
        stderr_lines: list[str] = []

        def pump() -> None:  # keep draining stderr so Chromium never blocks on a full pipe
            assert process.stderr is not None
            for raw in process.stderr:
                line = raw.decode("utf-8", errors="replace").rstrip()
                if len(stderr_lines) < 500:
                    stderr_lines.append(line)
                lines.put(line)
            lines.put(None)

        pumping = threading.Thread(target=pump, name="chromium-stderr", daemon=True)
        pumping.start()
        deadline = time.monotonic() + timeout
        try:
            port = _read_port(lines, deadline, stderr_lines)
            ws_url = _page_ws_url(port, deadline)
            ws = WebSocket(ws_url, timeout=max(0.1, deadline - time.monotonic()))
        except BaseException:
            _kill(process, pumping)
            shutil.rmtree(profile, ignore_errors=True)
            raise
        browser = cls(process, profile, port, ws)
        browser.stderr_lines, browser.pumping = stderr_lines, pumping
        try:
            for method in ("Page.enable", "Runtime.enable"):
                browser.send(method, timeout=max(1.0, deadline - time.monotonic()))
        except BaseException:
            browser.close()
            raise
        return browser

    def close(self) -> None:
        """Close the connection, kill Chromium's process group and remove its profile."""
        self._ws.close()
        _kill(self.process, self.pumping)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # The protocol.

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """Call a DevTools ``method``; its result, or CDPError with the protocol's message."""
        self._next_id += 1
        call_id = self._next_id
        self._ws.send_text(json.dumps({"id": call_id, "method": method, "params": params or {}}), timeout)
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._ws.recv_text(deadline, f"the answer to {method}"))
            if message.get("id") == call_id:
                if "error" in message:
                    error = message["error"]
                    raise CDPError(f"{method} failed: {error.get('message')} {error.get('data', '')}".strip())
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)
                del self.events[:-_MAX_EVENTS]

    def exceptions(self) -> list[str]:
        """The page's uncaught JavaScript exceptions and console.error calls seen so far."""
        found: list[str] = []
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                found.append(str(details.get("exception", {}).get("description") or details.get("text")))
            elif event["method"] == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(" ".join(str(arg.get("value", arg.get("description"))) for arg in params.get("args", [])))
        return found

    # Page helpers.

    def open(self, url: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Navigate to ``url`` and wait until the document has loaded."""
        self.evaluate("window.__cdpOldDocument = true", timeout)
        result = self.send("Page.navigate", {"url": url}, timeout)
        if result.get("errorText"):
            raise CDPError(f"cannot open {url}: {result['errorText']}")
        # A new document has no marker; a same-document (hash) navigation has no loaderId.
        fresh = "!window.__cdpOldDocument && " if result.get("loaderId") else ""
        self.wait_for(f"{fresh}document.readyState === 'complete' && location.href !== 'about:blank'", timeout)

    def evaluate(self, js: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """The value of the JavaScript expression ``js`` (promises awaited), as JSON data."""
        result = self.send("Runtime.evaluate", {
            "expression": js, "returnByValue": True, "awaitPromise": True, "userGesture": True,
            "timeout": int(timeout * 1000),
        }, timeout + 1.0)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text", "error")
            raise CDPError(f"JavaScript failed: {text}\n  in: {js[:300]}")
        return result.get("result", {}).get("value")

    def wait_for(self, js_condition: str, timeout: float = DEFAULT_TIMEOUT, interval: float = 0.1) -> Any:
        """Poll ``js_condition`` until it is truthy; its value. CDPTimeoutError says what it last was."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            remaining = deadline - time.monotonic()
            try:
                last = self.evaluate(js_condition, timeout=max(0.5, min(5.0, remaining)))
            except CDPTimeoutError:
                last = "(evaluation timed out)"
            except CDPError as exc:  # e.g. the page is navigating: try again
                last = f"(error: {exc})"
            else:
                if last:
                    return last
            if time.monotonic() + interval > deadline:
                raise CDPTimeoutError(f"timed out after {timeout:g} s waiting for: {js_condition} (last: {last!r})")
            time.sleep(interval)

    def click(self, css_selector: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Click the first element matching ``css_selector`` (waits for it to exist)."""
        sel = json.dumps(css_selector)
        self.wait_for(f"document.querySelector({sel}) !== null", timeout)
        self.evaluate(f"document.querySelector({sel}).click()", timeout)

    def type_into(self, selector: str, text: str, clear: bool = True, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Focus the input matching ``selector``, clear it, and type ``text`` (input and change events fire)."""
        sel = json.dumps(selector)
        self.wait_for(f"document.querySelector({sel}) !== null", timeout)
        self.evaluate(f"(() => {{ const el = document.querySelector({sel}); el.focus();"
                      f" if ({json.dumps(clear)}) {{ el.value = ''; el.dispatchEvent(new Event('input',"
                      f" {{bubbles: true}})); }} }})()", timeout)
        if text:
            self.send("Input.insertText", {"text": text}, timeout)
        self.evaluate(f"document.querySelector({sel}).dispatchEvent(new Event('change', {{bubbles: true}}))",
                      timeout)

    def select_option(self, selector: str, value: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Choose ``value`` in the <select> matching ``selector`` (waits for the option to exist)."""
        sel, val = json.dumps(selector), json.dumps(value)
        self.wait_for(f"(() => {{ const el = document.querySelector({sel});"
                      f" return !!el && Array.from(el.options).some(o => o.value === {val}); }})()", timeout)
        self.evaluate(f"(() => {{ const el = document.querySelector({sel}); el.value = {val};"
                      f" el.dispatchEvent(new Event('change', {{bubbles: true}})); }})()", timeout)

    def text(self, selector: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """The innerText of the first element matching ``selector`` ('' if none)."""
        sel = json.dumps(selector)
        value = self.evaluate(f"(document.querySelector({sel}) || {{innerText: ''}}).innerText", timeout)
        return str(value)

    def screenshot(self, path: str, timeout: float = DEFAULT_TIMEOUT, full_page: bool = False) -> str:
        """Save a PNG of the viewport (or the whole page) to ``path``; the path."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        result = self.send("Page.captureScreenshot", params, timeout)
        with open(path, "wb") as file:
            file.write(base64.b64decode(result["data"]))
        return path

    def dom(self, timeout: float = DEFAULT_TIMEOUT) -> str:
        """The document's current HTML."""
        return str(self.evaluate("document.documentElement.outerHTML", timeout))

    def set_viewport(self, width: int, height: int, mobile: bool = False, scale: float = 1.0,
                     timeout: float = DEFAULT_TIMEOUT) -> None:
        """Emulate a ``width`` x ``height`` screen (``mobile=True`` for a phone's viewport rules)."""
        self.send("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile,
        }, timeout)

    def clear_viewport(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Back to the window's own size."""
        self.send("Emulation.clearDeviceMetricsOverride", {}, timeout)


def _read_port(lines: queue.Queue[str | None], deadline: float, seen: list[str]) -> int:
    """The port in Chromium's ``DevTools listening on ws://127.0.0.1:PORT/...`` line."""
    marker = "DevTools listening on ws://"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            tail = "\n".join(seen[-20:])
            raise CDPTimeoutError(f"Chromium did not print 'DevTools listening on' in time; stderr:\n{tail}")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            raise CDPError("Chromium exited before it was ready; stderr:\n" + "\n".join(seen[-20:]))
        if marker in line:
            hostport = line.split(marker, 1)[1].split("/", 1)[0]
            return int(hostport.rsplit(":", 1)[1])


def _page_ws_url(port: int, deadline: float) -> str:
    """The websocket URL of Chromium's first page target (waits for it to appear)."""
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2.0) as response:
                targets = json.load(response)
            for target in targets:
                if target.get("type") == "page" and target.get("webSocketDebuggerUrl"):
                    return str(target["webSocketDebuggerUrl"])
            last = f"no page among {len(targets)} targets"
        except (OSError, ValueError) as exc:
            last = str(exc)
        time.sleep(0.1)
    raise CDPTimeoutError(f"no page target on DevTools port {port} in time: {last}")


def _kill(process: subprocess.Popen[bytes], pumping: threading.Thread | None = None, grace: float = 5.0) -> None:
    """SIGTERM Chromium's process group, SIGKILL it after ``grace`` seconds; close its stderr once read."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError, PermissionError):  # stragglers in the group
        os.killpg(process.pid, signal.SIGKILL)
    if pumping is not None:
        pumping.join(10)
    if process.stderr is not None and (pumping is None or not pumping.is_alive()):
        process.stderr.close()


#: Where the browser test leaves its screenshots (the README shows them).
SCREENS = AGENT.parent / "benchmarks" / "screens"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium: installed once (under a lock, for parallel workers) if it is missing."""
    import fcntl

    if not Path(CHROMIUM).exists():
        TEST_CACHE.mkdir(parents=True, exist_ok=True)
        with open(TEST_CACHE / "chromium.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not Path(CHROMIUM).exists():
                environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
                install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
                done = subprocess.run(install, capture_output=True, text=True, timeout=900, env=environment)
                if done.returncode != 0:  # stale package lists on a fresh machine: read them, then again
                    subprocess.run(["apt-get", "update"], capture_output=True, timeout=900, env=environment)
                    done = subprocess.run(install, capture_output=True, text=True, timeout=900, env=environment)
                assert done.returncode == 0 and Path(CHROMIUM).exists(), (
                    "the browser test needs Debian's chromium and could not install it (apt-get install -y "
                    f"chromium): {done.stderr.strip()[-800:]}")
    return CHROMIUM


def _dashboard_rows(page: Browser) -> list[dict[str, str]]:
    return page.evaluate("[...document.querySelectorAll('#runs-table tbody tr[data-run-id]')].map(r => "
                         "({id: r.dataset.runId, state: r.dataset.state, text: r.innerText}))")


def test_the_dashboard_in_a_real_browser(embedded: World, test_flows: Any, chromium: str) -> None:
    """The page, served by a real agent over a real database, rendered and clicked in Chromium."""
    flow_id = embedded.flow(test_flows.hello, schedule=la.CronClock("0 9 * * *", "Europe/Berlin"))
    sleepy = embedded.flow(test_flows.sleep, name="sleepy")
    done = [embedded.run(flow_id, parameters={"name": f"n{n}"}) for n in range(3)]
    failed = embedded.run(embedded.flow(test_flows.fail))
    assert embedded.agent("--once").returncode == 1  # one failed
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    agent = _agent_process(embedded, "--agent-address", url)
    SCREENS.mkdir(parents=True, exist_ok=True)
    with Browser.start(1280, 800) as page:
        deadline = time.monotonic() + 30
        while True:  # the agent's address comes up with the agent
            try:
                page.open(url)
                page.wait_for("document.querySelectorAll('#runs-table tbody tr[data-run-id]').length >= 14", 15)
                break
            except CDPError:
                assert time.monotonic() < deadline and agent.poll() is None, "the dashboard did not come up"
        rows = _dashboard_rows(page)
        by_id = {row["id"]: row for row in rows}
        assert {by_id[run]["state"] for run in done} == {"Success"} and by_id[failed]["state"] == "Failed"
        assert page.evaluate(f"!!document.querySelector('tr[data-run-id=\"{failed}\"] .state-Failed')")
        assert "local_agent.db" in page.text("#location")
        page.screenshot(str(SCREENS / "desktop-runs.png"))
        page.select_option("#state-filter", "Failed")
        page.wait_for("[...document.querySelectorAll('#runs-table tbody tr[data-run-id]')].every(r => "
                      "r.dataset.state === 'Failed')", 10)
        assert [row["id"] for row in _dashboard_rows(page)] == [failed]
        page.select_option("#state-filter", "")
        # One run: its parameters, its states, its log.
        page.evaluate(f"location.hash = '#/runs/{done[0]}'")
        page.wait_for("document.querySelectorAll('#log-lines .log-line').length > 0", 15)
        assert page.evaluate("[...document.querySelectorAll('#state-timeline li')].map(l => l.dataset.state)") == [
            "Pending", "Scheduled", "Submitted", "Running", "Success"]
        assert page.text("#detail-params tr[data-param=\"name\"]").split() == ["name", "n0"]
        assert "Hello, n0!" in page.text("#log-lines")
        page.screenshot(str(SCREENS / "desktop-run-detail.png"), full_page=True)
        # Flows: the schedule and its next run; create a run from the form built from the parameters.
        page.click("#tab-flows")
        page.wait_for("!!document.querySelector('#flows-table tr[data-flow-name=\"hello\"] .c-next')", 10)
        assert page.text("#flows-table tr[data-flow-name=\"hello\"] .c-schedule") == \
            "cron '0 9 * * *' Europe/Berlin"
        page.screenshot(str(SCREENS / "desktop-flows.png"))
        page.click("button.run-flow[data-flow=\"hello\"]")
        page.wait_for("!document.querySelector('#create-run-panel').hidden", 10)
        page.type_into(".param-input[data-param=\"name\"]", '"browser"')
        page.type_into("#run-name", "from-the-browser")
        page.screenshot(str(SCREENS / "desktop-create-run.png"))
        page.click("#create-run-submit")
        created = page.wait_for("location.hash.startsWith('#/runs/') && location.hash.slice(7)", 15)
        run = embedded.db.get_flow_run(created)
        assert run is not None and run.parameters == {"name": "browser"} and run.name == "from-the-browser"
        page.wait_for("document.querySelector('#detail-state .state-Success') !== null", 60)  # the agent ran it
        # Cancel a running run from its page.
        sleeping = embedded.run(sleepy, parameters={"seconds": 60})
        assert embedded.wait_for(lambda: embedded.state(sleeping) == "Running", timeout=60)
        page.evaluate(f"location.hash = '#/runs/{sleeping}'")
        page.wait_for("!!document.querySelector('#cancel-run') && !document.querySelector('#cancel-run').hidden",
                      15)
        page.click("#cancel-run")
        page.click("#cancel-confirm-yes")
        assert embedded.wait_for(lambda: embedded.state(sleeping) == "Cancelled", timeout=60)
        page.wait_for("document.querySelector('#detail-state .state-Cancelled') !== null", 20)
        # A phone: no sideways scrolling.
        page.set_viewport(390, 844, mobile=True)
        page.evaluate("location.hash = '#/runs'")
        page.wait_for("document.querySelectorAll('#runs-table tbody tr[data-run-id]').length > 0", 10)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        page.screenshot(str(SCREENS / "phone-runs.png"))
        assert page.exceptions() == []
    agent.send_signal(signal.SIGTERM)
    agent.communicate(timeout=60)


def test_the_dashboard_api_on_prefect_server(api_world: World, test_flows: Any) -> None:
    server = api_world.server
    flow_id = api_world.flow(test_flows.hello)
    run_ids = [api_world.run(flow_id, parameters={"name": f"n{n}"}) for n in range(7)]
    assert api_world.agent("--once").returncode == 0
    ui = _UI(api_world)
    try:
        first, second = ui.get("/api/runs?per_page=5"), ui.get("/api/runs?per_page=5&page=2")
        assert len(first["runs"]) == 5 and first["has_more"] and len(second["runs"]) == 2
        assert {run["id"] for run in first["runs"] + second["runs"]} == set(run_ids)
        assert all(run["start_time"] and run["end_time"] for run in first["runs"])
        name = first["runs"][0]["name"]
        found = ui.get(f"/api/runs?q={name}")["runs"]  # (the double's random names may repeat in 7 runs)
        assert first["runs"][0]["id"] in {run["id"] for run in found} and {run["name"] for run in found} == {name}
        assert len(ui.get("/api/runs?q=hel")["runs"]) == 7  # by flow name
        logs = ui.get(f"/api/runs/{run_ids[0]}/logs?after=0")
        assert logs["final"] and "Hello, n0!" in [line["message"] for line in logs["lines"]]
        assert [agent["name"] for agent in ui.get("/api/agents")] == ["agent"]
        code, created = ui.post("/api/runs", {"flow": "hello", "parameters": {"name": "web"}})
        assert code == 201 and server.run(created["id"])["parameters"] == {"name": "web"}
        code, _ = ui.post(f"/api/runs/{created['id']}/cancel", {})
        assert code == 200 and server.run(created["id"])["state"] == "Cancelled"
    finally:
        ui.close()


def test_the_http_endpoint_survives_slow_clients_and_its_own_bugs(tmp_path: Path, clean_env: dict[str, str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(la, "ENDPOINT_TIMEOUT_SECONDS", 1.0)

    class Buggy(la._Dashboard):
        def get(self, path: str, query: Any) -> tuple[int, str, bytes]:
            if path == "/api/flows":
                raise RuntimeError("a bug")
            return super().get(path, query)

    settings = la.resolve_settings({"api": f"sqlite:///{tmp_path / 'db.sqlite'}"}, environ=clean_env)
    port = _free_port()
    server = la._serve_http(f"http://127.0.0.1:{port}", Buggy(settings, mode="ui", on_loopback=True),
                            logging.getLogger("test-http"))
    base = f"http://127.0.0.1:{port}"
    slow = []
    try:
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(base + "/api/flows", timeout=10)
        with failed.value:
            assert failed.value.code == 500 and json.loads(failed.value.read())["error"].startswith("internal error")
        for _ in range(la.ENDPOINT_MAX_CONNECTIONS):  # every slot taken by a client that trickles its request
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            client.sendall(b"GET /api/status HTTP/1.1\r\n")
            slow.append(client)
        deadline = time.monotonic() + 20
        for client in slow:  # each keeps sending a header line now and then: never idle for a whole timeout
            with contextlib.suppress(OSError):
                client.sendall(b"X-Slow: 1\r\n")
        answered = None
        while answered is None and time.monotonic() < deadline:
            time.sleep(0.3)
            for client in slow:
                with contextlib.suppress(OSError):
                    client.sendall(b"X-Slow: 1\r\n")
            try:
                with urllib.request.urlopen(base + "/api/status", timeout=5) as answer:
                    answered = json.loads(answer.read())
            except OSError:
                continue
        assert answered is not None and answered["mode"] == "ui"  # the trickling clients were cut off
    finally:
        for client in slow:
            client.close()
        server.shutdown()
        server.server_close()


def test_who_may_write_and_which_hosts_are_this_server() -> None:
    assert la._is_loopback("127.0.0.1") and la._is_loopback("::1") and la._is_loopback("localhost")
    assert not la._is_loopback("127.0.0.1.evil.example") and not la._is_loopback("0.0.0.0")
    names = {"127.0.0.1:8080", "localhost:8080"}
    assert la._host_allowed("127.0.0.1:8080", names, wildcard=False)
    assert not la._host_allowed("192.0.2.7:8080", names, wildcard=False)
    assert la._host_allowed("192.0.2.7:8080", names, wildcard=True)  # on every interface: an address is fine
    assert not la._host_allowed("attacker.example:8080", names, wildcard=True)  # a name may be rebound
    assert not la._host_allowed("[::1", names, wildcard=True)


# --- Real Prefect 3.x ---------------------------------------------------------------------------
# These tests run the agent against a real `prefect server start` (3.9.1) and compare it with the
# official process worker. The virtualenv is built once and kept in TEST_CACHE; set
# LOCAL_AGENT_SKIP_PREFECT3=1 to skip them (the summary line from conftest.py says so).

PREFECT3_VERSION = "3.9.1"
#: The state types after which a Prefect 3 flow run never changes by itself.
PREFECT3_FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@pytest.fixture(scope="session")
def prefect3_python() -> str:
    """A Python with prefect 3.9.1: made once (under a lock, for parallel workers), then reused."""
    import fcntl

    if os.environ.get("LOCAL_AGENT_SKIP_PREFECT3") == "1":
        pytest.skip("prefect 3 tests skipped by LOCAL_AGENT_SKIP_PREFECT3=1")
    venv = TEST_CACHE / f"prefect-{PREFECT3_VERSION}-py{sys.version_info[0]}{sys.version_info[1]}"
    python = venv / "bin" / "python"
    check = f"import prefect; assert prefect.__version__ == {PREFECT3_VERSION!r}, prefect.__version__"
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    with open(TEST_CACHE / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # xdist workers wait here while the first one builds it
        if python.exists() and subprocess.run([str(python), "-c", check], capture_output=True,
                                              timeout=120).returncode == 0:
            return str(python)
        shutil.rmtree(venv, ignore_errors=True)  # a half-built or stale venv is rebuilt from scratch
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                  f"prefect=={PREFECT3_VERSION}"],
                 [str(python), "-c", check]]
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the prefect 3 tests need prefect {PREFECT3_VERSION} in {venv}, and "
                            f"`{' '.join(step)}` took over 900 s", pytrace=False)
            if done.returncode != 0:
                pytest.fail(f"the prefect 3 tests need prefect {PREFECT3_VERSION} in a virtualenv at {venv}, and "
                            f"`{' '.join(step)}` failed: {(done.stderr or done.stdout)[-1500:]}", pytrace=False)
    return str(python)


def prefect3_env(api_url: str, home: Path) -> dict[str, str]:
    """The environment for every Prefect 3 process of a test: this server, this home, nothing else."""
    # An inherited PREFECT_* (a developer's profile, PREFECT_API_KEY, ...) would point clients
    # elsewhere or change behaviour, so all of them go; then only what the tests rely on is set.
    env = {key: value for key, value in os.environ.items() if not key.upper().startswith("PREFECT")}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_UI_ENABLED": "false",
    })
    return env


def _tail(path: Path, size: int = 3000) -> str:
    """The end of a log file, for failure messages."""
    try:
        return path.read_bytes()[-size:].decode(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"


def _stop_group(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM a process's whole group (it leads one), SIGKILL it after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # the group is gone; reap the leader below
            pass
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # uvicorn and the services run as children in the same group: make sure none outlives the test.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Prefect3Server:
    """A real `prefect server start` on 127.0.0.1 with its own home; it can be stopped and started
    again on the same port and database (a "server restart mid-run")."""

    def __init__(self, python: str, home: Path) -> None:
        self.bin = Path(python).parent
        self.home = home
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = prefect3_env(self.url, home)
        self.log = home / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_in = 0.0  # seconds the last start took (the first one migrates the database)

    def start(self, timeout: float = 120.0) -> None:
        """Start the server (again) and wait until /api/health says true."""
        assert self.process is None, "the server is already running"
        self.home.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        with open(self.log, "ab") as log:  # appended, so a restart keeps the first run's lines
            self.process = subprocess.Popen(
                [str(self.bin / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env, cwd=self.home, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # its own group, so stop() reaches uvicorn and the services too
        while time.monotonic() - began < timeout:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                pytest.fail(f"prefect server exited with {code} while starting; {self.log}:\n{_tail(self.log)}",
                            pytrace=False)
            if self.healthy():
                self.started_in = time.monotonic() - began
                return
            time.sleep(0.25)
        self.stop()
        pytest.fail(f"prefect server was not healthy within {timeout:.0f} s; {self.log}:\n{_tail(self.log)}",
                    pytrace=False)

    def healthy(self) -> bool:
        """Whether GET /api/health answers true right now."""
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{self.url}/health", headers=_basic_auth(
                    self.env.get("PREFECT_API_AUTH_STRING", ""))), timeout=2) as response:
                return bool(json.load(response) is True)
        except (OSError, ValueError):  # refused, reset, timed out, or not JSON yet
            return False

    def stop(self, grace: float = 15.0) -> None:
        """Stop the server: SIGTERM to its process group, SIGKILL after `grace` seconds."""
        if self.process is not None:
            _stop_group(self.process, grace)
            self.process = None


def _started_server(python: str, home: Path) -> Iterator[Prefect3Server]:
    """A started Prefect3Server, stopped when the generator closes."""
    server = Prefect3Server(python, home)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def prefect3_server(prefect3_python: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prefect3Server]:
    """One real Prefect 3 server for the session (each test makes its own pool, so they don't meet)."""
    yield from _started_server(prefect3_python, tmp_path_factory.mktemp("prefect3-home"))


@pytest.fixture
def prefect3_private_server(prefect3_python: str, tmp_path: Path) -> Iterator[Prefect3Server]:
    """A Prefect 3 server of the test's own, which it may stop and start (the shared one must stay up)."""
    yield from _started_server(prefect3_python, tmp_path / "prefect3-home")


def _basic_auth(auth_string: str) -> dict[str, str]:
    """The header Prefect's client sends for PREFECT_API_AUTH_STRING (none without one)."""
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()} if auth_string else {}


class Prefect3:
    """A small client for Prefect 3's REST API, for setting up and observing tests (JSON in/out)."""

    def __init__(self, url: str, auth_string: str = "") -> None:
        self.url = url.rstrip("/")
        self.headers = {"Content-Type": "application/json", **_basic_auth(auth_string)}

    def call(self, method: str, path: str, body: Any = None, *, timeout: float = 30.0) -> Any:
        """One request; the decoded JSON answer (None if empty). HTTP >= 400 raises with the body."""
        data = None if body is None else json.dumps(body).encode()
        deadline = time.monotonic() + 60
        for attempt in itertools.count():
            request = urllib.request.Request(self.url + path, data=data, method=method, headers=self.headers)
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    raw = response.read()
                return json.loads(raw) if raw else None
            except urllib.error.HTTPError as error:
                detail = error.read().decode(errors="replace")
                error.close()
                # The server answers 503 while SQLite is busy (the write rolled back); under a loaded
                # test run that can last seconds, so retry for up to a minute.
                if error.code == 503 and time.monotonic() < deadline:
                    time.sleep(min(0.2 * 2 ** attempt, 3.0))
                    continue
                raise AssertionError(f"{method} {path} -> HTTP {error.code}: {detail[:2000]}") from None
        raise AssertionError("unreachable")

    def create_pool(self, name: str, *, paused: bool = False, concurrency_limit: int | None = None,
                    base_job_template: dict[str, Any] | None = None, pool_type: str = "process") -> dict[str, Any]:
        """A new work pool (an empty template, as `prefect work-pool create` without one leaves it)."""
        return self.call("POST", "/work_pools/", {
            "name": name, "type": pool_type, "is_paused": paused, "concurrency_limit": concurrency_limit,
            "base_job_template": base_job_template or {}})

    def create_queue(self, pool: str, name: str, **fields: Any) -> dict[str, Any]:
        """A new work queue in a pool (POST without the trailing slash: the slash form redirects)."""
        return self.call("POST", f"/work_pools/{pool}/queues", {"name": name, **fields})

    def pause_pool(self, name: str, paused: bool = True) -> None:
        """Pause (or resume) a work pool."""
        self.call("PATCH", f"/work_pools/{name}", {"is_paused": paused})

    def create_deployment(self, pool: str, flow_dir: Path, entrypoint: str, name: str, *, queue: str = "default",
                          job_variables: dict[str, Any] | None = None,
                          parameter_schema: dict[str, Any] | None = None) -> tuple[str, str]:
        """A flow and a deployment of `entrypoint` ("file.py:func") run from `flow_dir`; (flow id,
        deployment id). The pull step is what `prefect deploy` writes for local code."""
        flow_name = entrypoint.rsplit(":", 1)[-1]
        flow = self.call("POST", "/flows/", {"name": flow_name})  # idempotent: the same name gives the same id
        deployment = self.call("POST", "/deployments/", {
            "name": name, "flow_id": flow["id"], "work_pool_name": pool, "work_queue_name": queue,
            "entrypoint": entrypoint, "job_variables": job_variables or {},
            "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(flow_dir)}}],
            # Without a schema there is nothing to check parameters against.
            "parameter_openapi_schema": parameter_schema,
            "enforce_parameter_schema": parameter_schema is not None})
        return flow["id"], deployment["id"]

    def create_run(self, deployment_id: str, *, parameters: dict[str, Any] | None = None, queue: str | None = None,
                   scheduled_time: str | None = None, job_variables: dict[str, Any] | None = None) -> str:
        """A SCHEDULED flow run of a deployment (due now unless `scheduled_time`, ISO 8601); its id."""
        state: dict[str, Any] = {"type": "SCHEDULED", "name": "Scheduled"}
        if scheduled_time is not None:
            state["state_details"] = {"scheduled_time": scheduled_time}
        body: dict[str, Any] = {"parameters": parameters or {}, "state": state}
        if queue is not None:
            body["work_queue_name"] = queue
        if job_variables is not None:
            body["job_variables"] = job_variables
        return str(self.call("POST", f"/deployments/{deployment_id}/create_flow_run", body)["id"])

    def run(self, run_id: str) -> dict[str, Any]:
        """A flow run as the API shows it."""
        return dict(self.call("GET", f"/flow_runs/{run_id}"))

    def set_state(self, run_id: str, state: dict[str, Any], *, force: bool = False) -> dict[str, Any]:
        """Propose a state, as an engine or worker does; the orchestration result (status, state, details)."""
        return dict(self.call("POST", f"/flow_runs/{run_id}/set_state", {"state": state, "force": force}))

    def states(self, run_id: str) -> list[tuple[str, str, str]]:
        """A run's state history, oldest first, as (type, name, message)."""
        rows = self.call("GET", f"/flow_run_states/?flow_run_id={run_id}")
        rows.sort(key=lambda row: row["timestamp"])
        return [(row["type"], row["name"], row.get("message") or "") for row in rows]

    def logs(self, run_id: str) -> list[str]:
        """All log messages of a flow run, oldest first (the API pages by at most 200)."""
        messages: list[str] = []
        while True:
            page = self.call("POST", "/logs/filter", {
                "logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC",
                "offset": len(messages), "limit": 200})
            messages.extend(row["message"] for row in page)
            if len(page) < 200:
                return messages

    def wait_state(self, run_id: str, types: tuple[str, ...] | str, timeout: float) -> dict[str, Any]:
        """The run once its state type is one of `types`; fails with the state history after `timeout`."""
        wanted = (types,) if isinstance(types, str) else types
        deadline = time.monotonic() + timeout
        while True:
            run = self.run(run_id)
            if run["state"] and run["state"]["type"] in wanted:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"flow run {run_id} did not reach {wanted} within {timeout:.0f} s; "
                                     f"states: {self.states(run_id)}")
            time.sleep(0.2)

    def wait_final(self, run_id: str, timeout: float) -> dict[str, Any]:
        """The run once it is COMPLETED, FAILED, CRASHED or CANCELLED."""
        return self.wait_state(run_id, PREFECT3_FINAL, timeout)


PREFECT3_FLOW = '''
import os
import sys
import time

from prefect import flow, get_run_logger


@flow
def hello(name: str = "world", sleep: float = 0, exit_code: int = 0):
    get_run_logger().info("logged %s", name)
    print("printed", name, os.environ.get("FROM_POOL"), os.environ.get("FROM_DEPLOYMENT"), os.getcwd(), flush=True)
    marker = os.environ.get("MARKER_FILE")
    if marker:
        with open(marker, "a") as handle:
            handle.write(os.environ["PREFECT__FLOW_RUN_ID"] + "\\n")
    for tick in range(int(sleep)):  # output all along, as a long flow writes it
        print("tick", tick, flush=True)
        time.sleep(1)
    time.sleep(sleep - int(sleep))
    if exit_code:
        os._exit(exit_code)
    return name
'''


class P3World:
    """One test's work pool on the shared Prefect 3 server, its flow and deployment, and the agent's setup."""

    def __init__(self, server: Prefect3Server, python: str, tmp_path: Path, env: dict[str, str]) -> None:
        self.server, self.python, self.tmp_path = server, python, tmp_path
        self.api = Prefect3(server.url)
        self.pool = "t" + os.urandom(4).hex()  # never "prefect...": the server keeps those names
        self.flow_dir = tmp_path / "flows3"
        self.flow_dir.mkdir()
        (self.flow_dir / "hello.py").write_text(PREFECT3_FLOW)
        # The agent and its engines reach this server only, and tell nobody (DO_NOT_TRACK).
        self.env = {**env, "PREFECT_API_URL": server.url, "PREFECT_HOME": str(tmp_path / "prefect3-client"),
                    "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        self.deployment_id = ""

    def deploy(self, *, create_pool: bool = True, queue: str = "default",
               job_variables: dict[str, Any] | None = None, name: str = "d1") -> str:
        """The pool (unless the test makes it) and a deployment of `hello`; the deployment's id."""
        if create_pool:
            self.api.create_pool(self.pool)
        schema = {"type": "object", "properties": {"name": {"type": "string"}, "sleep": {"type": "number"},
                                                   "exit_code": {"type": "integer"}}}
        _, self.deployment_id = self.api.create_deployment(self.pool, self.flow_dir, "hello.py:hello", name,
                                                           queue=queue, job_variables=job_variables,
                                                           parameter_schema=schema)
        return self.deployment_id

    def run(self, **parameters: Any) -> str:
        """A run of the deployment, due now."""
        queue = parameters.pop("queue", None)
        return self.api.create_run(self.deployment_id, parameters=parameters, queue=queue)

    def agent_argv(self, *args: str) -> list[str]:
        return ["start", "--pool", self.pool, "--python", self.python, "--no-hostname-label", *args]

    def agent(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``start --pool POOL --python VENV ARGS`` to completion (as its own process: it starts real engines)."""
        return run_cli(*self.agent_argv(*args), env=self.env, cwd=self.tmp_path, timeout=timeout)

    def agent_process(self, *args: str, name: str = "agent") -> subprocess.Popen[str]:
        """The agent in the background, its stderr in a file (read with ``agent_log``)."""
        with open(self.tmp_path / f"{name}.log", "w") as log:  # the child has its own copy of the descriptor
            return subprocess.Popen([sys.executable, str(AGENT), *self.agent_argv("-n", name, *args)], env=self.env,
                                    cwd=self.tmp_path, stdout=log, stderr=subprocess.STDOUT, text=True)

    def agent_log(self, name: str = "agent") -> str:
        return (self.tmp_path / f"{name}.log").read_text()

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=self.env, cwd=self.tmp_path, timeout=timeout)

    def types(self, run_id: str) -> list[str]:
        return [kind for kind, _, _ in self.api.states(run_id)]


@pytest.fixture
def p3(prefect3_server: Prefect3Server, prefect3_python: str, tmp_path: Path, clean_env: dict[str, str]) -> P3World:
    """A fresh work pool on the shared real Prefect 3 server, with a deployment's flow on disk."""
    return P3World(prefect3_server, prefect3_python, tmp_path, clean_env)


def _stop_agent(process: subprocess.Popen[str], timeout: float = 60) -> int:
    """SIGTERM a background agent and wait for it; its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.wait(timeout=timeout)


def test_prefect3_run_created_by_name_completes_on_the_agent(p3: P3World) -> None:
    p3.deploy(job_variables={"env": {"FROM_DEPLOYMENT": "dep-value"}})
    p3.api.call("PATCH", f"/work_pools/{p3.pool}", {"base_job_template": {
        **la._PROCESS_JOB_TEMPLATE,
        "variables": {**la._PROCESS_JOB_TEMPLATE["variables"], "properties": {
            **la._PROCESS_JOB_TEMPLATE["variables"]["properties"],
            "env": {"type": "object", "default": {"FROM_POOL": "pool-value", "FROM_DEPLOYMENT": "pool-loses"}}}}}})
    created = p3.cli("run", "hello/d1", "--param", 'name="you"')
    assert created.returncode == 0, created.stderr
    run_id = created.stdout.strip()
    result = p3.agent("--once", "-f")
    assert result.returncode == 0, result.stderr
    run = p3.api.run(run_id)
    assert run["state"]["type"] == "COMPLETED"
    states = p3.api.states(run_id)
    assert [kind for kind, _, _ in states] == ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"]
    assert "Submitted for execution by agent agent" in states[1][2] and "[claim " in states[1][2]
    assert run["labels"]["prefect.worker.type"] == "process"
    assert run["labels"]["prefect.work-pool.name"] == p3.pool
    assert run["labels"]["prefect.worker.name"].startswith("agent@")
    pid = re.search(r"Submitted for execution: PID: (\d+)", "\n".join(p3.api.logs(run_id)))
    assert pid and run["infrastructure_pid"] == pid.group(1)  # the engine's own process
    logs = p3.api.logs(run_id)
    # The job: the pool template's env default, the deployment's job variables over it, the pull step's cwd.
    printed = [line for line in logs if line.startswith("printed you")]
    assert printed == [f"printed you pool-value dep-value {p3.flow_dir}"]  # once: the agent ships prints
    # Once: the engine ships its records, and the agent does not again, in any format.
    assert sum("logged you" in line for line in logs) == 1, logs
    assert "logged you" in result.stdout  # -f shows them
    assert "Flow run " + run_id + " finished: Success" in result.stderr
    assert f"Starting LocalAgent on work pool '{p3.pool}' (queues: all)" in result.stderr
    inspected = p3.cli("inspect", run_id)
    assert "state:      Success" in inspected.stdout and "claimed by: agent agent (" in inspected.stdout, \
        inspected.stdout + inspected.stderr
    assert re.search(r"Pending .*Submitted for execution by agent agent", inspected.stdout), inspected.stdout
    assert "printed you" in p3.cli("logs", run_id).stdout
    listed = p3.cli("runs").stdout
    assert run_id in listed and "Success" in listed


def test_prefect3_a_process_that_dies_leaves_the_run_crashed_with_why(p3: P3World) -> None:
    p3.deploy()
    run_id = p3.run(exit_code=3)
    result = p3.agent("--once")
    assert result.returncode == 1, result.stderr  # --once: a run did not succeed
    run = p3.api.run(run_id)
    assert run["state"]["type"] == "CRASHED"
    assert "exited with code 3 before reporting a final state" in run["state"]["message"]
    assert p3.types(run_id).count("CRASHED") == 1


def test_prefect3_cancelling_a_running_run_stops_its_process(p3: P3World) -> None:
    p3.deploy()
    run_id = p3.run(sleep=120)
    agent = p3.agent_process()
    try:
        p3.api.wait_state(run_id, "RUNNING", timeout=90)
        cancelled = p3.cli("cancel", run_id)
        assert cancelled.returncode == 0 and "Cancelling" in cancelled.stdout, cancelled.stderr
        run = p3.api.wait_final(run_id, timeout=la.WATCH_SECONDS + la.KILL_GRACE_SECONDS + 30)
    finally:
        assert _stop_agent(agent) == 0
    assert run["state"]["type"] == "CANCELLED", p3.api.states(run_id)
    assert "was cancelled" in run["state"]["message"]
    assert "Cancellation requested: stopping process PID" in "\n".join(p3.api.logs(run_id))
    # Told why before the signal, its engine ran the flow's cancellation and wrote no Crashed.
    assert "CRASHED" not in p3.types(run_id), p3.api.states(run_id)


def test_prefect3_a_run_past_its_timeout_fails_saying_so(p3: P3World) -> None:
    p3.deploy()
    run_id = p3.run(sleep=120)
    result = p3.agent("--once", "--timeout", "8")
    assert result.returncode == 1
    run = p3.api.run(run_id)
    # Over the Crashed its engine writes as the agent's SIGTERM ends it: the agent knows why.
    assert run["state"]["type"] == "FAILED" and "timed out after 8 s" in run["state"]["message"], p3.api.states(run_id)
    assert "CRASHED" not in p3.types(run_id), p3.api.states(run_id)  # told to let go, its engine wrote nothing


def test_prefect3_sigterm_hands_a_running_run_back(p3: P3World) -> None:
    p3.deploy()
    running = p3.run(sleep=120)
    agent = p3.agent_process("--grace", "1")
    try:
        p3.api.wait_state(running, "RUNNING", timeout=90)
    finally:
        code = _stop_agent(agent)
    assert code == 0, p3.agent_log()
    run = p3.api.run(running)
    assert (run["state"]["type"], run["state"]["name"]) == ("SCHEDULED", "AwaitingRetry"), p3.api.states(running)
    assert "shut down before this run finished; rescheduled" in run["state"]["message"]
    assert "CRASHED" not in p3.types(running), p3.api.states(running)  # its engine knew it was handed back
    # Handed back, it is due again, and the next agent runs it to the end.
    p3.api.call("PATCH", f"/flow_runs/{running}", {"parameters": {"sleep": 0}})
    assert p3.agent("--once").returncode == 0
    assert p3.api.run(running)["state"]["type"] == "COMPLETED"


def test_prefect3_a_paused_pool_gives_no_runs_until_resumed(p3: P3World) -> None:
    p3.deploy()
    p3.api.pause_pool(p3.pool)
    run_id = p3.run()
    result = p3.agent("--max-polls", "2", "--max-poll-interval", "0.3")
    assert result.returncode == 0, result.stderr
    assert p3.api.run(run_id)["state"]["type"] == "SCHEDULED"
    why = p3.cli("why", run_id, "--pool", p3.pool)
    assert f"would not run it: its work pool '{p3.pool}' is paused" in why.stdout, why.stdout + why.stderr
    p3.api.pause_pool(p3.pool, paused=False)
    assert p3.agent("--once").returncode == 0
    assert p3.api.run(run_id)["state"]["type"] == "COMPLETED"


def test_prefect3_work_queues_choose_which_runs_an_agent_takes(p3: P3World) -> None:
    p3.deploy()
    p3.api.create_queue(p3.pool, "gpu")
    on_default, on_gpu = p3.run(), p3.run(queue="gpu")
    result = p3.agent("--once", "--work-queue", "gpu")
    assert result.returncode == 0, result.stderr
    assert p3.api.run(on_gpu)["state"]["type"] == "COMPLETED"
    assert p3.api.run(on_default)["state"]["type"] == "SCHEDULED"
    why = p3.cli("why", "--pool", p3.pool, "--work-queue", "gpu")
    assert f"{on_default} (hello, labels []): would not run it: it is in work queue 'default', and the agent takes " \
           "only gpu" in why.stdout, why.stdout + why.stderr
    p3.api.call("PATCH", f"/work_pools/{p3.pool}/queues/default", {"concurrency_limit": 0})
    why = p3.cli("why", on_default, "--pool", p3.pool)
    assert "its work queue 'default' is at its concurrency limit (0 of 0 under way)" in why.stdout, why.stdout


def test_prefect3_a_missing_pool_or_queue_is_one_clear_line(p3: P3World) -> None:
    missing = p3.agent("--once")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert f"work pool '{p3.pool}' does not exist" in missing.stderr and "--create-pool" in missing.stderr
    no_pool = p3.cli("start", "--once", "--no-hostname-label")
    assert no_pool.returncode == 1 and "start the agent with --pool POOL" in no_pool.stderr, no_pool.stderr
    created = p3.agent("--once", "--create-pool", "--work-queue", "gpu")
    assert created.returncode == 0, created.stderr
    pool = p3.api.call("GET", f"/work_pools/{p3.pool}")
    assert pool["type"] == "process" and pool["base_job_template"] == la._PROCESS_JOB_TEMPLATE
    assert p3.api.call("GET", f"/work_pools/{p3.pool}/queues/gpu")["name"] == "gpu"
    unknown_queue = p3.agent("--once", "--work-queue", "nosuch")
    assert unknown_queue.returncode == 1 and f"work pool '{p3.pool}' has no work queue 'nosuch'" in \
        unknown_queue.stderr


def _kill_an_agent_while_it_runs(p3: P3World, run_id: str) -> None:
    """Start an agent, and kill -9 it once its flow is running (the flow goes on without it)."""
    first = p3.agent_process()
    try:
        p3.api.wait_state(run_id, "RUNNING", timeout=90)
    finally:
        first.kill()
        first.wait(timeout=30)


def test_prefect3_a_killed_agent_adopts_its_running_flow_on_restart(p3: P3World) -> None:
    p3.deploy()
    run_id = p3.run(sleep=8)
    _kill_an_agent_while_it_runs(p3, run_id)
    second = p3.agent("--once", timeout=120)
    assert second.returncode == 0, second.stderr
    assert f"Adopting flow run {run_id}" in second.stderr
    assert p3.api.run(run_id)["state"]["type"] == "COMPLETED"
    assert p3.types(run_id).count("RUNNING") == 1  # one engine ran it, once


def test_prefect3_claims_are_decided_by_the_answers_body() -> None:
    submitted = la.make_state("Submitted", "by me", context={"claim": "abc123"})
    proposal, force = la._rest_state(submitted)
    assert (proposal["type"], proposal["message"], force) == ("PENDING", "by me [claim abc123]", False)
    # The same state sent again carries the same transition id: the server refuses the duplicate.
    assert proposal["state_details"]["transition_id"] == la._rest_state(submitted)[0]["state_details"]["transition_id"]
    back, force = la._rest_state(la.make_state("Scheduled", "handed back"))
    assert back["type"] == "SCHEDULED" and back["name"] == "AwaitingRetry" and back["state_details"]["scheduled_time"]
    crashed, _ = la._rest_state(la.make_state("Failed", "died", context={"crashed": True}))
    assert crashed["type"] == "CRASHED"
    assert la._rest_state(la.make_state("Cancelled", "stop"))[1] is True  # forced, as the official worker


def test_prefect3_job_configuration_precedence_is_prefects() -> None:
    template = {"job_configuration": {"command": "{{ command }}", "env": "{{ env }}", "name": "run-{{ name }}"},
                "variables": {"properties": {"env": {"default": {"A": "pool", "B": "pool"}},
                                             "command": {"default": None}, "name": {"default": "x"}}}}
    job = la._render_job(template, {"env": {"B": "deployment", "C": "deployment"}, "name": "dep"},
                         {"env": {"C": "run"}})
    assert job == {"env": {"A": "pool", "B": "deployment", "C": "run"}, "name": "run-dep"}  # no command: the engine's


def test_prefect3_json_records_are_shown_and_shipped_once() -> None:
    record = ('{"name":"prefect.flow_runs","msg":"hi %s","args":["you"],"levelname":"INFO","created":1796031402.5,'
              '"exc_info":null}')
    line, shipped = la._parse_output_line(record)
    assert (line.name, line.level, line.message, shipped) == ("prefect.flow_runs", "INFO", "hi you", True)
    other, shipped = la._parse_output_line(record.replace("prefect.flow_runs", "prefect.engine"))
    assert other.message == "hi you" and not shipped  # the engine's API handler does not send these
    plain, shipped = la._parse_output_line('{"name": "not a record"}')
    assert plain.name == "output" and not shipped


def test_prefect3_an_adopted_run_past_its_timeout_fails_over_its_engines_crash(p3: P3World) -> None:
    p3.deploy()
    run_id = p3.run(sleep=120)
    _kill_an_agent_while_it_runs(p3, run_id)
    # The restarted agent cannot tell the adopted process why (its channel died with the first
    # agent): the engine writes Crashed on SIGTERM, and the agent's "timed out" goes over it.
    second = p3.agent("--once", "--timeout", "1", timeout=120)
    assert second.returncode == 1, second.stderr
    run = p3.api.run(run_id)
    assert run["state"]["type"] == "FAILED" and "timed out after 1 s" in run["state"]["message"], p3.api.states(run_id)
    assert p3.types(run_id)[-2:] == ["CRASHED", "FAILED"]


def test_prefect3_two_agents_and_the_official_worker_share_a_pool_without_doubling_a_run(p3: P3World) -> None:
    marker = p3.tmp_path / "ran.txt"
    p3.deploy(job_variables={"env": {"MARKER_FILE": str(marker)}})
    worker_log = open(p3.tmp_path / "worker.log", "wb")  # noqa: SIM115 (closed below)
    worker = subprocess.Popen(
        [str(Path(p3.python).parent / "prefect"), "worker", "start", "--pool", p3.pool, "--type", "process",
         "--limit", "3", "--name", "official"],
        env={**p3.env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, cwd=p3.tmp_path, stdout=worker_log,
        stderr=subprocess.STDOUT, start_new_session=True)
    agents = [p3.agent_process("--limit", "3", "--max-poll-interval", "1", name=f"agent{n}") for n in (1, 2)]
    try:
        deadline = time.monotonic() + 120
        while len(p3.api.call("POST", f"/work_pools/{p3.pool}/workers/filter", {})) < 3:  # all three polling
            assert time.monotonic() < deadline and worker.poll() is None, (p3.tmp_path / "worker.log").read_text()
            time.sleep(0.5)
        run_ids = [p3.run(name=f"run-{index}") for index in range(30)]
        finals = [p3.api.wait_final(run_id, timeout=420) for run_id in run_ids]
    finally:
        codes = [_stop_agent(agent) for agent in agents]
        _stop_group(worker, 30)
        worker_log.close()
    assert codes == [0, 0], [p3.agent_log(f"agent{n}")[-2000:] for n in (1, 2)]
    assert [run["state"]["type"] for run in finals] == ["COMPLETED"] * 30
    ran = marker.read_text().split()
    assert sorted(ran) == sorted(run_ids)  # each run ran once: none twice, none lost
    for run_id in run_ids:  # one claim each, whoever won it
        assert [name for kind, name, _ in p3.api.states(run_id) if kind == "PENDING"].count("Pending") == 1
    takers: dict[str, str] = {}
    for run_id in run_ids:  # who claimed each: our claims name the agent in their message
        states = p3.api.states(run_id)
        claim = next(message for kind, name, message in states if (kind, name) == ("PENDING", "Pending"))
        takers[run_id] = next((name for name in ("agent1", "agent2") if f"by agent {name} " in claim), "official")
        if takers[run_id] != "official":  # and ours label the runs they take, as the official worker does
            labels = p3.api.run(run_id)["labels"]
            assert labels.get("prefect.worker.name", "").startswith(takers[run_id] + "@"), (labels, states)
    assert set(takers.values()) == {"agent1", "agent2", "official"}, takers  # all three took part


def test_prefect3_a_server_restart_mid_run_loses_no_state_and_no_line(
        prefect3_private_server: Prefect3Server, prefect3_python: str, tmp_path: Path,
        clean_env: dict[str, str]) -> None:
    p3 = P3World(prefect3_private_server, prefect3_python, tmp_path, clean_env)
    p3.deploy()
    run_id = p3.run(sleep=12)
    agent = p3.agent_process("--max-poll-interval", "1")
    try:
        p3.api.wait_state(run_id, "RUNNING", timeout=90)
        prefect3_private_server.stop()  # the flow goes on printing; the agent holds its lines
        time.sleep(3)
        prefect3_private_server.start()
        run = p3.api.wait_final(run_id, timeout=120)
        deadline = time.monotonic() + 60
        while "Flow-run process PID" not in " ".join(p3.api.logs(run_id)) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        assert _stop_agent(agent) == 0
    assert run["state"]["type"] == "COMPLETED", p3.api.states(run_id)
    assert "Holding" in p3.agent_log() and "The API takes writes again" in p3.agent_log(), p3.agent_log()
    # Every line, once, in order. (Prefect's engine may leave a line of its own unfinished on
    # stderr during the outage, "All connection attempts failed", and a tick then ends it.)
    ticks = re.findall(r"tick (\d+)$", "\n".join(p3.api.logs(run_id)), re.MULTILINE)
    assert ticks == [str(n) for n in range(12)], p3.agent_log()


OWN_FLOW_FOR_PREFECT3 = '''
import sys

import local_agent


@local_agent.Flow("greet")
def greet(name: str, times: int = 1) -> None:
    if name == "boom":
        raise ValueError("boom from greet")
    for _ in range(times):
        local_agent.context["logger"].info("Hello, %s!", name)
    print("printed by greet")


if __name__ == "__main__":
    print(greet.deploy(sys.argv[1]))
'''


def test_prefect3_this_files_own_flows_deploy_and_run_with_no_prefect(p3: P3World) -> None:
    p3.api.create_pool(p3.pool)
    script = p3.tmp_path / "greet.py"
    script.write_text(OWN_FLOW_FOR_PREFECT3)
    env = {**p3.env, "PYTHONPATH": str(AGENT.parent)}
    deployed = subprocess.run([sys.executable, str(script), p3.pool], env=env, cwd=p3.tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert deployed.returncode == 0, deployed.stderr
    deployment = p3.api.call("GET", f"/deployments/{deployed.stdout.split()[-1]}")
    assert deployment["name"] == "local-agent" and deployment["work_pool_name"] == p3.pool
    assert sorted(deployment["parameter_openapi_schema"]["properties"]) == ["name", "times"]
    unknown = p3.cli("run", "greet", "--param", "nme=1")
    assert unknown.returncode == 1 and "has no parameter 'nme'; its parameters are name, times" in unknown.stderr
    good = p3.cli("run", "greet/local-agent", "--param", 'name="you"', "--param", "times=2").stdout.strip()
    bad = p3.cli("run", "greet", "--param", 'name="boom"').stdout.strip()
    # No --python: the agent runs its own flows itself, and needs no prefect for it.
    result = run_cli("start", "--once", "--pool", p3.pool, "--no-hostname-label", env=env, cwd=p3.tmp_path,
                     timeout=120)
    assert result.returncode == 1, result.stderr  # one of the two failed
    assert [kind for kind, _, _ in p3.api.states(good)] == ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"]
    logs = p3.api.logs(good)
    assert logs.count("Hello, you!") == 2 and "printed by greet" in logs
    failed = p3.api.run(bad)
    assert failed["state"]["type"] == "FAILED" and "boom from greet" in failed["state"]["message"]


def test_prefect3_the_pools_job_template_command_and_working_dir_are_honoured(p3: P3World) -> None:
    workdir = p3.tmp_path / "workdir"
    workdir.mkdir()
    command = f"sh -c 'echo custom command ran in $(pwd); exec {p3.python} -m prefect.engine'"
    p3.deploy(job_variables={"command": command, "working_dir": str(workdir), "stream_output": False})
    run_id = p3.run(name="job")
    # A run whose job names no working directory gets one of its own, as under Prefect's worker.
    own_dir = p3.api.create_run(p3.deployment_id, job_variables={"working_dir": None})
    result = p3.agent("--once", "-f")
    assert result.returncode == 0, result.stderr
    assert p3.api.run(run_id)["state"]["type"] == "COMPLETED", p3.api.states(run_id)
    assert f"custom command ran in {workdir}" in p3.api.logs(run_id)  # kept and logged ...
    assert "custom command ran" not in result.stdout  # ... but not shown: the job's stream_output is off
    ran_in = next(line for line in p3.api.logs(own_dir) if line.startswith("custom command ran in "))
    where = Path(ran_in.removeprefix("custom command ran in "))
    assert where.name == f"{own_dir}.work" and not where.exists()  # removed once the run was settled


def test_prefect3_a_full_agent_still_heartbeats(p3: P3World, monkeypatch: pytest.MonkeyPatch) -> None:
    p3.deploy()
    p3.run(sleep=30)
    for key, value in p3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(p3.tmp_path)
    settings = la.resolve_settings({"pool": p3.pool, "python": p3.python, "limit": 1, "hostname_label": False})
    agent = la.LocalAgent(settings)
    agent.open()
    try:
        drive(agent, lambda: bool(agent.book.jobs), budget=60)
        backend = agent.backend
        assert isinstance(backend, la.RESTBackend) and agent.book.free_slots() == 0
        calls: list[str] = []
        for name in ("_beat", "get_runs_in_queue"):
            monkeypatch.setattr(backend, name, functools.partial(
                lambda real, name, *args: (calls.append(name), real(*args))[1], getattr(backend, name), name))
        before = p3.api.call("POST", f"/work_pools/{p3.pool}/workers/filter", {})[0]["last_heartbeat_time"]
        backend._next_beat = 0.0  # the heartbeat is due
        agent._wait(min(agent.step(), 0.05))
        assert calls == ["_beat"]  # a heartbeat, and no poll: there is no room for a run
        after = p3.api.call("POST", f"/work_pools/{p3.pool}/workers/filter", {})[0]["last_heartbeat_time"]
        assert after > before
    finally:
        agent.stop(signal.SIGTERM)
        agent.stop(signal.SIGTERM)  # a second one skips the grace: the run is handed back now
        drive(agent, lambda: agent.phase == la.DONE, budget=60)
        agent.close()


def test_prefect3_a_claim_counts_only_when_the_answers_body_says_ours(p3: P3World) -> None:
    p3.deploy()
    backend = la.RESTBackend(p3.server.url, pool=p3.pool)
    try:
        run_id = p3.run()
        run = backend.get_flow_run(run_id)
        assert run is not None and run.state == "Scheduled"
        mine = la.make_state("Submitted", "Submitted for execution by agent a", context={"claim": "aa11"})
        theirs = la.make_state("Submitted", "Submitted for execution by agent b", context={"claim": "bb22"})
        assert backend.claim_flow_runs([(run, mine)]) == [1]  # ACCEPT
        # The same claim again (its answer was lost): refused as a duplicate of our PENDING: still ours.
        assert backend.claim_flow_runs([(run, mine)]) == [1]
        assert backend.claim_flow_runs([(run, theirs)]) == [None]  # ABORT over another claim: lost
        assert [kind for kind, _, _ in p3.api.states(run_id)] == ["SCHEDULED", "PENDING"]
        claimed = backend.get_flow_run(run_id)
        assert claimed is not None and claimed.state == "Submitted"
        assert claimed.serialized_state["context"]["claim"] == "aa11"  # a restarted agent knows its claim
        gone = backend.get_flow_run(run_id)
        assert gone is not None
        p3.api.call("DELETE", f"/flow_runs/{run_id}")
        assert backend.claim_flow_runs([(gone, theirs)]) == [None]  # deleted meanwhile: a lost race, not an error
        assert backend.get_flow_run(run_id) is None
    finally:
        backend.close()


def test_prefect3_a_server_behind_basic_authentication_takes_the_auth_string(
        prefect3_python: str, tmp_path: Path, clean_env: dict[str, str]) -> None:
    secret = "admin:s3cret-b4sic-pass"
    server = Prefect3Server(prefect3_python, tmp_path / "prefect3-home")
    server.env.update({"PREFECT_SERVER_API_AUTH_STRING": secret, "PREFECT_API_AUTH_STRING": secret})
    server.start()
    try:
        p3 = P3World(server, prefect3_python, tmp_path, clean_env)
        p3.api = Prefect3(server.url, secret)
        p3.deploy()
        run_id = p3.run()
        refused = p3.agent("--once")
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert "refused the key (HTTP 401)" in refused.stderr and "PREFECT_API_AUTH_STRING" in refused.stderr
        p3.env["PREFECT_API_AUTH_STRING"] = secret
        result = p3.agent("--once", "-f")
        assert result.returncode == 0, result.stderr
        assert p3.api.run(run_id)["state"]["type"] == "COMPLETED"  # its engine got the string too
        assert secret not in result.stdout + result.stderr
        assert not any(secret in line for line in p3.api.logs(run_id))
    finally:
        server.stop()


def test_a_plain_http_api_keeps_the_tls_libraries_out_and_https_still_works_after() -> None:
    probe = textwrap.dedent('''
        import sys
        import local_agent as la
        plain = la._http_client(False)
        assert "ssl" not in sys.modules and not hasattr(plain, "HTTPSConnection")  # about 4 MB saved
        transport = la._HTTPTransport("https://127.0.0.1:1", 2.0)  # an https API later in the same process
        try:
            transport.request("GET", "/", None, {})
        except la.APIError as exc:
            assert "Connection refused" in str(exc), exc  # it got as far as connecting
        assert hasattr(la._http_client(True), "HTTPSConnection") and "ssl" in sys.modules
        import ssl  # and anything else may import it as usual
        print("ok")
    ''')
    done = subprocess.run([sys.executable, "-c", probe], cwd=AGENT.parent, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_the_rest_backend_tries_again_while_the_server_is_busy() -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answers = [503, 503, 200]
    seen: list[str] = []

    class Busy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            status = answers.pop(0) if answers else 503
            body = b"true" if status == 200 else b'{"exception_message":"Service Unavailable"}'
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    backend = la.RESTBackend(f"http://127.0.0.1:{server.server_address[1]}/api")
    try:
        assert backend.call("GET", "/health") is True  # its SQLite was locked twice: the third try answers
        assert seen == ["/api/health"] * 3
        with pytest.raises(la.APIError, match=r"HTTP 503") as refused:  # busy for good: a transient error
            backend.call("GET", "/health")
        assert refused.value.transient and len(seen) == 3 + 5
    finally:
        backend.close()
        server.shutdown()
        server.server_close()


def test_prefect3_engines_fork_from_a_warm_template_with_preload(p3: P3World) -> None:
    p3.deploy()
    quick, slow = p3.run(name="warm"), p3.run(sleep=120)
    # The API given as a flag: the template imports prefect with no PREFECT_API_URL, and each
    # forked engine must read its settings again from its own environment (not talk to no server).
    del p3.env["PREFECT_API_URL"]
    agent = p3.agent_process("--preload", "prefect.engine", "-a", p3.server.url)
    try:
        p3.api.wait_final(quick, timeout=120)
        p3.api.wait_state(slow, "RUNNING", timeout=60)
        assert p3.cli("cancel", slow, "-a", p3.server.url).returncode == 0
        cancelled = p3.api.wait_final(slow, timeout=la.WATCH_SECONDS + la.KILL_GRACE_SECONDS + 30)
    finally:
        assert _stop_agent(agent) == 0
    log = p3.agent_log()
    assert "Flow runs fork from a warm process" in log and "fresh interpreter" not in log, log
    assert p3.api.run(quick)["state"]["type"] == "COMPLETED", p3.api.states(quick)
    logs = p3.api.logs(quick)
    assert sum("logged warm" in line for line in logs) == 1 and any(line.startswith("printed warm") for line in logs)
    # A forked engine hears why it is stopped as a fresh one does: Cancelled, with no Crashed.
    assert cancelled["state"]["type"] == "CANCELLED" and "CRASHED" not in p3.types(slow), p3.api.states(slow)


def test_prefect3_sigterm_hands_a_claimed_run_back_before_it_starts(p3: P3World,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    p3.deploy()
    due = la._utcnow() + timedelta(seconds=6)
    run_id = p3.api.create_run(p3.deployment_id, scheduled_time=due.isoformat())
    for key, value in p3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(p3.tmp_path)
    settings = la.resolve_settings({"pool": p3.pool, "python": p3.python, "hostname_label": False})
    agent = la.LocalAgent(settings)
    agent.open()
    try:
        # Claimed half a second before it is due, and not started yet: then the agent is stopped.
        drive(agent, lambda: bool(agent.book.in_phase(la.CLAIMED)), budget=60)
        assert p3.api.run(run_id)["state"]["type"] == "PENDING"
        agent.stop(signal.SIGTERM)
        drive(agent, lambda: agent.phase == la.DONE, budget=60)
    finally:
        agent.close()
    run = p3.api.run(run_id)
    assert (run["state"]["type"], run["state"]["name"]) == ("SCHEDULED", "AwaitingRetry"), p3.api.states(run_id)
    assert "shut down before starting this run; rescheduled" in run["state"]["message"]
    assert not agent.book.jobs and run["infrastructure_pid"] is None  # it never started


def test_prefect_2_3_variables_rank_below_the_agents_own_config_and_never_reach_cloud_1(
        clean_env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[cloud]\napi = "http://127.0.0.1:4200"\n')
    env = {**clean_env, "PREFECT__USER_CONFIG_PATH": str(config), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    settings = la.resolve_settings({}, env)
    assert settings.api == "http://127.0.0.1:4200"  # a Prefect 3 variable left in a shell does not win
    del env["PREFECT__USER_CONFIG_PATH"]
    assert la.resolve_settings({}, env).api == "http://127.0.0.1:9/api"  # with nothing else, it is the API
    key_only = {**clean_env, "PREFECT_API_KEY": "pnu_secret_key_value"}
    with pytest.raises(la.ConfigError, match="PREFECT_API_KEY is a Prefect 2/3 key, and no API is set"):
        la.resolve_settings({}, key_only)
    shown = repr(la.resolve_settings({"auth_string": "admin:s3cret-pass", "ui_token": "ui-s3cret"}, clean_env))
    assert "s3cret" not in shown  # no secret in a repr, a log line or a traceback


def test_prefect3_a_run_whose_job_cannot_be_read_fails_alone(p3: P3World) -> None:
    p3.deploy()
    bad = p3.api.create_run(p3.deployment_id, job_variables={"command": "python -c 'unclosed"})
    good = p3.run(name="fine")
    result = p3.agent("--once")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr  # the agent goes on
    failed = p3.api.run(bad)
    assert failed["state"]["type"] == "FAILED" and "cannot be read: No closing quotation" in \
        failed["state"]["message"], p3.api.states(bad)
    assert p3.api.run(good)["state"]["type"] == "COMPLETED"


def test_a_claim_whose_answer_was_lost_is_handed_back_in_the_same_life(embedded: World, test_flows: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = embedded.run(embedded.flow(test_flows.hello))

    class LostAnswer(la.SQLiteBackend):
        """The claim lands, and its answer is lost once (a connection reset after the commit)."""

        lost = 1

        def claim_flow_runs(self, claims: Any) -> list[int | None]:
            versions = super().claim_flow_runs(claims)
            if self.lost:
                self.lost -= 1
                raise la.APIError("lost the connection to the API", transient=True)
            return versions

    monkeypatch.chdir(embedded.cwd)
    settings = la.resolve_settings({"api": embedded.api, "labels": ["test"], "hostname_label": False, "once": True})
    agent = la.LocalAgent(settings, backend=LostAnswer(la._sqlite_path(embedded.api)), clock=JumpingClock())
    agent.open()
    try:
        drive(agent, lambda: agent.phase == la.DONE, budget=60)
    finally:
        agent.close()
    assert embedded.state(run_id) == "Success"
    history = embedded.history(run_id)
    # Not left Submitted until a restart: handed back at once, then claimed again and run, once.
    assert history.count("Submitted") == 2 and history.count("Running") == 1, history
    assert history[history.index("Submitted") + 1] == "Scheduled", history
