"""The collector and the stop flow end to end: real collector, real executors on
distinct loopback addresses (two lab machines), real processes, real HTTP."""

import time

import pytest

import executor as executor_module
from support import (SilentListener, assert_all_gone, closed_address, create, db_dump, detail,
                     report_route,
                     fake_case, running, start, stop, unconnectable, wait_pid_file, wait_task,
                     wait_until)


def test_create_start_stop_ends_every_process_on_both_machines(
        two_machines, start_collector, pid_file):
    col = start_collector([e.address for e in two_machines])
    paths = [pid_file() for _ in range(4)]
    task = create(col, [fake_case(p, "--children", "3", "--depth", "2") for p in paths])
    assert task["status"] == "PENDING"
    assert [i["executor"] for i in task["instances"]] == [e.address for e in two_machines] * 2
    assert all(i["status"] == "PENDING" and i["executionTaskId"] for i in task["instances"])

    started = start(col, task["id"])
    assert started["status"] == "RUNNING"
    assert [i["status"] for i in started["instances"]] == ["RUNNING"] * 4
    entries = [e for p in paths for e in wait_pid_file(p, 13)]

    code, resp = stop(col, task["id"], reason="wrong rig", user="alice")
    assert code == 200, resp
    assert resp["message"] == "task stopped"
    stopped = resp["data"]
    assert stopped["status"] == "STOPPED"
    assert (stopped["stoppedBy"], stopped["stopReason"]) == ("alice", "wrong rig")
    for inst in stopped["instances"]:
        assert inst["status"] == "STOPPED"
        assert inst["cancel"]["state"] == "DELIVERED", inst
        assert inst["cancel"]["attempts"] == 1
        assert inst["cancel"]["result"]["survivors"] == 0
    assert_all_gone(entries)
    for inst, ex in zip(stopped["instances"], two_machines * 2):
        code, st = ex.call("GET", f"/test-case-execution/status/{inst['executionTaskId']}")
        assert st["data"]["status"] == "CANCELLED"


def test_stop_of_unknown_finished_and_stopped_tasks(two_machines, start_collector, pid_file):
    col = start_collector([two_machines[0].address])
    code, resp = stop(col, 999999)
    assert code == 404 and resp["code"] == 404 and "not found" in resp["message"]

    done = create(col, [fake_case(pid_file(), "--duration", "0.1")])
    start(col, done["id"])
    wait_task(col, done["id"], "SUCCESS")
    code, resp = stop(col, done["id"])
    assert code == 409 and resp["message"] == "task already finished"
    code, resp = col.call("POST", f"/api/collect-task/{done['id']}/start")
    assert code == 409 and "SUCCESS" in resp["message"], resp
    assert detail(col, done["id"])["status"] == "SUCCESS"

    task = create(col, [fake_case(pid_file())])
    start(col, task["id"])
    assert stop(col, task["id"])[0] == 200
    code, resp = stop(col, task["id"])
    assert code == 200 and resp["message"] == "task already stopped"
    inst = resp["data"]["instances"][0]
    assert inst["cancel"]["attempts"] == 1, "a second stop sends no second cancel"
    assert two_machines[0].log_text().count(f"task={inst['executionTaskId']} cancel requested") == 1


def test_stop_of_a_pending_task_needs_no_cancel(two_machines, start_collector, pid_file):
    col = start_collector([e.address for e in two_machines])
    task = create(col, [fake_case(pid_file()), fake_case(pid_file())])
    code, resp = stop(col, task["id"])
    assert code == 200
    assert [i["status"] for i in resp["data"]["instances"]] == ["STOPPED", "STOPPED"]
    assert [i["cancel"]["state"] for i in resp["data"]["instances"]] == ["NOT_NEEDED"] * 2
    code, resp = col.call("POST", f"/api/collect-task/{task['id']}/start")
    assert code == 409


def test_report_after_stop_changes_nothing(two_machines, start_collector, pid_file):
    col = start_collector([two_machines[0].address])
    task = create(col, [fake_case(pid_file())])
    start(col, task["id"])
    stop(col, task["id"])
    inst = detail(col, task["id"])["instances"][0]
    code, resp = col.call("POST", report_route(col, inst["id"]),
                          {"executionTaskId": inst["executionTaskId"], "status": "SUCCESS",
                           "exitCode": 0})
    assert code == 200 and resp["data"]["changed"] is False
    after = detail(col, task["id"])
    assert after["status"] == "STOPPED" and after["instances"][0]["status"] == "STOPPED"
    assert after["instances"][0]["exitCode"] is None


def test_a_report_without_steps_after_stop_keeps_the_steps(two_machines, start_collector,
                                                          pid_file):
    col = start_collector([two_machines[0].address])
    task = create(col, [fake_case(pid_file())])
    start(col, task["id"])
    assert stop(col, task["id"])[0] == 200
    inst = wait_until(lambda: (d := detail(col, task["id"]))["stopConfirmedAt"]
                      and d["instances"][0]["steps"] and d["instances"][0],
                      10, 0.05, "the executor's report with its steps")
    assert [s["state"] for s in inst["steps"]] == ["CANCELLED"]
    route = report_route(col, inst["id"])
    report = {"executionTaskId": inst["executionTaskId"], "status": "SUCCESS", "exitCode": 0}
    before = db_dump(col.db)
    for body in (report, {**report, "steps": None}):
        code, resp = col.call("POST", route, body)
        assert code == 200 and resp["data"] == {"changed": False, "status": "STOPPED"}, resp
    assert db_dump(col.db) == before
    assert detail(col, task["id"])["instances"][0]["steps"] == inst["steps"]

    # Steps a later report does carry are kept: a cleanup's outcome after a stop.
    later = [dict(inst["steps"][0], note="cleanup finished")]
    assert col.call("POST", route, {**report, "steps": later})[0] == 200
    after = detail(col, task["id"])["instances"][0]
    assert after["steps"] == later
    assert (after["status"], after["exitCode"], after["error"]) == (
        "STOPPED", inst["exitCode"], inst["error"])


