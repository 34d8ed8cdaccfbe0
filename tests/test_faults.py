"""Stop under faults: hung and dead executors, restarts of either service,
races, and many stops at once. Every fault is real: sockets that never answer,
processes killed with SIGKILL, services restarted on the same database."""

import os
import signal
import threading
import time

import pytest

from executor import backoff
from support import (SilentListener, assert_all_gone, cases_dir, create, detail, drop_cap_kill,
                     fake_case, read_pid_file, running, start, stop, wait_gone, wait_pid_file,
                     wait_task, wait_until)


def execution_ids(task):
    return [i["executionTaskId"] for i in task["instances"]]


def cancels_received(ex, execution_task_id):
    return ex.log_text().count(f"task={execution_task_id} cancel requested")


def in_threads(n, fn, *args):
    """Run fn(*args) in n threads at once; their results, in order."""
    results = [None] * n
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        results[i] = fn(*args)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


# -- bounded stop latency --------------------------------------------------------

def test_cancels_go_out_in_parallel_and_the_stop_answers_within_stop_wait(
        start_executor, start_collector, pid_file):
    """Instances on two hung machines first in line; a one-after-another loop
    would spend 2 x read timeout before reaching the live machine."""
    hung1 = start_executor(host="127.0.0.2", name="hung1")
    hung2 = start_executor(host="127.0.0.3", name="hung2")
    live = start_executor(host="127.0.0.4", name="live")
    col = start_collector([hung1.address, hung2.address, live.address],
                          read_timeout=4.0, stop_wait=1.5)
    paths = [pid_file() for _ in range(3)]
    task = create(col, [fake_case(p) for p in paths])
    start(col, task["id"])
    live_entries = wait_pid_file(paths[2], 1)
    listeners = []
    try:
        for ex in (hung1, hung2):
            ex.kill9()      # the executor dies and something on its port never answers
            listeners.append(SilentListener(ex.host, ex.port))
        started = time.monotonic()
        code, resp = stop(col, task["id"])
        elapsed = time.monotonic() - started
        assert code == 200, resp
        assert elapsed < 1.5 + 1.0, f"stop took {elapsed:.1f}s"
        states = [i["cancel"]["state"] for i in resp["data"]["instances"]]
        assert states == ["PENDING", "PENDING", "DELIVERED"]
        assert "2 cancel(s) pending retry" in resp["message"]
        assert_all_gone(live_entries)
        # Delivery goes on in the background and ends in a read timeout, recorded.
        wait_until(lambda: all("no answer" in (i["cancel"]["error"] or "")
                               for i in detail(col, task["id"])["instances"][:2]),
                   10, 0.1, "the hung cancels to time out")
    finally:
        for listener in listeners:
            listener.close()


def test_a_stop_stuck_on_a_hung_machine_never_holds_up_the_stop_of_another(
        start_executor, start_collector, pid_file):
    """Each executor has its own lane of call threads: cancels queued behind a
    frozen machine wait there, and the ones that waited are not sent once a
    call to it found no answer (one timeout, not one per queued cancel)."""
    frozen = start_executor(host="127.0.0.2", name="frozen")
    healthy = start_executor(host="127.0.0.3", name="healthy")
    col = start_collector([frozen.address, healthy.address], args=["--lane-workers", "2"],
                          read_timeout=2.0, stop_wait=1.0, retry_max=0.5)
    big_paths = [pid_file() for _ in range(6)]
    big = create(col, [fake_case(p) for p in big_paths], executors=[frozen.address])
    small_paths = [pid_file() for _ in range(2)]
    small = create(col, [fake_case(p) for p in small_paths], executors=[healthy.address])
    for task in (big, small):
        start(col, task["id"])
    big_entries = [e for p in big_paths for e in wait_pid_file(p, 1)]
    small_entries = [e for p in small_paths for e in wait_pid_file(p, 1)]
    os.kill(frozen.proc.pid, signal.SIGSTOP)  # the kernel still accepts connects; nobody answers
    try:
        code, resp = stop(col, big["id"])
        assert code == 200 and "6 cancel(s) pending retry" in resp["message"], resp
        code, resp = stop(col, small["id"])
        assert code == 200, resp
        assert [i["cancel"]["state"] for i in resp["data"]["instances"]] == ["DELIVERED"] * 2
        assert_all_gone(small_entries)
        # Two calls time out; the four queued behind them are not sent.
        wait_until(lambda: all(i["cancel"]["error"] for i in detail(col, big["id"])["instances"]),
                   10, 0.1, "every cancel of the frozen machine to be tried or skipped")
        errors = [i["cancel"]["error"] for i in detail(col, big["id"])["instances"]]
        assert sum("not sent" in e for e in errors) >= 3, errors
        assert all(running(*e) for e in big_entries)
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
    # A timed-out call may still be served once the machine thaws; the retry
    # then finds the case already gone (NOT_FOUND), which confirms it too.
    wait_until(lambda: all(i["cancel"]["state"] in ("DELIVERED", "NOT_FOUND")
                           for i in detail(col, big["id"])["instances"]),
               20, 0.1, "the frozen machine's cancels to be confirmed once it thaws")
    wait_gone(big_entries, 10)


