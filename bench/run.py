#!/usr/bin/env python3
"""`make bench`: stop completeness and latency, side by side with the usual ways.

    .venv/bin/python bench/run.py            # the full run (~8-10 minutes on 2 cores)
    .venv/bin/python bench/run.py --quick    # tiny sizes, 1 run each (< 60 s): a smoke run

Four sections, all against the real services on loopback and real process trees:

1. kill   - every fake_case.py topology, stopped four ways: Popen.terminate()
            then kill() on the direct child (Java's Process.destroy() design),
            os.killpg on the case's process group, psutil's recursive children
            of the root, and the executor's own cancel. Survivors, time until
            zero survivors, median of --runs runs.
2. api    - the collector's stop of a 40-instance task over 10 executors with
            0, 1 and 3 black-holed, versus the design's loop that cancels one
            instance after another with the same connect/read timeouts.
3. scale  - 1, 10, 50, 100 concurrent stops of 4-instance tasks over 3
            executors: p50/p99, stops per second, CPU and peak RSS of the services.
4. growth - cancel time for trees of 10, 100, 500 processes; stop latency for
            tasks of 1, 10, 100 instances; the slope of each.

Prints Markdown tables on stdout (progress on stderr), writes the raw figures
to bench/results.json and the tables with the targets to bench/RESULTS.md.
Every loop is bounded in count and time; everything started is ended by pid
or by the BENCH_RUN environment marker it carries, never by name.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (BENCH_RUN_ENV, CODE_FILES, MY_PID, ROOT, RUN_ID,  # noqa: E402
                     SurvivorCounter, call_with_timeouts, code_root, collector_service,
                     executor_service, export_code, fmt_ms,
                     kill_everything, log, marked_pids, median, ms, new_id, percentile,
                     read_pid_file, reap_children, slope, start_services, table,
                     wait_until)

HERE = os.path.dirname(os.path.abspath(__file__))
IDLE_CASE = "bench/idle_case.py"      # relative to the executors' --cases-dir (the code root)
CASE_ID_ENV = "CASE_EXEC_TASK_ID"     # the executor marks every case process with it
BASELINE_ENV = "BENCH_CASE"           # the bench marks the cases it starts itself
SAFETY_SECONDS = "300"                # fake_case processes end by themselves after this
POLL = 0.01                           # survivor poll interval
CONFIRM = 0.1                         # zero survivors must hold this long to count


@dataclasses.dataclass
class Topology:
    key: str
    label: str
    args: list
    ready: int = 0            # pid-file entries to wait for before the stop (0: all expected)


@dataclasses.dataclass
class Plan:
    runs: int = 5
    grace: float = 1.0            # executor --grace-seconds, and the baselines' grace
    never_after: float = 1.0      # "never": survivors still there this long after the stop returned
    never_confirm: float = 30.0   # each "never" cell, run once more and watched this long
    topologies: list = None
    api_executors: int = 10
    api_instances: int = 40
    api_blackholes: tuple = ((0, 0), (1, 0), (2, 1))   # (silent, unconnectable)
    stop_wait: float = 3.0        # the collector's --stop-wait (its default)
    ref_timeouts: tuple = (0.5, 1.5)   # the design's 10 s / 30 s, scaled by 1/20
    ref_runs: int = 1             # the loop's time is the sum of its timeouts: one run shows it
    isolation_hung: int = 100     # > the collector's 64 call workers; 0 skips the isolation run
    isolation_watch: float = 5.0  # how long to watch the healthy task's cases after its stop
    design_ref_cap: float = 30.0  # one loop run with the real 10 s / 30 s, cut off after this
    scale_levels: tuple = (1, 10, 50, 100)
    scale_instances: int = 4
    scale_executors: int = 3
    growth_trees: tuple = (10, 100, 500)
    growth_tasks: tuple = (1, 10, 100)
    growth_runs: int = 3


def full_plan():
    return Plan(topologies=[
        Topology("wide-200", "wide tree: root + 200 children", ["--children", "200", "--depth", "1"]),
        Topology("chain-10", "depth-10 chain", ["--children", "1", "--depth", "10"]),
        Topology("sh-c", "`sh -c` wrapper, 4 x 4 behind it", ["--via-shell", "--children", "4", "--depth", "2"]),
        Topology("orphans", "orphans: 4x4x4, middles exit", ["--orphan", "--children", "4", "--depth", "3"]),
        Topology("daemon", "double-forked setsid daemon", ["--daemonize", "--children", "3", "--depth", "1"]),
        Topology("new-pgid", "each process its own group, 5x5", ["--new-pgid", "--children", "5", "--depth", "2"]),
        Topology("ignore-term", "SIGTERM ignored, 14x14", ["--ignore-sigterm", "--children", "14", "--depth", "2"]),
        Topology("fork-storm", "fork storm (a fork every 20 ms)", ["--fork-storm", "--storm-limit", "300"], ready=2 + 20),
    ])


def quick_plan():
    return Plan(
        runs=1, grace=0.3, never_after=0.5, never_confirm=0, api_executors=4, api_instances=8,
        api_blackholes=((0, 0), (1, 0), (1, 1)), stop_wait=1.0, ref_timeouts=(0.2, 0.6),
        ref_runs=1, design_ref_cap=0, isolation_hung=0, scale_levels=(1, 5), growth_trees=(10, 50),
        growth_tasks=(1, 5), growth_runs=1,
        topologies=[
            Topology("wide-200", "wide tree: root + 20 children (quick)", ["--children", "20", "--depth", "1"]),
            Topology("chain-10", "depth-3 chain (quick)", ["--children", "1", "--depth", "3"]),
            Topology("sh-c", "`sh -c` wrapper, 2 behind it (quick)", ["--via-shell", "--children", "2", "--depth", "1"]),
            Topology("orphans", "orphans: 2x2, middles exit (quick)", ["--orphan", "--children", "2", "--depth", "2"]),
            Topology("daemon", "double-forked setsid daemon", ["--daemonize", "--children", "1", "--depth", "1"]),
            Topology("new-pgid", "each process its own group, 2x2 (quick)", ["--new-pgid", "--children", "2", "--depth", "2"]),
            Topology("ignore-term", "SIGTERM ignored, 3x3 (quick)", ["--ignore-sigterm", "--children", "3", "--depth", "2"]),
            Topology("fork-storm", "fork storm (quick)", ["--fork-storm", "--storm-limit", "100"], ready=2 + 5),
        ])


def expected_entries(args):
    """How many pid-file entries a fake_case.py run will write (its own formula)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("fake_case", os.path.join(code_root(),
                                                                            "fake_case.py"))
    fake_case = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake_case)
    return fake_case.expected_count(fake_case.parse_args(list(args)))


# =============================================================================
# 1. kill completeness and time
# =============================================================================

METHODS = ("terminate", "killpg", "psutil", "executor")
EXECUTOR_METHODS = ("executor", "executor-scan")
METHOD_LABELS = {
    "terminate": "`Popen.terminate()`+`kill()` (Java `destroy()`)",
    "killpg": "`os.killpg` on its group",
    "psutil": "psutil recursive children",
    "executor": "executor cancel",
    "executor-scan": "executor cancel, `--cgroups off`",
}


def stop_terminate(popen, grace):
    """Java's Process.destroy() then destroyForcibly(): the direct child only."""
    popen.terminate()
    try:
        popen.wait(grace)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()


def stop_killpg(popen, grace):
    """SIGTERM to the case's process group, SIGKILL to it after the grace."""
    pgid = popen.pid            # started with start_new_session: pgid == pid
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        popen.poll()
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    else:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    popen.wait()


