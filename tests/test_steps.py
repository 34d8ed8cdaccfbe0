"""Executions with several steps: order, side by side, cleanup that always
runs, time limits, and the cancel that lands as one step ends."""

import json
import os
import time

import pytest

from support import (assert_all_gone, create, detail, read_pid_file, start, stop,
                     wait_gone, wait_pid_file, wait_task, wait_until)


def fake(path=None, *args, **step):
    """A fake_case.py step; path is its pid file."""
    extra = ["--pid-file", path] if path else []
    return {"script": "fake_case.py", "args": [*extra, *args], **step}


def release(marker, **step):
    return {"script": "cases/release_rig.py", "args": ["--marker", marker], "always": True,
            **step}


def execute(ex, task_id, steps, **limits):
    code, body = ex.call("POST", "/test-case-execution/execute",
                         {"taskId": task_id, "steps": steps, **limits})
    assert code == 200, body
    return body["data"]


def status(ex, task_id):
    return ex.call("GET", f"/test-case-execution/status/{task_id}")[1]["data"]


def final(ex, task_id, timeout=20):
    return wait_until(lambda: (s := status(ex, task_id))["status"] in (
        "SUCCESS", "FAILED", "CANCELLED", "TIMEOUT") and s, timeout, 0.05, "a final status")


def states(st):
    return [s["state"] for s in st["steps"]]


def test_steps_run_in_order_each_with_its_own_log(start_executor, pid_file, tmp_path):
    ex = start_executor()
    marker = str(tmp_path / "released")
    execute(ex, "order-1", [fake(None, "--duration", "0.1"), fake(None, "--duration", "0.1"),
                            release(marker)])
    st = final(ex, "order-1")
    assert st["status"] == "SUCCESS" and states(st) == ["SUCCESS"] * 3
    started = [s["startedAt"] for s in st["steps"]]
    assert started == sorted(started) and st["steps"][0]["endedAt"] <= started[1]
    assert all(s["pid"] and s["exitCode"] == 0 for s in st["steps"])
    assert len({s["log"] for s in st["steps"]}) == 3
    code, body = ex.call("GET", "/test-case-execution/log/order-1?step=2")
    assert "rig released" in body["data"]["text"]
    assert os.path.exists(marker)


def test_stop_during_step_two_skips_step_three_and_runs_the_cleanup(
        start_executor, pid_file, tmp_path):
    ex = start_executor()
    p2, p3, marker = pid_file(), pid_file(), str(tmp_path / "released")
    execute(ex, "three-1", [fake(None, "--duration", "0.1"), fake(p2, "--children", "2"),
                            fake(p3), release(marker)])
    entries = wait_pid_file(p2, 3)
    code, body = ex.call("POST", "/test-case-execution/cancel/three-1")
    assert code == 200 and body["data"]["survivors"] == 0
    assert_all_gone(entries)
    st = final(ex, "three-1")
    assert st["status"] == "CANCELLED"
    assert states(st) == ["SUCCESS", "CANCELLED", "SKIPPED", "SUCCESS"]
    assert read_pid_file(p3) == [], "step three never started"
    assert json.load(open(marker))["releasedAt"]


def test_parallel_steps_are_all_ended_by_one_cancel_under_one_grace(start_executor, pid_file):
    ex = start_executor(grace=1.0)
    paths = [pid_file() for _ in range(3)]
    execute(ex, "side-1", [fake(p, "--children", "2", "--ignore-sigterm", group="collect")
                           for p in paths])
    entries = [e for p in paths for e in wait_pid_file(p, 3)]
    code, body = ex.call("POST", "/test-case-execution/cancel/side-1")
    assert code == 200
    assert body["data"]["killed"] == 9 and body["data"]["elapsedMs"] < 2900  # not 3 x grace
    assert_all_gone(entries)
    assert states(final(ex, "side-1")) == ["CANCELLED"] * 3


def test_a_step_past_its_timeout_is_ended_and_the_cleanup_still_runs(
        start_executor, pid_file, tmp_path):
    ex = start_executor(grace=0.5)
    p1, p2, marker = pid_file(), pid_file(), str(tmp_path / "released")
    execute(ex, "slow-1", [fake(p1, "--children", "1", timeoutSeconds=0.5), fake(p2),
                           release(marker)])
    st = final(ex, "slow-1")
    assert st["status"] == "TIMEOUT"
    assert states(st) == ["TIMEOUT", "SKIPPED", "SUCCESS"]
    wait_gone(read_pid_file(p1), 5)
    assert read_pid_file(p2) == [] and os.path.exists(marker)


def test_a_hanging_cleanup_is_killed_at_its_timeout(start_executor, pid_file):
    ex = start_executor(grace=0.3)
    pc = pid_file()
    execute(ex, "hang-1", [fake(None, "--duration", "0.1"),
                           fake(pc, "--ignore-sigterm", always=True, timeoutSeconds=0.5)])
    st = final(ex, "hang-1")
    assert states(st) == ["SUCCESS", "TIMEOUT"] and st["status"] == "FAILED"
    assert "cleanup step 1 TIMEOUT" in st["note"]
    wait_gone(read_pid_file(pc), 5)