# -- cancels are never lost ------------------------------------------------------------

def test_retries_back_off_exponentially_up_to_the_cap():
    assert [backoff(n, 30) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 16, 30]
    assert backoff(0, 30) == 0.5 and backoff(50, 30) == 30 and backoff(3, 0.5) == 0.5


def test_a_cancel_state_moves_only_as_the_table_allows():
    from collector import move_cancel
    from executor import Database
    db = Database(":memory:")
    c = db.conn()
    c.execute("INSERT INTO collect_task (id, name, created_at) VALUES (1, 't', 0)")
    c.execute("INSERT INTO test_case_execution_instance (id, collect_task_id, script, executor,"
              " execution_task_id, report_key, created_at) VALUES (1, 1, 's', 'h:1', 'e', 'k', 0)")
    inst = {"id": 1}

    def state():
        return c.execute("SELECT cancel_state FROM test_case_execution_instance").fetchone()[0]
    assert not move_cancel(c, inst, "DELIVERED") and state() == "NOT_NEEDED"
    assert move_cancel(c, inst, "PENDING") and state() == "PENDING"
    assert move_cancel(c, inst, "NOT_FOUND", only_from=("PENDING",)) and state() == "NOT_FOUND"
    # A stale attempt's "still pending" never reopens what an executor answered ...
    assert not move_cancel(c, inst, "PENDING", only_from=("PENDING",))
    # ... but an execute answered after the stop does.
    assert move_cancel(c, inst, "PENDING") and state() == "PENDING"
    assert move_cancel(c, inst, "DELIVERED", only_from=("PENDING",))
    assert not move_cancel(c, inst, "PENDING") and state() == "DELIVERED"


def test_an_executor_back_from_the_dead_gets_its_cancel_and_ends_the_tree(
        start_executor, start_collector, pid_file):
    lab = start_executor(host="127.0.0.2", name="lab")
    col = start_collector([lab.address], retry_max=0.5)
    path = pid_file()
    task = create(col, [fake_case(path, "--children", "3", "--depth", "2")])
    start(col, task["id"])
    entries = wait_pid_file(path, 13)
    lab.kill9()                              # cases keep running without their executor
    assert all(running(*e) for e in entries)
    code, resp = stop(col, task["id"])
    assert code == 200 and resp["data"]["instances"][0]["cancel"]["state"] == "PENDING"
    # Five attempts: an uncapped backoff would now wait 8 s before the next one.
    wait_until(lambda: detail(col, task["id"])["instances"][0]["cancel"]["attempts"] >= 5,
               15, 0.1, "retries while the executor is down")
    inst = detail(col, task["id"])["instances"][0]
    assert "refused" in inst["cancel"]["error"] and inst["cancel"]["nextAttemptAt"]

    lab.start()                              # same address, same database: adopts the case
    back = time.monotonic()
    final = wait_until(lambda: (i := detail(col, task["id"])["instances"][0])["cancel"]["state"]
                       == "DELIVERED" and i, 10, 0.02, "the cancel to be delivered")
    # Within one retry period (0.5 s here), plus the cancel itself and slack for CI.
    assert time.monotonic() - back < 0.5 + 1.5
    assert final["cancel"]["confirmedAt"] and final["cancel"]["error"] is None
    assert final["cancel"]["result"]["survivors"] == 0
    wait_gone(entries, 10)
    assert "adopted root" in lab.log_text()


