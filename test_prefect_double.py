"""Tests of the Prefect Server 1.x double (prefect_double.py) on its own.

The double stands in for Prefect Server in test_local_agent.py, so it is tested here: each
rule it claims to copy from Server is checked over real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
import zoneinfo
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

import local_agent
import prefect_double as double_module
from prefect_double import PrefectServerDouble

UTC = timezone.utc
FAR_FUTURE = "2100-01-01T00:00:00+00:00"
STORAGE = {"type": "Local", "directory": "/tmp/flows", "flows": {"hello": "/tmp/flows/hello"}}
DROPPED = (urllib.error.URLError, http.client.RemoteDisconnected, ConnectionError)

# The documents a 1.x agent and flow-run process send (protocol reference §3), with
# inline values written as <name> and filled in JSON-quoted by fill().
TENANT = "query {\n    tenant {\n        id\n    }\n}"
AUTH_INFO = "query {\n    auth_info {\n        tenant_id\n    }\n}"
REGISTER_AGENT = "mutation($input: register_agent_input!) { register_agent(input: $input) { id } }"
GET_RUNS = "mutation($input: get_runs_in_queue_input!) { get_runs_in_queue(input: $input) { flow_run_ids } }"
METADATA = """query {
    flow_run(where: { id: { _in: <ids> }, _or: [{ state: { _eq: "Scheduled" } },
             { state: { _eq: "Running" }, task_runs: { state_start_time: { _lte: <now> } } }] }) {
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
        task_runs(where: { state_start_time: { _lte: <now> } }) {
            version
            id
            serialized_state
            task_id
        }
    }
}"""
SET_STATES = """mutation($input: set_flow_run_states_input!) {
    set_flow_run_states(input: $input) { states { id status message } }
}"""
SET_TASK_STATES = """mutation($input: set_task_run_states_input!) {
    set_task_run_states(input: $input) { states { id status message } }
}"""
WRITE_LOGS = "mutation($input: write_run_logs_input!) { write_run_logs(input: $input) { success } }"
RUN_BY_PK = """query {
    flow_run_by_pk(id: <id>) {
        id name version state serialized_state parameters context labels scheduled_start_time flow_id
        flow { id name storage run_config project { name } }
    }
}"""
HEARTBEAT = "mutation {\n    update_flow_run_heartbeat(input: { flow_run_id: <id> }) {\n        success\n    }\n}"
PROJECT = "query { project(where: { name: { _eq: <name> } }) { id } }"
CREATE_PROJECT = "mutation($input: create_project_input!) { create_project(input: $input) { id } }"
CREATE_FLOW = """mutation($input: create_flow_from_compressed_string_input!) {
    create_flow_from_compressed_string(input: $input) { id }
}"""
LATEST_FLOW = """query {
    flow(where: { name: { _eq: <name> }, archived: { _eq: false } }, order_by: { version: desc }, limit: 1) {
        id name version
    }
}"""
CREATE_RUN = "mutation($input: create_flow_run_input!) { create_flow_run(input: $input) { id } }"
RUN_LIST = """query {
    flow_run(where: <where>, order_by: { scheduled_start_time: desc }, limit: 20) {
        id name state state_message scheduled_start_time updated labels flow { name storage }
    }
}"""
LOGS = """query {
    log(where: { flow_run_id: { _eq: <id> } }, order_by: [{ timestamp: asc }, { id: asc }], offset: <offset>) {
        id timestamp level name message
    }
}"""
FLOW_LIST = """query {
    flow(where: { archived: { _eq: false } }, order_by: { name: asc }) {
        id name version storage run_config environment project { name }
    }
}"""
RUNS_BY_ID = "query { flow_run(where: { id: { _in: <ids> } }) { id state version } }"
CANCEL = "mutation($input: cancel_flow_run_input!) { cancel_flow_run(input: $input) { state } }"


# --- Helpers -------------------------------------------------------------------------


def fill(document: str, **values: Any) -> str:
    """Put values inline in a document, quoted with json.dumps as Prefect's client does."""
    for name, value in values.items():
        document = document.replace(f"<{name}>", value if name == "where" else json.dumps(value))
    return document