def test_a_second_cancel_while_cleanup_runs_ends_the_cleanup(start_executor, pid_file):
    ex = start_executor()
    p1, pc = pid_file(), pid_file()
    execute(ex, "twice-1", [fake(p1), fake(pc, "--children", "1", always=True)])
    wait_pid_file(p1, 1)
    assert ex.call("POST", "/test-case-execution/cancel/twice-1")[0] == 200
    cleanup = wait_pid_file(pc, 2)
    assert status(ex, "twice-1")["status"] == "CANCELLING"
    code, body = ex.call("POST", "/test-case-execution/cancel/twice-1")
    assert code == 200 and body["data"]["signalled"] == 2
    assert_all_gone(cleanup)
    st = final(ex, "twice-1")
    assert st["status"] == "CANCELLED" and states(st) == ["CANCELLED", "CANCELLED"]


def test_max_runtime_and_grace_per_execution(start_executor, pid_file):
    ex = start_executor(grace=5.0, args=["--max-grace-seconds", "2"])
    p = pid_file()
    execute(ex, "limits-1", [fake(p, "--ignore-sigterm")], maxRuntimeSeconds=0.5,
            graceSeconds=0.2)
    st = final(ex, "limits-1", timeout=10)
    assert st["status"] == "TIMEOUT" and st["graceSeconds"] == 0.2
    wait_gone(read_pid_file(p), 5)
    code, body = ex.call("POST", "/test-case-execution/execute",
                         {"script": "fake_case.py", "graceSeconds": 3})
    assert code == 400 and "graceSeconds" in body["message"]
    for bad in ({"steps": []}, {"steps": [{"args": []}]}, {"steps": "x"},
                {"steps": [{"script": "fake_case.py", "always": "yes"}]},
                {"steps": [{"script": "fake_case.py", "timeoutSeconds": -1}]},
                {"steps": [{"script": "fake_case.py"}], "script": "fake_case.py"},
                {"steps": [{"script": "fake_case.py", "group": 7}]}):
        code, body = ex.call("POST", "/test-case-execution/execute", bad)
        assert code == 400, (bad, body)


@pytest.mark.timeout(120)
def test_cancel_as_a_step_ends_never_lets_the_next_step_run(start_executor, pid_file):
    """The gap between one step ending and the next starting, hit many times.

    The cancel's moment homes in on the boundary: later after a round where it
    came before step 2 started, earlier after one where step 2 had started. So
    the rounds straddle the step's end, and the test proves that they did."""
    ex = start_executor(grace=0.5)
    delay, stride = 0.3, 0.04
    second_states = []
    for n in range(30):
        p2 = pid_file()
        execute(ex, f"gap-{n}", [fake(None, "--duration", "0.25"), fake(p2, "--children", "1")])
        time.sleep(delay)       # the race offset itself, not a wait for anything
        code, body = ex.call("POST", f"/test-case-execution/cancel/gap-{n}")
        assert code == 200, body
        st = final(ex, f"gap-{n}")
        assert st["status"] == "CANCELLED"
        second = st["steps"][1]
        second_states.append(second["state"])
        if second["state"] == "SKIPPED":
            assert second["pid"] is None and read_pid_file(p2) == []
            delay += stride
        else:
            assert second["state"] == "CANCELLED", states(st)
            wait_gone(read_pid_file(p2), 5)
            delay = max(0.0, delay - stride)
        if len(set(second_states)) > 1:     # crossed the boundary: close in on it
            stride = max(0.003, stride * 0.85)
    assert {"SKIPPED", "CANCELLED"} <= set(second_states), second_states
    assert ex.call("GET", "/test-case-execution/tasks")[1]["data"] == []


def test_the_collector_passes_steps_and_shows_a_timeout_as_failed(
        start_executor, start_collector, pid_file, tmp_path):
    lab = start_executor(host="127.0.0.2", name="lab", grace=0.3)
    col = start_collector([lab.address])
    marker = str(tmp_path / "released")
    task = create(col, [{"steps": [fake(pid_file(), timeoutSeconds=0.5), release(marker)]},
                        {"script": "fake_case.py", "args": ["--duration", "0.1"]}])
    start(col, task["id"])
    done = wait_task(col, task["id"], "FAILED")
    timed_out = done["instances"][0]
    assert timed_out["status"] == "FAILED" and timed_out["error"].startswith("timeout")
    assert [s["state"] for s in timed_out["steps"]] == ["TIMEOUT", "SUCCESS"]
    assert done["instances"][1]["status"] == "SUCCESS"
    assert os.path.exists(marker)


def test_stopping_a_task_runs_each_case_cleanup(start_executor, start_collector, pid_file,
                                               tmp_path):
    lab = start_executor(host="127.0.0.2", name="lab")
    col = start_collector([lab.address])
    p, marker = pid_file(), str(tmp_path / "released")
    task = create(col, [{"steps": [fake(p, "--children", "2"), release(marker)]}])
    start(col, task["id"])
    entries = wait_pid_file(p, 3)
    code, resp = stop(col, task["id"])
    assert code == 200 and resp["data"]["instances"][0]["cancel"]["state"] == "DELIVERED"
    assert_all_gone(entries)
    wait_until(lambda: os.path.exists(marker), 10, 0.05, "the cleanup marker")
    inst = wait_until(lambda: (i := detail(col, task["id"])["instances"][0])["steps"] and i,
                      10, 0.05, "the executor's report")
    assert [s["state"] for s in inst["steps"]] == ["CANCELLED", "SUCCESS"]
    assert inst["status"] == "STOPPED"