def test_a_collector_restarted_between_stop_and_delivery_resumes_the_cancel(
        start_executor, start_collector, pid_file):
    lab = start_executor(host="127.0.0.2", name="lab")
    col = start_collector([lab.address], retry_max=0.5)
    path = pid_file()
    task = create(col, [fake_case(path, "--children", "2")])
    start(col, task["id"])
    entries = wait_pid_file(path, 3)
    lab.kill9()
    assert stop(col, task["id"])[0] == 200
    col.stop()                               # the collector goes down with a cancel pending
    lab.start()
    assert all(running(*e) for e in entries), "nobody has delivered the cancel yet"
    col.start()
    wait_until(lambda: detail(col, task["id"])["instances"][0]["cancel"]["state"] == "DELIVERED",
               10, 0.1, "the resumed cancel to be delivered")
    wait_gone(entries, 10)
    assert "pending cancel(s) resumed" in col.log_text()


# -- executor restarts -----------------------------------------------------------------

def test_executor_killed_and_restarted_can_still_cancel_the_whole_tree(
        start_executor, pid_file):
    lab = start_executor()
    path = pid_file()
    code, resp = lab.call("POST", "/test-case-execution/execute", {
        "taskId": "adopt-me", "script": "fake_case.py",
        "args": ["--pid-file", path, "--children", "2", "--depth", "2", "--daemonize",
                 "--ignore-sigterm"]})
    assert code == 200
    entries = wait_pid_file(path, 9)    # the daemon's intermediate parent exits at once
    wait_until(lambda: sum(running(*e) for e in entries) == 8, 5, message="8 running")
    lab.kill9()
    assert sum(running(*e) for e in entries) == 8, "cases survive the executor"
    lab.start()
    code, resp = lab.call("GET", "/test-case-execution/tasks")
    assert [t["taskId"] for t in resp["data"]] == ["adopt-me"]
    code, resp = lab.call("POST", "/test-case-execution/cancel/adopt-me")
    assert code == 200, resp
    assert resp["data"]["survivors"] == 0 and resp["data"]["killed"] == 8
    wait_gone(read_pid_file(path), 10)


def test_a_cancel_cut_short_by_the_executors_death_is_finished_when_it_restarts(
        start_executor, pid_file):
    lab = start_executor(grace=3.0)
    path = pid_file()
    code, resp = lab.call("POST", "/test-case-execution/execute", {
        "taskId": "cut-short", "script": "fake_case.py",
        "args": ["--pid-file", path, "--children", "3", "--ignore-sigterm"]})
    assert code == 200, resp
    entries = wait_pid_file(path, 4)

    def cancel_in_grace():
        try:
            lab.call("POST", "/test-case-execution/cancel/cut-short", timeout=30)
        except OSError:
            pass            # the executor dies under it
    caller = threading.Thread(target=cancel_in_grace, daemon=True)
    caller.start()
    wait_until(lambda: lab.call("GET", "/test-case-execution/status/cut-short")[1]["data"]
               ["status"] == "CANCELLING", 5, 0.05, "the cancel to be under way")
    lab.kill9()
    caller.join(10)
    assert sum(running(*e) for e in entries) == 4, "SIGTERM is ignored: all still run"
    lab.start()
    # Nobody asks again: the restarted executor finishes the cancel by itself.
    wait_gone(entries, 3.0 + 10)
    wait_until(lambda: lab.call("GET", "/test-case-execution/status/cut-short")[1]["data"]
               ["status"] == "CANCELLED", 10, 0.05, "CANCELLED")
    assert lab.call("POST", "/test-case-execution/cancel/cut-short")[0] == 404