def test_cases_that_end_on_their_own_finish_the_task(two_machines, start_collector, pid_file):
    col = start_collector([e.address for e in two_machines])
    ok = create(col, [fake_case(pid_file(), "--duration", "0.2") for _ in range(3)])
    start(col, ok["id"])
    final = wait_task(col, ok["id"], "SUCCESS")
    assert [(i["status"], i["exitCode"]) for i in final["instances"]] == [("SUCCESS", 0)] * 3
    assert final["finishedAt"] and final["instanceCounts"] == {"SUCCESS": 3}

    bad = create(col, [fake_case(pid_file(), "--duration", "0.2"),
                       fake_case(pid_file(), "--duration", "0.2", "--exit-code", "2")])
    start(col, bad["id"])
    final = wait_task(col, bad["id"], "FAILED")
    assert sorted((i["status"], i["exitCode"]) for i in final["instances"]) == [
        ("FAILED", 2), ("SUCCESS", 0)]


def test_list_is_newest_first_with_counts(two_machines, start_collector, pid_file):
    col = start_collector([two_machines[0].address])
    first = create(col, [fake_case(pid_file())], name="first")
    second = create(col, [fake_case(pid_file()), fake_case(pid_file())], name="second")
    code, resp = col.call("GET", "/api/collect-task")
    assert code == 200
    assert [t["id"] for t in resp["data"][:2]] == [second["id"], first["id"]]
    assert resp["data"][0]["instanceCounts"] == {"PENDING": 2}


def test_unreachable_executor_does_not_fail_the_stop(start_executor, start_collector, pid_file):
    lab2 = start_executor(host="127.0.0.2", name="lab2")
    lab3 = start_executor(host="127.0.0.3", name="lab3")
    col = start_collector([lab2.address, lab3.address])
    paths = [pid_file(), pid_file()]
    task = create(col, [fake_case(p, "--children", "2") for p in paths])
    start(col, task["id"])
    lab3_entries = wait_pid_file(paths[1], 3)
    lab2_entries = wait_pid_file(paths[0], 3)
    lab3.kill9()        # the machine's executor dies; its case keeps running

    code, resp = stop(col, task["id"])
    assert code == 200, resp
    insts = resp["data"]["instances"]
    assert resp["data"]["status"] == "STOPPED"
    assert [i["status"] for i in insts] == ["STOPPED", "STOPPED"]
    assert insts[0]["cancel"]["state"] == "DELIVERED"
    assert insts[1]["cancel"]["state"] == "PENDING"
    assert "refused" in insts[1]["cancel"]["error"]
    assert "1 cancel(s) pending retry" in resp["message"]
    assert_all_gone(lab2_entries)
    assert all(running(*e) for e in lab3_entries)   # teardown ends them


def test_dispatch_to_a_hung_or_closed_executor_fails_the_instance(
        start_collector, pid_file):
    hung = SilentListener()
    try:
        col = start_collector(read_timeout=1.0)
        closed = closed_address()
        task = create(col, [fake_case(pid_file()), fake_case(pid_file())],
                      executors=[hung.address, closed])
        data = start(col, task["id"])
        by_executor = {i["executor"]: i for i in data["instances"]}
        assert by_executor[closed]["status"] == "FAILED"
        assert "refused" in by_executor[closed]["error"]
        assert by_executor[closed]["cancel"]["state"] == "NOT_NEEDED"
        assert by_executor[hung.address]["status"] == "FAILED"
        assert "no answer" in by_executor[hung.address]["error"]
        # It may have started there: a cancel is kept pending for it.
        assert by_executor[hung.address]["cancel"]["state"] == "PENDING"
        assert wait_task(col, task["id"], "FAILED")
    finally:
        hung.close()


# -- the executor client's timeouts, with real sockets -------------------------

def test_client_refused_fails_at_once():
    started = time.monotonic()
    with pytest.raises(executor_module.CallFailed) as e:
        executor_module.call_json(closed_address(), "POST", "/x", connect_timeout=5,
                                  read_timeout=5)
    assert e.value.kind == "refused" and time.monotonic() - started < 1


def test_client_read_timeout_on_a_listener_that_never_answers():
    hung = SilentListener()
    try:
        started = time.monotonic()
        with pytest.raises(executor_module.CallFailed) as e:
            executor_module.call_json(hung.address, "POST", "/x", connect_timeout=5,
                                      read_timeout=0.5)
        elapsed = time.monotonic() - started
        assert e.value.kind == "read_timeout" and 0.5 <= elapsed < 3
        assert "no answer" in e.value.text
    finally:
        hung.close()


def test_client_connect_timeout_is_separate_from_the_read_timeout():
    blackhole = unconnectable()
    try:
        started = time.monotonic()
        with pytest.raises(executor_module.CallFailed) as e:
            executor_module.call_json(blackhole.address, "POST", "/x", connect_timeout=0.5,
                                      read_timeout=10)
        elapsed = time.monotonic() - started
        assert e.value.kind == "connect_timeout" and 0.5 <= elapsed < 3
    finally:
        blackhole.close()


def test_documented_defaults():
    import collector
    config, _ = collector.parse_args([])
    assert (config.connect_timeout, config.read_timeout, config.stop_wait) == (10, 30, 3)
    assert config.port == 8080 and config.host == "127.0.0.1"
    assert config.max_grace_seconds == 60 == executor_module.parse_args([])[0].max_grace_seconds
