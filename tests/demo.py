#!/usr/bin/env python3
"""`make demo` and `make run`.

demo: one collector and two executors on distinct loopback addresses (two lab
      machines), a collect task of realistic cases, started, left running a few
      seconds, stopped over HTTP; then psutil checks that no process of any case
      is left. Exits 0 only if the stop was complete.
run:  a collector and one executor in the foreground until Ctrl-C.
"""

import os
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from support import ROOT, Service, port_or_free, processes_marked, wait_until  # noqa: E402

DEMO_CASES = [
    # Collect, then release the rig: the cleanup step runs even when stopped.
    {"steps": [{"script": "sysstat_sampler.py", "args": ["--duration", "600"]},
               {"script": "release_rig.py", "always": True}]},
    {"script": "pool_collector.py", "args": ["--duration", "600"]},
    {"script": "shell_pipeline.py", "args": ["--duration", "600"]},
]
RUN_SECONDS = 3


def say(text=""):
    print(text, flush=True)


def start_services(base, executor_hosts, log_to_files=True):
    executors = []
    for i, host in enumerate(executor_hosts, 1):
        d = os.path.join(base, f"executor{i}")
        os.makedirs(d)
        executors.append(Service(
            "executor.py", host, port_or_free(host, 8081),
            ["--cases-dir", os.path.join(ROOT, "cases"), "--db", os.path.join(d, "executor.db"),
             "--log-dir", os.path.join(d, "case-logs"), "--work-dir", os.path.join(d, "work")],
            os.path.join(d, "service.log") if log_to_files else None).start())
    collector = Service(
        "collector.py", "127.0.0.1", port_or_free("127.0.0.1", 8080),
        ["--db", os.path.join(base, "collector.db"),
         *[a for e in executors for a in ("--executor", e.address)]],
        os.path.join(base, "collector.log") if log_to_files else None).start()
    return collector, executors


def case_processes(instances):
    return {i["id"]: processes_marked("CASE_EXEC_TASK_ID", i["executionTaskId"])
            for i in instances}


def demo():
    base = tempfile.mkdtemp(prefix="task-stop-demo-")
    collector, executors = start_services(base, ["127.0.0.2", "127.0.0.3"])
    ok = False
    try:
        say("== demo: stopping a running collect task ==")
        say(f"collector  http://{collector.address}")
        for n, e in enumerate(executors, 1):
            say(f"executor   http://{e.address}   (lab machine {n})")
        code, resp = collector.call("POST", "/api/collect-task",
                                    {"name": "demo collection", "cases": DEMO_CASES})
        task = resp["data"]
        say(f"\ncreated task {task['id']} with {len(DEMO_CASES)} cases; starting it")
        code, resp = collector.call("POST", f"/api/collect-task/{task['id']}/start")
        instances = resp["data"]["instances"]
        if code != 200 or any(i["status"] != "RUNNING" for i in instances):
            say(f"start failed: {resp}")
            return 1
        wait_until(lambda: all(len(p) >= 2 for p in case_processes(instances).values()),
                   15, 0.1, "every case to start its child processes")
        time.sleep(RUN_SECONDS)       # let the collection do real work before Stop
        before = case_processes(instances)
        for i in instances:
            say(f"  instance {i['id']}  {i['script']:<20} on {i['executor']}  "
                f"RUNNING  {len(before[i['id']])} processes")
        total = sum(len(p) for p in before.values())

        say(f"\nPOST /api/collect-task/{task['id']}/stop")
        started = time.monotonic()
        code, resp = collector.call("POST", f"/api/collect-task/{task['id']}/stop",
                                    {"reason": "demo"}, headers={"X-User": "demo"})
        ms = (time.monotonic() - started) * 1000
        say(f"  -> HTTP {code} \"{resp['message']}\" in {ms:.0f} ms; task is "
            f"{resp['data']['status']}")
        for i in resp["data"]["instances"]:
            c = i["cancel"]
            r = c["result"] or {}
            say(f"  instance {i['id']}  {i['status']:<8} cancel {c['state']:<9} "
                f"signalled={r.get('signalled')} terminated={r.get('terminated')} "
                f"killed={r.get('killed')} survivors={r.get('survivors')}")
        marker = os.path.join(base, "executor1", "work", instances[0]["executionTaskId"],
                              "rig-released.txt")
        released = wait_until(lambda: os.path.exists(marker), 15, 0.1, "the cleanup step")
        say(f"  instance {instances[0]['id']}  cleanup step release_rig.py ran after the stop "
            f"and wrote {os.path.basename(marker)} in the case's work directory")
        def left_over():
            return [p for procs in case_processes(instances).values() for p in procs]
        try:        # the cleanup step itself ends within a second
            wait_until(lambda: not left_over(), 10, 0.1, "the cleanup step to end")
        except AssertionError:
            pass
        left = left_over()
        say(f"\ncheck with psutil: {total} case processes before the stop, {len(left)} after")
        ok = (code == 200 and not left and released
              and all(i["cancel"]["state"] == "DELIVERED" for i in resp["data"]["instances"]))
        say("OK: the stop was complete." if ok else "FAILED: the stop was not complete.")
        return 0 if ok else 1
    finally:
        collector.stop()
        for e in executors:
            e.stop()
        if ok:
            shutil.rmtree(base, ignore_errors=True)
        else:
            say(f"logs kept in {base}")


def run():
    base = os.path.join(ROOT, "var", "run")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    collector, executors = start_services(base, ["127.0.0.1"], log_to_files=False)
    c, e = collector.address, executors[0].address
    say(f"""
collector  http://{c}      executor  http://{e}   (Ctrl-C stops the unfinished tasks, then both)

  curl -s -XPOST http://{c}/api/collect-task -d '{{"name": "try", "cases": [{{"script": "sysstat_sampler.py"}}, {{"script": "pool_collector.py"}}]}}'
  curl -s -XPOST http://{c}/api/collect-task/1/start
  curl -s http://{c}/api/collect-task
  curl -s -XPOST http://{c}/api/collect-task/1/stop -d '{{"reason": "done"}}'
""")
    try:
        while collector.proc.poll() is None and executors[0].proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop_unfinished_tasks(collector, executors[0])
        collector.stop()
        executors[0].stop()
    return 0


def stop_unfinished_tasks(collector, executor):
    """Cases outlive their executor on purpose (it adopts them on restart), but the
    next `make run` starts from an empty var/run/ and could not reach them: so
    stop every unfinished task, and wait (bounded) until the executor runs nothing."""
    try:
        tasks = collector.call("GET", "/api/collect-task?limit=1000", timeout=5)[1]["data"]
        for task in tasks:
            if task["status"] in ("PENDING", "RUNNING"):
                collector.call("POST", f"/api/collect-task/{task['id']}/stop",
                               {"reason": "make run stopped"}, timeout=10)
                say(f"stopped task {task['id']} ({task['name']})")
        wait_until(lambda: not executor.call("GET", "/test-case-execution/tasks",
                                             timeout=5)[1]["data"], 15, 0.2,
                   "the executor to end every case")
    except (OSError, AssertionError, KeyError, TypeError) as e:
        say(f"could not stop every task before shutting down: {e}")


def stop_on_term(signum, frame):
    raise KeyboardInterrupt     # so `kill <pid>` shuts the services down like Ctrl-C


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, stop_on_term)
    return {"demo": demo, "run": run}[argv[0] if argv else "demo"]()


if __name__ == "__main__":
    sys.exit(main())