def stop_psutil(popen, grace):
    """The usual recipe: root.children(recursive=True), terminate, wait, kill."""
    import psutil
    try:
        root = psutil.Process(popen.pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)
    popen.wait()


def measure_stop(stop, pid_file, counter, never_after, hard_cap=120.0):
    """Run stop() in a thread while polling the pid file's survivors.

    Returns (time to zero survivors or None for never, survivors at the end,
    survivors when stop returned, stop's own duration, stop's result or error).
    "Never": survivors still there never_after seconds after stop returned."""
    state = {}

    def runner():
        try:
            state["result"] = stop()
        except Exception as e:        # reported, not raised: the run is cleaned up anyway
            state["error"] = repr(e)
        finally:
            state["done"] = time.monotonic()

    t0 = time.monotonic()
    th = threading.Thread(target=runner, daemon=True)
    th.start()
    zero_since = None
    at_return = None
    n = None
    while True:
        now = time.monotonic()
        n = counter.count(read_pid_file(pid_file))
        done = state.get("done")
        if done is not None and at_return is None:
            at_return = n
        if n:
            zero_since = None
        elif zero_since is None:
            zero_since = now
        if done is not None:
            if n == 0 and now - zero_since >= CONFIRM:
                break
            if now >= done + never_after:
                break
        if now - t0 > hard_cap:
            break
        time.sleep(POLL)
    th.join(hard_cap)
    done = state.get("done", time.monotonic())
    to_zero = (zero_since - t0) if n == 0 else None
    return to_zero, n, at_return, done - t0, state.get("result"), state.get("error")


def kill_run(plan, base, executors, topo, method, run):
    """One topology stopped one way; everything it made is killed afterwards.
    executors: method -> the executor service for the executor's own methods."""
    pid_file = os.path.join(base, "pids", f"{new_id(topo.key)}.json")
    args = [*topo.args, "--pid-file", pid_file, "--duration", SAFETY_SECONDS,
            "--child-duration", SAFETY_SECONDS]
    ready = topo.ready or expected_entries(topo.args)
    popen = None
    if method in EXECUTOR_METHODS:
        executor = executors[method]
        task_id = new_id("kill")
        code, resp = executor.call("POST", "/test-case-execution/execute",
                                   {"taskId": task_id, "script": "fake_case.py", "args": args})
        if code != 200:
            raise RuntimeError(f"execute answered {code}: {resp}")
        marker = (CASE_ID_ENV, task_id)
        counter = SurvivorCounter(executor.pid)

        def stop():
            code, resp = executor.call("POST", f"/test-case-execution/cancel/{task_id}",
                                       timeout=120)
            return {"http": code, **(resp.get("data") or {})}
    else:
        mark = new_id("case")
        env = dict(os.environ, **{BENCH_RUN_ENV: RUN_ID, BASELINE_ENV: mark})
        popen = subprocess.Popen([sys.executable, os.path.join(code_root(), "fake_case.py"),
                                  *args], cwd=base, env=env,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        marker = (BASELINE_ENV, mark)
        counter = SurvivorCounter(MY_PID)
        how = {"terminate": stop_terminate, "killpg": stop_killpg, "psutil": stop_psutil}[method]

        def stop():
            how(popen, plan.grace)
    try:
        wait_until(lambda: len(read_pid_file(pid_file)) >= ready, 60, 0.02,
                   f"{ready} processes of {topo.key}")
        processes = len(read_pid_file(pid_file))
        to_zero, left, at_return, took, result, error = measure_stop(
            stop, pid_file, counter, plan.never_after)
        processes = max(processes, len(read_pid_file(pid_file)))   # a storm adds more
        # Also by environment marker: catches a process that never made it into the pid file.
        marked = len(marked_pids(*marker))
    finally:
        kill_everything(pid_file, marker)
        if popen is not None:
            try:
                popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
    return {"topology": topo.key, "method": method, "run": run, "processes": processes,
            "survivors": left, "survivors_at_return": at_return, "marked_left": marked,
            "time_to_zero_ms": ms(to_zero), "stop_call_ms": ms(took),
            "cancel": result if method in EXECUTOR_METHODS else None, "error": error}


def section_kill(plan, base, info):
    """info receives what the executor ran with: its cgroup base, the methods measured."""
    log("== 1. kill completeness and time ==")
    os.makedirs(os.path.join(base, "pids"), exist_ok=True)
    executors = {"executor": executor_service("127.0.0.1", base, plan.grace, "kill-executor")}
    services = start_services(list(executors.values()))
    runs, growth = [], []
    try:
        health = executors["executor"].call("GET", "/health")[1].get("data") or {}
        info["cgroups"] = health.get("cgroups")
        methods = METHODS
        if info["cgroups"]:
            # A cgroup per case is the executor's default where it may create
            # them; the /proc scan alone is what it does elsewhere: measure both.
            executors["executor-scan"] = executor_service(
                "127.0.0.1", base, plan.grace, "kill-executor-scan", ["--cgroups", "off"])
            services += start_services([executors["executor-scan"]])
            methods = METHODS + ("executor-scan",)
        info["methods"] = list(methods)
        for topo in plan.topologies:
            for run in range(plan.runs):
                for method in methods:      # interleaved, so drift hits every method alike
                    r = kill_run(plan, base, executors, topo, method, run)
                    runs.append(r)
                    log(f"  {topo.key:<12} {method:<13} run {run + 1}: {r['processes']:>3} procs, "
                        f"{r['survivors']} left, zero after {fmt_ms(r['time_to_zero_ms'])}"
                        + (f" ERROR {r['error']}" if r["error"] else ""))
        runs += confirm_never(plan, base, executors, runs)
        for n in plan.growth_trees:
            topo = Topology(f"tree-{n}", f"cooperative tree of {n}",
                            ["--children", str(n - 1), "--depth", "1"])
            for run in range(plan.growth_runs):
                for method in [m for m in methods if m in EXECUTOR_METHODS]:
                    r = kill_run(plan, base, executors, topo, method, run)
                    r["size"] = n
                    growth.append(r)
                    log(f"  growth tree-{n} {method} run {run + 1}: cancel "
                        f"{fmt_ms(r['stop_call_ms'])}, zero after "
                        f"{fmt_ms(r['time_to_zero_ms'])}, {r['survivors']} left")
    finally:
        for s in services:
            s.stop()
    return runs, growth


def confirm_never(plan, base, executors, runs):
    """Each (topology, method) that left survivors, run once more and watched for
    never_confirm seconds: "never" means "still there 30 s later", and watching all
    of them at once keeps that to one wait instead of one per cell."""
    cells = sorted({(r["topology"], r["method"]) for r in runs if r["time_to_zero_ms"] is None})
    if not plan.never_confirm or not cells:
        return []
    log(f"  confirming 'never' for {len(cells)} cell(s): watching {plan.never_confirm:g} s")
    topologies = {t.key: t for t in plan.topologies}
    watch = dataclasses.replace(plan, never_after=plan.never_confirm)
    with concurrent.futures.ThreadPoolExecutor(len(cells)) as pool:
        confirms = list(pool.map(lambda c: kill_run(watch, base, executors, topologies[c[0]],
                                                    c[1], "confirm"), cells))
    for r in confirms:
        r["confirm"] = True
        log(f"  {r['topology']:<12} {r['method']:<13} confirm: {r['survivors']} left "
            f"{plan.never_confirm:g} s after the stop")
    return confirms


def summarize_kill(plan, runs):
    rows = []
    for topo in plan.topologies:
        row = {"topology": topo.key, "label": topo.label}
        for method in METHODS + ("executor-scan",):
            cell = [r for r in runs if r["topology"] == topo.key and r["method"] == method]
            rs = [r for r in cell if not r.get("confirm")]
            confirm = [r["survivors"] for r in cell if r.get("confirm")]
            if not rs:
                continue
            row["processes"] = median([r["processes"] for r in rs])
            row[method] = {
                "survivors_median": median([r["survivors"] for r in rs]),
                "survivors_max": max(r["survivors"] for r in rs),
                "time_to_zero_median_ms": median([r["time_to_zero_ms"] for r in rs]),
                "stop_call_median_ms": median([r["stop_call_ms"] for r in rs]),
                "never_runs": sum(r["time_to_zero_ms"] is None for r in rs),
                "marked_left_max": max(r["marked_left"] for r in rs),
                "runs": len(rs),
                "errors": [r["error"] for r in rs if r["error"]],
                "survivors_after_confirm": confirm[0] if confirm else None,
            }
        rows.append(row)
    return rows


def kill_table(plan, rows):
    methods = [m for m in METHODS + ("executor-scan",) if rows and m in rows[0]]
    header = ["topology", "processes"] + [METHOD_LABELS[m] for m in methods]
    out = []
    for row in rows:
        cells = [f"{row['topology']} ({row['label']})", f"{row['processes']:.0f}"]
        for m in methods:
            s = row[m]
            cell = f"{s['survivors_median']:.0f} left, {fmt_ms(s['time_to_zero_median_ms'])}"
            if s.get("survivors_after_confirm") is not None:
                cell += f" ({s['survivors_after_confirm']} left {plan.never_confirm:g} s after)"
            if m in EXECUTOR_METHODS:
                cell += f" (call {fmt_ms(s['stop_call_median_ms'])})"
            cells.append(cell)
        out.append(cells)
    return table(header, out)


# =============================================================================
# 2-4. the stop API
# =============================================================================

def make_task(collector, executors, instances, name="bench"):
    """Create and start a task of idle cases; every instance must be RUNNING."""
    code, resp = collector.call("POST", "/api/collect-task", {
        "name": f"{name}-{new_id('t')}",
        "cases": [{"script": IDLE_CASE, "args": [SAFETY_SECONDS]}] * instances,
        "executors": [e.address for e in executors]})
    if code != 201:
        raise RuntimeError(f"create answered {code}: {resp}")
    task_id = resp["data"]["id"]
    code, resp = collector.call("POST", f"/api/collect-task/{task_id}/start", timeout=120)
    insts = (resp.get("data") or {}).get("instances") or []
    if code != 200 or any(i["status"] != "RUNNING" for i in insts):
        raise RuntimeError(f"start answered {code}: {[i.get('status') for i in insts]} "
                           f"{[i.get('error') for i in insts if i.get('error')]}")
    return {"id": task_id, "instances": insts}


def make_tasks(collector, executors, count, instances, workers=8):
    with concurrent.futures.ThreadPoolExecutor(min(workers, count)) as pool:
        return list(pool.map(lambda _: make_task(collector, executors, instances), range(count)))


def case_ids(tasks):
    return {i["executionTaskId"] for t in tasks for i in t["instances"]}


def tidy(collector, executors, tasks, timeout=30.0):
    """After a measurement: every case of these tasks ends, through the API
    first (so services stay consistent), by SIGKILL on its marker last."""
    ids = case_ids(tasks)
    by_id = {i["executionTaskId"]: i["executor"] for t in tasks for i in t["instances"]}

    def cancel(task_id):
        return call_with_timeouts(by_id[task_id], "POST",
                                  f"/test-case-execution/cancel/{task_id}", 5, 30)

    live = set()
    for pid in marked_pids(CASE_ID_ENV, ids):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
            live.add(env[CASE_ID_ENV.encode()].decode())
        except (OSError, KeyError):
            pass
    if live:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(cancel, sorted(live)))
    try:
        wait_until(lambda: not marked_pids(CASE_ID_ENV, ids), timeout, 0.1, "cases to end")
    except TimeoutError:
        pass
    left = kill_everything(marker=(CASE_ID_ENV, ids))
    if left:
        log(f"  tidy: {left} case process(es) had to be killed by marker")
    return left


