#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
# Copyright (c) 2026 the local_agent authors. Keep this notice when you vendor this file.
"""A test double of Prefect Server 1.x's GraphQL API, in one stdlib-only file.

The double answers the snake_case GraphQL dialect that Prefect Server 1.x (Apollo in front
of Hasura and Server's Python resolvers) speaks, with Server's rules rather than whatever a
client hopes for: ``get_runs_in_queue`` applies the label and ``before`` rules and never
claims, every accepted state write bumps the run's version, a second ``Submitted`` within
30 s is refused, ``create_flow_run`` infers labels and checks required parameters, and
registering a flow with a known name adds a version and archives the old one.

Usage::

    from prefect_double import PrefectServerDouble

    with PrefectServerDouble() as api:               # http://127.0.0.1:<port>, one tenant
        flow_id = api.add_flow("hello", {"type": "Local", "flows": {...}}, labels=["dev"])
        run_id = api.add_flow_run(flow_id)           # Scheduled, version 1, labels ["dev"]
        ...  # point an agent at api.url
        assert api.wait_for(lambda: api.run(run_id)["state"] == "Success", timeout=30)
        print(api.states(run_id), api.logs(run_id), api.root_calls("get_runs_in_queue"))

Transport: POST to any path; the body is ``{"query", "variables", "operationName"}`` with
``variables`` a JSON object or a JSON-encoded string (Prefect clients send a string).
Documents are parsed and validated against a schema of Server's types; rejected documents
and variables get HTTP 400 in Apollo's shape, resolver failures HTTP 200 with
``data.<root> = null`` and an ``errors`` entry. Keep-alive connections are supported.

Options: ``cloud=True`` adds ``auth_info`` and makes ``get_runs_in_queue``'s ``tenant_id``
optional (Prefect Cloud); ``require_token`` answers requests without ``Authorization: Bearer
<token>`` with Cloud's ``UNAUTHENTICATED`` error (HTTP 200); ``version_locking=True`` refuses
state writes whose ``version`` is stale (Cloud); ``submitted_guard_seconds`` sets Server's
duplicate-``Submitted`` window (``0`` disables it); ``with_tenant=False`` starts empty;
``scheduler_seconds=S`` runs Server's scheduler service every ``S`` seconds (Server: 150).

Schedules follow Server: ``set_schedule_active`` refuses clocks that leave a required parameter
unset, turns the schedule on and creates the next 10 runs at once; ``set_schedule_inactive``
and ``set_flow_group_schedule``/``delete_flow_group_schedule`` (a flow group's schedule wins
over its flows' own) delete the auto-scheduled runs still ``Scheduled``; the scheduler keeps
each active, unarchived flow 10 runs ahead, idempotently (``auto-scheduled:<UTC start>`` keys).
Without ``scheduler_seconds`` a test runs a pass with ``run_scheduler_once()``. Clock events
come from local_agent.py's port of Prefect 1.4.1's clocks, imported on first use.

Server facts a test may trip over (read in PrefectHQ/server's source): a new run's history
is ``Pending`` (version 0) then ``Scheduled`` (version 1); each task of the flow gets a
``Pending`` task run at version 0; ``state_start_time`` is set only by Scheduled-family and
``Queued`` states; ``start_time``/``end_time`` follow the first ``Running`` state and the
state after the last one; a ``Cancelled`` run cancels its unfinished task runs; Hasura 1.x
ignores a comparison with ``null`` (``{_eq: null}`` matches every row).

Tests seed and inspect the data directly (``add_flow``, ``add_flow_run``, ``run``,
``states``, ``logs``, ``agents``, ``set_state``), read the recorded requests (``requests``,
``root_calls``) and inject faults (``fail_next``, ``set_down``). All data sits behind one
lock; the server is quiet (nothing is written to stderr). Not modelled: fragments and
directives (rejected with 400), Hasura aggregates, concurrency limits and Server's
other background services (Lazarus, zombie killer).
"""

from __future__ import annotations

import base64
import copy
import functools
import gzip
import hashlib
import json
import operator
import random
import re
import sys
import threading
import time
import traceback
import uuid
import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Callable, NoReturn

if TYPE_CHECKING:
    import local_agent

__version__ = "1.0.0"
__all__ = ["ApiError", "GraphQLError", "PrefectServerDouble", "RecordedRequest"]

# --- Constants -----------------------------------------------------------------------

#: The Prefect Core version the double claims when it serializes states itself.
CORE_VERSION = "1.4.1"
#: Server's ``queued_runs_returned_limit``; candidates fetched are three times this.
QUEUED_RUNS_RETURNED_LIMIT = 25
#: Server's ``core_version_cutoff``: flows serialized by older cores are refused.
CORE_VERSION_CUTOFF = (0, 6, 1)
#: ``sys.getsizeof(json.dumps(state))`` above this is "State payload is too large."
STATE_PAYLOAD_LIMIT = 1_000_000
#: Server's ``services.towel.max_scheduled_runs_per_flow``: runs the scheduler keeps ahead.
MAX_SCHEDULED_RUNS_PER_FLOW = 10
#: Server's ``Scheduler.loop_seconds_default``; the double's ``scheduler_seconds`` replaces it.
SERVER_SCHEDULER_SECONDS = 150.0

_UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)

# Prefect 1.4.1's state classes and their parents (prefect.engine.state).
_STATE_PARENTS: dict[str, str | None] = {
    "State": None,
    "Pending": "State",
    "Scheduled": "Pending",
    "Paused": "Scheduled",
    "Resume": "Scheduled",
    "Retrying": "Scheduled",
    "_MetaState": "State",
    "Submitted": "_MetaState",
    "Queued": "_MetaState",
    "ClientFailed": "_MetaState",
    "Running": "State",
    "Cancelling": "Running",
    "Finished": "State",
    "Success": "Finished",
    "Cached": "Success",
    "Mapped": "Success",
    "Skipped": "Success",
    "Failed": "Finished",
    "TimedOut": "Failed",
    "TriggerFailed": "Failed",
    "ValidationFailed": "Failed",
    "Cancelled": "Finished",
    "Looped": "Finished",
}


def _is_a(state_type: str | None, base: str) -> bool:
    """Whether ``state_type`` is ``base`` or one of its subclasses."""
    while state_type is not None:
        if state_type == base:
            return True
        state_type = _STATE_PARENTS.get(state_type)
    return False


#: Server's ``SCHEDULED_STATES``: subclasses of Scheduled or Queued.
_SCHEDULED_STATES = frozenset(t for t in _STATE_PARENTS if _is_a(t, "Scheduled") or _is_a(t, "Queued"))

# --- Errors --------------------------------------------------------------------------


