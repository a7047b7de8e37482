#!/usr/bin/env python3
"""Soak tests for "never lose or double a run", at full size, outside CI.

    python3 benchmarks/soak.py            # about 7 minutes on 2 cores, as root; writes benchmarks/SOAK.md
    python3 benchmarks/soak.py --quick    # smaller sizes, about 3 minutes

Scenarios (real agent processes against real SQLite files and the Prefect Server double,
127.0.0.1 only):
  1. N agents x M runs on shared labels: duplicates and lost runs, on the embedded backend,
     on Server (with its 30 s duplicate-Submitted guard) and on an older Server without it;
  2. a 30 s outage in the middle of a burst (10 s of HTTP 500, 10 s of dropped connections,
     10 s of answers held until the API returns): runs lost, log lines lost, seconds to resume;
  3. the agent killed with SIGKILL mid-burst and restarted: runs left unowned 60 s later;
  4. the disk under the agent's home and the embedded database (a 16 MB tmpfs; mounting it
     needs root) filled to the last byte for 10 s mid-burst: runs lost, final states
     overwritten, duplicates;
  5. the agent killed with SIGKILL at each step of settling a finished run (_finish,
     RunBook.settled, RunBook.save, _Job.remove_files and just after it), K times per step and
     backend, then restarted: runs lost, final states overwritten, duplicates, files left behind;
  6. the small-scale cases, through the test suite: the 8 ways a flow-run process can die,
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

#: The agent that kills itself at one step of settling a run (see crashing_agent.py).
CRASHING_AGENT = ROOT / "benchmarks" / "crashing_agent.py"
CRASH_STEPS = ("_finish", "settled", "save after settling", "remove_files", "remove_files done")


class Scenario:
    """A scratch directory with the flow module, a home directory and one backend.

    The home directory (and the embedded database in it) is ``<scratch>/home``, or ``home``; in
    the latter case the flow files are stored in ``<scratch>/flows``, named with --flows-dir.
    """

    def __init__(self, kind: str, server: PrefectServerDouble | None = None, home: Path | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="soak-"))
        self.home = home or self.root / "home"
        self.flows_dir = self.root / "home" / "flows" if home is None else self.root / "flows"
        (self.root / "soak_flows.py").write_text(FLOWS)
        sys.path.insert(0, str(self.root))
        import importlib

        self.flows = importlib.reload(importlib.import_module("soak_flows"))
        self.marker = self.root / "executions.txt"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT__")}
        self.env["PREFECT__HOME_DIR"] = str(self.home)
        self.kind, self.server = kind, server
        if kind == "sqlite":
            self.api = f"sqlite:///{self.home / 'local_agent.db'}"
            self.db = la.SQLiteBackend(la._sqlite_path(self.api))
            self.project = self.db.ensure_project("soak")
        else:
            assert server is not None
            self.api = server.url

    def flow(self, name: str) -> str:
        flow = la.Flow(name, getattr(self.flows, name))
        path = la.store_flow(flow, self.flows_dir)
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

    def message(self, run_id: str) -> str:
        if self.kind == "sqlite":
            run = self.db.get_flow_run(run_id)
            return (run.state_message or "") if run else ""
        assert self.server is not None
        return str(self.server.run(run_id).get("state_message") or "")

    def log_lines(self, run_id: str) -> list[str]:
        if self.kind == "sqlite":
            return [line.message for line in self.db.get_run_logs(run_id)]
        assert self.server is not None
        return [str(log["message"]) for log in self.server.logs(run_id)]

    def history(self, run_id: str) -> list[str]:
        """The run's state types, oldest first (for SQLite: its flow_run_state rows, by version)."""
        if self.kind == "sqlite":
            rows = self.db._read("SELECT state FROM flow_run_state WHERE flow_run_id = ? ORDER BY version", (run_id,))
            return [str(row[0]) for row in rows]
        assert self.server is not None
        return [str(state["type"]) for state in self.server.states(run_id)]

    def arguments(self, *args: str, name: str = "agent") -> list[str]:
        """``start ...`` for an agent of this scenario, after the script's path."""
        flows_dirs = [] if self.flows_dir == self.home / "flows" else ["--flows-dir", str(self.flows_dir)]
        return ["start", "--api", self.api, "-l", "soak", "--no-hostname-label", "-n", name, *flows_dirs, *args]

    def agent(self, *args: str, name: str = "agent", stderr: Any = subprocess.PIPE) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "local_agent.py"), *self.arguments(*args, name=name)],
            env=self.env, cwd=self.root, stdout=subprocess.DEVNULL, stderr=stderr, text=True)

    def files_left(self) -> list[Path]:
        """Output and result files under ``<home>/agents/*/runs/``."""
        return list((self.home / "agents").glob("*/runs/*"))

    def executions(self) -> list[str]:
        return self.marker.read_text().split() if self.marker.exists() else []


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def overwritten(history: list[str]) -> bool:
    """Whether any state follows the run's first final state."""
    finals = [index for index, state in enumerate(history) if state in la.FINAL_STATES]
    return bool(finals) and finals[0] < len(history) - 1