def stop_task(collector, task, results, index, go):
    """One stop, timed from the moment all stops are released."""
    go.wait(60)
    t0 = time.monotonic()
    try:
        code, resp = collector.call("POST", f"/api/collect-task/{task['id']}/stop",
                                    {"reason": "bench"}, timeout=120)
        error = None if code == 200 else f"HTTP {code}: {resp.get('message')}"
    except OSError as e:
        code, resp, error = None, {}, repr(e)
    t1 = time.monotonic()
    states = {}
    for i in (resp.get("data") or {}).get("instances") or []:
        states[i["cancel"]["state"]] = states.get(i["cancel"]["state"], 0) + 1
    results[index] = {"start": t0, "end": t1, "latency_ms": ms(t1 - t0), "http": code,
                      "error": error, "cancel_states": states}


def concurrent_stops(collector, tasks, services):
    """Release len(tasks) stops at once; latency, throughput, CPU and RSS of services."""
    results = [None] * len(tasks)
    go = threading.Event()
    threads = [threading.Thread(target=stop_task, args=(collector, t, results, k, go), daemon=True)
               for k, t in enumerate(tasks)]
    for th in threads:
        th.start()
    ids = case_ids(tasks)
    cpu0 = {s.address: s.cpu_seconds() for s in services}
    peak = {s.address: s.rss() for s in services}
    sampling = threading.Event()

    def sample():
        while not sampling.wait(0.02):
            for s in services:
                try:
                    peak[s.address] = max(peak[s.address], s.rss())
                except Exception:
                    pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    go.set()
    for th in threads:
        th.join(180)
    answered = time.monotonic()
    try:
        wait_until(lambda: not marked_pids(CASE_ID_ENV, ids), 60, 0.05, "every case to end")
        complete = time.monotonic() - t0
    except TimeoutError:
        complete = None
    sampling.set()
    sampler.join(5)
    cpu = {s.address: s.cpu_seconds() - cpu0[s.address] for s in services}
    done = [r for r in results if r]
    lat = [r["latency_ms"] for r in done]
    first = min(r["start"] for r in done)
    last = max(r["end"] for r in done)
    states = {}
    for r in done:
        for k, v in r["cancel_states"].items():
            states[k] = states.get(k, 0) + v
    return {
        "stops": len(tasks), "answered": len(done),
        "errors": sum(1 for r in done if r["error"]) + len(tasks) - len(done),
        "error_samples": [r["error"] for r in done if r["error"]][:5],
        "latency_ms": lat, "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
        "max_ms": max(lat), "wall_s": round(last - first, 3),
        "stops_per_s": round(len(done) / max(last - first, 1e-6), 1),
        "all_answered_s": round(answered - t0, 3),
        "all_cases_gone_s": None if complete is None else round(complete, 3),
        "cancel_states_at_answer": states,
        "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "peak_rss_mb": {k: round(v / 2 ** 20, 1) for k, v in peak.items()},
        "vmhwm_mb": {s.address: round(s.peak_rss() / 2 ** 20, 1) for s in services},
    }