UNKILLABLE = '''"""A child that becomes another user: an executor without CAP_KILL may not signal it."""
import os, sys, time
child = os.fork()
if child == 0:
    os.setuid(65534)
    time.sleep(120)
    os._exit(0)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(child))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
'''


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as another user")
def test_a_process_that_cannot_be_ended_keeps_the_cancel_open_until_it_is_gone(
        start_executor, start_collector, tmp_path):
    """The design's 'process cannot be terminated', end to end: the cancel says
    so (500, its pid), the execution is not marked cancelled, the collector
    keeps retrying, and the stop completes once the process is gone."""
    cases = cases_dir(tmp_path, unkillable=UNKILLABLE)
    lab = start_executor(host="127.0.0.2", name="lab", grace=0.3, cases_dir=str(cases),
                         args=["--cgroups", "off"], preexec=drop_cap_kill)
    col = start_collector([lab.address])
    pid_path = tmp_path / "victim.pid"
    task = create(col, [{"script": "unkillable.py", "args": [str(pid_path)]}])
    start(col, task["id"])
    victim = int(wait_until(lambda: pid_path.exists() and pid_path.read_text(), 10, 0.05,
                            "the victim's pid"))
    try:
        code, body = stop(col, task["id"])
        assert code == 200, body
        inst = body["data"]["instances"][0]
        assert inst["status"] == "STOPPED" and inst["cancel"]["state"] == "PENDING"
        execution = inst["executionTaskId"]
        wait_until(lambda: "cancel incomplete" in (
            detail(col, task["id"])["instances"][0]["cancel"]["error"] or ""), 15, 0.1,
            "the executor's answer: cancel incomplete")
        st = lambda: lab.call("GET", f"/test-case-execution/status/{execution}")[1]["data"]  # noqa: E731
        wait_until(lambda: st()["steps"][0]["endedAt"], 10, 0.05, "the root to be reaped")
        assert st()["status"] == "CANCELLING" and st()["steps"][0]["unended"]
        assert st()["lastStop"]["survivorPids"] == [victim]
        # The collector keeps trying; each attempt is an honest 500 while it lives.
        wait_until(lambda: detail(col, task["id"])["instances"][0]["cancel"]["attempts"] >= 3,
                   15, 0.1, "retries")
        assert detail(col, task["id"])["stopConfirmedAt"] is None
    finally:
        os.kill(victim, signal.SIGKILL)     # we still may
    wait_until(lambda: detail(col, task["id"])["stopConfirmedAt"], 15, 0.1, "the stop to complete")
    assert detail(col, task["id"])["instances"][0]["cancel"]["state"] == "DELIVERED"
    wait_until(lambda: st()["status"] == "CANCELLED", 10, 0.05, "CANCELLED")


def test_case_that_ended_while_the_executor_was_down_is_reported(
        start_executor, start_collector, pid_file):
    lab = start_executor(host="127.0.0.2", name="lab")
    col = start_collector([lab.address])
    path = pid_file()
    task = create(col, [fake_case(path, "--duration", "1")])
    start(col, task["id"])
    entries = wait_pid_file(path, 1)
    lab.kill9()
    wait_until(lambda: not running(*entries[0]), 10, 0.05, "the case to end")
    lab.start()
    final = wait_task(col, task["id"], "FAILED")
    inst = final["instances"][0]
    assert inst["status"] == "FAILED" and inst["exitCode"] is None
    assert "exit code is unknown" in inst["error"]


# -- races -------------------------------------------------------------------------------

def test_execute_after_cancel_of_an_unknown_task_id_is_refused(start_executor, pid_file):
    """The executor remembers cancelled taskIds: a late execute never runs."""
    lab = start_executor()
    assert lab.call("POST", "/test-case-execution/cancel/late-1")[0] == 404
    path = pid_file()
    code, resp = lab.call("POST", "/test-case-execution/execute", {
        "taskId": "late-1", "script": "fake_case.py", "args": ["--pid-file", path]})
    assert code == 409 and "cancelled before it started" in resp["message"]
    assert read_pid_file(path) == []


@pytest.mark.parametrize("round_", range(4))
def test_stop_while_dispatch_is_in_flight_leaves_nothing_running(
        start_executor, start_collector, pid_file, round_):
    """The executor is frozen (SIGSTOP) so the execute is sent but not answered;
    the stop comes in; then the executor runs both requests in whatever order."""
    lab = start_executor(host="127.0.0.2", name="lab")
    col = start_collector([lab.address], read_timeout=10.0, stop_wait=1.0, retry_max=0.5)
    paths = [pid_file() for _ in range(3)]
    task = create(col, [fake_case(p, "--children", "2") for p in paths])
    os.kill(lab.proc.pid, signal.SIGSTOP)
    try:
        starter = threading.Thread(target=col.call, args=(
            "POST", f"/api/collect-task/{task['id']}/start"))
        starter.start()
        wait_until(lambda: all(i["status"] == "DISPATCHING"
                               for i in detail(col, task["id"])["instances"]),
                   5, 0.02, "dispatch to be in flight")
        code, resp = stop(col, task["id"])
        assert code == 200
        assert [i["status"] for i in resp["data"]["instances"]] == ["STOPPED"] * 3
    finally:
        os.kill(lab.proc.pid, signal.SIGCONT)
    starter.join(20)
    wait_until(lambda: all(i["cancel"]["state"] in ("DELIVERED", "NOT_FOUND")
                           for i in detail(col, task["id"])["instances"]),
               15, 0.05, "every cancel to be confirmed")
    wait_until(lambda: not lab.call("GET", "/test-case-execution/tasks")[1]["data"], 15, 0.05,
               "nothing running on the executor")
    for p in paths:
        wait_gone(read_pid_file(p), 10)
    final = detail(col, task["id"])
    assert final["status"] == "STOPPED"
    assert [i["status"] for i in final["instances"]] == ["STOPPED"] * 3


