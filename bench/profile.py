#!/usr/bin/env python3
"""Where the services spend their CPU during a stop: py-spy on the real processes.

    .venv/bin/pip install py-spy                 # not a project requirement
    .venv/bin/python bench/profile.py --stops 100        # bench section 3's worst row
    .venv/bin/python bench/profile.py --tree 200         # one executor cancel of a wide tree

Starts the same services as bench/run.py, attaches `py-spy record --gil` to
each (so a sample is a moment that service's Python held the GIL: its CPU,
not its waiting), runs the stop, and prints each service's CPU seconds and the
share of its samples per part of the code. --ref COMMIT measures a commit
instead of the working tree, for before/after figures.
"""

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import run as bench  # noqa: E402

# First match wins: a sample is filed under the first of these its stack holds.
PARTS = [
    ("executor: /proc scan (ProcessTable.scan)", ("ProcessTable.scan", "case_process_finder")),
    ("executor: case_members (who belongs to the case)", ("case_members",)),
    ("executor: signals", ("Signaller.send", "send (executor.py")),
    ("executor: waiting for reap/exit checks", ("awaiting_reap", "is_alive")),
    ("executor: report to the collector", ("report_forever",)),
    ("executor: reaper thread", ("reap_forever",)),
    ("executor: leftovers of exited roots", ("root_exited",)),
    ("collector: cancel calls to executors", ("deliver_cancel",)),
    ("collector: completion reports from executors", ("Collector.report",)),
    ("collector: stop transaction and answer", ("stop_task",)),
    ("SQLite", ("Database.", "transaction (executor.py", "compare_and_set")),
    ("HTTP server, routing, JSON (wsgiref/bottle)", ("serve_requests", "process_request_thread")),
    ("accept loop", ("serve_forever",)),
]


def spy(service, out, rate):
    return subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "-p",
         str(service.pid), "-r", str(rate), "-f", "raw", "--gil", "--nonblocking", "-o", out],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def breakdown(path):
    parts = collections.Counter()
    total = 0
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return 0, parts
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        if not stack.strip():
            parts["(no Python frame: thread start-up, native code)"] += int(count)
            continue
        for name, keys in PARTS:
            if any(k in stack for k in keys):
                parts[name] += int(count)
                break
        else:
            parts["other"] += int(count)
    return total, parts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stops", type=int, default=100, help="concurrent stops (default 100)")
    p.add_argument("--tree", type=int, help="profile one cancel of a tree of N processes instead")
    p.add_argument("--rate", type=int, default=250, help="samples per second")
    p.add_argument("--ref", help="measure this commit instead of the working tree")
    p.add_argument("--keep", metavar="DIR", help="keep py-spy's raw stacks in DIR")
    a = p.parse_args(argv)
    if not shutil.which("py-spy", path=os.path.dirname(sys.executable)):
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    base = tempfile.mkdtemp(prefix="task-stop-profile-")
    if a.ref:
        harness.export_code(a.ref, os.path.join(base, "code"))
    spies, services, tasks, executors, collector = [], [], [], [], None
    try:
        if a.tree:
            executors = [harness.executor_service("127.0.0.1", base, 1.0, "executor")]
            services = harness.start_services(executors)
        else:
            executors = [harness.executor_service(f"127.0.0.{30 + k}", base, 1.0, f"e{k}")
                         for k in range(3)]
            collector = harness.collector_service(base, executors, "collector")
            services = harness.start_services(executors + [collector])
            tasks = bench.make_tasks(collector, executors, a.stops, 4)
            ids = bench.case_ids(tasks)
            harness.wait_until(lambda: len(harness.marked_pids(bench.CASE_ID_ENV, ids))
                               >= 4 * a.stops, 60, 0.1, "cases running")
        outs = {s.address: os.path.join(base, f"spy-{k}.txt") for k, s in enumerate(services)}
        spies = [spy(s, outs[s.address], a.rate) for s in services]
        time.sleep(1.0)     # py-spy attached
        if a.tree:
            topo = bench.Topology(f"tree-{a.tree}", "", ["--children", str(a.tree - 1),
                                                         "--depth", "1"])
            plan = bench.Plan(grace=1.0, never_after=1.0)
            os.makedirs(os.path.join(base, "pids"), exist_ok=True)
            cpu0 = {s.address: s.cpu_seconds() for s in services}
            r = bench.kill_run(plan, base, executors[0], topo, "executor", 0)
            cpu = {s.address: s.cpu_seconds() - cpu0[s.address] for s in services}
            print(f"cancel of {r['processes']} processes: call {r['stop_call_ms']} ms, zero "
                  f"survivors after {r['time_to_zero_ms']} ms, {r['survivors']} left; "
                  f"executor reported {r['cancel']}")
        else:
            r = bench.concurrent_stops(collector, tasks, services)
            cpu = r["cpu_s"]
            print(f"{a.stops} concurrent stops: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
                  f"errors {r['errors']}, cancels at answer {r['cancel_states_at_answer']}, "
                  f"every case gone after {r['all_cases_gone_s']} s")
        time.sleep(0.5)
    finally:
        for s in spies:
            s.send_signal(signal.SIGINT)
        for s in spies:
            try:
                s.wait(30)
            except subprocess.TimeoutExpired:
                s.kill()
                s.wait()
        if tasks:
            bench.tidy(collector, executors, tasks)
        for s in services:
            s.stop()
        harness.kill_everything(marker=(harness.BENCH_RUN_ENV, harness.RUN_ID))
    try:
        for s in services:
            total, parts = breakdown(outs[s.address])
            print(f"\n{s.script} {s.address}: {cpu.get(s.address, 0):.2f} s CPU, "
                  f"{total} samples with the GIL at {a.rate}/s")
            for name, n in parts.most_common():
                print(f"  {n / max(total, 1) * 100:5.1f}%  {name}")
    finally:
        if a.keep:
            os.makedirs(a.keep, exist_ok=True)
            for s in services:
                if os.path.exists(outs[s.address]):
                    shutil.copy(outs[s.address], os.path.join(
                        a.keep, f"{os.path.splitext(s.script)[0]}-{s.address.replace(':', '_')}.txt"))
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