class GraphQLError(Exception):
    """A document or its variables rejected before execution (answered with HTTP 400)."""

    def __init__(self, message: str, code: str = "GRAPHQL_VALIDATION_FAILED", position: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.position = position


class ApiError(ValueError):
    """A resolver failure, like Server's ``ValueError``s (HTTP 200, ``data.<root>: null``)."""

    def __init__(self, message: str, code: str = "INTERNAL_SERVER_ERROR") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# --- Time ----------------------------------------------------------------------------

_DATETIME_RE = re.compile(
    r"^(\d{4}-\d{2}-\d{2})(?:[Tt ](\d{2}:\d{2}(?::\d{2})?)(?:\.(\d+))?)?\s*"
    r"([Zz]|[+-]\d{2}(?::?\d{2})?)?$"
)


def _parse_datetime(value: Any) -> datetime:
    """An aware datetime from ISO 8601 text (``Z``, offsets, any fraction; naive is UTC)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=_UTC)
    match = _DATETIME_RE.match(value.strip()) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"not an ISO 8601 datetime: {value!r}")
    day, clock, fraction, offset = match.groups()
    text = f"{day}T{clock or '00:00:00'}"
    if fraction:
        text += "." + fraction[:6].ljust(6, "0")
    if offset and offset not in ("Z", "z"):
        digits = offset[1:].replace(":", "")
        text += f"{offset[0]}{digits[:2]}:{digits[2:4] or '00'}"
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=_UTC)


def _iso(moment: datetime) -> str:
    """The ISO 8601 text Hasura returns for a ``timestamptz``."""
    return moment.isoformat()


class _Clock:
    """UTC "now" that never repeats, so rows written in one burst still sort by time."""

    def __init__(self) -> None:
        self._last = _EPOCH

    def now(self) -> datetime:
        """The current time, at least one microsecond after the previous answer."""
        moment = datetime.now(_UTC)
        if moment <= self._last:
            moment = self._last + timedelta(microseconds=1)
        self._last = moment
        return moment


# --- Serialized states ---------------------------------------------------------------


def _serialized_state(
    state_type: str,
    message: str | None,
    *,
    start_time: datetime | None = None,
    inner: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A state as Prefect 1.4.1's ``State.serialize()`` writes it."""
    state: dict[str, Any] = {
        "type": state_type,
        "message": message,
        "context": {},
        "cached_inputs": {},
        "_result": {"type": "NoResultType", "__version__": CORE_VERSION},
        "__version__": CORE_VERSION,
    }
    if start_time is not None:
        state["start_time"] = _iso(start_time)
    if inner is not None:
        state["state"] = inner
    return state


def _load_state(payload: Any, now: datetime) -> dict[str, Any]:
    """Check a state JSON like ``StateSchema().load`` and fill a Scheduled state's start time."""
    if not isinstance(payload, dict):
        raise ApiError("{'_schema': ['Invalid input type.']}")
    state_type = payload.get("type")
    if state_type is None:
        raise ApiError("{'type': ['Missing data for required field.']}")
    if not isinstance(state_type, str) or state_type not in _STATE_PARENTS or state_type.startswith("_"):
        raise ApiError(f"{{'type': ['Unsupported value: {state_type}']}}")
    state = dict(payload)
    if state_type in _SCHEDULED_STATES:
        if state.get("start_time"):
            try:
                _parse_datetime(state["start_time"])
            except ValueError:
                raise ApiError("{'start_time': ['Not a valid datetime.']}") from None
        elif _is_a(state_type, "Scheduled"):
            state["start_time"] = _iso(now)
    return state


def _state_start_time(state: dict[str, Any]) -> datetime | None:
    """The state's ``start_time`` column: set only for Scheduled-family and Queued states."""
    if state["type"] in _SCHEDULED_STATES and state.get("start_time"):
        return _parse_datetime(state["start_time"])
    return None


# --- GraphQL language: lexer ---------------------------------------------------------

_TOKEN_RE = re.compile(
    r"""
      (?P<skip>[\s,\ufeff]+|\#[^\n\r]*)
    | (?P<block>\"\"\"(?:\\\"\"\"|(?!\"\"\")[\s\S])*\"\"\")
    | (?P<string>"(?:[^"\\\n\r]|\\["\\/bfnrt]|\\u[0-9A-Fa-f]{4})*")
    | (?P<float>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+(?:[eE][+-]?[0-9]+)?|[eE][+-]?[0-9]+))
    | (?P<int>-?(?:0|[1-9][0-9]*))
    | (?P<spread>\.\.\.)
    | (?P<punct>[!$&():=@\[\]{|}])
    | (?P<name>[_A-Za-z][_0-9A-Za-z]*)
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class _Token:
    kind: str  # the _TOKEN_RE group that matched, or "eof"
    text: str
    start: int

    def describe(self) -> str:
        """The token as graphql-js names it in syntax errors."""
        if self.kind == "eof":
            return "<EOF>"
        if self.kind in ("punct", "spread"):
            return f'"{self.text}"'
        if self.kind in ("string", "block"):
            return f"String {self.text}"
        return f'{self.kind.capitalize()} "{self.text}"'


def _tokenize(text: str) -> list[_Token]:
    """Split a document into tokens, dropping whitespace, commas and comments."""
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        match = _TOKEN_RE.match(text, position)
        if match is None:
            raise GraphQLError(
                f"Syntax Error: Unexpected character: {text[position]!r}.",
                "GRAPHQL_PARSE_FAILED",
                position,
            )
        if match.lastgroup != "skip":
            tokens.append(_Token(str(match.lastgroup), match.group(), position))
        position = match.end()
    tokens.append(_Token("eof", "", len(text)))
    return tokens


def _block_string_value(raw: str) -> str:
    """The value of a ``\"\"\"block string\"\"\"``: common indentation and blank edges removed."""
    lines = raw[3:-3].replace('\\"""', '"""').splitlines()
    indents = [len(line) - len(line.lstrip()) for line in lines[1:] if line.strip()]
    cut = min(indents, default=0)
    lines = lines[:1] + [line[cut:] for line in lines[1:]]
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


def _location(text: str, position: int) -> dict[str, int]:
    """GraphQL's 1-based ``{line, column}`` of an offset in ``text``."""
    line = text.count("\n", 0, position) + 1
    return {"line": line, "column": position - text.rfind("\n", 0, position)}


# --- GraphQL language: syntax tree ---------------------------------------------------


@dataclass(frozen=True)
class _TypeRef:
    """A type reference such as ``String``, ``[String!]`` or ``register_agent_input!``."""

    name: str = ""
    of: _TypeRef | None = None
    non_null: bool = False

    @property
    def named(self) -> str:
        """The named type at the core of the reference."""
        return self.of.named if self.of is not None else self.name

    def nullable(self) -> _TypeRef:
        """The same reference without the outer ``!``."""
        return replace(self, non_null=False)

    def __str__(self) -> str:
        core = f"[{self.of}]" if self.of is not None else self.name
        return core + ("!" if self.non_null else "")


@dataclass(frozen=True)
class _Variable:
    name: str


@dataclass(frozen=True)
class _EnumValue:
    name: str


@dataclass(frozen=True)
class _Field:
    alias: str | None
    name: str
    args: dict[str, Any]
    selections: tuple[_Field, ...]
    position: int

    @property
    def key(self) -> str:
        """The response key: the alias if there is one."""
        return self.alias or self.name


@dataclass(frozen=True)
class _VariableDef:
    name: str
    type: _TypeRef
    default: Any
    has_default: bool
    position: int


@dataclass(frozen=True)
class _Operation:
    kind: str
    name: str | None
    variables: dict[str, _VariableDef]
    selections: tuple[_Field, ...]


@dataclass(frozen=True)
class _Document:
    text: str
    operations: tuple[_Operation, ...]

    def operation(self, name: str | None) -> _Operation:
        """The operation to run, chosen by ``operationName`` as graphql-js does."""
        if name is None:
            if len(self.operations) > 1:
                raise GraphQLError("Must provide operation name if query contains multiple operations.")
            return self.operations[0]
        for operation in self.operations:
            if operation.name == name:
                return operation
        raise GraphQLError(f'Unknown operation named "{name}".')


# --- GraphQL language: parser --------------------------------------------------------


class _Parser:
    """Recursive-descent parser for executable documents and the schema's SDL subset."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.index = 0

    # Token helpers.

    @property
    def token(self) -> _Token:
        return self.tokens[self.index]

    def peek(self, kind: str, text: str | None = None) -> bool:
        token = self.token
        return token.kind == kind and (text is None or token.text == text)

    def advance(self) -> _Token:
        token = self.token
        self.index += 1
        return token

    def expect(self, kind: str, text: str | None = None) -> _Token:
        if not self.peek(kind, text):
            wanted = f'"{text}"' if text else kind.capitalize()
            self.fail(f"Expected {wanted}, found {self.token.describe()}.")
        return self.advance()

    def skip(self, kind: str, text: str | None = None) -> bool:
        if self.peek(kind, text):
            self.index += 1
            return True
        return False

    def fail(self, detail: str) -> NoReturn:
        raise GraphQLError(f"Syntax Error: {detail}", "GRAPHQL_PARSE_FAILED", self.token.start)

    def name(self) -> str:
        return self.expect("name").text

    def unsupported(self, what: str) -> NoReturn:
        raise GraphQLError(f"{what} are not supported by this test double.", position=self.token.start)

    # Executable documents.

    def document(self) -> _Document:
        operations = [self.operation()]
        while not self.peek("eof"):
            operations.append(self.operation())
        return _Document(self.text, tuple(operations))

    def operation(self) -> _Operation:
        if self.peek("punct", "{"):
            return _Operation("query", None, {}, self.selection_set())
        if self.peek("name", "fragment"):
            self.unsupported("Fragments")
        if not (self.peek("name") and self.token.text in ("query", "mutation", "subscription")):
            self.fail(f"Unexpected {self.token.describe()}.")
        kind = self.advance().text
        name = self.name() if self.peek("name") else None
        variables = self.variable_definitions() if self.peek("punct", "(") else {}
        if self.peek("punct", "@"):
            self.unsupported("Directives")
        return _Operation(kind, name, variables, self.selection_set())

    def variable_definitions(self) -> dict[str, _VariableDef]:
        self.expect("punct", "(")
        definitions: dict[str, _VariableDef] = {}
        while not self.skip("punct", ")"):
            position = self.expect("punct", "$").start
            name = self.name()
            self.expect("punct", ":")
            type_ref = self.type_ref()
            has_default = self.skip("punct", "=")
            default = self.value(const=True) if has_default else None
            if name in definitions:
                raise GraphQLError(f'There can be only one variable named "${name}".', position=position)
            definitions[name] = _VariableDef(name, type_ref, default, has_default, position)
        return definitions

    def type_ref(self) -> _TypeRef:
        if self.skip("punct", "["):
            type_ref = _TypeRef(of=self.type_ref())
            self.expect("punct", "]")
        else:
            type_ref = _TypeRef(name=self.name())
        return replace(type_ref, non_null=True) if self.skip("punct", "!") else type_ref

    def selection_set(self) -> tuple[_Field, ...]:
        self.expect("punct", "{")
        fields = [self.field()]
        while not self.skip("punct", "}"):
            fields.append(self.field())
        return tuple(fields)

    def field(self) -> _Field:
        if self.peek("spread"):
            self.unsupported("Fragments")
        position = self.token.start
        alias: str | None = None
        name = self.name()
        if self.skip("punct", ":"):
            alias, name = name, self.name()
        args = self.arguments() if self.peek("punct", "(") else {}
        if self.peek("punct", "@"):
            self.unsupported("Directives")
        selections = self.selection_set() if self.peek("punct", "{") else ()
        return _Field(alias, name, args, selections, position)

    def arguments(self) -> dict[str, Any]:
        self.expect("punct", "(")
        args: dict[str, Any] = {}
        while True:
            position = self.token.start
            name = self.name()
            self.expect("punct", ":")
            if name in args:
                raise GraphQLError(f'There can be only one argument named "{name}".', position=position)
            args[name] = self.value(const=False)
            if self.skip("punct", ")"):
                return args

    def value(self, const: bool) -> Any:
        token = self.token
        if token.kind == "punct" and token.text == "$" and not const:
            self.advance()
            return _Variable(self.name())
        if token.kind == "punct" and token.text == "[":
            self.advance()
            items = []
            while not self.skip("punct", "]"):
                items.append(self.value(const))
            return items
        if token.kind == "punct" and token.text == "{":
            return self.object_value(const)
        if token.kind == "punct" or token.kind in ("spread", "eof"):
            self.fail(f"Unexpected {token.describe()}.")
        self.advance()
        if token.kind == "int":
            return int(token.text)
        if token.kind == "float":
            return float(token.text)
        if token.kind == "string":
            return json.loads(token.text, strict=False)
        if token.kind == "block":
            return _block_string_value(token.text)
        constants = {"true": True, "false": False, "null": None}
        return constants[token.text] if token.text in constants else _EnumValue(token.text)

    def object_value(self, const: bool) -> dict[str, Any]:
        self.expect("punct", "{")
        fields: dict[str, Any] = {}
        while not self.skip("punct", "}"):
            position = self.token.start
            name = self.name()
            self.expect("punct", ":")
            if name in fields:
                raise GraphQLError(f'There can be only one input field named "{name}".', position=position)
            fields[name] = self.value(const)
        return fields

    # The schema's SDL subset: scalar, enum, type and input definitions.

    def schema(self) -> _Schema:
        schema = _Schema()
        while not self.peek("eof"):
            keyword, name = self.name(), self.name()
            if keyword == "scalar":
                schema.scalars.add(name)
            elif keyword == "enum":
                schema.enums[name] = frozenset(self.delimited("{", "}", self.name))
            elif keyword == "type":
                schema.objects[name] = dict(self.delimited("{", "}", self.field_definition))
            elif keyword == "input":
                schema.inputs[name] = dict(self.delimited("{", "}", self.input_field))
            else:
                self.fail(f'Unexpected Name "{keyword}".')
        return schema

    def field_definition(self) -> tuple[str, _FieldDef]:
        name = self.name()
        args = dict(self.delimited("(", ")", self.input_field)) if self.peek("punct", "(") else {}
        self.expect("punct", ":")
        return name, _FieldDef(self.type_ref(), args)

    def input_field(self) -> tuple[str, _TypeRef]:
        name = self.name()
        self.expect("punct", ":")
        return name, self.type_ref()

    def delimited(self, opening: str, closing: str, item: Callable[[], Any]) -> list[Any]:
        self.expect("punct", opening)
        items = [item()]
        while not self.skip("punct", closing):
            items.append(item())
        return items


@functools.lru_cache(maxsize=512)
def _parse_document(text: str) -> _Document:
    """Parse an executable document (cached: clients resend the same texts)."""
    return _Parser(text).document()


# --- Schema --------------------------------------------------------------------------


@dataclass(frozen=True)
class _FieldDef:
    type: _TypeRef
    args: dict[str, _TypeRef]


@dataclass
class _Schema:
    """Named types of the API: the subset of Server's schema the double serves."""

    scalars: set[str] = field(default_factory=set)
    enums: dict[str, frozenset[str]] = field(default_factory=dict)
    objects: dict[str, dict[str, _FieldDef]] = field(default_factory=dict)
    inputs: dict[str, dict[str, _TypeRef]] = field(default_factory=dict)

    def is_input(self, name: str) -> bool:
        """Whether ``name`` may type a variable or an argument."""
        return name in self.scalars or name in self.enums or name in self.inputs


# Server's own types (graphql/schema/*.graphql) plus the Hasura tables it exposes. Table
# types list their columns and relationships; _add_hasura_types derives the rest.
_SDL = """
scalar String scalar Int scalar Float scalar Boolean scalar ID
scalar UUID scalar DateTime scalar JSON
scalar uuid scalar timestamptz scalar jsonb

enum log_level { DEBUG INFO WARNING ERROR CRITICAL }
enum order_by { asc asc_nulls_first asc_nulls_last desc desc_nulls_first desc_nulls_last }

type Query { hello: String }

type Mutation {
  register_agent(input: register_agent_input!): agent_id_payload
  get_runs_in_queue(input: get_runs_in_queue_input!): runs_in_queue_payload
  set_flow_run_states(input: set_flow_run_states_input!): set_flow_run_states_payload
  set_task_run_states(input: set_task_run_states_input!): set_task_run_states_payload
  cancel_flow_run(input: cancel_flow_run_input!): cancel_flow_run_payload
  write_run_logs(input: write_run_logs_input!): success_payload
  update_flow_run_heartbeat(input: update_flow_run_heartbeat_input!): success_payload
  update_task_run_heartbeat(input: update_task_run_heartbeat_input!): success_payload
  get_or_create_task_run_info(input: get_or_create_task_run_info_input!): get_or_create_task_run_info_payload
  create_flow_run(input: create_flow_run_input!): flow_run_id_payload
  delete_flow_run(input: delete_flow_run_input!): success_payload
  create_tenant(input: create_tenant_input!): tenant_id_payload
  create_project(input: create_project_input!): project_id_payload
  create_flow(input: create_flow_input!): flow_id_payload
  create_flow_from_compressed_string(input: create_flow_from_compressed_string_input!): flow_id_payload
  register_tasks(input: register_tasks_input!): success_payload
  register_edges(input: register_edges_input!): success_payload
  set_schedule_active(input: set_schedule_active_input!): success_payload
  set_schedule_inactive(input: set_schedule_inactive_input!): success_payload
  set_flow_group_schedule(input: set_flow_group_schedule_input!): success_payload
  delete_flow_group_schedule(input: delete_flow_group_schedule_input!): success_payload
  archive_flow(input: archive_flow_input!): success_payload
}

input register_agent_input { tenant_id: UUID labels: [String!] agent_config_id: UUID type: String! name: String }
input get_runs_in_queue_input { tenant_id: UUID! before: DateTime labels: [String!] }
input set_flow_run_states_input { states: [set_flow_run_state_input!]! }
input set_flow_run_state_input { flow_run_id: UUID! version: Int state: JSON! }
input set_task_run_states_input { states: [set_task_run_state_input!]! }
input set_task_run_state_input { task_run_id: UUID! version: Int state: JSON! flow_run_version: Int }
input cancel_flow_run_input { flow_run_id: UUID! }
input write_run_logs_input { logs: [write_run_log_input!]! }
input write_run_log_input {
  flow_run_id: UUID! task_run_id: UUID timestamp: DateTime message: String name: String
  level: log_level info: JSON
}
input update_flow_run_heartbeat_input { flow_run_id: UUID! }
input update_task_run_heartbeat_input { task_run_id: UUID! }
input get_or_create_task_run_info_input { flow_run_id: UUID! task_id: UUID! map_index: Int }
input create_flow_run_input {
  flow_id: UUID parameters: JSON labels: [String!] run_config: JSON context: JSON
  scheduled_start_time: DateTime idempotency_key: String flow_run_name: String version_group_id: String
}
input delete_flow_run_input { flow_run_id: UUID! }
input create_tenant_input { name: String! slug: String }
input create_project_input { tenant_id: String! name: String! description: String }
input create_flow_input {
  serialized_flow: JSON! project_id: UUID! version_group_id: String set_schedule_active: Boolean
  description: String idempotency_key: String
}
input create_flow_from_compressed_string_input {
  serialized_flow: String! project_id: UUID! version_group_id: String set_schedule_active: Boolean
  description: String idempotency_key: String
}
input register_tasks_input { flow_id: UUID! serialized_tasks: JSON! }
input register_edges_input { flow_id: UUID! serialized_edges: JSON! }
input set_schedule_active_input { flow_id: UUID! }
input set_schedule_inactive_input { flow_id: UUID! }
input set_flow_group_schedule_input {
  flow_group_id: UUID! cron_clocks: [cron_clock_input!] interval_clocks: [interval_clock_input!] timezone: String
}
input cron_clock_input { cron: String! parameter_defaults: JSON }
input interval_clock_input { interval: Int! parameter_defaults: JSON }
input delete_flow_group_schedule_input { flow_group_id: UUID! }
input archive_flow_input { flow_id: UUID! }

type success_payload { success: Boolean error: String }
type agent_id_payload { id: UUID }
type runs_in_queue_payload { flow_run_ids: [String!] }
type set_flow_run_state_payload { id: UUID status: String message: String }
type set_flow_run_states_payload { states: [set_flow_run_state_payload!] }
type set_task_run_state_payload { id: UUID status: String message: String }
type set_task_run_states_payload { states: [set_task_run_state_payload!] }
type cancel_flow_run_payload { state: String }
type get_or_create_task_run_info_payload { id: UUID version: Int state: String serialized_state: JSON }
type flow_run_id_payload { id: UUID }
type tenant_id_payload { id: UUID }
type project_id_payload { id: UUID }
type flow_id_payload { id: UUID }

type tenant {
  id: uuid! name: String! slug: String! info: jsonb settings: jsonb! created: timestamptz! updated: timestamptz!
  projects: [project!]! flows: [flow!]!
}
type project {
  id: uuid! tenant_id: uuid! name: String! description: String created: timestamptz! updated: timestamptz!
  tenant: tenant! flows: [flow!]!
}
type flow_group {
  id: uuid! tenant_id: uuid! name: String description: String labels: jsonb run_config: jsonb
  schedule: jsonb settings: jsonb! default_parameters: jsonb! created: timestamptz! updated: timestamptz!
  flows: [flow!]!
}
type flow {
  id: uuid! tenant_id: uuid! project_id: uuid! flow_group_id: uuid! version_group_id: String
  name: String! version: Int description: String archived: Boolean! core_version: String
  storage: jsonb run_config: jsonb environment: jsonb parameters: jsonb serialized_flow: jsonb
  schedule: jsonb is_schedule_active: Boolean! settings: jsonb! created: timestamptz! updated: timestamptz!
  tenant: tenant! project: project! flow_group: flow_group! tasks: [task!]! edges: [edge!]!
  flow_runs: [flow_run!]!
}
type task {
  id: uuid! tenant_id: uuid! flow_id: uuid! name: String slug: String type: String description: String
  max_retries: Int retry_delay: String trigger: String mapped: Boolean! auto_generated: Boolean!
  cache_key: String is_root_task: Boolean! is_terminal_task: Boolean! is_reference_task: Boolean!
  tags: jsonb! created: timestamptz! updated: timestamptz!
  flow: flow! task_runs: [task_run!]!
}
type edge {
  id: uuid! tenant_id: uuid! flow_id: uuid! upstream_task_id: uuid! downstream_task_id: uuid!
  key: String mapped: Boolean! created: timestamptz! updated: timestamptz!
  flow: flow! upstream_task: task! downstream_task: task!
}
type flow_run {
  id: uuid! tenant_id: uuid! flow_id: uuid! agent_id: uuid name: String labels: jsonb!
  parameters: jsonb context: jsonb run_config: jsonb idempotency_key: String
  scheduled_start_time: timestamptz! auto_scheduled: Boolean! heartbeat: timestamptz
  start_time: timestamptz end_time: timestamptz version: Int! state: String state_message: String
  state_start_time: timestamptz state_timestamp: timestamptz serialized_state: jsonb
  times_resurrected: Int created: timestamptz! updated: timestamptz!
  tenant: tenant! flow: flow! agent: agent task_runs: [task_run!]! logs: [log!]!
  states: [flow_run_state!]!
}
type task_run {
  id: uuid! tenant_id: uuid! flow_run_id: uuid! task_id: uuid! map_index: Int! version: Int!
  name: String heartbeat: timestamptz start_time: timestamptz end_time: timestamptz run_count: Int!
  state: String state_message: String state_start_time: timestamptz state_timestamp: timestamptz
  serialized_state: jsonb cache_key: String created: timestamptz! updated: timestamptz!
  flow_run: flow_run! task: task! states: [task_run_state!]! logs: [log!]!
}
type flow_run_state {
  id: uuid! tenant_id: uuid! flow_run_id: uuid! version: Int state: String! message: String
  serialized_state: jsonb! start_time: timestamptz timestamp: timestamptz! created: timestamptz!
  flow_run: flow_run!
}
type task_run_state {
  id: uuid! tenant_id: uuid! task_run_id: uuid! version: Int state: String! message: String
  serialized_state: jsonb! start_time: timestamptz timestamp: timestamptz! created: timestamptz!
  task_run: task_run!
}
type log {
  id: uuid! tenant_id: uuid flow_run_id: uuid task_run_id: uuid timestamp: timestamptz! name: String
  level: String message: String info: jsonb is_loaded_from_archive: Boolean created: timestamptz!
  updated: timestamptz! flow_run: flow_run task_run: task_run
}
type agent {
  id: uuid! tenant_id: uuid! name: String type: String core_version: String labels: jsonb!
  agent_config_id: uuid last_queried: timestamptz created: timestamptz! updated: timestamptz!
  flow_runs: [flow_run!]!
}
"""

# Prefect Cloud's extra root (Server has no ``auth_info``).
_CLOUD_SDL = """
type Query { hello: String auth_info: auth_info }
type auth_info { tenant_id: UUID api_token_scope: String user_id: UUID membership_id: UUID }
"""

# Hasura relationships: (table, field) -> (target table, local column, remote column).
_RELATIONS: dict[str, dict[str, tuple[str, str, str]]] = {
    "tenant": {"projects": ("project", "id", "tenant_id"), "flows": ("flow", "id", "tenant_id")},
    "project": {"tenant": ("tenant", "tenant_id", "id"), "flows": ("flow", "id", "project_id")},
    "flow_group": {"flows": ("flow", "id", "flow_group_id")},
    "flow": {
        "tenant": ("tenant", "tenant_id", "id"),
        "project": ("project", "project_id", "id"),
        "flow_group": ("flow_group", "flow_group_id", "id"),
        "tasks": ("task", "id", "flow_id"),
        "edges": ("edge", "id", "flow_id"),
        "flow_runs": ("flow_run", "id", "flow_id"),
    },
    "task": {"flow": ("flow", "flow_id", "id"), "task_runs": ("task_run", "id", "task_id")},
    "edge": {
        "flow": ("flow", "flow_id", "id"),
        "upstream_task": ("task", "upstream_task_id", "id"),
        "downstream_task": ("task", "downstream_task_id", "id"),
    },
    "flow_run": {
        "tenant": ("tenant", "tenant_id", "id"),
        "flow": ("flow", "flow_id", "id"),
        "agent": ("agent", "agent_id", "id"),
        "task_runs": ("task_run", "id", "flow_run_id"),
        "logs": ("log", "id", "flow_run_id"),
        "states": ("flow_run_state", "id", "flow_run_id"),
    },
    "task_run": {
        "flow_run": ("flow_run", "flow_run_id", "id"),
        "task": ("task", "task_id", "id"),
        "states": ("task_run_state", "id", "task_run_id"),
        "logs": ("log", "id", "task_run_id"),
    },
    "flow_run_state": {"flow_run": ("flow_run", "flow_run_id", "id")},
    "task_run_state": {"task_run": ("task_run", "task_run_id", "id")},
    "log": {"flow_run": ("flow_run", "flow_run_id", "id"), "task_run": ("task_run", "task_run_id", "id")},
    "agent": {"flow_runs": ("flow_run", "id", "agent_id")},
}

_COMPARISON_OPERATORS = ("_eq", "_neq", "_gt", "_gte", "_lt", "_lte")
_TEXT_OPERATORS = ("_like", "_nlike", "_ilike", "_nilike")


def _hasura_list_args(table: str) -> dict[str, _TypeRef]:
    """The arguments Hasura gives a table root or an array relationship."""
    return {
        "where": _TypeRef(f"{table}_bool_exp"),
        "order_by": _TypeRef(of=_TypeRef(f"{table}_order_by", non_null=True)),
        "limit": _TypeRef("Int"),
        "offset": _TypeRef("Int"),
    }


def _comparison_type(schema: _Schema, scalar: str) -> str:
    """Name of ``<scalar>_comparison_exp``, adding it to the schema on first use."""
    name = f"{scalar}_comparison_exp"
    if name not in schema.inputs:
        operand, operands = _TypeRef(scalar), _TypeRef(of=_TypeRef(scalar, non_null=True))
        fields = {op: operand for op in _COMPARISON_OPERATORS}
        fields.update(_in=operands, _nin=operands, _is_null=_TypeRef("Boolean"))
        if scalar == "String":
            fields.update({op: operand for op in _TEXT_OPERATORS})
        if scalar == "jsonb":
            keys = _TypeRef(of=_TypeRef("String", non_null=True))
            fields.update(_contains=operand, _contained_in=operand, _has_key=_TypeRef("String"))
            fields.update(_has_keys_any=keys, _has_keys_all=keys)
        schema.inputs[name] = fields
    return name


def _add_hasura_types(schema: _Schema) -> None:
    """Derive Hasura's roots, ``_bool_exp``, ``_order_by`` and comparison types per table."""
    for table, relations in _RELATIONS.items():
        columns = schema.objects[table]
        where = _TypeRef(f"{table}_bool_exp")
        bool_exp: dict[str, _TypeRef] = {
            "_and": _TypeRef(of=replace(where, non_null=True)),
            "_or": _TypeRef(of=replace(where, non_null=True)),
            "_not": where,
        }
        order_by: dict[str, _TypeRef] = {}
        for name, definition in list(columns.items()):
            if name in relations:
                target = relations[name][0]
                bool_exp[name] = _TypeRef(f"{target}_bool_exp")
                if definition.type.of is None:
                    order_by[name] = _TypeRef(f"{target}_order_by")
                else:
                    columns[name] = _FieldDef(definition.type, _hasura_list_args(target))
            else:
                bool_exp[name] = _TypeRef(_comparison_type(schema, definition.type.named))
                order_by[name] = _TypeRef("order_by")
        schema.inputs[f"{table}_bool_exp"] = bool_exp
        schema.inputs[f"{table}_order_by"] = order_by
        rows = _TypeRef(of=_TypeRef(table, non_null=True), non_null=True)
        schema.objects["Query"][table] = _FieldDef(rows, _hasura_list_args(table))
        schema.objects["Query"][f"{table}_by_pk"] = _FieldDef(_TypeRef(table), {"id": _TypeRef("uuid", non_null=True)})


@functools.lru_cache(maxsize=2)
def _build_schema(cloud: bool) -> _Schema:
    """The schema for Server (``cloud=False``) or Prefect Cloud (``cloud=True``)."""
    schema = _Parser(_SDL).schema()
    if cloud:
        cloud_types = _Parser(_CLOUD_SDL).schema()
        schema.objects.update(cloud_types.objects)
        # Cloud infers the tenant from the credential; 0.13-0.14 agents sent null.
        schema.inputs["get_runs_in_queue_input"]["tenant_id"] = _TypeRef("UUID")
    _add_hasura_types(schema)
    return schema


# --- Validation and input coercion ---------------------------------------------------

_MISSING: Any = object()  # an argument, input field or variable that was not given


def _print_value(value: Any) -> str:
    """A literal or JSON value in GraphQL syntax, for error messages."""
    if isinstance(value, _EnumValue):
        return value.name
    if isinstance(value, _Variable):
        return f"${value.name}"
    if isinstance(value, list):
        return "[" + ", ".join(_print_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_print_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _scalar_problem(scalar: str, value: Any) -> str | None:
    """Why ``value`` cannot be the scalar ``scalar``, or None when it can."""
    printed = _print_value(value)
    if scalar == "String" and not isinstance(value, str):
        return f"String cannot represent a non string value: {printed}"
    if scalar == "Int" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"Int cannot represent non-integer value: {printed}"
    if scalar == "Float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"Float cannot represent non numeric value: {printed}"
    if scalar == "Boolean" and not isinstance(value, bool):
        return f"Boolean cannot represent a non boolean value: {printed}"
    if scalar == "ID" and (isinstance(value, bool) or not isinstance(value, (str, int))):
        return f"ID cannot represent value: {printed}"
    if scalar in ("UUID", "uuid") and not isinstance(value, str):
        return f'Expected value of type "{scalar}", found {printed}.'
    if scalar in ("DateTime", "timestamptz"):
        try:
            _parse_datetime(value)
        except ValueError:
            return f'Expected value of type "{scalar}", found {printed}.'
    return None


def _is_subtype(sub: _TypeRef, sup: _TypeRef) -> bool:
    """Whether a value of type ``sub`` may appear where ``sup`` is expected."""
    if sup.non_null:
        return sub.non_null and _is_subtype(sub.nullable(), sup.nullable())
    if sub.non_null:
        return _is_subtype(sub.nullable(), sup)
    if sup.of is not None or sub.of is not None:
        return sup.of is not None and sub.of is not None and _is_subtype(sub.of, sup.of)
    return sub.name == sup.name


class _Validator:
    """Checks one operation against the schema as graphql-js does; the first error wins."""

    def __init__(self, schema: _Schema, operation: _Operation) -> None:
        self.schema = schema
        self.operation = operation
        self.used: set[str] = set()
        self.in_operation = f' in operation "{operation.name}"' if operation.name else ""

    def validate(self) -> None:
        """Raise GraphQLError for the first problem in the operation."""
        for definition in self.operation.variables.values():
            self.variable_definition(definition)
        root = {"query": "Query", "mutation": "Mutation"}.get(self.operation.kind)
        if root is None:
            raise GraphQLError("Schema is not configured to execute subscription operation.")
        self.selections(root, self.operation.selections)
        for definition in self.operation.variables.values():
            if definition.name not in self.used:
                raise GraphQLError(
                    f'Variable "${definition.name}" is never used{self.in_operation}.',
                    position=definition.position,
                )

    def variable_definition(self, definition: _VariableDef) -> None:
        named = definition.type.named
        if not self.schema.is_input(named) and named not in self.schema.objects:
            raise GraphQLError(f'Unknown type "{named}".', position=definition.position)
        if not self.schema.is_input(named):
            raise GraphQLError(
                f'Variable "${definition.name}" cannot be non-input type "{definition.type}".',
                position=definition.position,
            )
        if definition.has_default:
            self.value(definition.default, definition.type, definition.position)

    def selections(self, type_name: str, fields: Iterable[_Field]) -> None:
        for selection in fields:
            if selection.name == "__typename":
                self.leaf(selection, "String!")
                continue
            definition = self.schema.objects[type_name].get(selection.name)
            if definition is None:
                raise GraphQLError(
                    f'Cannot query field "{selection.name}" on type "{type_name}".',
                    position=selection.position,
                )
            self.arguments(type_name, selection, definition)
            named = definition.type.named
            if named in self.schema.objects:
                if not selection.selections:
                    raise GraphQLError(
                        f'Field "{selection.name}" of type "{definition.type}" must have a selection '
                        f'of subfields. Did you mean "{selection.name} {{ ... }}"?',
                        position=selection.position,
                    )
                self.selections(named, selection.selections)
            else:
                self.leaf(selection, str(definition.type))

    def leaf(self, selection: _Field, type_text: str) -> None:
        if selection.selections:
            raise GraphQLError(
                f'Field "{selection.name}" must not have a selection since type "{type_text}" has no subfields.',
                position=selection.position,
            )
        if selection.name == "__typename" and selection.args:
            name = next(iter(selection.args))
            raise GraphQLError(f'Unknown argument "{name}" on field "__typename".', position=selection.position)

    def arguments(self, type_name: str, selection: _Field, definition: _FieldDef) -> None:
        for name, value in selection.args.items():
            if name not in definition.args:
                raise GraphQLError(
                    f'Unknown argument "{name}" on field "{type_name}.{selection.name}".',
                    position=selection.position,
                )
            self.value(value, definition.args[name], selection.position)
        for name, type_ref in definition.args.items():
            if type_ref.non_null and name not in selection.args:
                raise GraphQLError(
                    f'Field "{selection.name}" argument "{name}" of type "{type_ref}" is required, '
                    "but it was not provided.",
                    position=selection.position,
                )

    def value(self, value: Any, type_ref: _TypeRef, position: int) -> None:
        """Check a literal (or a variable used in its place) against ``type_ref``."""
        if isinstance(value, _Variable):
            self.variable_use(value, type_ref, position)
        elif value is None:
            if type_ref.non_null:
                raise GraphQLError(f'Expected value of type "{type_ref}", found null.', position=position)
        elif type_ref.of is not None:
            for item in value if isinstance(value, list) else [value]:
                self.value(item, type_ref.of, position)
        elif type_ref.name in self.schema.inputs:
            self.input_object(value, type_ref, position)
        elif type_ref.name in self.schema.enums:
            self.enum(value, type_ref.name, position)
        elif type_ref.name not in ("JSON", "jsonb"):  # Server's JSON scalars take any literal
            problem = _scalar_problem(type_ref.name, value)
            if problem:
                raise GraphQLError(problem, position=position)

    def input_object(self, value: Any, type_ref: _TypeRef, position: int) -> None:
        fields = self.schema.inputs[type_ref.name]
        if not isinstance(value, dict):
            raise GraphQLError(f'Expected value of type "{type_ref}", found {_print_value(value)}.', position=position)
        for name, item in value.items():
            if name not in fields:
                raise GraphQLError(f'Field "{name}" is not defined by type "{type_ref.name}".', position=position)
            self.value(item, fields[name], position)
        for name, field_type in fields.items():
            if field_type.non_null and name not in value:
                raise GraphQLError(
                    f'Field "{type_ref.name}.{name}" of required type "{field_type}" was not provided.',
                    position=position,
                )

    def enum(self, value: Any, enum: str, position: int) -> None:
        if not isinstance(value, _EnumValue):
            raise GraphQLError(
                f'Enum "{enum}" cannot represent non-enum value: {_print_value(value)}.', position=position
            )
        if value.name not in self.schema.enums[enum]:
            raise GraphQLError(f'Value "{value.name}" does not exist in "{enum}" enum.', position=position)

    def variable_use(self, variable: _Variable, location: _TypeRef, position: int) -> None:
        definition = self.operation.variables.get(variable.name)
        if definition is None:
            by = f' by operation "{self.operation.name}"' if self.operation.name else ""
            raise GraphQLError(f'Variable "${variable.name}" is not defined{by}.', position=position)
        self.used.add(variable.name)
        declared = definition.type
        if location.non_null and not declared.non_null and definition.default is not None:
            location = location.nullable()
        if not _is_subtype(declared, location):
            raise GraphQLError(
                f'Variable "${variable.name}" of type "{declared}" used in position expecting type "{location}".',
                position=definition.position,
            )


class _Inputs:
    """Turns JSON variables and argument literals into the plain values resolvers read."""

    def __init__(self, schema: _Schema) -> None:
        self.schema = schema

    def variables(self, operation: _Operation, provided: dict[str, Any] | None) -> dict[str, Any]:
        """Coerce the request's variables to their declared types, as graphql-js does."""
        provided = provided or {}
        values: dict[str, Any] = {}
        for name, definition in operation.variables.items():
            try:
                if name in provided:
                    values[name] = self.coerce(provided[name], definition.type, name)
                elif definition.has_default:
                    values[name] = self.literal(definition.default, definition.type, {})
                elif definition.type.non_null:
                    raise GraphQLError(f'Variable "${name}" of required type "{definition.type}" was not provided.')
            except GraphQLError as error:
                # Apollo Server 2 answers coercion failures with HTTP 400 and this code.
                raise GraphQLError(error.message, "INTERNAL_SERVER_ERROR", definition.position) from None
        return values

    def coerce(self, value: Any, type_ref: _TypeRef, path: str) -> Any:
        """One JSON variable value checked against ``type_ref``; ``path`` names it in errors."""
        if value is None:
            if type_ref.non_null:
                self.invalid(path, value, f'Expected non-nullable type "{type_ref}" not to be null.')
            return None
        if type_ref.of is not None:
            if not isinstance(value, list):
                return [self.coerce(value, type_ref.of, path)]  # input coercion of a single value
            return [self.coerce(item, type_ref.of, f"{path}[{i}]") for i, item in enumerate(value)]
        name = type_ref.name
        if name in self.schema.inputs:
            return self.coerce_object(value, type_ref, path)
        if name in self.schema.enums:
            if not isinstance(value, str):
                self.invalid(path, value, f'Enum "{name}" cannot represent non-string value: {json.dumps(value)}.')
            if value not in self.schema.enums[name]:
                self.invalid(path, value, f'Value "{value}" does not exist in "{name}" enum.')
            return value
        problem = None if name in ("JSON", "jsonb") else _scalar_problem(name, value)
        if problem:
            self.invalid(path, value, problem)
        return value

    def coerce_object(self, value: Any, type_ref: _TypeRef, path: str) -> dict[str, Any]:
        fields = self.schema.inputs[type_ref.name]
        if not isinstance(value, dict):
            self.invalid(path, value, f'Expected type "{type_ref.name}" to be an object.')
        result: dict[str, Any] = {}
        for name, field_type in fields.items():
            if name in value:
                result[name] = self.coerce(value[name], field_type, f"{path}.{name}")
            elif field_type.non_null:
                self.invalid(path, value, f'Field "{name}" of required type "{field_type}" was not provided.')
        for name in value:
            if name not in fields:
                self.invalid(path, value, f'Field "{name}" is not defined by type "{type_ref.name}".')
        return result

    @staticmethod
    def invalid(path: str, value: Any, problem: str) -> None:
        variable = re.split(r"[.\[]", path, maxsplit=1)[0]
        at = f' at "{path}"' if path != variable else ""
        raise GraphQLError(f'Variable "${variable}" got invalid value {json.dumps(value)}{at}; {problem}')

    def literal(self, value: Any, type_ref: _TypeRef, variables: dict[str, Any]) -> Any:
        """An argument literal with variables substituted, enums as names and lists coerced."""
        if isinstance(value, _Variable):
            return variables.get(value.name, _MISSING)
        if value is None:
            return None
        if type_ref.of is not None:
            items = value if isinstance(value, list) else [value]
            resolved = (self.literal(item, type_ref.of, variables) for item in items)
            return [None if item is _MISSING else item for item in resolved]
        if type_ref.name in self.schema.inputs:
            fields = self.schema.inputs[type_ref.name]
            result = {name: self.literal(item, fields[name], variables) for name, item in value.items()}
            return {name: item for name, item in result.items() if item is not _MISSING}
        return _plain(value, variables)


def _plain(value: Any, variables: dict[str, Any]) -> Any:
    """A literal as plain JSON: enum values become their names, variables their values."""
    if isinstance(value, _EnumValue):
        return value.name
    if isinstance(value, _Variable):
        return variables.get(value.name)
    if isinstance(value, list):
        return [_plain(item, variables) for item in value]
    if isinstance(value, dict):
        return {name: _plain(item, variables) for name, item in value.items()}
    return value


# --- In-memory database with Hasura's query semantics --------------------------------

_Row = dict[str, Any]  # a table row: column name -> value (timestamps are aware datetimes)


def _indexed_columns() -> dict[str, set[str]]:
    """Columns to index per table: every array relationship's join column, plus hot lookups."""
    columns = {"flow_run": {"tenant_id"}, "flow": {"version_group_id"}}
    for relations in _RELATIONS.values():
        for target, _local, remote in relations.values():
            if remote != "id":
                columns.setdefault(target, set()).add(remote)
    return columns


class _Table:
    """Rows of one table by id, with indexes on the columns relationships join on."""

    def __init__(self, indexed: Iterable[str]) -> None:
        self.rows: dict[str, _Row] = {}
        self.indexes: dict[str, dict[Any, dict[str, None]]] = {column: {} for column in indexed}

    def get(self, row_id: Any) -> _Row | None:
        """The row with this id, or None."""
        return self.rows.get(row_id) if isinstance(row_id, str) else None

    def where(self, column: str, value: Any) -> list[_Row]:
        """Rows whose ``column`` equals ``value``, in insertion order."""
        if column == "id":
            row = self.get(value)
            return [row] if row is not None else []
        index = self.indexes.get(column)
        if index is None:
            return [row for row in self.rows.values() if row.get(column) == value]
        return [self.rows[row_id] for row_id in index.get(value, ())]

    def insert(self, row: _Row) -> _Row:
        self.rows[row["id"]] = row
        for column, index in self.indexes.items():
            index.setdefault(row.get(column), {})[row["id"]] = None
        return row

    def update(self, row_id: str, changes: dict[str, Any]) -> _Row:
        row = self.rows[row_id]
        for column, index in self.indexes.items():
            if column in changes and changes[column] != row.get(column):
                index.get(row.get(column), {}).pop(row_id, None)
                index.setdefault(changes[column], {})[row_id] = None
        row.update(changes)
        return row

    def delete(self, row_id: str) -> None:
        row = self.rows.pop(row_id)
        for column, index in self.indexes.items():
            index.get(row.get(column), {}).pop(row_id, None)


def _like_regex(pattern: str, insensitive: bool) -> re.Pattern[str]:
    """SQL ``LIKE`` pattern (``%`` and ``_`` wildcards) as a regular expression."""
    parts = {"%": ".*", "_": "."}
    regex = "".join(parts.get(char, re.escape(char)) for char in pattern)
    return re.compile(regex, re.IGNORECASE | re.DOTALL if insensitive else re.DOTALL)


def _json_contains(container: Any, contained: Any) -> bool:
    """PostgreSQL's ``jsonb @>``: does ``container`` contain ``contained``?"""
    if isinstance(contained, dict):
        return isinstance(container, dict) and all(
            key in container and _json_contains(container[key], value) for key, value in contained.items()
        )
    if isinstance(contained, list):
        return isinstance(container, list) and all(
            any(_json_contains(item, wanted) for item in container) for wanted in contained
        )
    return bool(container == contained)


def _like(value: Any, pattern: str, insensitive: bool) -> bool:
    return _like_regex(pattern, insensitive).fullmatch(value) is not None


# Hasura's comparison operators as (column value, operand) -> bool.
_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "_eq": operator.eq,
    "_neq": operator.ne,
    "_gt": operator.gt,
    "_gte": operator.ge,
    "_lt": operator.lt,
    "_lte": operator.le,
    "_in": lambda value, operand: value in operand,
    "_nin": lambda value, operand: value not in operand,
    "_like": lambda value, operand: _like(value, operand, False),
    "_nlike": lambda value, operand: not _like(value, operand, False),
    "_ilike": lambda value, operand: _like(value, operand, True),
    "_nilike": lambda value, operand: not _like(value, operand, True),
    "_contains": _json_contains,
    "_contained_in": lambda value, operand: _json_contains(operand, value),
    "_has_key": lambda value, operand: isinstance(value, dict) and operand in value,
    "_has_keys_any": lambda value, operand: isinstance(value, dict) and any(key in value for key in operand),
    "_has_keys_all": lambda value, operand: isinstance(value, dict) and all(key in value for key in operand),
}


def _compare(op: str, value: Any, operand: Any) -> bool:
    """One Hasura comparison of a column value with an operand (both already typed)."""
    if op == "_is_null":
        return (value is None) == bool(operand)
    if value is None:  # SQL: NULL compares as unknown, which filters the row out
        return False
    try:
        return bool(_OPERATORS[op](value, operand))
    except TypeError:
        raise ApiError(f"cannot compare {value!r} with {operand!r} using {op}") from None


class _Database:
    """Server's tables in memory, queried with Hasura's ``where``/``order_by`` semantics."""

    def __init__(self, schema: _Schema) -> None:
        self.schema = schema
        self.clock = _Clock()
        indexed = _indexed_columns()
        self.tables = {name: _Table(indexed.get(name, ())) for name in _RELATIONS}

    # Writes: ``created``/``updated`` follow PostgreSQL's defaults and update trigger.

    def insert(self, table: str, **columns: Any) -> _Row:
        now = self.clock.now()
        row: _Row = {"id": str(uuid.uuid4()), "created": now, "updated": now}
        row.update(columns)
        return self.tables[table].insert(row)

    def update(self, table: str, row_id: str, **changes: Any) -> _Row:
        return self.tables[table].update(row_id, {**changes, "updated": self.clock.now()})

    def delete(self, table: str, row_id: str) -> None:
        self.tables[table].delete(row_id)

    def get(self, table: str, row_id: Any) -> _Row | None:
        return self.tables[table].get(row_id)

    # Reads.

    def query(self, table: str, args: dict[str, Any]) -> list[_Row]:
        """A Hasura root query: ``where``, ``order_by``, ``offset`` and ``limit``."""
        return self.select(table, self.candidates(table, args.get("where")), args)

    def first(self, table: str, where: dict[str, Any], order_by: list[Any] | None = None) -> _Row | None:
        """The first matching row, as Server's ``Model.where(...).first()``."""
        rows = self.query(table, {"where": where, "order_by": order_by, "limit": 1})
        return rows[0] if rows else None

    def select(self, table: str, rows: Iterable[_Row], args: dict[str, Any]) -> list[_Row]:
        """Filter, order and page ``rows`` as Hasura does for a list field."""
        where = args.get("where")
        selected = [row for row in rows if self.matches(table, row, where)] if where else list(rows)
        if args.get("order_by"):
            selected = self.ordered(table, selected, args["order_by"])
        offset, limit = args.get("offset") or 0, args.get("limit")
        return selected[offset:] if limit is None else selected[offset : offset + limit]

    def candidates(self, table: str, where: dict[str, Any] | None) -> list[_Row]:
        """A superset of the rows ``where`` can match, narrowed by an id or index lookup."""
        rows = self.tables[table]
        for column in ("id", *rows.indexes):
            condition = (where or {}).get(column)
            if not isinstance(condition, dict):
                continue
            if condition.get("_eq") is not None:
                return rows.where(column, condition["_eq"])
            if column == "id" and isinstance(condition.get("_in"), list):
                found = (rows.get(row_id) for row_id in dict.fromkeys(condition["_in"]))
                return [row for row in found if row is not None]
        return list(rows.rows.values())

    def matches(self, table: str, row: _Row, where: dict[str, Any]) -> bool:
        """Whether ``row`` satisfies a Hasura boolean expression."""
        for key, condition in where.items():
            if key == "_and":
                ok = all(self.matches(table, row, part) for part in condition)
            elif key == "_or":
                ok = any(self.matches(table, row, part) for part in condition)
            elif key == "_not":
                ok = not self.matches(table, row, condition)
            elif key in _RELATIONS[table]:
                ok = self.relation_matches(table, row, key, condition)
            else:
                ok = self.column_matches(table, key, row.get(key), condition)
            if not ok:
                return False
        return True

    def relation_matches(self, table: str, row: _Row, name: str, condition: dict[str, Any]) -> bool:
        """Object relationship: the related row matches; array: some related row does."""
        target, local, remote = _RELATIONS[table][name]
        related = self.tables[target].where(remote, row.get(local))
        return any(self.matches(target, other, condition) for other in related)

    def column_matches(self, table: str, column: str, value: Any, condition: dict[str, Any]) -> bool:
        scalar = self.schema.objects[table][column].type.named
        for op, operand in condition.items():
            if operand is None and op != "_is_null":
                continue  # Hasura 1.x drops comparisons with null ("_eq: null" matches all)
            if not _compare(op, value, self.operand(scalar, operand)):
                return False
        return True

    @staticmethod
    def operand(scalar: str, operand: Any) -> Any:
        """A comparison operand in the column's Python type (timestamps become datetimes)."""
        if scalar != "timestamptz" or isinstance(operand, bool):
            return operand
        try:
            if isinstance(operand, list):
                return [_parse_datetime(item) for item in operand]
            return _parse_datetime(operand)
        except ValueError:
            raise ApiError(f'invalid input syntax for type timestamp with time zone: "{operand}"') from None

    def related(self, table: str, row: _Row, name: str, args: dict[str, Any]) -> Any:
        """A relationship field's value: one row (or None), or the filtered list of rows."""
        target, local, remote = _RELATIONS[table][name]
        if remote == "id":
            return self.tables[target].get(row.get(local))
        return self.select(target, self.tables[target].where(remote, row.get(local)), args)

    def ordered(self, table: str, rows: list[_Row], order_by: list[Any]) -> list[_Row]:
        """Rows sorted by Hasura ``order_by`` terms (PostgreSQL null placement)."""
        terms = list(self.order_terms(order_by, ()))
        for path, direction in reversed(terms):  # stable sorts, least significant first
            descending = direction.startswith("desc")
            nulls_first = direction.endswith("nulls_first") or (descending and not direction.endswith("nulls_last"))
            null_rank = 0 if nulls_first != descending else 2
            rows = sorted(
                rows,
                key=lambda row: self.sort_key(table, row, path, null_rank),
                reverse=descending,
            )
        return rows

    def order_terms(self, order_by: Any, prefix: tuple[str, ...]) -> Iterable[tuple[tuple[str, ...], str]]:
        for term in order_by if isinstance(order_by, list) else [order_by]:
            for name, direction in term.items():
                if isinstance(direction, dict):
                    yield from self.order_terms(direction, (*prefix, name))
                else:
                    yield (*prefix, name), direction

    def sort_key(self, table: str, row: _Row | None, path: tuple[str, ...], null_rank: int) -> tuple[int, Any]:
        for name in path[:-1]:
            if row is None:
                break
            row, table = self.related(table, row, name, {}), _RELATIONS[table][name][0]
        value = None if row is None else row.get(path[-1])
        if value is None:
            return (null_rank, 0)
        return (1, json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value)


# --- Schedules -----------------------------------------------------------------------


def _load_schedule(serialized: Any) -> local_agent.Schedule:
    """A schedule from Prefect 1.4.1's ``ScheduleSchema`` JSON (ValueError when Prefect refuses it).

    The events come from the agent's port of Prefect 1.4.1's clocks, which is tested against
    real Prefect. It is imported on first use so that the double, vendored without
    local_agent.py, still serves everything but schedules.
    """
    import local_agent

    return local_agent.Schedule.from_prefect(serialized)


@functools.lru_cache(maxsize=1)
def _timezone_names() -> frozenset[str]:
    """The IANA zone names, standing in for ``pendulum.timezones`` (reading them is slow).

    "localtime" and "posixrules" are files some systems keep beside the zones, not zones.
    """
    return frozenset(zoneinfo.available_timezones() - {"localtime", "posixrules"})


def _auto_scheduled_key(event: local_agent.ClockEvent, last_scheduled_run: datetime) -> str | None:
    """Server's idempotency key for a run of ``event``, or None when it is already scheduled.

    An event with parameter defaults or labels gets an md5 of them in its key, so that two
    clocks may schedule the same instant; only a plain event is skipped when it is not after
    the last auto-scheduled start. The key's time is ``str()`` of a pendulum time in UTC.
    """
    start = event.start_time.astimezone(_UTC).isoformat()
    if event.parameter_defaults or event.labels is not None:
        # Server's recipe as written: sorted() over the characters of the JSON texts.
        param_string = str(sorted(json.dumps(event.parameter_defaults)))
        label_string = str(sorted(json.dumps(event.labels)))
        digest = hashlib.md5((param_string + label_string).encode("utf-8"), usedforsecurity=False)
        return f"auto-scheduled:{start}:{digest.hexdigest()}"
    if event.start_time <= last_scheduled_run:
        return None
    return f"auto-scheduled:{start}"


def _json_object(value: Any, method: str) -> dict[str, Any]:
    """``value`` if it is a JSON object, else the AttributeError Server's ``value.<method>`` raises."""
    if not isinstance(value, dict):
        raise ApiError(f"'{type(value).__name__}' object has no attribute '{method}'")
    return value


def _clock_parameter_names(clock: Any) -> set[str]:
    """Server's ``set(c.get("parameter_defaults", {}).keys())`` (a null value fails)."""
    return set(_json_object(_json_object(clock, "get").get("parameter_defaults", {}), "keys"))


def _iterable(value: Any) -> list[Any]:
    """A list input Server iterates; an explicit null fails as Python's ``for`` does."""
    if value is None:
        raise ApiError("'NoneType' object is not iterable")
    return list(value)


# --- Server's rules ------------------------------------------------------------------

_ADJECTIVES = (
    "amber",
    "brave",
    "calm",
    "daring",
    "eager",
    "fuzzy",
    "gentle",
    "happy",
    "icy",
    "jolly",
    "keen",
    "lively",
    "mellow",
    "nimble",
    "olive",
    "proud",
    "quiet",
    "rapid",
    "silver",
    "tidy",
)
_NOUNS = (
    "ant",
    "bear",
    "crane",
    "dingo",
    "eagle",
    "fish",
    "gecko",
    "heron",
    "ibis",
    "jackal",
    "koala",
    "lemur",
    "moose",
    "newt",
    "otter",
    "panda",
    "quail",
    "raven",
    "seal",
    "tapir",
)


@dataclass(frozen=True)
class _Options:
    cloud: bool
    version_locking: bool
    submitted_guard_seconds: float


@dataclass(frozen=True)
class _Context:
    """What a resolver may read about the request: its lower-cased headers."""

    headers: dict[str, str]


def _version_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric release parts of a version string: ``"0.15.13+1.g"`` -> (0, 15, 13)."""
    parts = []
    for part in re.split(r"[.+-]", version):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def _flow_schema_errors(flow: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(location, message, type) for each way ``flow`` fails Server's pydantic ``FlowSchema``."""
    errors = []
    required = {"tasks": ("slug",), "edges": ("upstream_task", "downstream_task"), "parameters": ("slug",)}
    for key, fields in required.items():
        items = flow.get(key, [])
        if not isinstance(items, list):
            errors.append((key, "value is not a valid list", "type_error.list"))
            continue
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                errors.append((f"{key} -> {i}", "value is not a valid dict", "type_error.dict"))
                continue
            for name in fields:
                value = item.get(name)
                value = value.get("slug") if isinstance(value, dict) else value
                if name not in item:
                    errors.append((f"{key} -> {i} -> {name}", "field required", "value_error.missing"))
                elif value is None:
                    errors.append(
                        (f"{key} -> {i} -> {name}", "none is not an allowed value", "type_error.none.not_allowed")
                    )
    for key in ("environment", "run_config", "storage"):
        if flow.get(key) is not None and not isinstance(flow[key], dict):
            errors.append((key, "value is not a valid dict", "type_error.dict"))
    return errors


def _check_flow_schema(flow: Any) -> dict[str, Any]:
    """The serialized flow if Server's ``FlowSchema(**flow)`` accepts it, else ApiError."""
    if not isinstance(flow, dict):
        raise ApiError("argument after ** must be a mapping, not " + type(flow).__name__)
    errors = _flow_schema_errors(flow)
    if errors:
        lines = [f"{len(errors)} validation error{'' if len(errors) == 1 else 's'} for FlowSchema"]
        for location, message, kind in errors:
            lines += [location, f"  {message} (type={kind})"]
        raise ApiError("\n".join(lines))
    core_version = flow.get("__version__")
    if core_version and _version_tuple(str(core_version)) < CORE_VERSION_CUTOFF:
        cutoff = ".".join(map(str, CORE_VERSION_CUTOFF))
        raise ApiError(
            f"Prefect backends require new flows to be built with Prefect {cutoff}+, but this flow "
            f"was built with Prefect {core_version}."
        )
    return flow


def _slug_of(task: Any) -> Any:
    """Core sends tasks in edges and reference lists as ``{"slug": ...}``."""
    return task.get("slug") if isinstance(task, dict) else task


class _Server:
    """Prefect Server's resolvers and rules over the in-memory database.

    Every method runs with the double's lock held. Method names ending in ``_root`` are the
    GraphQL root fields; the others mirror functions of Server's ``api`` package.
    """

    def __init__(self, database: _Database, options: _Options) -> None:
        self.db = database
        self.options = options
        self._submitted_until: dict[str, float] = {}

    def resolve(self, name: str, args: dict[str, Any], context: _Context) -> Any:
        """The value of root field ``name``: a Hasura table query or a Python resolver."""
        resolver = getattr(self, f"{name}_root", None)
        if resolver is not None:
            return resolver(args.get("input"), context)
        if name.endswith("_by_pk"):
            return self.db.get(name[: -len("_by_pk")], args["id"])
        return self.db.query(name, args)

    def default_tenant_id(self) -> str | None:
        """The first tenant (Server's single-tenant setups use exactly one)."""
        tenants = self.db.tables["tenant"].rows
        return next(iter(tenants), None)

    # Tenants, projects and agents.

    def hello_root(self, _input: None, _context: _Context) -> str:
        return "👋"

    def auth_info_root(self, _input: None, _context: _Context) -> dict[str, Any]:
        return {"tenant_id": self.default_tenant_id(), "api_token_scope": "RUNNER"}

    def create_tenant_root(self, data: dict[str, Any], _context: _Context) -> dict[str, Any]:
        return {"id": self.create_tenant(data["name"], data.get("slug"))}

    def create_tenant(self, name: str, slug: str | None = None) -> str:
        slug = slug or re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        if self.db.tables["tenant"].where("slug", slug):
            raise ApiError("Uniqueness violation.")
        return str(self.db.insert("tenant", name=name, slug=slug, info=None, settings={})["id"])

    def create_project_root(self, data: dict[str, Any], _context: _Context) -> dict[str, Any]:
        return {"id": self.create_project(data["tenant_id"], data["name"], data.get("description"))}

    def create_project(self, tenant_id: str, name: str, description: str | None = None) -> str:
        if self.db.first("project", {"tenant_id": {"_eq": tenant_id}, "name": {"_eq": name}}):
            raise ApiError("Uniqueness violation.")
        return str(self.db.insert("project", tenant_id=tenant_id, name=name, description=description)["id"])

    def register_agent_root(self, data: dict[str, Any], context: _Context) -> dict[str, Any]:
        tenant_id = data.get("tenant_id") or self.default_tenant_id()
        if tenant_id is None:
            raise ApiError("No tenant found.")
        labels = sorted(data.get("labels") or [])
        core_version = context.headers.get("x-prefect-core-version")
        where = {
            "tenant_id": {"_eq": tenant_id},
            "name": {"_eq": data.get("name")},
            "type": {"_eq": data.get("type")},
            "core_version": {"_eq": core_version},
            "labels": {"_eq": labels},
        }
        agent = self.db.first("agent", where) or self.db.insert(
            "agent",
            tenant_id=tenant_id,
            agent_config_id=data.get("agent_config_id"),
            labels=labels,
            name=data.get("name"),
            type=data.get("type"),
            core_version=core_version,
            last_queried=None,
        )
        return {"id": agent["id"]}

    # The queue.

    def get_runs_in_queue_root(self, data: dict[str, Any], context: _Context) -> dict[str, Any]:
        labels = data.get("labels", [])
        if labels is None:  # Server's resolver calls labels.sort() on it
            raise ApiError("'NoneType' object has no attribute 'sort'")
        tenant_id = data.get("tenant_id") or (self.default_tenant_id() if self.options.cloud else None)
        if tenant_id is None:
            raise ApiError("Invalid tenant ID")
        before = _parse_datetime(data["before"]) if data.get("before") else self.db.clock.now()
        ids = self.runs_in_queue(tenant_id, before, sorted(labels))
        agent = self.db.get("agent", context.headers.get("x-prefect-agent-id"))
        if agent is not None:
            self.db.update("agent", agent["id"], last_queried=self.db.clock.now())
        return {"flow_run_ids": ids}

    def runs_in_queue(self, tenant_id: str, before: datetime, labels: list[str]) -> list[str]:
        """Server's ``get_runs_in_queue``: due runs, oldest first, filtered by labels."""
        due = [run for run in self.db.tables["flow_run"].where("tenant_id", tenant_id) if self.is_due(run, before)]
        due.sort(key=lambda run: (run["state_start_time"] is None, run["state_start_time"] or _EPOCH))
        chosen: list[str] = []
        for run in due[: 3 * QUEUED_RUNS_RETURNED_LIMIT]:
            if len(chosen) == QUEUED_RUNS_RETURNED_LIMIT:
                break
            run_labels = set(run["labels"] or [])
            if run_labels - set(labels):  # the run needs a label the agent lacks
                continue
            if not run_labels and labels:  # unlabeled runs go only to unlabeled agents
                continue
            chosen.append(run["id"])
        return chosen

    def is_due(self, run: _Row, before: datetime) -> bool:
        """Scheduled-family state due by ``before``, or Running with such a task run."""
        if run["state"] in _SCHEDULED_STATES:
            return run["state_start_time"] is not None and run["state_start_time"] <= before
        if run["state"] != "Running":
            return False
        return any(
            task_run["state"] in _SCHEDULED_STATES
            and task_run["state_start_time"] is not None
            and task_run["state_start_time"] <= before
            for task_run in self.db.tables["task_run"].where("flow_run_id", run["id"])
        )

    # State writes.

    def set_flow_run_states_root(self, data: dict[str, Any], context: _Context) -> dict[str, Any]:
        agent_id = context.headers.get("x-prefect-agent-id")
        results = []
        for item in data["states"]:
            state = self.checked_state(item["state"])
            written = self.set_flow_run_state(
                item["flow_run_id"], state, version=item.get("version"), agent_id=agent_id
            )
            status = "QUEUED" if written["state"] == "Queued" else "SUCCESS"
            results.append({"id": item["flow_run_id"], "status": status, "message": None})
        return {"states": results}

    def set_task_run_states_root(self, data: dict[str, Any], _context: _Context) -> dict[str, Any]:
        results = []
        for item in data["states"]:
            state = self.checked_state(item["state"])
            self.set_task_run_state(item["task_run_id"], state, version=item.get("version"))
            results.append({"id": item["task_run_id"], "status": "SUCCESS", "message": None})
        return {"states": results}

    def checked_state(self, payload: Any) -> dict[str, Any]:
        """The size limit and ``StateSchema().load`` the state resolvers apply first."""
        if sys.getsizeof(json.dumps(payload)) > STATE_PAYLOAD_LIMIT:
            raise ApiError("State payload is too large.")
        return _load_state(payload, self.db.clock.now())

    def set_flow_run_state(
        self,
        run_id: str | None,
        state: dict[str, Any],
        *,
        version: int | None = None,
        agent_id: str | None = None,
    ) -> _Row:
        """Server's ``api.states.set_flow_run_state``; returns the new state row."""
        if run_id is None:
            raise ApiError("Invalid flow run ID.")
        run = self.db.get("flow_run", run_id)
        if run is None:
            raise ApiError(f"State update failed for flow run ID {run_id}")
        self.check_version(f"flow run ID {run_id}", run, version)
        state_type = state["type"]
        if state_type == "Submitted":
            self.take_submitted_lock(run_id)
        if state_type == "Cancelled":
            self.cancel_task_runs(run_id, state)
        written = self.append_state("flow_run", run, state)
        if _is_a(state_type, "Running") or state_type == "Submitted":
            self.db.update("flow_run", run_id, heartbeat=self.db.clock.now())
        if state_type == "Submitted" and self.db.get("agent", agent_id) is not None:
            self.db.update("flow_run", run_id, agent_id=agent_id)
        return written

    def set_task_run_state(self, task_run_id: str | None, state: dict[str, Any], *, version: int | None = None) -> _Row:
        """Server's ``api.states.set_task_run_state``; returns the new state row."""
        if task_run_id is None:
            raise ApiError("Invalid task run ID.")
        task_run = self.db.get("task_run", task_run_id)
        if task_run is None:
            raise ApiError(f"State update failed for task run ID {task_run_id}")
        self.check_version(f"task run ID {task_run_id}", task_run, version)
        flow_run = self.db.tables["flow_run"].rows[task_run["flow_run_id"]]
        if _is_a(state["type"], "Running") and flow_run["state"] != "Running":
            raise ApiError(
                f"State update failed for task run ID {task_run_id}: provided a running state but "
                f"associated flow run {flow_run['id']} is not in a running state."
            )
        previous_inputs = (task_run["serialized_state"] or {}).get("cached_inputs")
        if not state.get("cached_inputs") and previous_inputs:
            state = {**state, "cached_inputs": previous_inputs}
        written = self.append_state("task_run", task_run, state)
        if _is_a(state["type"], "Running"):
            self.db.update("task_run", task_run_id, heartbeat=self.db.clock.now())
        return written

    def check_version(self, what: str, run: _Row, version: int | None) -> None:
        """Prefect Cloud's version lock (``version_locking=True``); Server never compares."""
        if self.options.version_locking and version is not None and version != run["version"]:
            raise ApiError(
                f"State update failed for {what}: provided version {version} but current version is {run['version']}.",
                "VERSION_LOCKING_ERROR",
            )

    def take_submitted_lock(self, run_id: str) -> None:
        """Server's 30-second ``submitted_state_lock``: one Submitted per run per window."""
        if self.options.submitted_guard_seconds <= 0:
            return
        now = time.monotonic()
        if self._submitted_until.get(run_id, 0.0) > now:
            raise ApiError("State update failed: this run has already been submitted.")
        self._submitted_until[run_id] = now + self.options.submitted_guard_seconds

    def cancel_task_runs(self, run_id: str, state: dict[str, Any]) -> None:
        """A Cancelled flow run cancels its unfinished task runs (errors are ignored)."""
        for task_run in self.db.tables["task_run"].where("flow_run_id", run_id):
            if not _is_a(task_run["state"], "Finished"):
                try:
                    self.set_task_run_state(task_run["id"], state)
                except ApiError:
                    pass

    def append_state(self, kind: str, run: _Row, state: dict[str, Any], version: int | None = None) -> _Row:
        """Insert a state row and copy it onto the run, like Server's database triggers.

        ``version`` defaults to the run's version + 1. The timing columns follow the
        trigger too: ``start_time`` is the first Running state's timestamp and
        ``end_time`` the timestamp of the state that followed the last Running one.
        """
        now = self.db.clock.now()
        written = self.db.insert(
            f"{kind}_state",
            **{f"{kind}_id": run["id"]},
            tenant_id=run["tenant_id"],
            version=(run["version"] or 0) + 1 if version is None else version,
            state=state["type"],
            message=state.get("message"),
            serialized_state=state,
            start_time=_state_start_time(state),
            timestamp=now,
        )
        changes: dict[str, Any] = {
            "version": written["version"],
            "state": state["type"],
            "serialized_state": state,
            "state_message": state.get("message"),
            "state_start_time": written["start_time"],
            "state_timestamp": now,
        }
        if run["state"] == "Running":
            changes["end_time"] = now
        if state["type"] == "Running" and run["start_time"] is None:
            changes["start_time"] = now
        if kind == "task_run" and state["type"] in ("Running", "Looped"):
            changes["run_count"] = run["run_count"] + (1 if state["type"] == "Running" else -1)
        self.db.update(kind, run["id"], **changes)
        return written

    def cancel_flow_run_root(self, data: dict[str, Any], _context: _Context) -> dict[str, Any]:
        return {"state": self.cancel_flow_run(data["flow_run_id"])}

    def cancel_flow_run(self, run_id: str, message: str | None = None) -> str:
        """Server's ``cancel_flow_run``: no-op when finished, Cancelling when running."""
        run = self.db.get("flow_run", run_id)
        if run is None:
            raise ApiError(f"Invalid flow run ID: {run_id}.")
        if _is_a(run["state"], "Finished"):
            return str(run["state"])
        if _is_a(run["state"], "Running"):
            state = _serialized_state("Cancelling", message or "Flow run is cancelling")
        else:
            state = _serialized_state("Cancelled", message or "Flow run is cancelled")
        self.set_flow_run_state(run_id, state)
        return str(state["type"])

    # Heartbeats, logs and task runs.

    def update_flow_run_heartbeat_root(self, data: dict[str, Any], _context: _Context) -> dict[str, Any]:
        # Server defers this write and answers success even for an unknown id.
        if self.db.get("flow_run", data["flow_run_id"]) is not None:
            self.db.update("flow_run", data["flow_run_id"], heartbeat=self.db.clock.now())
        return {"success": True}

    def update_task_run_heartbeat_root(self, data: dict[str, Any], _context: _Context) -> dict[str, Any]:
        if self.db.get("task_run", data["task_run_id"]) is not None:
            self.db.update("task_run", data["task_run_id"], heartbeat=self.db.clock.now())
        return {"success": True}

    def write_run_logs_root(self, data: dict[str, Any], _context: _Context) -> dict[str, Any]:
        # One insert: every row of the batch shares "now", as PostgreSQL's now() does.
        now = self.db.clock.now()
        for log in data["logs"]:
            run = self.db.get("flow_run", log.get("flow_run_id"))
            row = self.db.insert(
                "log",
                tenant_id=run["tenant_id"] if run else None,
                flow_run_id=log.get("flow_run_id"),
                task_run_id=log.get("task_run_id"),
                timestamp=_parse_datetime(log["timestamp"]) if log.get("timestamp") else now,
                name=log.get("name"),
                level=log.get("level") or "INFO",
                message=log.get("message"),
                info=log.get("info"),
                is_loaded_from_archive=False,
            )
            row.update(created=now, updated=now)
        return {"success": True}

    def get_or_create_task_run_info_root(self, data: dict[str, Any], _context: _Context) -> dict[str, Any]:
        map_index = -1 if data.get("map_index") is None else data["map_index"]
        task_run = next(
            (
                candidate
                for candidate in self.db.tables["task_run"].where("flow_run_id", data["flow_run_id"])
                if candidate["task_id"] == data["task_id"] and candidate["map_index"] == map_index
            ),
            None,
        )
        if task_run is None:
            task = self.db.get("task", data["task_id"])
            if task is None:
                raise ApiError("Invalid task ID")
            state = _serialized_state("Pending", "Task run created")
            task_run = self.create_task_run(data["flow_run_id"], task, map_index, state)
        return {key: task_run[key] for key in ("id", "version", "state", "serialized_state")}

    def create_task_run(self, run_id: str, task: _Row, map_index: int, state: dict[str, Any]) -> _Row:
        """A task run at version 0 with its first (Pending) state."""
        task_run = self.db.insert(
            "task_run",
            tenant_id=task["tenant_id"],
            flow_run_id=run_id,
            task_id=task["id"],
            map_index=map_index,
            version=0,
            name=None,
            heartbeat=None,
            start_time=None,
            end_time=None,
            run_count=0,
            state=None,
            state_message=None,
            state_start_time=None,
            state_timestamp=None,
            serialized_state=None,
            cache_key=task["cache_key"],
        )
        self.append_state("task_run", task_run, state, version=0)
        return task_run

    # Flow runs.

    def create_flow_run_root(self, data: dict[str, Any], _context: _Context) -> dict[str, Any]:
        return {"id": self.create_flow_run(**data)}

    def create_flow_run(
        self,
        flow_id: str | None = None,
        version_group_id: str | None = None,
        parameters: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
        scheduled_start_time: Any = None,
        flow_run_name: str | None = None,
        idempotency_key: str | None = None,
        labels: list[str] | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> str:
        """Server's ``create_flow_run``: Pending at version 0, then Scheduled at version 1."""
        if not (flow_id or version_group_id):
            raise ApiError("A flow id or version group ID must be provided.")
        if idempotency_key is not None:
            existing = self.run_with_idempotency_key(idempotency_key, flow_id, version_group_id)
            if existing is not None:
                return existing
        flow = self.flow_to_run(flow_id, version_group_id)
        group = self.db.tables["flow_group"].rows[flow["flow_group_id"]]
        run_parameters = {**group["default_parameters"], **(parameters or {})}
        missing = {p.get("name") for p in flow["parameters"] or [] if p.get("required")} - set(run_parameters)
        if missing:
            raise ApiError(f"Required parameters were not supplied: {missing}")
        start = _parse_datetime(scheduled_start_time) if scheduled_start_time else self.db.clock.now()
        run = self.db.insert(
            "flow_run",
            tenant_id=flow["tenant_id"],
            flow_id=flow["id"],
            agent_id=None,
            name=flow_run_name or f"{random.choice(_ADJECTIVES)}-{random.choice(_NOUNS)}",
            labels=self.run_labels(labels, run_config, group, flow),
            parameters=run_parameters,
            context=context or {},
            run_config=run_config or group["run_config"] or flow["run_config"],
            idempotency_key=idempotency_key,
            scheduled_start_time=start,
            auto_scheduled=False,
            heartbeat=None,
            start_time=None,
            end_time=None,
            version=0,
            state=None,
            state_message=None,
            state_start_time=None,
            state_timestamp=None,
            serialized_state=None,
            times_resurrected=0,
        )
        # Database triggers: one Pending task run per task, and the run's first state.
        for task in self.db.tables["task"].where("flow_id", flow["id"]):
            self.create_task_run(run["id"], task, -1, {"type": "Pending", "message": "Task run created"})
        self.append_state("flow_run", run, _serialized_state("Pending", "Flow run created"), version=0)
        self.set_flow_run_state(run["id"], _serialized_state("Scheduled", "Flow run scheduled.", start_time=start))
        return str(run["id"])

    def run_with_idempotency_key(self, key: str, flow_id: str | None, version_group_id: str | None) -> str | None:
        where: dict[str, Any] = {"idempotency_key": {"_eq": key}}
        if flow_id is not None:
            where["flow_id"] = {"_eq": flow_id}
        if version_group_id is not None:
            where["flow"] = {"version_group_id": {"_eq": version_group_id}}
        run = self.db.first("flow_run", where, order_by=[{"created": "desc"}])
        return None if run is None else str(run["id"])

    def flow_to_run(self, flow_id: str | None, version_group_id: str | None) -> _Row:
        """The flow by id, or the newest unarchived version of the group."""
        if flow_id:
            flow = self.db.get("flow", flow_id)
            if flow is None:
                raise ApiError(f"Flow {flow_id} not found")
        else:
            where = {"version_group_id": {"_eq": version_group_id}, "archived": {"_eq": False}}
            flow = self.db.first("flow", where, order_by=[{"version": "desc"}])
            if flow is None:
                raise ApiError(f"Version group {version_group_id} has no unarchived flows.")
        if flow["archived"]:
            raise ApiError(f"Flow {flow['id']} is archived.")
        return flow

    @staticmethod
    def run_labels(labels: list[str] | None, run_config: dict[str, Any] | None, group: _Row, flow: _Row) -> list[str]:
        """Labels inferred at run creation, first source present wins; stored sorted."""
        if labels is not None:
            chosen = labels
        elif run_config is not None:
            chosen = run_config.get("labels") or []
        elif group["labels"] is not None:
            chosen = group["labels"]
        elif group["run_config"] is not None:
            chosen = group["run_config"].get("labels") or []
        elif flow["run_config"] is not None:
            chosen = flow["run_config"].get("labels") or []
        elif flow["environment"] is not None:
            chosen = flow["environment"].get("labels") or []
        else:  # Server calls flow.environment.get(...) on a null environment
            raise ApiError("'NoneType' object has no attribute 'get'")
        return sorted(chosen)

    def delete_flow_run_root(self, data: dict[str, Any], _context: _Context) -> dict[str, Any]:
        return {"success": self.delete_flow_run(data["flow_run_id"])}

    def delete_flow_run(self, run_id: str) -> bool:
        """Delete a run with its task runs, states and logs (Server's cascades)."""
        if self.db.get("flow_run", run_id) is None:
            return False
        for task_run in self.db.tables["task_run"].where("flow_run_id", run_id):
            for table, column in (("task_run_state", "task_run_id"), ("log", "task_run_id")):
                for row in self.db.tables[table].where(column, task_run["id"]):
                    self.db.delete(table, row["id"])
            self.db.delete("task_run", task_run["id"])
        for table in ("flow_run_state", "log"):
            for row in self.db.tables[table].where("flow_run_id", run_id):
                self.db.delete(table, row["id"])
        self.db.delete("flow_run", run_id)
        return True

    # Flows.

    def create_flow_from_compressed_string_root(self, data: dict[str, Any], context: _Context) -> dict[str, Any]:
        try:
            flow = json.loads(gzip.decompress(base64.b64decode(data["serialized_flow"])).decode())
        except (ValueError, OSError, EOFError):
            raise ApiError("Unable to decompress serialized flow") from None
        return self.create_flow_root({**data, "serialized_flow": flow}, context)

    def create_flow_root(self, data: dict[str, Any], _context: _Context) -> dict[str, Any]:
        return {"id": self.create_flow(**data)}

    def create_flow(
        self,
        serialized_flow: Any,
        project_id: str,
        version_group_id: str | None = None,
        set_schedule_active: bool | None = True,
        description: str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Server's ``create_flow`` resolver: version by name in the project, archive the rest."""
        flow = _check_flow_schema(serialized_flow)
        if not version_group_id:
            where = {"project_id": {"_eq": project_id}, "name": {"_eq": flow.get("name")}}
            previous = self.db.first("flow", where, order_by=[{"created": "desc"}])
            version_group_id = previous["version_group_id"] if previous else None
        flow_id, created = self.insert_flow(flow, project_id, version_group_id, description, idempotency_key)
        # Server turns the schedule on only for a new version with a schedule of its own or
        # of its flow group; an idempotent re-registration returns before that step.
        if created and set_schedule_active and self.has_schedule(self.db.tables["flow"].rows[flow_id]):
            try:
                self.set_schedule_active(flow_id)
            except ApiError:
                pass  # Server lets the flow be created with its schedule off
        if version_group_id:
            for other in self.db.tables["flow"].where("version_group_id", version_group_id):
                if other["id"] != flow_id and not other["archived"]:
                    self.archive_flow(other["id"])
        return flow_id

    def insert_flow(
        self,
        flow: dict[str, Any],
        project_id: str,
        version_group_id: str | None,
        description: str | None,
        idempotency_key: str | None,
    ) -> tuple[str, bool]:
        """Server's ``api.flows.create_flow``: flow group, idempotency, version, tasks, edges.

        Returns the flow's id and whether it is new (False: the idempotency key matched).
        """
        project = self.db.get("project", project_id)
        if project is None:
            raise ApiError("Invalid project.")
        tenant_id = project["tenant_id"]
        version_group_id = version_group_id or str(uuid.uuid4())
        group = self.db.first("flow_group", {"tenant_id": {"_eq": tenant_id}, "name": {"_eq": version_group_id}})
        if group is None:
            settings = {"heartbeat_enabled": True, "lazarus_enabled": True, "version_locking_enabled": False}
            group = self.db.insert(
                "flow_group",
                tenant_id=tenant_id,
                name=version_group_id,
                description=None,
                labels=None,
                run_config=None,
                schedule=None,
                default_parameters={},
                settings={**settings, "idempotency_key": idempotency_key},
            )
        else:
            if idempotency_key and group["settings"].get("idempotency_key") == idempotency_key:
                where = {"version_group_id": {"_eq": version_group_id}, "archived": {"_eq": False}}
                latest = self.db.first("flow", where, order_by=[{"version": "desc"}])
                if latest is not None:
                    return str(latest["id"]), False
            self.db.update(
                "flow_group", group["id"], settings={**group["settings"], "idempotency_key": idempotency_key}
            )
        versions = [
            other["version"] or 0
            for other in self.db.tables["flow"].where("version_group_id", version_group_id)
            if other["tenant_id"] == tenant_id
        ]
        row = self.db.insert(
            "flow",
            tenant_id=tenant_id,
            project_id=project_id,
            flow_group_id=group["id"],
            version_group_id=version_group_id,
            name=flow.get("name"),
            version=max(versions, default=0) + 1,
            description=description,
            archived=False,
            core_version=flow.get("__version__"),
            storage=flow.get("storage"),
            run_config=flow.get("run_config"),
            environment=flow.get("environment"),
            parameters=[{"name": None, "required": False, "default": None, **p} for p in flow.get("parameters", [])],
            serialized_flow=flow,
            schedule=flow.get("schedule"),
            is_schedule_active=False,
            settings={},
        )
        self.insert_tasks(row, flow.get("tasks", []), flow.get("edges", []), flow.get("reference_tasks", []))
        self.insert_edges(row, flow.get("edges", []))
        return str(row["id"]), True

    def insert_tasks(
        self, flow: _Row, tasks: list[dict[str, Any]], edges: list[dict[str, Any]], reference: list[Any]
    ) -> None:
        """Task rows with Server's computed flags (root, terminal, reference, mapped)."""
        downstream = {_slug_of(edge["downstream_task"]) for edge in edges}
        upstream = {_slug_of(edge["upstream_task"]) for edge in edges}
        reference_slugs = {_slug_of(task) for task in reference} or {
            task["slug"] for task in tasks if task["slug"] not in upstream
        }
        known = {task["slug"] for task in self.db.tables["task"].where("flow_id", flow["id"])}
        for task in tasks:
            if task["slug"] in known:
                continue
            trigger = task.get("trigger")
            self.db.insert(
                "task",
                tenant_id=flow["tenant_id"],
                flow_id=flow["id"],
                name=task.get("name"),
                slug=task["slug"],
                type=task.get("type"),
                description=None,
                max_retries=task.get("max_retries") or 0,
                retry_delay=task.get("retry_delay"),
                trigger=trigger.get("fn") if isinstance(trigger, dict) else trigger,
                mapped=any(edge.get("mapped") for edge in edges if _slug_of(edge["downstream_task"]) == task["slug"]),
                auto_generated=bool(task.get("auto_generated")),
                cache_key=task.get("cache_key"),
                is_root_task=task["slug"] not in downstream,
                is_terminal_task=task["slug"] not in upstream,
                is_reference_task=task["slug"] in reference_slugs,
                tags=task.get("tags") or [],
            )

    def insert_edges(self, flow: _Row, edges: list[dict[str, Any]]) -> None:
        tasks = {task["slug"]: task["id"] for task in self.db.tables["task"].where("flow_id", flow["id"])}
        for edge in edges:
            ends = [_slug_of(edge["upstream_task"]), _slug_of(edge["downstream_task"])]
            missing = [slug for slug in ends if slug not in tasks]
            if missing:
                raise ApiError(repr(missing[0]))  # Server's task_lookup[...] KeyError
            self.db.insert(
                "edge",
                tenant_id=flow["tenant_id"],
                flow_id=flow["id"],
                upstream_task_id=tasks[ends[0]],
                downstream_task_id=tasks[ends[1]],
                key=edge.get("key"),
                mapped=bool(edge.get("mapped")),
            )

    def register_tasks_root(self, data: dict[str, Any], _context: _Context) -> dict[str, Any]:
        flow = self.registered_flow(data["flow_id"])
        tasks = _check_flow_schema({"tasks": data["serialized_tasks"]})["tasks"]
        self.insert_tasks(flow, tasks, [], [])
        return {"success": True}

    def register_edges_root(self, data: dict[str, Any], _context: _Context) -> dict[str, Any]:
        flow = self.registered_flow(data["flow_id"])
        self.insert_edges(flow, _check_flow_schema({"edges": data["serialized_edges"]})["edges"])
        return {"success": True}

    def registered_flow(self, flow_id: str) -> _Row:
        flow = self.db.get("flow", flow_id)
        if flow is None:
            raise ApiError("Invalid flow ID.")
        return flow

    # Schedules and the scheduler service (api/flows.py, api/flow_groups.py, services/towel).

    def flow_group_of(self, flow: _Row) -> _Row:
        return self.db.tables["flow_group"].rows[flow["flow_group_id"]]

    def has_schedule(self, flow: _Row) -> bool:
        """Whether the flow or its flow group has a schedule (Server's ``is None`` tests)."""
        return flow["schedule"] is not None or self.flow_group_of(flow)["schedule"] is not None

    def set_schedule_active_root(self, data: dict[str, Any], _context: _Context) -> dict[str, Any]:
        return {"success": self.set_schedule_active(data["flow_id"])}

    def set_schedule_active(self, flow_id: str) -> bool:
        """Server's ``set_schedule_active``: check parameters, turn on, schedule runs at once.

        Only the flow's own clocks (with the group's default parameters) are checked against
        its required parameters: a flow-group schedule that lacks one fails later, in
        ``create_flow_run``, with the schedule already on, as in Server.
        """
        flow = self.db.get("flow", flow_id)
        if flow is None:
            return False
        self.check_scheduled_parameters(flow)
        if not self.has_schedule(flow):
            return False  # Server leaves it off: an active flag without a schedule confuses
        self.db.update("flow", flow_id, is_schedule_active=True)
        self.schedule_flow_runs(flow_id)
        return True

    def check_scheduled_parameters(self, flow: _Row) -> None:
        """Refuse a flow schedule with a clock that leaves a required parameter unset."""
        required = {p.get("name") for p in flow["parameters"] or [] if p.get("required")}
        if flow["schedule"] is None or not required:
            return
        unset = required - set(self.flow_group_of(flow)["default_parameters"] or {})
        clocks = _json_object(flow["schedule"], "get").get("clocks", [])
        # Every clock is read before any is judged, so a null parameter_defaults fails first.
        names = [_clock_parameter_names(clock) for clock in clocks]
        if not all(unset <= clock_names for clock_names in names):
            raise ApiError("Can not schedule a flow that has required parameters.")

    def set_schedule_inactive_root(self, data: dict[str, Any], _context: _Context) -> dict[str, Any]:
        return {"success": self.set_schedule_inactive(data["flow_id"])}

    def set_schedule_inactive(self, flow_id: str) -> bool:
        """Server's ``set_schedule_inactive``: turn off, delete the runs not yet started."""
        if self.db.get("flow", flow_id) is None:
            return False
        self.db.update("flow", flow_id, is_schedule_active=False)
        self.delete_auto_scheduled_runs([flow_id])
        return True

    def delete_auto_scheduled_runs(self, flow_ids: Iterable[str]) -> None:
        """Delete the flows' auto-scheduled runs still in ``Scheduled`` (not its subclasses)."""
        for flow_id in flow_ids:
            for run in self.db.tables["flow_run"].where("flow_id", flow_id):
                if run["auto_scheduled"] and run["state"] == "Scheduled":
                    self.delete_flow_run(run["id"])

    def set_flow_group_schedule_root(self, data: dict[str, Any], _context: _Context) -> dict[str, Any]:
        """Server's resolver: cron clocks as given, interval clocks from seconds to microseconds."""
        clocks = [{"type": "CronClock", **clock} for clock in _iterable(data.get("cron_clocks", []))]
        for interval_clock in _iterable(data.get("interval_clocks", [])):
            clock = {"type": "IntervalClock", "interval": interval_clock["interval"] * 1_000_000}
            if interval_clock.get("parameter_defaults"):  # unlike a cron clock's, {} is dropped
                clock["parameter_defaults"] = interval_clock["parameter_defaults"]
            clocks.append(clock)
        return {"success": self.set_flow_group_schedule(data["flow_group_id"], clocks, data.get("timezone"))}

    def set_flow_group_schedule(self, flow_group_id: str, clocks: list[dict[str, Any]], tz: str | None) -> bool:
        """Server's ``set_flow_group_schedule``: validate, store, delete the group's pending runs.

        No run is created here: the flows pick the new schedule up on the next scheduler pass.
        """
        start_date = self.schedule_start_date(tz)
        for clock in clocks:
            clock["start_date"] = start_date
            try:
                _load_schedule({"type": "Schedule", "clocks": [clock]})
            except (ValueError, TypeError):  # Server's bare except around ClockSchema().load
                raise ApiError(f"Invalid clock provided for schedule: {clock}") from None
        return self.replace_flow_group_schedule(flow_group_id, {"type": "Schedule", "clocks": clocks})

    def schedule_start_date(self, tz: str | None) -> dict[str, str] | None:
        """A flow-group schedule's clocks start "now" in ``tz`` (naive time and zone name)."""
        if not tz:
            return None
        if tz not in _timezone_names():
            raise ApiError(f"Invalid timezone provided for schedule: {tz}")
        local_now = self.db.clock.now().astimezone(zoneinfo.ZoneInfo(tz))
        return {"dt": local_now.replace(tzinfo=None).isoformat(), "tz": tz}

    def delete_flow_group_schedule_root(self, data: dict[str, Any], _context: _Context) -> dict[str, Any]:
        return {"success": self.replace_flow_group_schedule(data["flow_group_id"], None)}

    def replace_flow_group_schedule(self, flow_group_id: str, schedule: dict[str, Any] | None) -> bool:
        """Store the group's schedule (None deletes it) and delete the runs made by the old one."""
        if not flow_group_id:
            raise ApiError("Invalid flow group ID")
        found = self.db.get("flow_group", flow_group_id) is not None
        if found:
            self.db.update("flow_group", flow_group_id, schedule=schedule)
        # Server deletes even when no group matched (there are then no runs to delete).
        flows = self.db.tables["flow"].where("flow_group_id", flow_group_id)
        self.delete_auto_scheduled_runs(flow["id"] for flow in flows)
        return found

    def schedule_flow_runs(self, flow_id: str, max_runs: int = MAX_SCHEDULED_RUNS_PER_FLOW) -> list[str]:
        """Server's ``schedule_flow_runs``: a run for each of the schedule's next ``max_runs`` events.

        Only an active, unarchived flow with a schedule is scheduled, by its flow group's
        schedule if there is one. Returns the ids ``create_flow_run`` answered, runs that
        already had the idempotency key included. Server creates the runs concurrently: every
        event that can become a run does, then the first failure is raised and none of them
        is marked ``auto_scheduled``.
        """
        flow = self.db.get("flow", flow_id)
        if flow is None or not flow["is_schedule_active"] or flow["archived"] or not self.has_schedule(flow):
            return []
        try:
            schedule = _load_schedule(self.flow_group_of(flow)["schedule"] or flow["schedule"])
        except (ValueError, TypeError):
            return []  # Server logs "Failed to deserialize schedule" and moves on
        now = self.db.clock.now()
        last_scheduled_run = self.last_auto_scheduled_start(flow_id) or now
        run_ids: list[str] = []
        failure: ApiError | None = None
        for event in schedule.next(max_runs, after=now):
            key = _auto_scheduled_key(event, last_scheduled_run)
            if key is None:
                continue
            labels = None if event.labels is None else list(event.labels)
            try:
                run_id = self.create_flow_run(
                    flow_id=flow_id,
                    scheduled_start_time=event.start_time,
                    parameters=event.parameter_defaults,
                    labels=labels,
                    idempotency_key=key,
                )
            except ApiError as error:
                failure = failure or error
                continue
            run_ids.append(run_id)
        if failure is not None:
            raise failure
        for run_id in dict.fromkeys(run_ids):
            self.db.update("flow_run", run_id, auto_scheduled=True)
        return run_ids

    def last_auto_scheduled_start(self, flow_id: str) -> datetime | None:
        """The latest ``scheduled_start_time`` of the flow's auto-scheduled runs, in any state."""
        starts = [
            run["scheduled_start_time"]
            for run in self.db.tables["flow_run"].where("flow_id", flow_id)
            if run["auto_scheduled"]
        ]
        return max(starts, default=None)

    def run_scheduler_once(self) -> tuple[int, list[str]]:
        """Server's ``Scheduler.run_once``: ``schedule_flow_runs`` for each active, unarchived flow.

        Returns the count Server logs (the lengths of the id lists, so runs found by their
        idempotency key count too) and the tracebacks of unexpected errors. A flow whose
        scheduling fails is skipped, as ``gather(return_exceptions=True)`` does.
        """
        flows = [
            flow for flow in self.db.tables["flow"].rows.values() if flow["is_schedule_active"] and not flow["archived"]
        ]
        flows.sort(key=lambda flow: str(flow["id"]), reverse=True)  # Server pages through flows by id, descending
        scheduled, crashes = 0, []
        for flow in flows:
            try:
                scheduled += len(self.schedule_flow_runs(flow["id"]))
            except ApiError:
                continue
            except Exception:  # a bug in the double (or the clocks): keep it for server_errors
                crashes.append(traceback.format_exc())
        return scheduled, crashes

    def archive_flow_root(self, data: dict[str, Any], _context: _Context) -> dict[str, Any]:
        return {"success": self.archive_flow(data["flow_id"])}

    def archive_flow(self, flow_id: str) -> bool:
        """Archive: delete auto-scheduled runs, cancel the flow's other Scheduled runs."""
        if self.db.get("flow", flow_id) is None:
            return False
        self.db.update("flow", flow_id, archived=True)
        for run in self.db.tables["flow_run"].where("flow_id", flow_id):
            if run["state"] != "Scheduled":
                continue
            if run["auto_scheduled"]:
                self.delete_flow_run(run["id"])
            else:
                self.cancel_flow_run(run["id"], f"Flow {flow_id} was archived.")
        return True


# --- Execution -----------------------------------------------------------------------


class _Execution:
    """Runs one validated operation and shapes each answer to its selection set."""

    def __init__(
        self,
        server: _Server,
        inputs: _Inputs,
        document: _Document,
        operation: _Operation,
        variables: dict[str, Any],
        context: _Context,
        auth_error: str | None,
    ) -> None:
        self.server = server
        self.schema = inputs.schema
        self.inputs = inputs
        self.document = document
        self.operation = operation
        self.variables = variables
        self.context = context
        self.auth_error = auth_error
        self.crashes: list[str] = []  # tracebacks of unexpected resolver exceptions

    def run(self) -> dict[str, Any]:
        """The response: ``data`` and, when a root field failed, ``errors``."""
        root = "Query" if self.operation.kind == "query" else "Mutation"
        data: dict[str, Any] = {}
        errors: list[dict[str, Any]] = []
        for selection in self.operation.selections:  # mutations run serially, in order
            try:
                data[selection.key] = self.root_field(root, selection)
                continue
            except ApiError as error:
                message, code = error.message, error.code
            except Exception as error:  # Server reports any resolver exception this way too
                self.crashes.append(traceback.format_exc())
                message, code = str(error), "INTERNAL_SERVER_ERROR"
            data[selection.key] = None
            errors.append(
                {
                    "message": message,
                    "locations": [_location(self.document.text, selection.position)],
                    "path": [selection.key],
                    "extensions": {"code": code},
                }
            )
        return {"data": data, "errors": errors} if errors else {"data": data}

    def root_field(self, root: str, selection: _Field) -> Any:
        if selection.name == "__typename":
            return root
        if self.auth_error is not None:
            raise ApiError(self.auth_error, "UNAUTHENTICATED")
        definition = self.schema.objects[root][selection.name]
        value = self.server.resolve(selection.name, self.arguments(selection, definition), self.context)
        return self.complete(definition.type, value, selection)

    def arguments(self, selection: _Field, definition: _FieldDef) -> dict[str, Any]:
        values = {
            name: self.inputs.literal(value, definition.args[name], self.variables)
            for name, value in selection.args.items()
        }
        return {name: value for name, value in values.items() if value is not _MISSING}

    def complete(self, type_ref: _TypeRef, value: Any, selection: _Field) -> Any:
        """A resolved value shaped by its type: lists mapped, objects narrowed to the selection."""
        if value is None:
            return None
        if type_ref.of is not None:
            return [self.complete(type_ref.of, item, selection) for item in value]
        if type_ref.name in self.schema.objects:
            return self.object(type_ref.name, value, selection.selections)
        return _iso(value) if isinstance(value, datetime) else value

    def object(self, type_name: str, source: dict[str, Any], selections: tuple[_Field, ...]) -> dict[str, Any]:
        """Only the selected fields, under their aliases (0.7.3 clients break on extras)."""
        result: dict[str, Any] = {}
        relations = _RELATIONS.get(type_name, {})
        for selection in selections:
            if selection.name == "__typename":
                result[selection.key] = type_name
                continue
            definition = self.schema.objects[type_name][selection.name]
            if selection.name in relations:
                value = self.server.db.related(type_name, source, selection.name, self.arguments(selection, definition))
            else:
                value = source.get(selection.name)
            result[selection.key] = self.complete(definition.type, value, selection)
        return result


# --- HTTP transport ------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """One POST the double received, as a test sees it."""

    path: str
    headers: dict[str, str]  # lower-cased names
    query: str
    variables: dict[str, Any] | None  # decoded, whether sent as an object or a string
    roots: list[str]  # root field names (not aliases) of the operation
    status: int  # HTTP status answered; 0 when the connection was dropped
    time: float  # time.time() on arrival
    variables_as_text: bool = False  # whether variables came JSON-encoded in a string, as Prefect sends them


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes | None  # None: close the connection without answering
    content_type: str = "application/json"


def _json_reply(status: int, payload: Any) -> _Reply:
    return _Reply(status, json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode())


def _graphql_error_reply(error: GraphQLError, text: str) -> _Reply:
    entry: dict[str, Any] = {"message": error.message}
    if error.position is not None:
        entry["locations"] = [_location(text, error.position)]
    entry["extensions"] = {"code": error.code}
    return _json_reply(400, {"errors": [entry]})


@dataclass(frozen=True)
class _Body:
    """A decoded request body."""

    query: str = ""
    variables: dict[str, Any] | None = None
    operation_name: str | None = None
    problem: str | None = None  # why the body cannot be run (HTTP 400)
    variables_as_text: bool = False


def _decode_body(raw: bytes) -> _Body:
    """The query, variables (object or JSON string) and operation name of a POST body."""
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return _Body(problem="POST body sent invalid JSON.")
    if not isinstance(payload, dict) or not isinstance(payload.get("query"), str):
        return _Body(problem="Must provide query string.")
    query, variables = payload["query"], payload.get("variables")
    if isinstance(variables, str):  # Prefect clients json.dumps() them ("null" when absent)
        try:
            variables = json.loads(variables)
        except ValueError:
            return _Body(query, problem="Variables are invalid JSON.")
    if variables is not None and not isinstance(variables, dict):
        return _Body(query, problem="Variables are invalid JSON.")
    name = payload.get("operationName")
    as_text = isinstance(payload.get("variables"), str)
    return _Body(query, variables, name if isinstance(name, str) else None, variables_as_text=as_text)


@dataclass
class _Fault:
    """An injected failure that applies to the next ``remaining`` matching requests."""

    remaining: int
    status: int | None
    body: bytes | None
    delay: float
    drop_connection: bool
    graphql_error: str | None
    code: str | None
    only_root: str | None
    after_processing: bool = False  # serve the request (its effects happen), then fail the answer

    def applies_to(self, roots: list[str]) -> bool:
        return self.remaining > 0 and (self.only_root is None or self.only_root in roots)

    def reply(self, roots: list[str]) -> _Reply | None:
        """The injected answer, or None to answer normally (after the delay)."""
        if self.drop_connection:
            return _Reply(0, None)
        if self.status is not None or self.body is not None:
            status = self.status or 200
            body = self.body if self.body is not None else f"Injected HTTP {status}".encode()
            return _Reply(status, body, "application/json" if self.body is not None else "text/plain")
        if self.graphql_error is not None:
            extensions = {"code": self.code or "INTERNAL_SERVER_ERROR"}
            errors = [{"message": self.graphql_error, "path": [root], "extensions": extensions} for root in roots]
            return _json_reply(
                200,
                {
                    "data": {root: None for root in roots} if roots else None,
                    "errors": errors or [{"message": self.graphql_error, "extensions": extensions}],
                },
            )
        return None


class _Handler(BaseHTTPRequestHandler):
    """Hands POSTs to the double; GET answers a health check; other methods get 400."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes
    server: _HTTPServer

    def do_POST(self) -> None:
        self.server.double._serve(self)

    def do_GET(self) -> None:
        self.reply(_json_reply(200, {"status": "pass"}))

    def reject(self) -> None:
        self.reply(_json_reply(400, {"errors": [{"message": f"{self.command} is not supported; POST a query."}]}))

    do_PUT = do_PATCH = do_DELETE = do_OPTIONS = reject  # noqa: N815 (http.server names)

    def reply(self, reply: _Reply) -> None:
        """Write ``reply`` with a Content-Length (keep-alive), or hang up when it has no body."""
        if reply.body is None:
            self.close_connection = True
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the double never writes request logs to stderr."""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, double: PrefectServerDouble) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.double = double

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: clients hanging up mid-request (fault tests) are not errors."""


# --- The double ----------------------------------------------------------------------


class PrefectServerDouble:
    """A Prefect Server 1.x GraphQL API on ``127.0.0.1:<ephemeral port>`` for tests.

    Seed and inspect the data with the methods below (they take the same lock as the HTTP
    requests); point clients at :attr:`url` after :meth:`start` (or ``with``).

    Args:
        cloud: serve Prefect Cloud's dialect (``auth_info``; optional queue tenant).
        require_token: answer requests without ``Authorization: Bearer <token>`` with
            Cloud's ``UNAUTHENTICATED`` error (HTTP 200, as in Prefect issue #3272).
        version_locking: refuse state writes whose non-null ``version`` is not current
            (``VERSION_LOCKING_ERROR``), as Prefect Cloud did; Server never compares.
        submitted_guard_seconds: Server's window for refusing a second ``Submitted``.
        with_tenant: create the ``default`` tenant (Server needs one to be usable).
        scheduler_seconds: run Server's scheduler service in a thread every this many
            seconds from :meth:`start` (Server's loop is 150 s); None runs it only when a
            test calls :meth:`run_scheduler_once`.
    """

    def __init__(
        self,
        *,
        cloud: bool = False,
        require_token: str | None = None,
        version_locking: bool = False,
        submitted_guard_seconds: float = 30.0,
        with_tenant: bool = True,
        scheduler_seconds: float | None = None,
    ) -> None:
        if scheduler_seconds is not None and not scheduler_seconds > 0:
            raise ValueError(f"scheduler_seconds must be greater than 0, not {scheduler_seconds!r}")
        schema = _build_schema(cloud)
        self._lock = threading.RLock()
        self._inputs = _Inputs(schema)
        self._server = _Server(_Database(schema), _Options(cloud, version_locking, submitted_guard_seconds))
        self._require_token = require_token
        self._prepared: dict[tuple[str, str | None], tuple[_Document, _Operation]] = {}
        self._requests: list[RecordedRequest] = []
        self._faults: list[_Fault] = []
        self._down_mode: str | None = None
        self._up = threading.Event()
        self._up.set()
        self._server_errors: list[str] = []
        self._http: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._scheduler_seconds = scheduler_seconds
        self._scheduler_stop = threading.Event()
        self._scheduler_thread: threading.Thread | None = None
        self.url = ""
        if with_tenant:
            self._server.create_tenant("default", "default")

    # Lifecycle.

    def start(self) -> PrefectServerDouble:
        """Listen on an ephemeral port in a daemon thread; sets :attr:`url`."""
        if self._http is not None:
            raise RuntimeError("the double is already started")
        self._http = _HTTPServer(self)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        # A short poll interval keeps stop() fast; shutdown() waits for one interval.
        self._thread = threading.Thread(
            target=self._http.serve_forever, args=(0.05,), name="prefect-double", daemon=True
        )
        self._thread.start()
        if self._scheduler_seconds is not None:
            self._scheduler_thread = threading.Thread(
                target=self._scheduler_loop,
                args=(self._scheduler_seconds,),
                name="prefect-double-scheduler",
                daemon=True,
            )
            self._scheduler_thread.start()
        return self

    def stop(self) -> None:
        """Stop the scheduler and listening; keep-alive connections are hung up on their next request."""
        self._stopped = True
        self._up.set()
        self._scheduler_stop.set()
        if self._scheduler_thread is not None:
            self._scheduler_thread.join()
        if self._http is not None and self._thread is not None:
            self._http.shutdown()
            self._http.server_close()
            self._thread.join()

    def __enter__(self) -> PrefectServerDouble:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # Seeding.

    @property
    def tenant_id(self) -> str:
        """The default (first) tenant's id."""
        with self._lock:
            tenant_id = self._server.default_tenant_id()
        if tenant_id is None:
            raise RuntimeError("the double has no tenant (with_tenant=False); call add_tenant()")
        return tenant_id

    def add_tenant(self, name: str = "default") -> str:
        """Create a tenant, as ``prefect server create-tenant`` does."""
        with self._lock:
            return self._server.create_tenant(name)

    def add_project(self, name: str) -> str:
        """Create a project in the default tenant (ApiError "Uniqueness violation." if taken)."""
        tenant_id = self.tenant_id
        with self._lock:
            return self._server.create_project(tenant_id, name)

    def add_flow(
        self,
        name: str,
        storage: dict[str, Any] | None,
        *,
        labels: list[str] | None = None,
        project: str = "test",
        run_config: dict[str, Any] | None = None,
        parameters: list[dict[str, Any]] | None = None,
        tasks: list[str] | None = None,
        schedule: dict[str, Any] | None = None,
    ) -> str:
        """Register a flow the way ``create_flow`` does (new version, older ones archived).

        ``labels`` go into the run config (a ``UniversalRun`` unless ``run_config`` is
        given); ``parameters`` are ``{"name", "required", "default"}`` dicts; ``tasks`` are
        task slugs, each of which gets a pre-created task run in every new flow run;
        ``schedule`` is Prefect's schedule JSON, stored inactive (``set_schedule_active``).
        """
        config = (
            dict(run_config)
            if run_config is not None
            else {
                "type": "UniversalRun",
                "labels": [],
                "env": None,
                "__version__": CORE_VERSION,
            }
        )
        if labels is not None:
            config["labels"] = list(labels)
        serialized = {
            "name": name,
            "type": "prefect.core.flow.Flow",
            "schedule": schedule,
            "parameters": [{"slug": p.get("name"), **p} for p in parameters or []],
            "tasks": [{"name": slug, "slug": slug, "type": "prefect.core.task.Task"} for slug in tasks or []],
            "edges": [],
            "reference_tasks": [],
            "environment": None,
            "run_config": config,
            "storage": storage,
            "__version__": CORE_VERSION,
        }
        tenant_id = self.tenant_id
        with self._lock:
            existing = self._server.db.first("project", {"tenant_id": {"_eq": tenant_id}, "name": {"_eq": project}})
            project_id = existing["id"] if existing else self._server.create_project(tenant_id, project)
            return self._server.create_flow(serialized, project_id, set_schedule_active=False)

    def add_flow_run(
        self,
        flow_id: str,
        *,
        labels: list[str] | None = None,
        parameters: dict[str, Any] | None = None,
        scheduled_start_time: datetime | str | None = None,
        name: str | None = None,
    ) -> str:
        """Create a run the way ``create_flow_run`` does (labels inferred, Scheduled, version 1)."""
        with self._lock:
            return self._server.create_flow_run(
                flow_id,
                parameters=parameters,
                scheduled_start_time=scheduled_start_time,
                flow_run_name=name,
                labels=labels,
            )

    def set_state(self, run_id: str, state_type: str, message: str = "") -> None:
        """Write a flow-run state as a UI user would (Server's rules apply, e.g. cancelling)."""
        with self._lock:
            run = self._row("flow_run", run_id)
            start = self._server.db.clock.now() if state_type in _SCHEDULED_STATES else None
            inner = run["serialized_state"] if _is_a(state_type, "_MetaState") else None
            state = _serialized_state(state_type, message, start_time=start, inner=inner)
            self._server.set_flow_run_state(run_id, self._server.checked_state(state))

    # Server's scheduler service.

    def run_scheduler_once(self) -> int:
        """One pass of Server's scheduler: the next 10 runs of every active, unarchived flow.

        Returns the number Server logs as "Scheduled N flow runs.": runs that already existed
        under the same idempotency key (events with parameter defaults or labels) count too.
        """
        with self._lock:
            scheduled, crashes = self._server.run_scheduler_once()
            self._server_errors.extend(crashes)
            return scheduled

    def _scheduler_loop(self, seconds: float) -> None:
        """Server's ``LoopService.run``: a pass at once, then one ``seconds`` after each start."""
        while not self._scheduler_stop.is_set():
            started = time.monotonic()
            try:
                self.run_scheduler_once()
            except Exception:  # a bug in the double: keep the trace and the loop, as Server does
                with self._lock:
                    self._server_errors.append(traceback.format_exc())
            self._scheduler_stop.wait(max(0.0, started + seconds - time.monotonic()))

    # Inspection.

    def run(self, run_id: str) -> dict[str, Any]:
        """A deep copy of the flow-run row (timestamps are aware datetimes)."""
        with self._lock:
            return copy.deepcopy(self._row("flow_run", run_id))

    def task_runs(self, run_id: str) -> list[dict[str, Any]]:
        """Deep copies of the run's task-run rows."""
        with self._lock:
            return copy.deepcopy(self._server.db.tables["task_run"].where("flow_run_id", run_id))

    def flow(self, flow_id: str) -> dict[str, Any]:
        """A deep copy of the flow row."""
        with self._lock:
            return copy.deepcopy(self._row("flow", flow_id))

    def states(self, run_id: str) -> list[dict[str, Any]]:
        """The run's state history, oldest first: ``{version, type, message, serialized, timestamp}``."""
        with self._lock:
            rows = self._server.db.tables["flow_run_state"].where("flow_run_id", run_id)
            rows = sorted(rows, key=lambda row: (row["version"], row["timestamp"]))
            return [
                {
                    "version": row["version"],
                    "type": row["state"],
                    "message": row["message"],
                    "serialized": copy.deepcopy(row["serialized_state"]),
                    "timestamp": row["timestamp"],
                }
                for row in rows
            ]

    def logs(self, run_id: str) -> list[dict[str, Any]]:
        """Deep copies of the run's log rows, in the order they were written."""
        with self._lock:
            return copy.deepcopy(self._server.db.tables["log"].where("flow_run_id", run_id))

    def agents(self) -> list[dict[str, Any]]:
        """Deep copies of the registered agents."""
        with self._lock:
            return copy.deepcopy(list(self._server.db.tables["agent"].rows.values()))

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every POST received so far, oldest first (a snapshot)."""
        with self._lock:
            return list(self._requests)

    def root_calls(self, name: str) -> list[RecordedRequest]:
        """The recorded requests whose operation selects root field ``name``."""
        return [request for request in self.requests if name in request.roots]

    @property
    def server_errors(self) -> list[str]:
        """Tracebacks of unexpected exceptions in the double (a test should expect none)."""
        with self._lock:
            return list(self._server_errors)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Poll ``predicate`` under the lock until it is true or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if predicate():
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    # Fault injection.

    def fail_next(
        self,
        n: int = 1,
        *,
        status: int | None = None,
        body: bytes | None = None,
        delay: float = 0.0,
        drop_connection: bool = False,
        graphql_error: str | None = None,
        code: str | None = None,
        only_root: str | None = None,
        after_processing: bool = False,
    ) -> None:
        """Make the next ``n`` POSTs (selecting ``only_root``, if given) fail.

        Each request consumes the first matching fault. After ``delay`` seconds the request
        is hung up on (``drop_connection``), answered with ``status``/``body`` (raw), or
        with a GraphQL error ``graphql_error`` (HTTP 200, ``extensions.code`` = ``code``,
        default ``INTERNAL_SERVER_ERROR``); with none of these it is then served normally.
        With ``after_processing`` the request is served first (a write takes effect) and
        only its answer is replaced: the client cannot tell whether it landed.
        """
        fault = _Fault(n, status, body, delay, drop_connection, graphql_error, code, only_root, after_processing)
        with self._lock:
            self._faults.append(fault)

    def set_down(self, down: bool, *, mode: str = "500") -> None:
        """While down, every request fails: ``"500"`` (HTTP 500), ``"drop"`` (hang up) or
        ``"slow"`` (held until the double is up again, then served)."""
        if mode not in ("500", "drop", "slow"):
            raise ValueError(f"unknown mode {mode!r}; use '500', 'drop' or 'slow'")
        with self._lock:
            self._down_mode = mode if down else None
            if down and mode == "slow":
                self._up.clear()
            else:
                self._up.set()

    # Request handling (called on the server's threads).

    def _row(self, table: str, row_id: str) -> _Row:
        row = self._server.db.get(table, row_id)
        if row is None:
            raise KeyError(f"no {table} with id {row_id!r}")
        return row

    def _serve(self, handler: _Handler) -> None:
        arrived = time.time()
        headers = {name.lower(): value for name, value in handler.headers.items()}
        length = int(headers.get("content-length") or 0)
        body = _decode_body(handler.rfile.read(length) if length > 0 else b"")
        roots = self._root_names(body)
        reply = _Reply(0, None) if self._stopped else self._answer(body, roots, headers)
        query = sys.intern(body.query)  # agents resend the same few documents
        record = RecordedRequest(
            handler.path, headers, query, body.variables, roots, reply.status, arrived, body.variables_as_text
        )
        with self._lock:
            self._requests.append(record)
        handler.reply(reply)

    def _answer(self, body: _Body, roots: list[str], headers: dict[str, str]) -> _Reply:
        """Outages and faults first, then the GraphQL pipeline."""
        outage = self._outage()
        if outage is not None:
            return outage
        fault = self._take_fault(roots)
        if fault is not None:
            time.sleep(fault.delay)
            injected = fault.reply(roots)
            if injected is not None:
                if fault.after_processing and body.problem is None:
                    self._answer_normally(body, headers)  # the write happens; its answer is lost
                return injected
        return self._answer_normally(body, headers)

    def _answer_normally(self, body: _Body, headers: dict[str, str]) -> _Reply:
        """The GraphQL pipeline: parse, validate, execute."""
        if body.problem is not None:
            return _json_reply(400, {"errors": [{"message": body.problem}]})
        try:
            return self._execute(body, headers)
        except GraphQLError as error:
            return _graphql_error_reply(error, body.query)
        except Exception:  # a bug in the double: answer 500, keep serving, keep the trace
            with self._lock:
                self._server_errors.append(traceback.format_exc())
            return _json_reply(500, {"errors": [{"message": "Internal error in the Prefect double."}]})

    def _outage(self) -> _Reply | None:
        with self._lock:
            mode = self._down_mode
        if mode == "500":
            return _Reply(500, b"Internal Server Error", "text/plain")
        if mode == "drop":
            return _Reply(0, None)
        if mode == "slow":
            self._up.wait()
            return _Reply(0, None) if self._stopped else None
        return None

    def _take_fault(self, roots: list[str]) -> _Fault | None:
        with self._lock:
            fault = next((fault for fault in self._faults if fault.applies_to(roots)), None)
            if fault is not None:
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
            return fault

    def _prepare(self, body: _Body) -> tuple[_Document, _Operation]:
        """Parse, pick the operation and validate it (cached per query text)."""
        key = (body.query, body.operation_name)
        prepared = self._prepared.get(key)
        if prepared is None:
            document = _parse_document(body.query)
            operation = document.operation(body.operation_name)
            _Validator(self._inputs.schema, operation).validate()
            if len(self._prepared) >= 1024:
                self._prepared.clear()
            prepared = self._prepared[key] = (document, operation)
        return prepared

    def _root_names(self, body: _Body) -> list[str]:
        try:
            return [field.name for field in _parse_document(body.query).operation(body.operation_name).selections]
        except GraphQLError:
            return []

    def _execute(self, body: _Body, headers: dict[str, str]) -> _Reply:
        document, operation = self._prepare(body)
        variables = self._inputs.variables(operation, body.variables)
        context = _Context(headers)
        with self._lock:
            execution = _Execution(
                self._server, self._inputs, document, operation, variables, context, self._auth_error(headers)
            )
            reply = _json_reply(200, execution.run())
            self._server_errors.extend(execution.crashes)
            return reply

    def _auth_error(self, headers: dict[str, str]) -> str | None:
        """Prefect Cloud's answer to a missing or wrong credential (issues #3272, #1454)."""
        if self._require_token is None:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme and (scheme != "Bearer" or not token.strip()):
            return "Malformed Authorization header"
        return None if token == self._require_token else "AuthenticationError: Forbidden"