def reference_loop(instances, connect_timeout, read_timeout, cap=None):
    """The design's stop: cancel one instance after another, each call with
    the given connect and read timeouts. cap: start no new call after that
    many seconds (the loop is then at least that slow)."""
    t0 = time.monotonic()
    calls = []
    for inst in sorted(instances, key=lambda i: i["id"]):
        if cap is not None and time.monotonic() - t0 >= cap:
            break
        s = time.monotonic()
        outcome = call_with_timeouts(inst["executor"], "POST",
                                     f"/test-case-execution/cancel/{inst['executionTaskId']}",
                                     connect_timeout, read_timeout)
        calls.append({"executor": inst["executor"], "outcome": outcome,
                      "ms": ms(time.monotonic() - s)})
    return {"total_ms": ms(time.monotonic() - t0), "calls": calls,
            "complete": len(calls) == len(instances)}


def blackhole(executors, silent, unconnectable):
    """The last silent+unconnectable executors become black holes."""
    n = len(executors)
    chosen = executors[n - silent - unconnectable:]
    for k, e in enumerate(chosen):
        e.freeze(unconnectable=k >= silent)
    return chosen


def section_api(plan, base):
    log("== 2. stop API latency with black-holed executors ==")
    executors = [executor_service(f"127.0.0.{10 + k}", base, 1.0, f"api-executor{k}")
                 for k in range(plan.api_executors)]
    collector = collector_service(base, executors, "api-collector", stop_wait=plan.stop_wait)
    services = executors + [collector]
    rows = []
    design = isolation = None
    c_s, r_s = plan.ref_timeouts
    try:
        start_services(services)
        for silent, unconn in plan.api_blackholes:
            row = {"silent": silent, "unconnectable": unconn, "collector": [], "reference": []}
            for run in range(plan.runs):
                with_ref = run < plan.ref_runs
                tasks = [make_task(collector, executors, plan.api_instances)]
                if with_ref:
                    tasks.append(make_task(collector, executors, plan.api_instances))
                holes = []
                try:
                    holes = blackhole(executors, silent, unconn)
                    results = [None]
                    go = threading.Event()
                    go.set()
                    stop_task(collector, tasks[0], results, 0, go)
                    row["collector"].append(results[0])
                    if with_ref:
                        row["reference"].append(reference_loop(tasks[1]["instances"], c_s, r_s))
                finally:
                    for e in holes:
                        e.thaw()
                    for e in holes:
                        e.wait_healthy(30)
                    tidy(collector, executors, tasks)
                ref = row["reference"][-1]["total_ms"] if with_ref else None
                log(f"  {silent} silent + {unconn} unconnectable, run {run + 1}: collector stop "
                    f"{fmt_ms(results[0]['latency_ms'])} {results[0]['cancel_states']}"
                    + (f"; one-after-another loop {fmt_ms(ref)}" if ref is not None else ""))
            rows.append(row)
        silent, unconn = plan.api_blackholes[-1]
        if plan.design_ref_cap:
            tasks = [make_task(collector, executors, plan.api_instances)]
            holes = []
            try:
                holes = blackhole(executors, silent, unconn)
                design = reference_loop(tasks[0]["instances"], 10.0, 30.0, plan.design_ref_cap)
                design.update(silent=silent, unconnectable=unconn, cap_s=plan.design_ref_cap)
            finally:
                for e in holes:
                    e.thaw()
                for e in holes:
                    e.wait_healthy(30)
                tidy(collector, executors, tasks)
            log(f"  one-after-another loop with the design's 10 s / 30 s, {silent} silent + "
                f"{unconn} unconnectable: {fmt_ms(design['total_ms'])} for "
                f"{len(design['calls'])} of {plan.api_instances} instances (cut off)")
        if plan.isolation_hung:
            isolation = isolation_run(plan, collector, executors)
    finally:
        for s in services:
            s.stop()
    return rows, design, isolation


def watch_gone(ids, within):
    """Seconds until no case of ids runs, or None if some still run after `within`."""
    t0 = time.monotonic()
    try:
        wait_until(lambda: not marked_pids(CASE_ID_ENV, ids), within, 0.02, "cases to end")
        return time.monotonic() - t0
    except TimeoutError:
        return None


def isolation_run(plan, collector, executors):
    """Does a stop stuck on black holes hold up the stop of a healthy task?

    A 4-instance task on two healthy executors is stopped alone; then again
    0.5 s after the stop of a task of isolation_hung instances on two silent
    executors began (more cancels than the collector has call workers)."""
    healthy, hung = executors[:2], executors[-2:]
    tasks = []
    out = {"hung_instances": plan.isolation_hung, "watch_s": plan.isolation_watch}
    try:
        alone = make_task(collector, healthy, 4)
        tasks.append(alone)
        t0 = time.monotonic()
        r = [None]
        go = threading.Event()
        go.set()
        stop_task(collector, alone, r, 0, go)
        gone = watch_gone(case_ids([alone]), plan.isolation_watch)
        out["alone"] = dict(r[0], cases_gone_s=None if gone is None else
                            round(time.monotonic() - t0, 3))
        big = make_task(collector, hung, plan.isolation_hung)
        small = make_task(collector, healthy, 4)
        tasks += [big, small]
        for e in hung:
            e.freeze()
        rb = [None]
        stuck = threading.Thread(target=stop_task, args=(collector, big, rb, 0, go), daemon=True)
        stuck.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        stop_task(collector, small, r, 0, go)
        gone = watch_gone(case_ids([small]), plan.isolation_watch)
        out["behind_hung"] = dict(r[0], cases_gone_s=None if gone is None else
                                  round(time.monotonic() - t0, 3))
        stuck.join(60)
        out["hung_stop"] = rb[0]
    finally:
        for e in hung:
            e.thaw()
        for e in hung:
            e.wait_healthy(30)
        tidy(collector, executors, tasks)
    for k in ("alone", "behind_hung"):
        for key in ("start", "end"):
            out[k].pop(key, None)
    if out.get("hung_stop"):
        out["hung_stop"].pop("start", None)
        out["hung_stop"].pop("end", None)
    log(f"  isolation: healthy task's stop alone {fmt_ms(out['alone']['latency_ms'])} "
        f"{out['alone']['cancel_states']}; behind a stop of {plan.isolation_hung} instances on "
        f"hung executors {fmt_ms(out['behind_hung']['latency_ms'])} "
        f"{out['behind_hung']['cancel_states']}, its cases gone after "
        f"{out['behind_hung']['cases_gone_s']} s (watched {plan.isolation_watch:g} s)")
    return out


def project_design(plan, row, ok_ms):
    """The one-after-another loop's time at the design's 10 s / 30 s: the
    answered calls as measured, each black-holed call its full timeout."""
    per_exec = plan.api_instances / plan.api_executors
    holes = (row["silent"] * 30.0 + row["unconnectable"] * 10.0) * per_exec
    answered = plan.api_instances - (row["silent"] + row["unconnectable"]) * per_exec
    return holes * 1000 + answered * ok_ms


def summarize_api(plan, rows, design, isolation):
    out = []
    ok_calls = [c["ms"] for row in rows for ref in row["reference"] for c in ref["calls"]
                if c["outcome"].startswith("HTTP")]
    ok_ms = median(ok_calls) or 0
    for row in rows:
        lat = [r["latency_ms"] for r in row["collector"]]
        refs = [r["total_ms"] for r in row["reference"]]
        combos = [tuple(sorted(r["cancel_states"].items())) for r in row["collector"]]
        states = dict(max(set(combos), key=combos.count)) if combos else {}
        out.append({
            "silent": row["silent"], "unconnectable": row["unconnectable"],
            "blackholed": row["silent"] + row["unconnectable"],
            "collector_median_ms": median(lat), "collector_max_ms": max(lat),
            "collector_errors": sum(1 for r in row["collector"] if r["error"]),
            "cancel_states_at_answer": states,     # the most common per run
            "cancel_states_runs": [r["cancel_states"] for r in row["collector"]],
            "reference_scaled_median_ms": median(refs) if refs else None,
            "reference_scaled_max_ms": max(refs) if refs else None,
            "reference_projected_design_ms": round(project_design(plan, row, ok_ms), 1),
        })
    return {"rows": out, "answered_call_median_ms": ok_ms, "design_run": design,
            "isolation": isolation}