def post_raw(
    api: PrefectServerDouble, body: bytes, *, headers: dict[str, str] | None = None, path: str = "/"
) -> tuple[int, Any]:
    """POST raw bytes; the answer is decoded JSON, or the raw bytes when it is not JSON."""
    request = urllib.request.Request(
        api.url + path, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def gql(
    api: PrefectServerDouble,
    query: str,
    variables: dict[str, Any] | None = None,
    *,
    as_object: bool = False,
    headers: dict[str, str] | None = None,
    path: str = "/",
) -> tuple[int, Any]:
    """POST a document like Prefect's client (variables JSON-encoded unless ``as_object``)."""
    payload = {"query": query, "variables": variables if as_object else json.dumps(variables)}
    return post_raw(api, json.dumps(payload).encode(), headers=headers, path=path)


def data(api: PrefectServerDouble, query: str, variables: dict[str, Any] | None = None, **kw: Any) -> Any:
    """The ``data`` of a successful answer."""
    status, answer = gql(api, query, variables, **kw)
    assert status == 200 and "errors" not in answer, answer
    return answer["data"]


def error_of(
    api: PrefectServerDouble, query: str, variables: dict[str, Any] | None = None, **kw: Any
) -> dict[str, Any]:
    """The single resolver error of an HTTP 200 answer."""
    status, answer = gql(api, query, variables, **kw)
    assert status == 200 and len(answer["errors"]) == 1, answer
    return dict(answer["errors"][0])


def register_agent(api: PrefectServerDouble, labels: list[str], **kw: Any) -> str:
    variables = {"input": {"type": "LocalAgent", "name": "agent", "labels": labels, "tenant_id": api.tenant_id}}
    return str(data(api, REGISTER_AGENT, variables, **kw)["register_agent"]["id"])


def queue(api: PrefectServerDouble, labels: list[str], before: str = FAR_FUTURE, **kw: Any) -> list[str]:
    variables = {"input": {"tenant_id": api.tenant_id, "labels": labels, "before": before}}
    return list(data(api, GET_RUNS, variables, **kw)["get_runs_in_queue"]["flow_run_ids"])


def state(state_type: str, message: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": state_type, "message": message, "context": {}, "__version__": "1.4.1", **extra}


def set_flow_state(
    api: PrefectServerDouble, run_id: str, payload: dict[str, Any], version: int | None = None, **kw: Any
) -> dict[str, Any]:
    """The whole HTTP 200 answer to one ``set_flow_run_states`` write."""
    variables = {"input": {"states": [{"flow_run_id": run_id, "version": version, "state": payload}]}}
    status, answer = gql(api, SET_STATES, variables, **kw)
    assert status == 200, answer
    return dict(answer)


def set_task_state(api: PrefectServerDouble, task_run_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    variables = {"input": {"states": [{"task_run_id": task_run_id, "version": None, "state": payload}]}}
    return dict(gql(api, SET_TASK_STATES, variables)[1])


def serialized_flow(name: str, **extra: Any) -> dict[str, Any]:
    """A flow as Prefect 1.4.1 serializes it for registration (protocol reference §4.3)."""
    flow: dict[str, Any] = {
        "name": name,
        "type": "prefect.core.flow.Flow",
        "schedule": None,
        "parameters": [],
        "reference_tasks": [],
        "storage": STORAGE,
        "run_config": {"labels": ["extra", "vm"], "env": None, "__version__": "1.4.1", "type": "UniversalRun"},
        "__version__": "1.4.1",
    }
    return {**flow, **extra}


def register_flow(api: PrefectServerDouble, project_id: str, flow: Any, **extra: Any) -> dict[str, Any]:
    """The whole answer to ``create_flow_from_compressed_string``."""
    compressed = base64.b64encode(gzip.compress(json.dumps(flow).encode())).decode()
    variables = {"input": {"project_id": project_id, "serialized_flow": compressed, **extra}}
    return dict(gql(api, CREATE_FLOW, variables)[1])


@pytest.fixture
def api() -> Iterator[PrefectServerDouble]:
    with PrefectServerDouble() as double:
        yield double
        assert double.server_errors == []


@pytest.fixture
def flow_id(api: PrefectServerDouble) -> str:
    return api.add_flow("hello", STORAGE, labels=["dev"])


# --- Transport and the GraphQL layer -------------------------------------------------


def test_all_lists_the_public_names() -> None:
    defined = {
        name
        for name, value in vars(double_module).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == double_module.__name__
    }
    assert set(double_module.__all__) == defined


@pytest.mark.parametrize("as_object", [False, True])
def test_variables_as_a_json_string_or_an_object(api: PrefectServerDouble, as_object: bool) -> None:
    assert data(api, TENANT, as_object=as_object) == {"tenant": [{"id": api.tenant_id}]}
    assert data(api, "query { hello }", as_object=as_object) == {"hello": "👋"}
    variables = {"input": {"type": "LocalAgent", "name": "agent", "labels": ["vm"], "tenant_id": api.tenant_id}}
    agent_id = data(api, REGISTER_AGENT, variables, as_object=as_object)["register_agent"]["id"]
    assert [agent["id"] for agent in api.agents()] == [agent_id]
    assert api.requests[-1].variables == variables and api.requests[-1].roots == ["register_agent"]


def test_null_variables_and_any_path(api: PrefectServerDouble) -> None:
    status, answer = post_raw(api, b'{"query": "{ hello }", "variables": "null"}', path="/graphql/alpha")
    assert (status, answer) == (200, {"data": {"hello": "👋"}})
    assert api.requests[-1].path == "/graphql/alpha" and api.requests[-1].variables is None


def test_answers_only_the_selection_under_its_aliases(api: PrefectServerDouble, flow_id: str) -> None:
    run_id = api.add_flow_run(flow_id, name="fuzzy-fish", parameters={"x": 1})
    row = data(api, fill(RUN_BY_PK, id=run_id))["flow_run_by_pk"]
    assert list(row) == [
        "id", "name", "version", "state", "serialized_state", "parameters", "context", "labels",
        "scheduled_start_time", "flow_id", "flow",
    ]  # fmt: skip
    assert (row["name"], row["version"], row["parameters"], row["labels"]) == ("fuzzy-fish", 1, {"x": 1}, ["dev"])
    assert row["flow"] == {
        "id": flow_id, "name": "hello", "storage": STORAGE, "run_config": api.flow(flow_id)["run_config"],
        "project": {"name": "test"},
    }  # fmt: skip
    aliased = fill("query { r: flow_run_by_pk(id: <id>) { __typename v: version } }", id=run_id)
    assert data(api, aliased) == {"r": {"__typename": "flow_run", "v": 1}}
    assert data(api, fill("query { flow_run_by_pk(id: <id>) { id } }", id=flow_id)) == {"flow_run_by_pk": None}


def test_auth_info_exists_only_in_cloud_mode(api: PrefectServerDouble) -> None:
    status, answer = gql(api, AUTH_INFO)
    assert status == 400
    assert answer["errors"][0]["message"] == 'Cannot query field "auth_info" on type "Query".'
    with PrefectServerDouble(cloud=True) as cloud:
        assert data(cloud, AUTH_INFO) == {"auth_info": {"tenant_id": cloud.tenant_id}}
        # Cloud infers the tenant when an old agent sends tenant_id: null.
        variables: dict[str, Any] = {"input": {"tenant_id": None, "labels": [], "before": FAR_FUTURE}}
        assert data(cloud, GET_RUNS, variables) == {"get_runs_in_queue": {"flow_run_ids": []}}


VALIDATION = "GRAPHQL_VALIDATION_FAILED"
COERCION = "INTERNAL_SERVER_ERROR"  # Apollo Server 2's code for variable coercion failures


@pytest.mark.parametrize(
    "query, variables, code, message",
    [
        ("query { nope }", None, VALIDATION, 'Cannot query field "nope" on type "Query".'),
        (
            "query { hello { x } }",
            None,
            VALIDATION,
            'Field "hello" must not have a selection since type "String" has no subfields.',
        ),
        (
            "query { tenant }",
            None,
            VALIDATION,
            'Field "tenant" of type "[tenant!]!" must have a selection of subfields. Did you mean "tenant { ... }"?',
        ),
        ("query { tenant(first: 1) { id } }", None, VALIDATION, 'Unknown argument "first" on field "Query.tenant".'),
        (
            "mutation { cancel_flow_run { state } }",
            None,
            VALIDATION,
            'Field "cancel_flow_run" argument "input" of type "cancel_flow_run_input!" is required, '
            "but it was not provided.",
        ),
        (
            "mutation { get_runs_in_queue(input: { labels: [] }) { flow_run_ids } }",
            None,
            VALIDATION,
            'Field "get_runs_in_queue_input.tenant_id" of required type "UUID!" was not provided.',
        ),
        (
            "query { flow(where: { nope: { _eq: 1 } }) { id } }",
            None,
            VALIDATION,
            'Field "nope" is not defined by type "flow_bool_exp".',
        ),
        (
            'query { flow(order_by: { name: "asc" }) { id } }',
            None,
            VALIDATION,
            'Enum "order_by" cannot represent non-enum value: "asc".',
        ),
        ("query { tenant(where: $w) { id } }", None, VALIDATION, 'Variable "$w" is not defined.'),
        ("query($x: Foo) { hello }", None, VALIDATION, 'Unknown type "Foo".'),
        ("query($x: String) { hello }", None, VALIDATION, 'Variable "$x" is never used.'),
        (
            "{ ...f } fragment f on Query { hello }",
            None,
            VALIDATION,
            "Fragments are not supported by this test double.",
        ),
        ("query { hello ", None, "GRAPHQL_PARSE_FAILED", "Syntax Error: Expected Name, found <EOF>."),
        (
            GET_RUNS,
            {"input": {"labels": []}},
            COERCION,
            'Variable "$input" got invalid value {"labels": []}; Field "tenant_id" of required type "UUID!" '
            "was not provided.",
        ),
        (GET_RUNS, None, COERCION, 'Variable "$input" of required type "get_runs_in_queue_input!" was not provided.'),
        (
            WRITE_LOGS,
            {"input": {"logs": [{"flow_run_id": "x", "level": "LOUD"}]}},
            COERCION,
            'Variable "$input" got invalid value "LOUD" at "input.logs[0].level"; '
            'Value "LOUD" does not exist in "log_level" enum.',
        ),
    ],
)
def test_rejected_documents_get_http_400(
    api: PrefectServerDouble, query: str, variables: Any, code: str, message: str
) -> None:
    status, answer = gql(api, query, variables)
    assert status == 400
    assert answer["errors"][0]["message"] == message
    assert answer["errors"][0]["extensions"] == {"code": code}


def test_transport_errors_and_other_methods(api: PrefectServerDouble) -> None:
    assert post_raw(api, b"not json")[0] == 400
    assert post_raw(api, b'{"variables": {}}') == (400, {"errors": [{"message": "Must provide query string."}]})
    assert post_raw(api, b'{"query": "{ hello }", "variables": "{"}')[0] == 400
    with urllib.request.urlopen(api.url, timeout=5) as response:
        assert json.loads(response.read()) == {"status": "pass"}
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(urllib.request.Request(api.url, data=b"{}", method="PUT"), timeout=5)
    with raised.value as rejected:
        assert rejected.code == 400


def test_keep_alive_serves_several_requests_on_one_connection(api: PrefectServerDouble) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", int(api.url.rsplit(":", 1)[1]), timeout=5)
    started = time.monotonic()
    for _ in range(20):
        body = json.dumps({"query": "{ hello }", "variables": "null"})
        connection.request("POST", "/", body, {"Content-Type": "application/json"})
        assert json.loads(connection.getresponse().read()) == {"data": {"hello": "👋"}}
    connection.close()
    assert time.monotonic() - started < 0.5  # no Nagle/delayed-ACK stalls between requests


# --- Agents and the queue ------------------------------------------------------------


def test_register_agent_deduplicates_like_server(api: PrefectServerDouble) -> None:
    first = register_agent(api, ["b", "a"], headers={"X-PREFECT-CORE-VERSION": "1.4.1"})
    assert register_agent(api, ["a", "b"], headers={"X-PREFECT-CORE-VERSION": "1.4.1"}) == first
    assert register_agent(api, ["a", "b"], headers={"X-PREFECT-CORE-VERSION": "1.3.0"}) != first
    assert register_agent(api, ["a"], headers={"X-PREFECT-CORE-VERSION": "1.4.1"}) != first
    agent = api.agents()[0]
    assert (agent["labels"], agent["core_version"], agent["type"]) == (["a", "b"], "1.4.1", "LocalAgent")


def test_queue_label_rules(api: PrefectServerDouble) -> None:
    dev = api.add_flow_run(api.add_flow("a", STORAGE, labels=["dev"]))
    dev_vm = api.add_flow_run(api.add_flow("b", STORAGE, labels=["vm", "dev"]))
    bare = api.add_flow_run(api.add_flow("c", STORAGE))
    assert api.run(dev_vm)["labels"] == ["dev", "vm"]
    assert queue(api, ["dev"]) == [dev]  # run labels must be a subset of the agent's
    assert queue(api, ["dev", "vm", "other"]) == [dev, dev_vm]
    assert queue(api, []) == [bare]  # an unlabeled run only goes to an unlabeled agent


def test_queue_before_ordering_limit_and_no_claim(api: PrefectServerDouble, flow_id: str) -> None:
    now = datetime.now(UTC)
    later = api.add_flow_run(flow_id, scheduled_start_time=now + timedelta(hours=1))
    runs = [api.add_flow_run(flow_id, scheduled_start_time=now - timedelta(minutes=i)) for i in range(30)]
    due = queue(api, ["dev"], before=now.isoformat())
    assert due == list(reversed(runs))[:25]  # oldest first, at most 25
    assert later not in due
    in_two_hours = (now + timedelta(hours=2)).astimezone(timezone(timedelta(hours=2))).isoformat()
    assert queue(api, ["dev"], before=in_two_hours) == due  # offsets compare as instants
    assert queue(api, ["dev"], before=now.isoformat()) == due  # polling claims nothing
    assert {api.run(run_id)["state"] for run_id in due} == {"Scheduled"}


def test_queue_records_the_agent_as_last_queried(api: PrefectServerDouble) -> None:
    agent_id = register_agent(api, [])
    assert api.agents()[0]["last_queried"] is None
    queue(api, [], headers={"X-PREFECT-AGENT-ID": agent_id})
    assert api.agents()[0]["last_queried"] is not None


def test_running_run_with_a_due_task_run_is_queued(api: PrefectServerDouble) -> None:
    run_id = api.add_flow_run(api.add_flow("tasks", STORAGE, labels=["dev"], tasks=["t-1"]))
    api.set_state(run_id, "Running")
    assert queue(api, ["dev"]) == []
    retry = state("Retrying", "retry", start_time=datetime.now(UTC).isoformat(), run_count=1)
    assert set_task_state(api, api.task_runs(run_id)[0]["id"], retry)["data"] is not None
    assert queue(api, ["dev"]) == [run_id]
    rows = data(api, fill(METADATA, ids=[run_id], now=FAR_FUTURE))["flow_run"]
    assert [row["id"] for row in rows] == [run_id]
    assert rows[0]["task_runs"][0]["serialized_state"]["type"] == "Retrying"
    assert rows[0]["flow"]["core_version"] == "1.4.1" and rows[0]["run_config"]["labels"] == ["dev"]


def test_metadata_query_skips_runs_already_submitted(api: PrefectServerDouble, flow_id: str) -> None:
    scheduled, submitted = api.add_flow_run(flow_id), api.add_flow_run(flow_id)
    api.set_state(submitted, "Submitted")
    rows = data(api, fill(METADATA, ids=[scheduled, submitted], now=FAR_FUTURE))["flow_run"]
    assert [row["id"] for row in rows] == [scheduled]


# --- State writes --------------------------------------------------------------------


def test_every_state_write_bumps_the_version(api: PrefectServerDouble, flow_id: str) -> None:
    agent_id = register_agent(api, ["dev"])
    run_id = api.add_flow_run(flow_id)
    submitted = state("Submitted", "Submitted for execution", state=api.run(run_id)["serialized_state"])
    answer = set_flow_state(api, run_id, submitted, 1, headers={"X-PREFECT-AGENT-ID": agent_id})
    assert answer == {
        "data": {"set_flow_run_states": {"states": [{"id": run_id, "status": "SUCCESS", "message": None}]}}
    }
    run = api.run(run_id)
    assert (run["version"], run["state"], run["agent_id"]) == (2, "Submitted", agent_id)
    assert run["heartbeat"] is not None and run["state_start_time"] is None
    set_flow_state(api, run_id, state("Running", "Running flow."), 2)
    set_flow_state(api, run_id, state("Success", "All reference tasks succeeded."), None)
    history = api.states(run_id)
    assert [(entry["version"], entry["type"]) for entry in history] == [
        (0, "Pending"), (1, "Scheduled"), (2, "Submitted"), (3, "Running"), (4, "Success"),
    ]  # fmt: skip
    run = api.run(run_id)
    assert (run["version"], run["state_message"]) == (4, "All reference tasks succeeded.")
    assert run["start_time"] == history[3]["timestamp"] and run["end_time"] == history[4]["timestamp"]


def test_server_does_not_compare_versions(api: PrefectServerDouble, flow_id: str) -> None:
    run_id = api.add_flow_run(flow_id)
    assert "errors" not in set_flow_state(api, run_id, state("Running"), version=99)
    assert api.run(run_id)["version"] == 2


def test_second_submitted_within_the_guard_window_fails() -> None:
    with PrefectServerDouble(submitted_guard_seconds=0.2) as api:
        run_id = api.add_flow_run(api.add_flow("hello", STORAGE))
        assert "errors" not in set_flow_state(api, run_id, state("Submitted"), 1)
        answer = set_flow_state(api, run_id, state("Submitted"), 1)
        assert answer["data"] == {"set_flow_run_states": None}
        assert answer["errors"][0]["message"] == "State update failed: this run has already been submitted."
        assert answer["errors"][0]["path"] == ["set_flow_run_states"]
        time.sleep(0.25)
        assert "errors" not in set_flow_state(api, run_id, state("Submitted"), 2)
        assert api.run(run_id)["version"] == 3


def test_unknown_runs_and_bad_states_fail_without_writing(api: PrefectServerDouble, flow_id: str) -> None:
    missing = "00000000-0000-0000-0000-000000000000"
    error = set_flow_state(api, missing, state("Running"), 1)["errors"][0]
    assert error["message"] == f"State update failed for flow run ID {missing}"
    assert error["extensions"] == {"code": "INTERNAL_SERVER_ERROR"}
    assert error["locations"] == [{"line": 2, "column": 5}]
    run_id = api.add_flow_run(flow_id)
    assert "Unsupported value: Bogus" in set_flow_state(api, run_id, state("Bogus"))["errors"][0]["message"]
    huge = state("Running", "x" * 1_000_001)
    assert set_flow_state(api, run_id, huge)["errors"][0]["message"] == "State payload is too large."
    assert api.run(run_id)["version"] == 1


def test_version_locking_mode_rejects_stale_versions() -> None:
    with PrefectServerDouble(version_locking=True) as api:
        run_id = api.add_flow_run(api.add_flow("hello", STORAGE))
        assert "errors" not in set_flow_state(api, run_id, state("Submitted"), 1)
        error = set_flow_state(api, run_id, state("Failed"), 1)["errors"][0]
        assert error["message"] == (
            f"State update failed for flow run ID {run_id}: provided version 1 but current version is 2."
        )
        assert error["extensions"] == {"code": "VERSION_LOCKING_ERROR"}
        assert "errors" not in set_flow_state(api, run_id, state("Running"), None)  # null skips the check


def test_task_runs_are_precreated_and_run_only_in_a_running_flow_run(api: PrefectServerDouble) -> None:
    run_id = api.add_flow_run(api.add_flow("tasks", STORAGE, tasks=["t-1"]))
    task_run = api.task_runs(run_id)[0]
    assert (task_run["version"], task_run["state"], task_run["map_index"]) == (0, "Pending", -1)
    assert task_run["serialized_state"] == {"type": "Pending", "message": "Task run created"}
    assert "is not in a running state" in set_task_state(api, task_run["id"], state("Running"))["errors"][0]["message"]
    api.set_state(run_id, "Running")
    assert set_task_state(api, task_run["id"], state("Running"))["data"] is not None
    info = f"mutation {{ get_or_create_task_run_info(input: {{ flow_run_id: {json.dumps(run_id)}, task_id: "
    info += f"{json.dumps(task_run['task_id'])}, map_index: -1 }}) {{ id version state }} }}"
    assert data(api, info) == {"get_or_create_task_run_info": {"id": task_run["id"], "version": 1, "state": "Running"}}


# --- Logs and heartbeats -------------------------------------------------------------


def test_write_run_logs_coerces_a_single_object_and_defaults_the_timestamp(
    api: PrefectServerDouble, flow_id: str
) -> None:
    run_id = api.add_flow_run(flow_id)
    logs = [
        {"flow_run_id": run_id, "name": "prefect.CloudFlowRunner", "message": f"line {i}", "level": "INFO",
         "timestamp": f"2026-11-25T14:43:5{i}.236616+00:00"}
        for i in range(3)
    ]  # fmt: skip
    assert data(api, WRITE_LOGS, {"input": {"logs": logs}}) == {"write_run_logs": {"success": True}}
    single = {"flow_run_id": run_id, "name": "agent", "message": "Submitted for execution: PID: 1"}
    assert data(api, WRITE_LOGS, {"input": {"logs": single}}) == {"write_run_logs": {"success": True}}
    inline = (
        "mutation { write_run_logs(input: { logs: { flow_run_id: <id>, message: <m>, level: ERROR } }) { success } }"
    )
    data(api, fill(inline, id=run_id, m="inline"))
    stored = api.logs(run_id)
    assert [log["message"] for log in stored] == [
        "line 0",
        "line 1",
        "line 2",
        "Submitted for execution: PID: 1",
        "inline",
    ]
    assert stored[3]["level"] == "INFO" and stored[3]["timestamp"] > stored[2]["timestamp"]
    rows = data(api, fill(LOGS, id=run_id, offset=3))["log"]
    assert [(row["level"], row["name"], row["message"]) for row in rows] == [
        ("INFO", "agent", "Submitted for execution: PID: 1"), ("ERROR", None, "inline"),
    ]  # fmt: skip


def test_inline_heartbeat(api: PrefectServerDouble, flow_id: str) -> None:
    run_id = api.add_flow_run(flow_id)
    answer = data(api, fill(HEARTBEAT, id=run_id), headers={"X-PREFECT-HEARTBEAT-ID": run_id})
    assert answer == {"update_flow_run_heartbeat": {"success": True}}
    assert api.run(run_id)["heartbeat"] is not None
    assert api.root_calls("update_flow_run_heartbeat")[0].headers["x-prefect-heartbeat-id"] == run_id


# --- Registration --------------------------------------------------------------------


def test_projects(api: PrefectServerDouble) -> None:
    assert data(api, fill(PROJECT, name="proj")) == {"project": []}
    variables = {"input": {"name": "proj", "description": None, "tenant_id": api.tenant_id}}
    project_id = data(api, CREATE_PROJECT, variables)["create_project"]["id"]
    assert data(api, fill(PROJECT, name="proj")) == {"project": [{"id": project_id}]}
    assert error_of(api, CREATE_PROJECT, variables)["message"] == "Uniqueness violation."


def test_compressed_registration_versions_and_archives(api: PrefectServerDouble) -> None:
    project_id = api.add_project("proj")

    def register(flow: dict[str, Any], **extra: Any) -> str:
        return str(register_flow(api, project_id, flow, **extra)["data"]["create_flow_from_compressed_string"]["id"])

    first = register(serialized_flow("reg-demo"), set_schedule_active=False, version_group_id=None)
    old_run = api.add_flow_run(first)
    second = register(serialized_flow("reg-demo"), idempotency_key="k1")
    assert register(serialized_flow("reg-demo"), idempotency_key="k1") == second
    other = register(serialized_flow("other"))
    assert [api.flow(flow)["version"] for flow in (first, second, other)] == [1, 2, 1]
    assert api.flow(first)["archived"] and not api.flow(second)["archived"]
    assert api.flow(second)["storage"] == STORAGE and api.flow(second)["core_version"] == "1.4.1"
    # Archiving cancelled the old version's scheduled run, and it can no longer be run.
    assert (api.run(old_run)["state"], api.run(old_run)["state_message"]) == (
        "Cancelled",
        f"Flow {first} was archived.",
    )
    assert error_of(api, CREATE_RUN, {"input": {"flow_id": first}})["message"] == f"Flow {first} is archived."
    assert data(api, fill(LATEST_FLOW, name="reg-demo")) == {"flow": [{"id": second, "name": "reg-demo", "version": 2}]}
    listing = data(api, FLOW_LIST)["flow"]
    assert [(row["name"], row["project"]) for row in listing] == [
        ("other", {"name": "proj"}),
        ("reg-demo", {"name": "proj"}),
    ]


def test_tasks_registered_separately_get_task_runs(api: PrefectServerDouble) -> None:
    project_id = api.add_project("proj")
    flow_id = register_flow(api, project_id, serialized_flow("split"))["data"]["create_flow_from_compressed_string"][
        "id"
    ]
    tasks = [{"slug": "hello-1", "name": "hello", "inputs": {}}, {"slug": "bye-1", "name": "bye"}]
    register = "mutation($input: register_tasks_input!) { register_tasks(input: $input) { success } }"
    assert data(api, register, {"input": {"flow_id": flow_id, "serialized_tasks": tasks}})["register_tasks"]["success"]
    edges = [{"upstream_task": {"slug": "hello-1"}, "downstream_task": {"slug": "bye-1"}, "key": None}]
    register = "mutation($input: register_edges_input!) { register_edges(input: $input) { success } }"
    assert data(api, register, {"input": {"flow_id": flow_id, "serialized_edges": edges}})["register_edges"]["success"]
    run_id = api.add_flow_run(flow_id)
    query = fill("query { flow_run_by_pk(id: <id>) { task_runs { task { slug } } } }", id=run_id)
    slugs = [row["task"]["slug"] for row in data(api, query)["flow_run_by_pk"]["task_runs"]]
    assert sorted(slugs) == ["bye-1", "hello-1"]


def test_registration_validates_the_flow_like_server(api: PrefectServerDouble) -> None:
    project_id = api.add_project("proj")

    def error(flow: Any) -> str:
        return str(register_flow(api, project_id, flow)["errors"][0]["message"])

    assert error(serialized_flow("x", tasks=[{"name": "no slug"}])) == (
        "1 validation error for FlowSchema\ntasks -> 0 -> slug\n  field required (type=value_error.missing)"
    )
    assert error(serialized_flow("x", __version__="0.5.0")).endswith("this flow was built with Prefect 0.5.0.")
    assert error(serialized_flow("x", parameters={"x": 1})).endswith("value is not a valid list (type=type_error.list)")
    assert register_flow(api, "00000000-0000-0000-0000-000000000000", serialized_flow("x"))["errors"][0]["message"] == (
        "Invalid project."
    )
    variables = {"input": {"project_id": project_id, "serialized_flow": "not base64 gzip"}}
    assert error_of(api, CREATE_FLOW, variables)["message"] == "Unable to decompress serialized flow"


# --- Flow runs -----------------------------------------------------------------------


def test_create_flow_run_infers_labels_and_checks_parameters(api: PrefectServerDouble) -> None:
    parameters = [{"name": "x", "required": True, "default": None}]
    flow_id = api.add_flow("params", STORAGE, labels=["b", "a"], parameters=parameters)

    def create(**extra: Any) -> str:
        variables = {"input": {"flow_id": flow_id, "parameters": {"x": 1}, **extra}}
        return str(data(api, CREATE_RUN, variables)["create_flow_run"]["id"])

    assert api.run(create())["labels"] == ["a", "b"]  # from the flow's run config, sorted
    assert api.run(create(labels=["z", "y"]))["labels"] == ["y", "z"]
    assert api.run(create(labels=[]))["labels"] == []
    with_config = api.run(create(run_config={"type": "LocalRun", "labels": ["rc"]}))
    assert with_config["labels"] == ["rc"] and with_config["run_config"]["type"] == "LocalRun"
    error = error_of(api, CREATE_RUN, {"input": {"flow_id": flow_id}})
    assert error["message"] == "Required parameters were not supplied: {'x'}"
    assert create(idempotency_key="same") == create(idempotency_key="same")
    run = api.run(create(flow_run_name="named", scheduled_start_time="2026-01-01T10:00:00+02:00"))
    assert run["name"] == "named" and run["scheduled_start_time"] == datetime(2026, 1, 1, 8, tzinfo=UTC)
    assert (run["state"], run["state_start_time"], run["version"]) == ("Scheduled", run["scheduled_start_time"], 1)


def test_create_flow_run_needs_a_run_config_or_an_environment(api: PrefectServerDouble) -> None:
    project_id = api.add_project("proj")
    flow = serialized_flow("bare", run_config=None, environment=None)
    flow_id = register_flow(api, project_id, flow)["data"]["create_flow_from_compressed_string"]["id"]
    # Server reads flow.environment.get("labels") when neither labels source exists.
    assert error_of(api, CREATE_RUN, {"input": {"flow_id": flow_id}})["message"] == (
        "'NoneType' object has no attribute 'get'"
    )


def test_run_listings_and_filters(api: PrefectServerDouble, flow_id: str) -> None:
    early = api.add_flow_run(flow_id, name="early-bird", scheduled_start_time="2026-01-01T00:00:00Z")
    late = api.add_flow_run(flow_id, name="late-owl", scheduled_start_time="2026-01-02T00:00:00Z")
    rows = data(api, fill(RUN_LIST, where='{ flow: { name: { _eq: "hello" } } }'))["flow_run"]
    assert [row["id"] for row in rows] == [late, early]
    assert rows[0]["scheduled_start_time"] == "2026-01-02T00:00:00+00:00"
    assert rows[0]["flow"] == {"name": "hello", "storage": STORAGE} and rows[0]["labels"] == ["dev"]
    assert data(api, fill(RUNS_BY_ID, ids=[early, late]))["flow_run"] == [
        {"id": early, "state": "Scheduled", "version": 1}, {"id": late, "state": "Scheduled", "version": 1},
    ]  # fmt: skip
    where = '{ _not: { name: { _ilike: "EARLY%" } }, scheduled_start_time: { _gt: "2026-01-01T01:00:00+02:00" } }'
    assert [row["id"] for row in data(api, fill(RUN_LIST, where=where))["flow_run"]] == [late]
    states = fill(
        "query { flow_run_by_pk(id: <id>) { states(order_by: { version: desc }) { version state } } }", id=late
    )
    assert data(api, states)["flow_run_by_pk"]["states"] == [
        {"version": 1, "state": "Scheduled"}, {"version": 0, "state": "Pending"},
    ]  # fmt: skip


def test_cancel_flow_run(api: PrefectServerDouble) -> None:
    flow_id = api.add_flow("tasks", STORAGE, tasks=["t-1"])
    scheduled, running, finished = (api.add_flow_run(flow_id) for _ in range(3))
    api.set_state(running, "Running")
    api.set_state(finished, "Success")

    def cancel(run_id: str) -> str:
        return str(data(api, CANCEL, {"input": {"flow_run_id": run_id}})["cancel_flow_run"]["state"])

    assert (cancel(scheduled), cancel(running), cancel(finished)) == ("Cancelled", "Cancelling", "Success")
    assert api.task_runs(scheduled)[0]["state"] == "Cancelled"  # Cancelled cancels unfinished task runs
    assert api.run(running)["state_message"] == "Flow run is cancelling"
    assert api.task_runs(running)[0]["state"] == "Pending"
    assert api.run(finished)["version"] == 2


def test_set_state_from_a_test_follows_server_rules(api: PrefectServerDouble, flow_id: str) -> None:
    run_id = api.add_flow_run(flow_id)
    api.set_state(run_id, "Submitted")
    with pytest.raises(ValueError, match="already been submitted"):
        api.set_state(run_id, "Submitted")
    api.set_state(run_id, "Cancelled", "stop")
    assert api.states(run_id)[-1]["message"] == "stop" and api.run(run_id)["version"] == 3


def test_delete_flow_run(api: PrefectServerDouble, flow_id: str) -> None:
    run_id = api.add_flow_run(flow_id)
    delete = "mutation { delete_flow_run(input: { flow_run_id: <id> }) { success } }"
    assert data(api, fill(delete, id=run_id)) == {"delete_flow_run": {"success": True}}
    assert data(api, fill(delete, id=run_id)) == {"delete_flow_run": {"success": False}}
    assert api.states(run_id) == [] and queue(api, ["dev"]) == []


# --- Schedules and the scheduler service ---------------------------------------------

FLOW_SCHEDULE = """query {
    flow_by_pk(id: <id>) { schedule is_schedule_active flow_group { id schedule } flow_group_id }
}"""
FLOW_RUNS = """query {
    flow_run(where: { flow_id: { _eq: <id> } }, order_by: [{ scheduled_start_time: asc }, { idempotency_key: asc }]) {
        id state scheduled_start_time auto_scheduled parameters labels idempotency_key
    }
}"""
SET_ACTIVE = "mutation($input: set_schedule_active_input!) { set_schedule_active(input: $input) { success } }"
SET_INACTIVE = "mutation($input: set_schedule_inactive_input!) { set_schedule_inactive(input: $input) { success } }"
SET_GROUP_SCHEDULE = """mutation($input: set_flow_group_schedule_input!) {
    set_flow_group_schedule(input: $input) { success }
}"""
DELETE_GROUP_SCHEDULE = """mutation($input: delete_flow_group_schedule_input!) {
    delete_flow_group_schedule(input: $input) { success }
}"""
REQUIRED_X = [{"slug": "x", "name": "x", "required": True, "default": None, "type": "prefect.core.parameter.Parameter"}]


def clock(kind: str, *, tz: str = "UTC", parameter_defaults: Any = None, labels: Any = None, **fields: Any) -> Any:
    """A clock as Prefect 1.4.1's ClockSchema dumps it, starting 2026-01-01 in ``tz``."""
    return {
        "type": kind, **fields, "start_date": {"dt": "2026-01-01T00:00:00", "tz": tz}, "end_date": None,
        "parameter_defaults": parameter_defaults or {}, "labels": labels, "__version__": "1.4.1",
    }  # fmt: skip


def prefect_schedule(*clocks: Any) -> dict[str, Any]:
    """A flow's ``schedule`` as Prefect 1.4.1's ScheduleSchema dumps it."""
    return {
        "clocks": list(clocks), "filters": [], "not_filters": [], "or_filters": [], "adjustments": [],
        "__version__": "1.4.1",
    }  # fmt: skip


WEEKDAYS_AT_9 = prefect_schedule(clock("CronClock", cron="0 9 * * 1-5", day_or=True, tz="Europe/Berlin"))


def activate(api: PrefectServerDouble, flow_id: str) -> bool:
    return bool(data(api, SET_ACTIVE, {"input": {"flow_id": flow_id}})["set_schedule_active"]["success"])


def new_flow(api: PrefectServerDouble, name: str, schedule: Any, **extra: Any) -> str:
    """Register a flow over HTTP (schedule off unless ``extra`` says otherwise)."""
    project = data(api, fill(PROJECT, name="proj"))["project"]
    project_id = project[0]["id"] if project else api.add_project("proj")
    options = {"set_schedule_active": False, **extra}
    flow = serialized_flow(name, schedule=schedule, **options.pop("flow", {}))
    answer = register_flow(api, project_id, flow, **options)
    return str(answer["data"]["create_flow_from_compressed_string"]["id"])


def runs_of(api: PrefectServerDouble, flow_id: str) -> list[dict[str, Any]]:
    return list(data(api, fill(FLOW_RUNS, id=flow_id))["flow_run"])


def flow_schedule(api: PrefectServerDouble, flow_id: str) -> dict[str, Any]:
    return dict(data(api, fill(FLOW_SCHEDULE, id=flow_id))["flow_by_pk"])


def timed(action: Any) -> tuple[Any, datetime, datetime]:
    """``action()`` with the UTC times just before and just after it."""
    before = datetime.now(UTC)
    result = action()
    return result, before, datetime.now(UTC)


FLOW_LABELS = ["extra", "vm"]  # serialized_flow()'s run config labels, which runs inherit


def as_events(runs: list[dict[str, Any]]) -> list[tuple[datetime, str, str]]:
    """Runs as sorted (start, parameters, labels) tuples, the JSON values as text."""
    return sorted(
        (datetime.fromisoformat(run["scheduled_start_time"]), json.dumps(run["parameters"]), json.dumps(run["labels"]))
        for run in runs
    )


def expected_events(clock_events: list[Any], labels: list[str]) -> set[tuple[datetime, str, str]]:
    """Clock events as the runs they become (a clock without labels: the flow's labels)."""
    return {
        (
            event.start_time,
            json.dumps(event.parameter_defaults),
            json.dumps(labels if event.labels is None else event.labels),
        )
        for event in clock_events
    }


def assert_scheduler_pass(
    api: PrefectServerDouble,
    flow_id: str,
    schedule: Any,
    action: Any,
    old: list[dict[str, Any]] | None = None,
    labels: list[str] = FLOW_LABELS,
) -> Any:
    """Run ``action``; then the flow's auto-scheduled runs must be ``old`` (unchanged) plus the
    schedule's next 10 events after the moment the double read "now", within the call."""
    old = old or []
    result, before, after = timed(action)
    clocks = local_agent.Schedule.from_prefect(schedule)
    # The next 10 events change only at an event (a cron clock rounds "now" up to the next
    # second), so these moments give every answer the call can have seen.
    soon = clocks.next(10, after=before)
    moments = [before, after, *(event.start_time for event in soon if event.start_time <= after + timedelta(seconds=1))]
    candidates = [sorted(set(as_events(old)) | expected_events(clocks.next(10, after=t), labels)) for t in moments]
    runs = [run for run in runs_of(api, flow_id) if run["auto_scheduled"]]
    assert as_events(runs) in candidates
    assert all(run in runs for run in old)
    return result


def test_set_schedule_active_schedules_the_next_ten_runs_at_once(api: PrefectServerDouble) -> None:
    flow_id = new_flow(api, "weekdays", WEEKDAYS_AT_9)
    assert flow_schedule(api, flow_id)["schedule"] == WEEKDAYS_AT_9
    assert not flow_schedule(api, flow_id)["is_schedule_active"] and runs_of(api, flow_id) == []
    assert assert_scheduler_pass(api, flow_id, WEEKDAYS_AT_9, lambda: activate(api, flow_id))
    runs = runs_of(api, flow_id)
    assert flow_schedule(api, flow_id)["is_schedule_active"] and len(runs) == 10
    assert {(run["state"], run["auto_scheduled"], json.dumps(run["parameters"])) for run in runs} == {
        ("Scheduled", True, "{}")
    }
    for run in runs:  # str() of a pendulum time in UTC, as Server writes the key
        start = datetime.fromisoformat(run["scheduled_start_time"])
        assert start.hour == 8 or start.hour == 7  # 09:00 in Berlin (CET or CEST)
        assert run["idempotency_key"] == f"auto-scheduled:{start.astimezone(UTC).isoformat()}"
    # The scheduler and a second activation find the events scheduled already.
    added = assert_scheduler_pass(api, flow_id, WEEKDAYS_AT_9, api.run_scheduler_once, runs)
    assert added == len(runs_of(api, flow_id)) - len(runs)  # 0, unless a run fell due meanwhile
    assert assert_scheduler_pass(api, flow_id, WEEKDAYS_AT_9, lambda: activate(api, flow_id), runs)
    assert data(api, SET_ACTIVE, {"input": {"flow_id": "00000000-0000-0000-0000-000000000000"}}) == {
        "set_schedule_active": {"success": False}
    }


def test_clock_parameters_and_labels_go_into_the_runs_and_their_keys(api: PrefectServerDouble) -> None:
    every_90_min = clock("IntervalClock", interval=5400 * 10**6, parameter_defaults={"x": 1})
    noon_on_gpu = clock("CronClock", cron="0 12 * * *", day_or=True, labels=["gpu"])
    schedule = prefect_schedule(every_90_min, noon_on_gpu)
    flow_id = new_flow(api, "mixed", schedule, flow={"parameters": [{**REQUIRED_X[0], "required": False}]})
    assert_scheduler_pass(api, flow_id, schedule, lambda: activate(api, flow_id))
    runs = runs_of(api, flow_id)
    assert len(runs) == 10 and all(run["auto_scheduled"] for run in runs)
    assert {run["parameters"]["x"] for run in runs if run["labels"] == FLOW_LABELS} == {1}
    assert {json.dumps(run["parameters"]) for run in runs if run["labels"] == ["gpu"]} <= {"{}"}
    for run in runs:
        start = datetime.fromisoformat(run["scheduled_start_time"]).isoformat()
        labels = None if run["labels"] == FLOW_LABELS else run["labels"]  # None: inferred from the run config
        text = str(sorted(json.dumps(run["parameters"]))) + str(sorted(json.dumps(labels)))
        assert run["idempotency_key"] == f"auto-scheduled:{start}:{hashlib.md5(text.encode()).hexdigest()}"
    # Keyed events are not skipped but found by their key: Server counts them too.
    assert assert_scheduler_pass(api, flow_id, schedule, api.run_scheduler_once, runs) == 10


def test_the_scheduler_tops_up_as_time_passes(api: PrefectServerDouble) -> None:
    every_second = prefect_schedule(clock("IntervalClock", interval=10**6))
    flow_id = new_flow(api, "every-second", every_second)
    assert activate(api, flow_id)
    first = runs_of(api, flow_id)
    second_start = datetime.fromisoformat(first[1]["scheduled_start_time"])
    time.sleep(max(0.0, min(3.0, (second_start - datetime.now(UTC)).total_seconds() + 0.1)))
    added = assert_scheduler_pass(api, flow_id, every_second, api.run_scheduler_once, first)
    runs = runs_of(api, flow_id)
    assert added >= 1 and len(runs) == 10 + added and runs[:10] == first
    starts = [datetime.fromisoformat(run["scheduled_start_time"]) for run in runs]
    assert all(later - earlier == timedelta(seconds=1) for earlier, later in zip(starts, starts[1:]))


def test_set_schedule_inactive_deletes_only_the_pending_auto_scheduled_runs(api: PrefectServerDouble) -> None:
    flow_id = new_flow(api, "weekdays", WEEKDAYS_AT_9)
    assert activate(api, flow_id)
    started = runs_of(api, flow_id)[0]["id"]
    ad_hoc = api.add_flow_run(flow_id)
    api.set_state(started, "Running")
    answer = data(api, SET_INACTIVE, {"input": {"flow_id": flow_id}})
    assert answer == {"set_schedule_inactive": {"success": True}}
    assert not flow_schedule(api, flow_id)["is_schedule_active"]
    left = {run["id"]: (run["state"], run["auto_scheduled"]) for run in runs_of(api, flow_id)}
    assert left == {ad_hoc: ("Scheduled", False), started: ("Running", True)}
    assert api.run_scheduler_once() == 0 and len(runs_of(api, flow_id)) == 2
    unknown = {"input": {"flow_id": "00000000-0000-0000-0000-000000000000"}}
    assert data(api, SET_INACTIVE, unknown) == {"set_schedule_inactive": {"success": False}}


def test_a_flow_group_schedule_replaces_the_flows_own(api: PrefectServerDouble) -> None:
    flow_id = new_flow(api, "weekdays", WEEKDAYS_AT_9)
    assert activate(api, flow_id)
    ad_hoc = api.add_flow_run(flow_id)
    shown = flow_schedule(api, flow_id)
    group_id = shown["flow_group_id"]
    assert shown["flow_group"] == {"id": group_id, "schedule": None}
    hourly = {"interval": 3600, "parameter_defaults": {"x": 2}}
    variables = {"input": {"flow_group_id": group_id, "interval_clocks": [hourly], "timezone": "Europe/Berlin"}}
    answer, before, after = timed(lambda: data(api, SET_GROUP_SCHEDULE, variables))
    assert answer == {"set_flow_group_schedule": {"success": True}}
    # The old schedule's runs are gone, the ad-hoc run stays, and no new run exists yet.
    assert [run["id"] for run in runs_of(api, flow_id)] == [ad_hoc]
    group_schedule = flow_schedule(api, flow_id)["flow_group"]["schedule"]
    start_date = group_schedule["clocks"][0]["start_date"]
    wall = datetime.fromisoformat(start_date["dt"])  # "now" in Berlin, naive (either one, when clocks go back)
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    assert any(before <= wall.replace(tzinfo=berlin, fold=fold) <= after for fold in (0, 1))
    assert group_schedule == {
        "type": "Schedule",
        "clocks": [
            {"type": "IntervalClock", "interval": 3600 * 10**6, "parameter_defaults": {"x": 2},
             "start_date": {"dt": start_date["dt"], "tz": "Europe/Berlin"}},
        ],
    }  # fmt: skip
    assert flow_schedule(api, flow_id)["schedule"] == WEEKDAYS_AT_9  # kept, but the group's wins
    assert assert_scheduler_pass(api, flow_id, group_schedule, api.run_scheduler_once) == 10
    assert {run["parameters"]["x"] for run in runs_of(api, flow_id) if run["auto_scheduled"]} == {2}
    # Cron clocks keep what was given (a null parameter_defaults too); no time zone, no start.
    cron = {"cron": "0 6 * * *", "parameter_defaults": None}
    variables = {"input": {"flow_group_id": group_id, "cron_clocks": [cron]}}
    assert data(api, SET_GROUP_SCHEDULE, variables) == {"set_flow_group_schedule": {"success": True}}
    assert flow_schedule(api, flow_id)["flow_group"]["schedule"] == {
        "type": "Schedule",
        "clocks": [{"type": "CronClock", "cron": "0 6 * * *", "parameter_defaults": None, "start_date": None}],
    }
    assert [run["id"] for run in runs_of(api, flow_id)] == [ad_hoc]


def test_set_flow_group_schedule_validates_like_server(api: PrefectServerDouble) -> None:
    flow_id = new_flow(api, "weekdays", WEEKDAYS_AT_9)
    group_id = flow_schedule(api, flow_id)["flow_group_id"]

    def error(**fields: Any) -> str:
        return str(error_of(api, SET_GROUP_SCHEDULE, {"input": {"flow_group_id": group_id, **fields}})["message"])

    assert error(timezone="Mars/Olympus") == "Invalid timezone provided for schedule: Mars/Olympus"
    assert error(cron_clocks=[{"cron": "not a cron"}]) == (
        "Invalid clock provided for schedule: {'type': 'CronClock', 'cron': 'not a cron', 'start_date': None}"
    )
    assert error(interval_clocks=[{"interval": 0}]) == (
        "Invalid clock provided for schedule: {'type': 'IntervalClock', 'interval': 0, 'start_date': None}"
    )
    assert error(cron_clocks=None) == "'NoneType' object is not iterable"
    assert flow_schedule(api, flow_id)["flow_group"]["schedule"] is None
    unknown = {"input": {"flow_group_id": "00000000-0000-0000-0000-000000000000", "cron_clocks": []}}
    assert data(api, SET_GROUP_SCHEDULE, unknown) == {"set_flow_group_schedule": {"success": False}}
    unknown = {"input": {"flow_group_id": "00000000-0000-0000-0000-000000000000"}}
    assert data(api, DELETE_GROUP_SCHEDULE, unknown) == {"delete_flow_group_schedule": {"success": False}}


def test_delete_flow_group_schedule_falls_back_to_the_flows_own(api: PrefectServerDouble) -> None:
    flow_id = new_flow(api, "weekdays", WEEKDAYS_AT_9)
    bare_id = new_flow(api, "bare", None)
    group_id, bare_group_id = (flow_schedule(api, flow)["flow_group_id"] for flow in (flow_id, bare_id))
    # A flow with no schedule of its own or of its group cannot be turned on.
    assert not activate(api, bare_id) and not flow_schedule(api, bare_id)["is_schedule_active"]
    noon = {"cron_clocks": [{"cron": "0 12 * * *"}]}
    for group in (group_id, bare_group_id):
        answer = data(api, SET_GROUP_SCHEDULE, {"input": {"flow_group_id": group, **noon}})
        assert answer == {"set_flow_group_schedule": {"success": True}}
    assert activate(api, flow_id) and activate(api, bare_id)
    group_schedule = flow_schedule(api, flow_id)["flow_group"]["schedule"]
    for flow in (flow_id, bare_id):  # scheduled at once by the group's schedule
        starts = {datetime.fromisoformat(run["scheduled_start_time"]).time() for run in runs_of(api, flow)}
        assert starts == {datetime(2026, 1, 1, 12).time()} and len(runs_of(api, flow)) == 10
    for group in (group_id, bare_group_id):
        answer = data(api, DELETE_GROUP_SCHEDULE, {"input": {"flow_group_id": group}})
        assert answer == {"delete_flow_group_schedule": {"success": True}}
    assert flow_schedule(api, flow_id)["flow_group"]["schedule"] is None
    assert runs_of(api, flow_id) == runs_of(api, bare_id) == []
    # The flows stay "active"; the next pass schedules the one with a schedule of its own.
    assert flow_schedule(api, bare_id)["is_schedule_active"]
    assert assert_scheduler_pass(api, flow_id, WEEKDAYS_AT_9, api.run_scheduler_once) == 10
    assert runs_of(api, bare_id) == []
    assert group_schedule["clocks"][0]["cron"] == "0 12 * * *"


def test_required_parameters_and_schedules(api: PrefectServerDouble) -> None:
    refused = new_flow(api, "needs-x", WEEKDAYS_AT_9, flow={"parameters": REQUIRED_X})
    error = error_of(api, SET_ACTIVE, {"input": {"flow_id": refused}})
    assert error["message"] == "Can not schedule a flow that has required parameters."
    assert not flow_schedule(api, refused)["is_schedule_active"] and runs_of(api, refused) == []
    # Registration with the schedule on still creates the flow, with its schedule off.
    registered = new_flow(api, "needs-x", WEEKDAYS_AT_9, flow={"parameters": REQUIRED_X}, set_schedule_active=True)
    assert not flow_schedule(api, registered)["is_schedule_active"] and runs_of(api, registered) == []
    # A clock that gives the parameter may run.
    given = prefect_schedule(clock("CronClock", cron="0 9 * * *", day_or=True, parameter_defaults={"x": 3}))
    flow_id = new_flow(api, "given-x", given, flow={"parameters": REQUIRED_X})
    assert activate(api, flow_id)
    assert [run["parameters"] for run in runs_of(api, flow_id)] == [{"x": 3}] * 10
    # Only the flow's own clocks are checked: a flow-group schedule without x turns the
    # schedule on, then fails in create_flow_run, as in Server.
    bare = new_flow(api, "bare-x", None, flow={"parameters": REQUIRED_X})
    group_id = flow_schedule(api, bare)["flow_group_id"]
    variables = {"input": {"flow_group_id": group_id, "interval_clocks": [{"interval": 3600}]}}
    assert data(api, SET_GROUP_SCHEDULE, variables) == {"set_flow_group_schedule": {"success": True}}
    error = error_of(api, SET_ACTIVE, {"input": {"flow_id": bare}})
    assert error["message"] == "Required parameters were not supplied: {'x'}"
    assert flow_schedule(api, bare)["is_schedule_active"] and runs_of(api, bare) == []
    # A pass skips the failure; it counts only given-x's keyed runs, found again.
    assert api.run_scheduler_once() == 10 and runs_of(api, bare) == []


def test_archived_flows_are_not_scheduled(api: PrefectServerDouble) -> None:
    first = new_flow(api, "versions", WEEKDAYS_AT_9, set_schedule_active=True)
    assert flow_schedule(api, first)["is_schedule_active"] and len(runs_of(api, first)) == 10
    second = new_flow(api, "versions", WEEKDAYS_AT_9, set_schedule_active=True, idempotency_key="k")
    assert api.flow(first)["archived"] and runs_of(api, first) == []  # its auto runs deleted
    second_runs = runs_of(api, second)
    assert len(second_runs) == 10
    assert [run["idempotency_key"] for run in second_runs] == [
        f"auto-scheduled:{run['scheduled_start_time']}" for run in second_runs
    ]
    assert_scheduler_pass(api, second, WEEKDAYS_AT_9, api.run_scheduler_once, second_runs)
    assert runs_of(api, first) == []
    assert activate(api, first) and runs_of(api, first) == []  # turned on, but archived
    # An idempotent re-registration returns the flow as it is: its schedule stays off.
    assert data(api, SET_INACTIVE, {"input": {"flow_id": second}})["set_schedule_inactive"]["success"]
    again = new_flow(api, "versions", WEEKDAYS_AT_9, set_schedule_active=True, idempotency_key="k")
    assert again == second and not flow_schedule(api, second)["is_schedule_active"] and runs_of(api, second) == []


def test_the_background_scheduler_creates_runs_by_itself() -> None:
    with pytest.raises(ValueError, match="scheduler_seconds must be greater than 0"):
        PrefectServerDouble(scheduler_seconds=0)
    with PrefectServerDouble(scheduler_seconds=0.05) as api:
        flow_id = api.add_flow("hello", STORAGE, labels=["dev"], schedule=WEEKDAYS_AT_9)
        assert activate(api, flow_id) and len(runs_of(api, flow_id)) == 10
        group_id = flow_schedule(api, flow_id)["flow_group_id"]
        variables = {"input": {"flow_group_id": group_id, "cron_clocks": [{"cron": "30 7 * * *"}]}}
        assert data(api, SET_GROUP_SCHEDULE, variables)["set_flow_group_schedule"]["success"]
        deadline = time.monotonic() + 10
        runs = runs_of(api, flow_id)
        while len(runs) < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
            runs = runs_of(api, flow_id)
        starts = {datetime.fromisoformat(run["scheduled_start_time"]).time() for run in runs}
        assert len(runs) == 10 and starts == {datetime(2026, 1, 1, 7, 30).time()}
        assert all(run["auto_scheduled"] and run["labels"] == ["dev"] for run in runs)
        assert api.server_errors == []
    assert not any(thread.name == "prefect-double-scheduler" for thread in threading.enumerate())


# --- Faults, outages and auth --------------------------------------------------------


def test_fault_injection(api: PrefectServerDouble) -> None:
    api.fail_next(status=500)
    assert gql(api, "{ hello }") == (500, b"Injected HTTP 500")
    api.fail_next(body=b"<html>edge proxy</html>")
    assert gql(api, "{ hello }") == (200, b"<html>edge proxy</html>")
    api_error = "Unable to complete operation. An internal API error occurred."
    api.fail_next(graphql_error=api_error, code="API_ERROR", only_root="get_runs_in_queue")
    assert data(api, "{ hello }") == {"hello": "👋"}  # does not match only_root: not consumed
    _, answer = gql(api, GET_RUNS, {"input": {"tenant_id": api.tenant_id}})
    assert answer["data"] == {"get_runs_in_queue": None}
    assert answer["errors"] == [
        {"message": api_error, "path": ["get_runs_in_queue"], "extensions": {"code": "API_ERROR"}}
    ]
    api.fail_next(2, drop_connection=True)
    for _ in range(2):
        with pytest.raises(DROPPED):
            gql(api, "{ hello }")
    api.fail_next(delay=0.2)
    started = time.monotonic()
    assert data(api, "{ hello }") == {"hello": "👋"} and time.monotonic() - started >= 0.2
    assert [request.status for request in api.requests] == [500, 200, 200, 200, 0, 0, 200]


def test_set_down_modes(api: PrefectServerDouble) -> None:
    api.set_down(True)
    assert gql(api, "{ hello }")[0] == 500
    api.set_down(True, mode="drop")
    with pytest.raises(DROPPED):
        gql(api, "{ hello }")
    api.set_down(True, mode="slow")
    answers: list[Any] = []
    waiter = threading.Thread(target=lambda: answers.append(gql(api, "{ hello }")))
    waiter.start()
    time.sleep(0.1)
    assert answers == []
    api.set_down(False)
    waiter.join(5)
    assert answers == [(200, {"data": {"hello": "👋"}})]


def test_require_token_answers_like_prefect_cloud() -> None:
    with PrefectServerDouble(cloud=True, require_token="pnu_TESTKEY") as api:
        status, answer = gql(api, GET_RUNS, {"input": {"tenant_id": api.tenant_id}})
        assert status == 200 and answer["data"] == {"get_runs_in_queue": None}
        assert answer["errors"][0]["message"] == "AuthenticationError: Forbidden"
        assert answer["errors"][0]["extensions"] == {"code": "UNAUTHENTICATED"}
        wrong = gql(api, "{ hello }", headers={"Authorization": "Bearer nope"})[1]
        assert wrong["errors"][0]["message"] == "AuthenticationError: Forbidden"
        malformed = gql(api, "{ hello }", headers={"Authorization": "Bearer "})[1]
        assert malformed["errors"][0]["message"] == "Malformed Authorization header"
        answer = data(api, AUTH_INFO, headers={"Authorization": "Bearer pnu_TESTKEY"})
        assert answer == {"auth_info": {"tenant_id": api.tenant_id}}


def test_a_double_without_tenants() -> None:
    with PrefectServerDouble(with_tenant=False) as api:
        assert data(api, TENANT) == {"tenant": []}
        with pytest.raises(RuntimeError):
            _ = api.tenant_id
        variables = {"input": {"type": "LocalAgent", "name": "agent", "labels": []}}
        assert error_of(api, REGISTER_AGENT, variables)["message"] == "No tenant found."
        created = data(api, 'mutation { create_tenant(input: { name: "Default" }) { id } }')["create_tenant"]["id"]
        assert created == api.tenant_id


def test_wait_for(api: PrefectServerDouble, flow_id: str) -> None:
    run_id = api.add_flow_run(flow_id)
    threading.Timer(0.05, lambda: api.set_state(run_id, "Running")).start()
    assert api.wait_for(lambda: api.run(run_id)["state"] == "Running", timeout=2)
    assert not api.wait_for(lambda: False, timeout=0.05)