def test_start_answers_within_the_wait_while_an_executor_hangs(
        start_executor, start_collector, pid_file):
    lab = start_executor(host="127.0.0.2", name="lab")
    col = start_collector([lab.address], read_timeout=10.0, stop_wait=0.5)
    path = pid_file()
    task = create(col, [fake_case(path)])
    os.kill(lab.proc.pid, signal.SIGSTOP)
    try:
        asked = time.monotonic()
        code, resp = col.call("POST", f"/api/collect-task/{task['id']}/start")
        answered = time.monotonic() - asked
    finally:
        os.kill(lab.proc.pid, signal.SIGCONT)
    assert code == 200 and "1 instance(s) still being dispatched" in resp["message"], resp
    assert resp["data"]["instances"][0]["status"] == "DISPATCHING"
    assert answered < 5, "the start waited for the executor's read timeout (10 s)"
    wait_until(lambda: detail(col, task["id"])["instances"][0]["status"] == "RUNNING",
               10, 0.05, "the dispatch to finish once the executor runs again")
    entries = wait_pid_file(path, 1)
    assert stop(col, task["id"])[0] == 200
    assert_all_gone(entries)


def test_an_execute_still_waiting_in_its_lane_is_not_sent_after_the_stop(
        start_executor, start_collector, pid_file):
    """One call at a time to a frozen executor: the first execute is in flight, the
    others wait behind it. After the stop, only the one in flight may reach it."""
    lab = start_executor(host="127.0.0.2", name="lab")
    col = start_collector([lab.address], read_timeout=10.0, stop_wait=0.3, retry_max=0.5,
                          args=["--lane-workers", "1"])
    paths = [pid_file() for _ in range(3)]
    task = create(col, [fake_case(p) for p in paths])
    os.kill(lab.proc.pid, signal.SIGSTOP)
    try:
        assert col.call("POST", f"/api/collect-task/{task['id']}/start")[0] == 200
        assert stop(col, task["id"])[0] == 200
    finally:
        os.kill(lab.proc.pid, signal.SIGCONT)
    wait_until(lambda: col.log_text().count("execute not sent: the instance is STOPPED") == 2,
               15, 0.05, "the two waiting executes to be dropped")
    wait_until(lambda: all(i["cancel"]["state"] in ("DELIVERED", "NOT_FOUND")
                           for i in detail(col, task["id"])["instances"]),
               15, 0.05, "every cancel to be confirmed")
    started = lab.log_text().count("step=0 started")
    assert started <= 1, f"{started} cases started after their task was stopped"
    for p in paths:
        wait_gone(read_pid_file(p), 10)


def test_a_report_the_collector_will_never_take_is_not_retried(start_executor, start_collector):
    lab = start_executor(host="127.0.0.2", name="lab")
    col = start_collector([lab.address])
    url = f"http://{col.address}/api/execution-instance/424242/report/no-such-key"
    code, body = lab.call("POST", "/test-case-execution/execute", {
        "taskId": "unwanted", "script": "fake_case.py", "args": ["--duration", "0"],
        "reportUrl": url})
    assert code == 200, body
    report = wait_until(lambda: (r := lab.call("GET", "/test-case-execution/status/unwanted")[1]
                                 ["data"]["report"])["state"] == "REJECTED" and r,
                        10, 0.05, "the report to be rejected")
    assert report["attempts"] == 1 and "HTTP 404" in report["error"], report
    assert "report of SUCCESS rejected by the collector" in lab.log_text()