def api_table(plan, summary):
    c_s, r_s = plan.ref_timeouts
    header = ["black-holed of " + str(plan.api_executors), "collector stop median", "max",
              "cancel states at answer (per run)",
              f"one-after-another, {c_s:g} s/{r_s:g} s timeouts: median", "max",
              "one-after-another at 10 s/30 s (projected)"]
    out = []
    for r in summary["rows"]:
        what = "0" if not r["blackholed"] else (
            f"{r['blackholed']} ({r['silent']} silent, {r['unconnectable']} unconnectable)")
        states = ", ".join(f"{k} {v}" for k, v in sorted(r["cancel_states_at_answer"].items()))
        out.append([what, fmt_ms(r["collector_median_ms"]), fmt_ms(r["collector_max_ms"]), states,
                    fmt_ms(r["reference_scaled_median_ms"]), fmt_ms(r["reference_scaled_max_ms"]),
                    fmt_ms(r["reference_projected_design_ms"])])
    return table(header, out)


def section_scale(plan, base):
    log("== 3. concurrent stops ==")
    levels = []
    for n in plan.scale_levels:
        executors = [executor_service(f"127.0.0.{30 + k}", base, 1.0, f"scale{n}-executor{k}")
                     for k in range(plan.scale_executors)]
        collector = collector_service(base, executors, f"scale{n}-collector",
                                      stop_wait=plan.stop_wait)
        services = executors + [collector]
        tasks = []
        try:
            start_services(services)
            tasks = make_tasks(collector, executors, n, plan.scale_instances)
            want = n * plan.scale_instances
            wait_until(lambda: len(marked_pids(CASE_ID_ENV, case_ids(tasks))) >= want, 60, 0.1,
                       f"{want} cases running")
            r = concurrent_stops(collector, tasks, services)
            r["collector"] = collector.address
            r["executors"] = [e.address for e in executors]
            levels.append(r)
            log(f"  {n} concurrent stops: p50 {fmt_ms(r['p50_ms'])} p99 {fmt_ms(r['p99_ms'])} "
                f"{r['stops_per_s']}/s errors {r['errors']} states {r['cancel_states_at_answer']} "
                f"all cases gone after {r['all_cases_gone_s']} s")
        finally:
            tidy(collector, executors, tasks)
            for s in services:
                s.stop()
    return levels


def scale_table(plan, levels):
    header = ["concurrent stops", "instances", "p50", "p99", "max", "stops/s", "errors",
              "cancels at answer", "all cases gone", "CPU collector", "CPU executors",
              "peak RSS collector", "peak RSS executor (max)"]
    out = []
    for r in levels:
        col = r["collector"]
        ex_cpu = sum(v for k, v in r["cpu_s"].items() if k != col)
        ex_rss = max(v for k, v in r["peak_rss_mb"].items() if k != col)
        states = ", ".join(f"{k} {v}" for k, v in sorted(r["cancel_states_at_answer"].items()))
        out.append([r["stops"], r["stops"] * plan.scale_instances, fmt_ms(r["p50_ms"]),
                    fmt_ms(r["p99_ms"]), fmt_ms(r["max_ms"]), r["stops_per_s"], r["errors"],
                    states, "never" if r["all_cases_gone_s"] is None else f"{r['all_cases_gone_s']:.2f} s",
                    f"{r['cpu_s'][col]:.2f} s", f"{ex_cpu:.2f} s",
                    f"{r['peak_rss_mb'][col]:.0f} MB", f"{ex_rss:.0f} MB"])
    return table(header, out)


def section_growth_tasks(plan, base):
    log("== 4b. stop latency by task size ==")
    executors = [executor_service(f"127.0.0.{50 + k}", base, 1.0, f"growth-executor{k}")
                 for k in range(plan.scale_executors)]
    collector = collector_service(base, executors, "growth-collector", stop_wait=plan.stop_wait)
    services = executors + [collector]
    out = []
    try:
        start_services(services)
        for size in plan.growth_tasks:
            for run in range(plan.growth_runs):
                tasks = []
                try:
                    tasks = [make_task(collector, executors, size)]
                    results = [None]
                    go = threading.Event()
                    go.set()
                    stop_task(collector, tasks[0], results, 0, go)
                    r = dict(results[0], size=size, run=run)
                    out.append(r)
                    log(f"  task of {size} instance(s), run {run + 1}: stop "
                        f"{fmt_ms(r['latency_ms'])} {r['cancel_states']}")
                finally:
                    tidy(collector, executors, tasks)
    finally:
        for s in services:
            s.stop()
    return out


def growth_summary(plan, trees, tasks):
    tree_rows = []
    for n in plan.growth_trees:
        row = {"processes": n}
        for method in EXECUTOR_METHODS:
            rs = [r for r in trees if r["size"] == n and r["method"] == method]
            if not rs:
                continue
            prefix = "" if method == "executor" else "scan_"
            row.update({
                prefix + "cancel_median_ms": median([r["stop_call_ms"] for r in rs]),
                prefix + "time_to_zero_median_ms": median([r["time_to_zero_ms"] for r in rs]),
                prefix + "survivors_max": max(r["survivors"] for r in rs)})
        tree_rows.append(row)
    task_rows = []
    for n in plan.growth_tasks:
        rs = [r for r in tasks if r["size"] == n]
        task_rows.append({"instances": n, "stop_median_ms": median([r["latency_ms"] for r in rs]),
                          "stop_max_ms": max(r["latency_ms"] for r in rs),
                          "errors": sum(1 for r in rs if r["error"]),
                          "pending_at_answer": sum(r["cancel_states"].get("PENDING", 0) for r in rs)})
    tb, ta = slope([(r["processes"], r["cancel_median_ms"]) for r in tree_rows])
    sb, sa = slope([(r["processes"], r["scan_cancel_median_ms"]) for r in tree_rows
                    if "scan_cancel_median_ms" in r])
    kb, ka = slope([(r["instances"], r["stop_median_ms"]) for r in task_rows])
    return {"trees": tree_rows, "tasks": task_rows,
            "scan_tree_slope_ms_per_process": None if sb is None else round(sb, 3),
            "scan_tree_intercept_ms": None if sa is None else round(sa, 1),
            "tree_slope_ms_per_process": None if tb is None else round(tb, 3),
            "tree_intercept_ms": None if ta is None else round(ta, 1),
            "task_slope_ms_per_instance": None if kb is None else round(kb, 3),
            "task_intercept_ms": None if ka is None else round(ka, 1)}


def growth_tables(g):
    scan = any("scan_cancel_median_ms" in r for r in g["trees"])
    header = ["tree (cooperative)", "cancel call median", "zero survivors after", "survivors"]
    if scan:
        header += ["`--cgroups off`: cancel call", "zero survivors after", "survivors"]
    rows = []
    for r in g["trees"]:
        row = [f"{r['processes']} processes", fmt_ms(r["cancel_median_ms"]),
               fmt_ms(r["time_to_zero_median_ms"]), r["survivors_max"]]
        if scan:
            row += [fmt_ms(r.get("scan_cancel_median_ms")),
                    fmt_ms(r.get("scan_time_to_zero_median_ms")), r.get("scan_survivors_max")]
        rows.append(row)
    t1 = table(header, rows)
    t2 = table(["task", "stop median", "max", "errors", "cancels pending at answer"],
               [[f"{r['instances']} instance(s)", fmt_ms(r["stop_median_ms"]),
                 fmt_ms(r["stop_max_ms"]), r["errors"], r["pending_at_answer"]]
                for r in g["tasks"]])
    return t1, t2