def overwritten_with_another(history: list[str]) -> bool:
    """Whether a state of another type follows the run's first final state."""
    finals = [index for index, state in enumerate(history) if state in la.FINAL_STATES]
    return bool(finals) and any(state != history[finals[0]] for state in history[finals[0] + 1:])


def duplicates(executed: list[str]) -> int:
    return len(executed) - len(set(executed))


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


def fill(disk: Path) -> Path:
    """Fill a file system to the last byte (64 KiB writes, then the short one, until ENOSPC); the filler."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


def disk_full(runs: int, full_seconds: float) -> dict[str, Any]:
    """Fill the disk under the agent's home and the embedded database mid-burst; what was lost or overwritten."""
    disk = Path(tempfile.mkdtemp(prefix="soak-disk-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        raise RuntimeError(f"the disk-full scenario mounts a 16 MB tmpfs on {disk}, which needs root: "
                           f"{(mounted.stderr or mounted.stdout).strip() or f'mount exited {mounted.returncode}'}")
    agent: subprocess.Popen[str] | None = None
    scenario: Scenario | None = None
    try:
        scenario = Scenario("sqlite", home=disk)  # opens the database now, before the disk fills
        run_ids = scenario.runs(scenario.flow("talk"), runs, path=str(scenario.marker), seconds=0.5)
        with open(scenario.root / "agent.stderr", "w") as errors:
            agent = scenario.agent("--limit", "4", stderr=errors)
            assert wait_for(lambda: len(scenario.executions()) >= runs // 3, timeout=300)
            filler = fill(disk)
            full = time.monotonic()
            free_while_full = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            executed_before = len(scenario.executions())
            time.sleep(full_seconds)
            executed_while_full = len(scenario.executions()) - executed_before
            filler.unlink()
            seconds_full = time.monotonic() - full
            settled = wait_for(lambda: all(la.is_final(scenario.state(run_id)) for run_id in run_ids), timeout=300)
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=120)
        stderr = (scenario.root / "agent.stderr").read_text()
        histories = {run_id: scenario.history(run_id) for run_id in run_ids}
        executed = scenario.executions()
        lost = [run_id for run_id in run_ids if scenario.state(run_id) != "Success"]
        changed = [run_id for run_id, history in histories.items() if overwritten(history)]
        return {
            "runs": runs, "seconds_full": round(seconds_full, 1), "free_bytes_while_full": free_while_full,
            "executed_while_full": executed_while_full, "all_final": settled,
            "success": runs - len(lost), "lost": len(lost), "overwritten": len(changed),
            "overwritten_with_another": sum(overwritten_with_another(histories[run_id]) for run_id in changed),
            "duplicates": duplicates(executed), "executions": len(executed),
            "exit_code": agent.returncode, "traceback": "Traceback" in stderr,
            "writes_held": max(map(int, re.findall(r"Holding (\d+) API write", stderr)), default=0),
            "problems": [f"{run_id}: {scenario.state(run_id)} ({scenario.message(run_id)[:300]!r}), history "
                         f"{histories[run_id]}, logs {[line[:200] for line in scenario.log_lines(run_id)][-6:]}"
                         for run_id in dict.fromkeys([*lost, *changed])],
            "stderr_tail": stderr[-2000:] if agent.returncode or "Traceback" in stderr else "",
        }
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait()
        if scenario is not None:
            scenario.db.close()
        subprocess.run(["umount", "-l", str(disk)], check=False)


def crash_while_settling(kind: str, trials: int) -> dict[str, dict[str, Any]]:
    """Kill the agent at each step of settling a finished run, restart it; lost, overwritten, doubled?"""
    server = PrefectServerDouble().start() if kind == "graphql" else None
    try:
        scenario = Scenario(kind, server)
        script = CRASHING_AGENT
        flow_id = scenario.flow("mark")
        results: dict[str, dict[str, Any]] = {}
        for step in CRASH_STEPS:
            row: dict[str, Any] = {"trials": trials, "killed": 0, "lost": 0, "overwritten": 0, "duplicates": 0,
                                   "files_left": 0, "problems": []}
            for _ in range(trials):
                (run_id,) = scenario.runs(flow_id, 1, path=str(scenario.marker))
                crashed = subprocess.run([sys.executable, str(script), str(ROOT), *scenario.arguments("--once")],
                                         env={**scenario.env, "CRASH_AT": step}, cwd=scenario.root,
                                         capture_output=True, text=True, timeout=120)
                row["killed"] += crashed.returncode == -signal.SIGKILL
                restarted = scenario.agent("--once")
                _, errors = restarted.communicate(timeout=120)
                wait_for(lambda run_id=run_id: scenario.history(run_id)[-1:] == ["Success"], timeout=10)
                history = scenario.history(run_id)
                runs = scenario.executions().count(run_id)
                lost = scenario.state(run_id) != "Success" or runs == 0
                changed = "Failed" in history or history.count("Success") != 1 or overwritten(history)
                left = [path.name for path in scenario.files_left()]
                row["lost"] += lost
                row["overwritten"] += changed
                row["duplicates"] += max(runs - 1, 0)
                row["files_left"] += bool(left)
                if lost or changed or runs != 1 or left or restarted.returncode != 0 or "Traceback" in errors:
                    row["problems"].append(
                        f"{run_id}: crashing agent exited {crashed.returncode}, restarted agent exited "
                        f"{restarted.returncode}, history {history}, executed {runs}x, files left {left}"
                        + (f", stderr: {errors.strip()[-500:]}" if restarted.returncode or "Traceback" in errors
                           else ""))
                for path in scenario.files_left():  # one trial's leftovers are not counted again in the next
                    path.unlink(missing_ok=True)
            results[step] = row
        return results
    finally:
        if server is not None:
            server.stop()


def small_scale_cases() -> dict[str, Any]:
    """The 8 failure modes, SIGTERM drains and the bad-input matrix, through the test suite."""
    groups = {
        "the 8 child failure modes, all in one test per backend (tests)": "each_way",
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
    full = results["disk_full"]
    lines += ["", "## A full disk under the agent's home and the embedded database", "",
              "A 16 MB tmpfs holds `PREFECT__HOME_DIR` and the SQLite file (the flow files stay off it, "
              "named with `--flows-dir`); one agent with `--limit 4` runs the burst, and once a third of it "
              "has run the tmpfs is filled to the last byte, kept full, then emptied. Most writes held back: "
              "the largest N in the agent's \"Holding N API write(s) back\" (its database writes refused "
              "while the disk was full). Overwritten: any state after the run's first final state (in "
              "parentheses: of another type than that final state). Runs lost or overwritten are listed "
              "below the table with their state history.", "",
              "| runs | seconds full | bytes free while full | most writes held back | executed while full | "
              "Success | lost | final states overwritten (by another state) | duplicates | agent exit code | "
              "Traceback on stderr |",
              "|---|---|---|---|---|---|---|---|---|---|---|",
              f"| {full['runs']} | {full['seconds_full']:g} | {full['free_bytes_while_full']} | "
              f"{full['writes_held']} | {full['executed_while_full']} | {full['success']} | {full['lost']} | "
              f"{full['overwritten']} ({full['overwritten_with_another']}) | "
              f"{full['duplicates']} | {full['exit_code']} | {'yes' if full['traceback'] else 'no'} |"]
    if full["problems"] or full["stderr_tail"]:
        lines += ["", *(f"- {problem}" for problem in full["problems"])]
        lines += [f"- the agent's stderr ends: `{' | '.join(full['stderr_tail'].splitlines()[-10:])}`"] * bool(
            full["stderr_tail"])
    lines += ["", "## SIGKILL at each step of settling a finished run, then a restart", "",
              "A wrapper kills the agent (`--once`) with SIGKILL at one step of settling a run whose "
              "process ended (`_finish`, `RunBook.settled`, `RunBook.save` after it, `_Job.remove_files`, "
              "just after it); a normal `--once` agent follows. Lost: the run is not Success; overwritten: "
              "its history holds Failed, not exactly one Success, or a state after its first final one; "
              "files left: under `<home>/agents/*/runs/`.", "",
              "| backend | step | trials | killed at the step | lost | overwritten | duplicates | files left |",
              "|---|---|---|---|---|---|---|---|"]
    problems = []
    for label, steps in results["crash_while_settling"].items():
        for step, row in steps.items():
            lines.append(f"| {label} | `{step}` | {row['trials']} | {row['killed']} | {row['lost']} | "
                         f"{row['overwritten']} | {row['duplicates']} | {row['files_left']} |")
            problems += [f"- {label}, `{step}`: {problem}" for problem in row["problems"]]
    if problems:
        lines += ["", *problems]
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
    print("disk full under the home and the embedded database ...", flush=True)
    results["disk_full"] = disk_full(30 if options.quick else 100, 3.0 if options.quick else 10.0)
    print("  ", results["disk_full"], flush=True)
    results["crash_while_settling"] = {}
    for label, kind in (("embedded (SQLite)", "sqlite"), ("Prefect Server double", "graphql")):
        print(f"SIGKILL at each step of settling: {label} ...", flush=True)
        results["crash_while_settling"][label] = crash_while_settling(kind, 5 if options.quick else 20)
        print("  ", results["crash_while_settling"][label], flush=True)
    print("small-scale cases ...", flush=True)
    results["small_scale"] = small_scale_cases()
    print("  ", results["small_scale"], flush=True)
    report = markdown(results)
    Path(options.out).write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