def test_stop_as_cases_exit_on_their_own_has_one_final_state(
        start_executor, start_collector, pid_file):
    lab = start_executor(host="127.0.0.2", name="lab")
    col = start_collector([lab.address])

    def reported(execution_task_id):
        st = lab.call("GET", f"/test-case-execution/status/{execution_task_id}")[1]["data"]
        return st["report"]["state"] == "DELIVERED"

    for delay in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5):
        task = create(col, [fake_case(pid_file(), "--duration", "0.3") for _ in range(2)])
        start(col, task["id"])
        time.sleep(delay)       # the race itself: stop lands around the cases' own exit
        code, resp = stop(col, task["id"])
        assert code in (200, 409), resp
        # Every outcome, late ones included, has reached the collector ...
        wait_until(lambda: all(reported(e) for e in execution_ids(task)), 10, 0.05,
                   "the executor's reports")
        final = detail(col, task["id"])
        if code == 200:
            # ... and none overwrote the stop.
            assert final["status"] == "STOPPED"
            stopped = {i["id"] for i in resp["data"]["instances"] if i["status"] == "STOPPED"}
            assert stopped, "the stop found something to stop"
            for inst in final["instances"]:
                assert inst["status"] == ("STOPPED" if inst["id"] in stopped else "SUCCESS")
        else:
            assert resp["message"] == "task already finished"
            assert final["status"] == "SUCCESS"
    assert "error id" not in col.log_text() and "error id" not in lab.log_text()


def test_two_stops_at_once_send_exactly_one_cancel_per_instance(
        two_machines, start_collector, pid_file):
    col = start_collector([e.address for e in two_machines])
    paths = [pid_file() for _ in range(4)]
    task = create(col, [fake_case(p, "--children", "2") for p in paths])
    start(col, task["id"])
    entries = [e for p in paths for e in wait_pid_file(p, 3)]
    results = in_threads(5, stop, col, task["id"])
    assert [code for code, _ in results] == [200] * 5
    assert sum(r["message"] == "task stopped" for _, r in results) == 1
    for inst, ex in zip(detail(col, task["id"])["instances"], two_machines * 2):
        assert inst["cancel"]["attempts"] == 1
        assert cancels_received(ex, inst["executionTaskId"]) == 1
    assert_all_gone(entries)


def test_start_twice_at_once_dispatches_once_and_start_after_stop_is_refused(
        two_machines, start_collector, pid_file):
    col = start_collector([e.address for e in two_machines])
    task = create(col, [fake_case(pid_file()) for _ in range(4)])
    results = in_threads(4, col.call, "POST", f"/api/collect-task/{task['id']}/start")
    assert [code for code, _ in results] == [200] * 4
    log = "".join(ex.log_text() for ex in two_machines)
    for execution_task_id in execution_ids(task):
        assert log.count(f"task={execution_task_id} step=0 started") == 1
    assert stop(col, task["id"])[0] == 200
    code, resp = col.call("POST", f"/api/collect-task/{task['id']}/start")
    assert code == 409 and "STOPPED" in resp["message"]


# -- many stops at once --------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_50_tasks_stopped_by_50_clients_at_once(start_executor, start_collector, pid_file):
    labs = [start_executor(host=f"127.0.0.{n}", name=f"lab{n}") for n in (2, 3, 4)]
    col = start_collector([e.address for e in labs], read_timeout=30.0, stop_wait=3.0)
    tasks, paths = [], []
    for _ in range(50):
        ps = [pid_file() for _ in range(4)]
        paths += ps
        tasks.append(create(col, [fake_case(p) for p in ps]))
    for t in tasks:
        start(col, t["id"])
    entries = [e for p in paths for e in wait_pid_file(p, 1, timeout=60)]

    barrier = threading.Barrier(50)
    results = {}

    def client(task_id):
        barrier.wait()
        results[task_id] = stop(col, task_id)

    threads = [threading.Thread(target=client, args=(t["id"],)) for t in tasks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 50
    assert all(code == 200 for code, _ in results.values()), \
        [r for r in results.values() if r[0] != 200][:3]
    for t in tasks:
        assert all(i["status"] == "STOPPED" for i in detail(col, t["id"])["instances"])
    wait_gone(entries, 60)
    wait_until(lambda: all(i["cancel"]["state"] == "DELIVERED"
                           for t in tasks for i in detail(col, t["id"])["instances"]),
               60, 0.2, "every cancel to be delivered")
    for svc in (col, *labs):
        assert "database is locked" not in svc.log_text()
        assert "error id" not in svc.log_text()