# =============================================================================
# targets and report
# =============================================================================

def scan_note(row):
    s = row.get("executor-scan")
    if not s:
        return ""
    return (f"; with `--cgroups off` {fmt_ms(s['time_to_zero_median_ms'])} (call "
            f"{fmt_ms(s['stop_call_median_ms'])})")


def targets(plan, kill_rows, api, scale, quick):
    out = []

    def add(name, met, evidence):
        out.append({"target": name, "met": met, "evidence": evidence})

    bad = [(r["topology"], m, r[m]["survivors_max"], r[m]["marked_left_max"])
           for r in kill_rows for m in EXECUTOR_METHODS if m in r
           and (r[m]["survivors_max"] or r[m]["never_runs"] or r[m]["marked_left_max"])]
    if kill_rows:
        add("zero survivors in every topology for the executor's cancel", not bad,
            f"every run of all {len(kill_rows)} topologies ended with 0 survivors (pid file) "
            f"and 0 processes left carrying the case's marker" if not bad
            else f"(topology, method, survivors, marked processes left) {bad}")
    wide = next((r for r in kill_rows if r["topology"] == "wide-200"), None)
    if wide:
        t = wide["executor"]["time_to_zero_median_ms"]
        add(f"{wide['processes']:.0f}-process cooperative tree gone in < 300 ms",
            t is not None and t < 300,
            f"zero survivors after {fmt_ms(t)} (median); cancel call "
            f"{fmt_ms(wide['executor']['stop_call_median_ms'])}" + scan_note(wide))
    ign = next((r for r in kill_rows if r["topology"] == "ignore-term"), None)
    if ign:
        t = ign["executor"]["time_to_zero_median_ms"]
        limit = plan.grace * 1000 + 300
        add(f"SIGTERM-ignoring tree ({ign['processes']:.0f} processes) gone in grace "
            f"({plan.grace:g} s) + < 300 ms", t is not None and t < limit,
            f"zero survivors after {fmt_ms(t)} (median); grace + 300 ms = {fmt_ms(limit)}"
            + scan_note(ign))
    rows = api["rows"]
    worst = max(rows, key=lambda r: r["blackholed"]) if rows else None
    if worst and worst["blackholed"]:
        limit = plan.stop_wait * 1000 + 200
        design = api.get("design_run")
        ref = (f"the one-after-another loop: {fmt_ms(worst['reference_scaled_median_ms'])} with "
               f"{plan.ref_timeouts[0]:g} s/{plan.ref_timeouts[1]:g} s timeouts, "
               f"{fmt_ms(worst['reference_projected_design_ms'])} projected at 10 s/30 s")
        if design:
            ref += (f", and {fmt_ms(design['total_ms'])} measured at 10 s/30 s after only "
                    f"{len(design['calls'])} of {plan.api_instances} instances (cut off)")
        ref_ok = (design["total_ms"] >= 30000) if design else (
            worst["reference_projected_design_ms"] >= 30000)
        add(f"stop API with {worst['blackholed']} of {plan.api_executors} executors black-holed "
            f"<= --stop-wait ({plan.stop_wait:g} s) + 200 ms, versus >= 30 s one after another",
            worst["collector_max_ms"] <= limit and ref_ok,
            f"collector stop median {fmt_ms(worst['collector_median_ms'])}, max "
            f"{fmt_ms(worst['collector_max_ms'])} (limit {fmt_ms(limit)}); {ref}")
    top = max(scale, key=lambda r: r["stops"]) if scale else None
    if top:
        cpu = sum(top["cpu_s"].values())
        cancels = top["stops"] * plan.scale_instances
        cpus = os.cpu_count() or 1
        add(f"{top['stops']} concurrent stops: p99 < 2 s, no errors",
            top["p99_ms"] < 2000 and not top["errors"],
            f"p50 {fmt_ms(top['p50_ms'])}, p99 {fmt_ms(top['p99_ms'])}, max "
            f"{fmt_ms(top['max_ms'])}, errors {top['errors']}, cancels at answer "
            f"{top['cancel_states_at_answer']}; the services used {cpu:.2f} CPU-seconds for "
            f"{cancels} cancels ({cpu / cancels * 1000:.1f} ms each), which on {cpus} cores "
            f"takes at least {cpu / cpus:.2f} s even with nothing else running")
    if quick:
        for t in out:
            t["note"] = "quick run: tiny sizes, not the targets' sizes"
    return out


def code_fingerprint(ref=None):
    """What code was measured: a commit (--ref), or HEAD plus the working tree."""
    import hashlib
    out = {"ref": ref} if ref else {}
    try:
        out["head"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", ref or "HEAD"],
                                     capture_output=True, text=True, timeout=10).stdout.strip()
        if not ref:
            status = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--",
                                     *CODE_FILES], capture_output=True, text=True, timeout=10)
            out["dirty"] = [line.strip() for line in status.stdout.split("\n") if line.strip()]
    except (OSError, subprocess.SubprocessError):
        pass
    for name in CODE_FILES:
        with open(os.path.join(code_root(), name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()[:12]
    return out


def environment():
    import psutil
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2 ** 30, 1),
            "loadavg": os.getloadavg(), "processes_on_machine": len(psutil.pids())}


def code_line(env):
    code = env.get("code") or {}
    text = (f"commit {code['head']} (`--ref {code['ref']}`)" if code.get("ref")
            else f"HEAD {code.get('head', '?')}")
    if code.get("dirty"):
        text += " + uncommitted changes to " + ", ".join(d.split()[-1] for d in code["dirty"])
    text += f" (executor.py {code.get('executor.py')}, collector.py {code.get('collector.py')})"
    if env.get("code_changed_during_run"):
        text += " - **changed during the run: " + ", ".join(env["code_changed_during_run"]) + "**"
    return text


def cgroup_sentence(info):
    if info.get("cgroups"):
        return ("The executor ran each case in its own cgroup v2 here (it may create them: "
                "root), so its cancel also uses `cgroup.kill`, and so do sections 2-4; the "
                "`--cgroups off` column is the same executor with the /proc scan alone, as on a "
                "machine where it may not create cgroups.")
    return "The executor found no cgroup v2 it may write here: its cancel is the /proc scan alone."


