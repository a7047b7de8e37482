#!/usr/bin/env python3
"""Soak tests for "never lose or double a run", at full size, outside CI.

    python3 benchmarks/soak.py            # about 6 minutes on 2 cores; writes benchmarks/SOAK.md
    python3 benchmarks/soak.py --quick    # smaller sizes, about 1 minute

Scenarios (real agent processes against real SQLite files and the Prefect Server double,
127.0.0.1 only):
  1. N agents x M runs on shared labels: duplicates and lost runs, on the embedded backend,
     on Server (with its 30 s duplicate-Submitted guard) and on an older Server without it;
  2. a 30 s outage in the middle of a burst (10 s of HTTP 500, 10 s of dropped connections,
     10 s of answers held until the API returns): runs lost, log lines lost, seconds to resume;
  3. the agent killed with SIGKILL mid-burst and restarted: runs left unowned 60 s later;
  4. the small-scale cases, through the test suite: the 9 ways a flow-run process can die,
     SIGTERM with running flows, and the bad-input matrix.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import local_agent as la  # noqa: E402
from prefect_double import PrefectServerDouble  # noqa: E402

FLOWS = '''
import os, time

def mark(path):
    with open(path, "a") as handle:
        handle.write(os.environ["PREFECT__CONTEXT__FLOW_RUN_ID"] + "\\n")

def talk(path, seconds=0.5):
    print("line one", flush=True)
    time.sleep(seconds)
    print("line two", flush=True)
    mark(path)
'''


class Scenario:
    """A scratch directory with the flow module, a home directory and one backend."""

    def __init__(self, kind: str, server: PrefectServerDouble | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="soak-"))
        (self.root / "soak_flows.py").write_text(FLOWS)
        sys.path.insert(0, str(self.root))
        import importlib

        self.flows = importlib.reload(importlib.import_module("soak_flows"))
        self.marker = self.root / "executions.txt"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT__")}
        self.env["PREFECT__HOME_DIR"] = str(self.root / "home")
        self.kind, self.server = kind, server
        if kind == "sqlite":
            self.api = f"sqlite:///{self.root / 'home' / 'local_agent.db'}"
            self.db = la.SQLiteBackend(la._sqlite_path(self.api))
            self.project = self.db.ensure_project("soak")
        else:
            assert server is not None
            self.api = server.url

    def flow(self, name: str) -> str:
        flow = la.Flow(name, getattr(self.flows, name))
        path = la.store_flow(flow, self.root / "home" / "flows")
        if self.kind == "sqlite":
            return self.db.register_flow(self.project, la.serialize_flow(flow, path, ["soak"]))
        assert self.server is not None
        return str(self.server.add_flow(name, la.local_storage(name, path), labels=["soak"]))

    def runs(self, flow_id: str, count: int, **parameters: Any) -> list[str]:
        if self.kind == "sqlite":
            return [self.db.create_flow_run(flow_id, parameters=parameters, labels=None, scheduled_start_time=None,
                                            idempotency_key=os.urandom(8).hex()) for _ in range(count)]
        assert self.server is not None
        return [str(self.server.add_flow_run(flow_id, parameters=parameters)) for _ in range(count)]

    def state(self, run_id: str) -> str:
        if self.kind == "sqlite":
            run = self.db.get_flow_run(run_id)
            return run.state if run else "?"
        assert self.server is not None
        return str(self.server.run(run_id)["state"])

    def log_lines(self, run_id: str) -> list[str]:
        if self.kind == "sqlite":
            return [line.message for line in self.db.get_run_logs(run_id)]
        assert self.server is not None
        return [str(log["message"]) for log in self.server.logs(run_id)]

    def agent(self, *args: str, name: str = "agent") -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "local_agent.py"), "start", "--api", self.api, "-l", "soak",
             "--no-hostname-label", "-n", name, *args],
            env=self.env, cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def executions(self) -> list[str]:
        return self.marker.read_text().split() if self.marker.exists() else []


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def shared_labels(kind: str, agents: int, runs: int, guard: float = 30.0) -> dict[str, Any]:
    """N agents with the same labels drain M runs; count duplicates and lost runs."""
    server = PrefectServerDouble(submitted_guard_seconds=guard).start() if kind == "graphql" else None
    try:
        scenario = Scenario(kind, server)
        run_ids = scenario.runs(scenario.flow("mark"), runs, path=str(scenario.marker))
        started = time.monotonic()
        processes = [scenario.agent("--once", name=f"soak-{n}") for n in range(agents)]
        for process in processes:
            process.communicate(timeout=900)
        took = time.monotonic() - started
        executed = scenario.executions()
        return {
            "agents": agents, "runs": runs, "executions": len(executed),
            "duplicates": len(executed) - len(set(executed)),
            "lost": sum(scenario.state(run_id) != "Success" for run_id in run_ids),
            "seconds": round(took, 1), "runs_per_second": round(runs / took, 1),
            "exit_codes": [process.returncode for process in processes],
        }
    finally:
        if server is not None:
            server.stop()


def outage(runs: int, phase_seconds: float) -> dict[str, Any]:
    """A burst with an outage of three phases in its middle; what was lost, how fast it resumed."""
    with PrefectServerDouble() as server:
        scenario = Scenario("graphql", server)
        flow_id = scenario.flow("talk")
        run_ids = scenario.runs(flow_id, runs, path=str(scenario.marker), seconds=0.5)
        agent = scenario.agent("--limit", "8")
        assert wait_for(lambda: len(scenario.executions()) >= runs // 3, timeout=300)
        for mode in ("500", "drop", "slow"):
            server.set_down(True, mode=mode)
            time.sleep(phase_seconds)
        server.set_down(False)
        back = time.time()
        wait_for(lambda: any(r.time >= back and r.status == 200 and "x-prefect-agent-id" in r.headers
                             for r in server.requests[-50:]), timeout=30)
        resumed = min((r.time for r in server.requests if r.time >= back and r.status == 200
                       and "x-prefect-agent-id" in r.headers), default=float("inf")) - back
        wait_for(lambda: all(scenario.state(run_id) == "Success" for run_id in run_ids), timeout=600)
        wait_for(lambda: all(scenario.log_lines(r).count("line two") == 1 for r in run_ids), timeout=60)
        agent.send_signal(signal.SIGTERM)
        agent.communicate(timeout=120)
        expected = 2 * runs
        shipped = sum(min(lines.count("line one"), 1) + min(lines.count("line two"), 1)
                      for lines in map(scenario.log_lines, run_ids))
        return {
            "runs": runs, "outage_seconds": 3 * phase_seconds,
            "runs_lost": sum(scenario.state(run_id) != "Success" for run_id in run_ids),
            "duplicates": len(scenario.executions()) - len(set(scenario.executions())),
            "log_lines_lost": expected - shipped,
            "seconds_to_resume": round(resumed, 2),
        }


def kill_and_restart(kind: str, runs: int) -> dict[str, Any]:
    """SIGKILL the agent mid-burst, restart it; are any runs left unowned 60 s later?"""
    server = PrefectServerDouble().start() if kind == "graphql" else None
    try:
        scenario = Scenario(kind, server)
        run_ids = scenario.runs(scenario.flow("talk"), runs, path=str(scenario.marker), seconds=2.0)
        agent = scenario.agent("--limit", "10")
        assert wait_for(lambda: len(scenario.executions()) >= runs // 4, timeout=300)
        agent.kill()
        agent.communicate()
        killed = time.monotonic()
        time.sleep(2)
        restarted = scenario.agent("--limit", "10")
        wait_for(lambda: all(la.is_final(scenario.state(run_id)) for run_id in run_ids), timeout=60)
        unowned = [run_id for run_id in run_ids if scenario.state(run_id) in ("Submitted", "Running")]
        settled = time.monotonic() - killed
        restarted.send_signal(signal.SIGTERM)
        restarted.communicate(timeout=120)
        executed = scenario.executions()
        return {
            "runs": runs, "unowned_after_60s": len(unowned),
            "success": sum(scenario.state(run_id) == "Success" for run_id in run_ids),
            "duplicates": len(executed) - len(set(executed)), "seconds_to_settle_all": round(settled, 1),
        }
    finally:
        if server is not None:
            server.stop()


def small_scale_cases() -> dict[str, Any]:
    """The 9 failure modes, SIGTERM drains and the bad-input matrix, through the test suite."""
    groups = {
        "the 9 child failure modes, all in one test per backend (tests)": "each_way",
        "SIGTERM with running flows: drained, handed back, no orphans (tests, one per backend)": "sigterm",
        "bad-input matrix (cases)": "usage_errors or bad_settings or bad_config or bad_api or bad_storage "
                            "or corrupt_database or newer_schema or locked_database or read_only_database "
                            "or cannot_run or token_is_not_sent or cloud_key",
    }
    results = {}
    for label, selection in groups.items():
        finished = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                   str(ROOT / "test_local_agent.py"), "-k", selection],
                                  cwd=ROOT, capture_output=True, text=True, timeout=900)
        summary = finished.stdout.strip().splitlines()[-1] if finished.stdout.strip() else finished.stderr
        passed = int(re.search(r"(\d+) passed", summary).group(1)) if "passed" in summary else 0
        failed = int(re.search(r"(\d+) failed", summary).group(1)) if "failed" in summary else 0
        results[label] = {"cases_passed": passed, "cases_failed": failed}
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Soak results", "",
        f"`python3 benchmarks/soak.py{' --quick' if results['quick'] else ''}` on {results['machine']}, "
        f"{results['date']}.", "",
        "## Agents sharing labels", "",
        "| backend | agents × runs | executions | duplicates | lost | seconds | runs/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, row in results["shared_labels"].items():
        lines.append(f"| {label} | {row['agents']} × {row['runs']} | {row['executions']} | {row['duplicates']} | "
                     f"{row['lost']} | {row['seconds']} | {row['runs_per_second']} |")
    out = results["outage"]
    lines += ["", "## An outage in the middle of a burst", "",
              f"{out['runs']} runs, {out['outage_seconds']:g} s outage (HTTP 500, dropped connections, held answers): "
              f"runs lost **{out['runs_lost']}**, duplicates **{out['duplicates']}**, log lines lost "
              f"**{out['log_lines_lost']}**, seconds to resume **{out['seconds_to_resume']}**.", "",
              "## SIGKILL mid-burst and restart", "",
              "| backend | runs | unowned after 60 s | Success | duplicates | all settled after (s) |",
              "|---|---|---|---|---|---|"]
    for label, row in results["kill_and_restart"].items():
        lines.append(f"| {label} | {row['runs']} | {row['unowned_after_60s']} | {row['success']} | "
                     f"{row['duplicates']} | {row['seconds_to_settle_all']} |")
    lines += ["", "## Small-scale cases (from the test suite)", "", "| group | passed | failed |", "|---|---|---|"]
    for label, row in results["small_scale"].items():
        lines.append(f"| {label} | {row['cases_passed']} | {row['cases_failed']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "SOAK.md"), help="the Markdown report")
    options = parser.parse_args()
    agents, runs = (4, 60) if options.quick else (4, 300)
    results: dict[str, Any] = {
        "quick": options.quick, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}",
        "shared_labels": {}, "kill_and_restart": {},
    }
    for label, kind, guard in (("embedded (SQLite)", "sqlite", 30.0), ("Prefect Server double", "graphql", 30.0),
                               ("Server without its 30 s guard", "graphql", 0.0)):
        print(f"shared labels: {label} ...", flush=True)
        results["shared_labels"][label] = shared_labels(kind, agents, runs, guard)
        print("  ", results["shared_labels"][label], flush=True)
    print("outage ...", flush=True)
    results["outage"] = outage(60 if options.quick else 150, 3.0 if options.quick else 10.0)
    print("  ", results["outage"], flush=True)
    for label, kind in (("embedded (SQLite)", "sqlite"), ("Prefect Server double", "graphql")):
        print(f"kill -9 and restart: {label} ...", flush=True)
        results["kill_and_restart"][label] = kill_and_restart(kind, 40 if options.quick else 100)
        print("  ", results["kill_and_restart"][label], flush=True)
    print("small-scale cases ...", flush=True)
    results["small_scale"] = small_scale_cases()
    print("  ", results["small_scale"], flush=True)
    report = markdown(results)
    Path(options.out).write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