def render(plan, quick, env, kill_rows, api, scale, growth, target_list, elapsed, out):
    c_s, r_s = plan.ref_timeouts
    parts = [
        f"Measured by `{'make bench' if not quick else 'bench/run.py --quick'}` "
        f"({'quick: tiny sizes, 1 run each' if quick else f'median of {plan.runs} runs'}) on "
        f"{env['cpus']} CPUs, Python {env['python']}, load average at start "
        f"{env['loadavg_start'][0]:.2f}, {env['processes_on_machine']} processes on the machine; "
        f"whole run {elapsed:.0f} s; code: {code_line(env)}. Raw figures: `{out}`.",
        "",
        "### 1. Kill completeness and time per topology",
        "",
        f"Each cell: survivors after the stop (median), then the time from the start of the stop "
        f"until zero survivors (median). Grace between SIGTERM and SIGKILL: {plan.grace:g} s for "
        f"every method (the executor's `--grace-seconds`). **never** = survivors were still "
        f"there {plan.never_after:g} s after the method returned in every run; each such cell "
        f"was then run once more and watched for {plan.never_confirm:g} s, and the survivors "
        f"still there at the end are in parentheses (nothing in these trees exits on its own "
        f"for {SAFETY_SECONDS} s). Survivors are the processes of the case's `--pid-file` that still exist; a "
        f"zombie counts while its parent is the stopper (the bench, or the executor) and has "
        f"not reaped it, a zombie reparented to init counts as gone. The baselines run "
        f"`fake_case.py` as the bench's own child in a new session; the executor's cancel is "
        f"`POST /test-case-execution/cancel/{{taskId}}` on a real executor (the call's wall "
        f"time in parentheses). " + cgroup_sentence(env.get("kill_executor") or {}),
        "",
        kill_table(plan, kill_rows),
        "",
        "### 2. Stop API latency, black-holed executors",
        "",
        f"A task of {plan.api_instances} instances over {plan.api_executors} executors "
        f"(round-robin), stopped through `POST /api/collect-task/{{id}}/stop` on a collector with "
        f"the design's timeouts (connect 10 s, read 30 s) and `--stop-wait {plan.stop_wait:g}`. "
        f"A black-holed executor is a real executor frozen with SIGSTOP: the kernel completes "
        f"connects into its listen queue and nobody answers (*silent*, the socket state of "
        f"`tests/support.SilentListener`); *unconnectable* additionally has its accept queue "
        f"filled, so a connect never completes (`support.unconnectable()`). The one-after-"
        f"another loop is the design's stop: for each instance in turn, the executor's cancel "
        f"with the same connect/read timeouts, scaled by 1/20 ({c_s:g} s/{r_s:g} s) to keep "
        f"the bench short; the last column projects it to 10 s/30 s (each black-holed call "
        f"its full timeout, each answered call its measured median "
        f"{fmt_ms(api['answered_call_median_ms'])}). Collector: {plan.runs} runs; loop: "
        f"{min(plan.runs, plan.ref_runs)} run(s) (its time is the sum of its timeouts).",
        "",
        api_table(plan, api),
    ]
    design = api.get("design_run")
    if design:
        parts += ["", f"One run of the loop with the real 10 s / 30 s timeouts and "
                  f"{design['silent']} silent + {design['unconnectable']} unconnectable "
                  f"executors, cut off after {design['cap_s']:g} s: "
                  f"**{fmt_ms(design['total_ms'])}** and only {len(design['calls'])} of "
                  f"{plan.api_instances} instances cancelled "
                  f"({', '.join(c['outcome'] + ' ' + fmt_ms(c['ms']) for c in design['calls'][-2:])} "
                  f"were the last calls)."]
    iso = api.get("isolation")
    if iso:
        def gone(r):
            return (f"{r['cases_gone_s']:.2f} s" if r["cases_gone_s"] is not None
                    else f"still running after {iso['watch_s']:g} s")
        parts += ["", f"Isolation: the stop of a healthy 4-instance task (2 healthy executors), "
                  f"alone and 0.5 s after the stop of a {iso['hung_instances']}-instance task on "
                  f"2 silent executors began (more cancels than the collector's call workers).",
                  "", table(["healthy task's stop", "answer", "cancel states at answer",
                             "its cases gone after"],
                            [["alone", fmt_ms(iso["alone"]["latency_ms"]),
                              ", ".join(f"{k} {v}" for k, v in iso["alone"]["cancel_states"].items()),
                              gone(iso["alone"])],
                             [f"behind {iso['hung_instances']} hung cancels",
                              fmt_ms(iso["behind_hung"]["latency_ms"]),
                              ", ".join(f"{k} {v}" for k, v in
                                        iso["behind_hung"]["cancel_states"].items()),
                              gone(iso["behind_hung"])]])]
    g1, g2 = growth["tables"]
    parts += [
        "",
        "### 3. Concurrent stops",
        "",
        f"N tasks of {plan.scale_instances} instances over {plan.scale_executors} executors "
        f"(fresh services per row), all N stops released at once. Latency per stop call; "
        f"stops/s = N / (last answer - first request); CPU = user+system seconds of the "
        f"services from the release until every case process was gone; peak RSS sampled every "
        f"20 ms over the same window. The bench's own client threads share the 2 cores.",
        "",
        scale_table(plan, scale),
        "",
        "### 4. Growth",
        "",
        g1,
        "",
        g2,
        "",
        growth_sentence(growth),
        "",
        "### Targets",
        "",
    ]
    for t in target_list:
        parts.append(f"- {'met' if t['met'] else '**missed**'}: {t['target']} - {t['evidence']}"
                     + (f" ({t['note']})" if t.get("note") else ""))
    parts += ["", "Reproduce: `make bench` (this run; `bench/run.py --ref HEAD` measures the "
              "last commit rather than the working tree), `.venv/bin/python bench/run.py "
              "--quick` (a smoke run, < 60 s), and for where the CPU goes `.venv/bin/pip "
              "install py-spy && .venv/bin/python bench/profile.py --stops 100` (or "
              "`--tree 200`)."]
    return "\n".join(parts) + "\n"


def growth_sentence(g):
    def ratio(rows, xkey, ykey):
        if len(rows) < 2 or not rows[0][ykey] or rows[-1][ykey] is None:
            return ""
        return (f"; {rows[0][xkey]} -> {rows[-1][xkey]} is x{rows[-1][xkey] / rows[0][xkey]:g} "
                f"in size and x{rows[-1][ykey] / rows[0][ykey]:.1f} in time")
    if g["tree_slope_ms_per_process"] is None or g["task_slope_ms_per_instance"] is None:
        return "Slope: not enough sizes measured."
    scan = ""
    if g.get("scan_tree_slope_ms_per_process") is not None:
        scan = (f" ({g['scan_tree_slope_ms_per_process']:.2f} ms per process + "
                f"{g['scan_tree_intercept_ms']:.0f} ms with `--cgroups off`)")
    return (f"Slope (least squares over the medians): the executor's cancel of a cooperative "
            f"tree costs {g['tree_slope_ms_per_process']:.2f} ms per process + "
            f"{g['tree_intercept_ms']:.0f} ms fixed{scan}"
            f"{ratio(g['trees'], 'processes', 'cancel_median_ms')}; the stop of one task costs "
            f"{g['task_slope_ms_per_instance']:.2f} ms per instance + "
            f"{g['task_intercept_ms']:.0f} ms fixed"
            f"{ratio(g['tasks'], 'instances', 'stop_median_ms')}. "
            f"{shape(g['trees'], 'processes', 'cancel_median_ms', 'The cancel')} "
            f"{shape(g['tasks'], 'instances', 'stop_median_ms', 'The stop')}")


def shape(rows, xkey, ykey, what):
    """Whether time grows at most in proportion to size between the end points."""
    if len(rows) < 2 or not rows[0][ykey] or rows[-1][ykey] is None:
        return ""
    size, time_ = rows[-1][xkey] / rows[0][xkey], rows[-1][ykey] / rows[0][ykey]
    if time_ <= size * 1.2:
        return f"{what} grows at most linearly with size (x{time_:.1f} for x{size:g})."
    return f"{what} grows faster than size (x{time_:.1f} for x{size:g}): superlinear."


# =============================================================================
# main
# =============================================================================

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 run each (< 60 s)")
    p.add_argument("--runs", type=int, help="runs per measurement (default 5; quick 1)")
    p.add_argument("--only", choices=("kill", "api", "scale", "growth"), action="append",
                   help="run only these sections (repeatable); the report shows what ran")
    p.add_argument("--topology", action="append", metavar="KEY",
                   help="section 1 only for these topologies (repeatable), e.g. wide-200")
    p.add_argument("--no-design-run", action="store_true",
                   help="skip the one ~31 s run of the loop at the real 10 s/30 s timeouts")
    p.add_argument("--ref", help="measure the code of this commit (exported to a scratch "
                   "directory) instead of the working tree, e.g. --ref HEAD")
    p.add_argument("--out", help="raw figures (default bench/results.json; with --quick "
                   "a file in the temporary directory, so a smoke run never replaces them)")
    p.add_argument("--markdown", help="the tables (default bench/RESULTS.md; with --quick none)")
    p.add_argument("--max-minutes", type=float, default=25.0,
                   help="abort (and clean up) if the whole run takes longer than this")
    return p.parse_args(argv)


def cleanup(services_base):
    """End everything this run started, by its marker; remove its scratch space."""
    killed = kill_everything(marker=(BENCH_RUN_ENV, RUN_ID), timeout=15)
    reap_children()
    shutil.rmtree(services_base, ignore_errors=True)
    if killed:
        log(f"cleanup: ended {killed} leftover process(es) of this run")


def main(argv=None):
    a = parse_args(argv)
    plan = quick_plan() if a.quick else full_plan()
    if a.runs:
        plan.runs = a.runs
    if a.no_design_run:
        plan.design_ref_cap = 0
    if a.topology:
        known = {t.key for t in plan.topologies}
        unknown = set(a.topology) - known
        if unknown:
            raise SystemExit(f"unknown topology {sorted(unknown)}; known: {sorted(known)}")
        plan.topologies = [t for t in plan.topologies if t.key in a.topology]
    sections = set(a.only or ("kill", "api", "scale", "growth"))
    # Only a full run replaces bench/results.json and bench/RESULTS.md.
    full = (not a.quick and sections == {"kill", "api", "scale", "growth"} and not a.topology)
    if a.out is None:
        a.out = (os.path.join(HERE, "results.json") if full else
                 os.path.join(tempfile.gettempdir(), f"task-stop-bench-{os.getuid()}.json"))
    if a.markdown is None and full:
        a.markdown = os.path.join(HERE, "RESULTS.md")
    base = tempfile.mkdtemp(prefix="task-stop-bench-")
    # SIGINT and SIGTERM end the run through the cleanup below, even when a
    # shell started it in the background with SIGINT ignored.
    def interrupted(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    watchdog = threading.Timer(a.max_minutes * 60, os.kill, (os.getpid(), signal.SIGTERM))
    watchdog.daemon = True
    watchdog.start()
    env = environment()
    env["loadavg_start"] = env.pop("loadavg")
    started = time.monotonic()
    raw = {"run_id": RUN_ID, "quick": a.quick, "plan": dataclasses.asdict(plan),
           "environment": env, "sections": sorted(sections)}
    if a.ref:
        export_code(a.ref, os.path.join(base, "code"))
    raw["code_at_start"] = code_fingerprint(a.ref)
    timing = raw["section_timing"] = {}

    def timed(name, fn, *args):
        t, load = time.monotonic(), os.getloadavg()[0]
        try:
            return fn(*args)
        finally:
            timing[name] = {"seconds": round(time.monotonic() - t, 1),
                            "loadavg_1min_start": load, "loadavg_1min_end": os.getloadavg()[0]}
            log(f"  ({name}: {timing[name]['seconds']} s, load average {load:.1f} -> "
                f"{timing[name]['loadavg_1min_end']:.1f})")

    kill_rows, api, scale, growth_trees, growth_tasks = [], {"rows": []}, [], [], []
    try:
        if "kill" in sections or "growth" in sections:
            p = plan if "kill" in sections else dataclasses.replace(plan, topologies=[])
            if "growth" not in sections:
                p = dataclasses.replace(p, growth_trees=())
            kill_info = raw["kill_executor"] = {}
            kill_runs, growth_trees = timed("kill", section_kill, p, base, kill_info)
            raw["kill_runs"] = kill_runs
            kill_rows = summarize_kill(plan, kill_runs)
        if "api" in sections:
            api_rows, design, isolation = timed("api", section_api, plan, base)
            raw["api_runs"] = api_rows
            api = summarize_api(plan, api_rows, design, isolation)
        if "scale" in sections:
            scale = timed("scale", section_scale, plan, base)
        if "growth" in sections:
            growth_tasks = timed("growth-tasks", section_growth_tasks, plan, base)
    finally:
        watchdog.cancel()
        raw["code_at_end"] = code_fingerprint(a.ref)
        cleanup(base)
    elapsed = time.monotonic() - started
    env["loadavg_end"] = os.getloadavg()
    changed = [k for k in CODE_FILES
               if raw["code_at_start"].get(k) != raw["code_at_end"].get(k)]
    env["code"] = raw["code_at_start"]
    env["code_changed_during_run"] = changed
    env["kill_executor"] = raw.get("kill_executor")
    if changed:
        log(f"WARNING: {', '.join(changed)} changed during the run: services started after "
            f"the change ran the new code; run again for figures of one version")
    growth = growth_summary(plan, growth_trees, growth_tasks) if growth_trees and growth_tasks \
        else {"trees": [], "tasks": [], "tree_slope_ms_per_process": None,
              "tree_intercept_ms": None, "task_slope_ms_per_instance": None,
              "task_intercept_ms": None}
    growth["tables"] = growth_tables(growth)
    target_list = targets(plan, kill_rows, api, scale, a.quick)
    raw.update(kill_summary=kill_rows, api_summary=api, scale=scale,
               growth={k: v for k, v in growth.items() if k != "tables"},
               growth_tree_runs=growth_trees, growth_task_runs=growth_tasks,
               targets=target_list, elapsed_s=round(elapsed, 1))
    with open(a.out, "w") as f:
        json.dump(raw, f, indent=1, default=str)
    shown = os.path.relpath(a.out, ROOT) if a.out.startswith(ROOT + os.sep) else a.out
    text = render(plan, a.quick, env, kill_rows, api, scale, growth, target_list, elapsed, shown) \
        if sections == {"kill", "api", "scale", "growth"} else None
    if text is None:
        text = f"Partial run ({', '.join(sorted(sections))}); raw figures in {a.out}\n"
        if kill_rows:
            text += "\n" + kill_table(plan, kill_rows) + "\n"
        if api["rows"]:
            text += "\n" + api_table(plan, api) + "\n"
        if scale:
            text += "\n" + scale_table(plan, scale) + "\n"
        for t in target_list:
            text += f"- {'met' if t['met'] else 'missed'}: {t['target']} - {t['evidence']}\n"
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(("## Performance\n\n" if full else "") + text)
    print(text, flush=True)
    log(f"raw figures: {a.out}" + (f"; tables: {a.markdown}" if a.markdown else ""))
    # Timing targets are reported, not enforced; a stop that is incomplete or
    # fails is a defect, and the exit status says so (for a smoke test).
    defects = [t["evidence"] for t in target_list
               if t["target"].startswith("zero survivors") and not t["met"]]
    defects += [f"{r['errors']} failed stop(s) with {r['stops']} concurrent" for r in scale
                if r["errors"]]
    defects += [f"{r['collector_errors']} failed stop(s) with {r['blackholed']} black-holed"
                for r in api["rows"] if r["collector_errors"]]
    defects += [f"stop of a {r['instances']}-instance task failed {r['errors']} time(s)"
                for r in growth["tasks"] if r["errors"]]
    for d in defects:
        log(f"DEFECT: {d}")
    return 1 if defects else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted: everything this run started has been ended")
        sys.exit(130)
