"""Logs, /metrics and case logs, checked on real stops."""

import json
import os
import re
import time

import pytest

from support import (cases_dir, create, detail, fake_case, http_json, start, stop, wait_pid_file,
                     wait_until)

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
                    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*)?\})? (\S+)$')


def parse_metrics(text):
    """A strict reader of the Prometheus text format: {(name, labels): value}.

    Every sample belongs to a family announced by HELP and TYPE; histograms
    have cumulative buckets ending in +Inf equal to their _count."""
    assert text.endswith("\n")
    types, samples = {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram") and name not in types
            types[name] = kind
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"{name} has no TYPE"
        samples[(name, labels)] = value
    for family, kind in types.items():
        if kind != "histogram":
            continue
        series = {}
        for (name, labels), value in samples.items():
            if name == family + "_bucket":
                le = re.search(r'le="([^"]+)"', labels).group(1)
                rest = re.sub(r',?le="[^"]+"', "", labels)
                series.setdefault(rest, []).append((float(le), value))
        for rest, buckets in series.items():
            counts = [v for _, v in sorted(buckets)]
            assert counts == sorted(counts) and sorted(buckets)[-1][0] == float("inf")
            assert counts[-1] == samples[(family + "_count", rest)]
    return samples


def scrape(svc):
    code, text = http_json(svc.address, "GET", "/metrics")
    assert code == 200 and isinstance(text, str), text
    return parse_metrics(text)


def delta(before, after, name, labels=""):
    return after.get((name, labels), 0) - before.get((name, labels), 0)


def test_a_real_stop_moves_each_indicator_by_the_right_amount(
        start_executor, start_collector, pid_file):
    lab = start_executor(host="127.0.0.2", name="lab", grace=1.0)
    col = start_collector([lab.address])
    paths = [pid_file(), pid_file()]
    task = create(col, [fake_case(paths[0], "--children", "2"),
                        fake_case(paths[1], "--children", "1", "--ignore-sigterm")])
    start(col, task["id"])
    wait_pid_file(paths[0], 3)
    wait_pid_file(paths[1], 2)
    col_before, lab_before = scrape(col), scrape(lab)
    assert lab_before[("executor_running_cases", "")] == 2

    assert stop(col, task["id"])[0] == 200
    wait_until(lambda: detail(col, task["id"])["stopConfirmedAt"], 10, 0.05, "stop complete")
    col_after, lab_after = scrape(col), scrape(lab)

    assert delta(col_before, col_after, "collector_stop_requests_total",
                 '{outcome="stopped"}') == 1
    assert delta(col_before, col_after, "collector_stops_complete_total") == 1
    assert delta(col_before, col_after, "collector_executor_call_seconds_count",
                 '{call="cancel",outcome="delivered"}') == 2
    assert col_after[("collector_pending_cancels", "")] == 0
    assert delta(lab_before, lab_after, "executor_cancel_requests_total",
                 '{outcome="cancelled"}') == 2
    assert delta(lab_before, lab_after, "executor_processes_terminated_total") == 3
    assert delta(lab_before, lab_after, "executor_processes_killed_total") == 2
    assert delta(lab_before, lab_after, "executor_termination_failures_total") == 0
    assert delta(lab_before, lab_after, "executor_tree_stop_seconds_count",
                 '{reason="cancel"}') == 2
    assert lab_after[("executor_running_cases", "")] == 0
    wait_until(lambda: delta(lab_before, scrape(lab), "executor_reports_total",
                             '{outcome="delivered"}') == 2, 10, 0.05, "both reports")

    # The same stop again is counted as such, and nothing else moves.
    assert stop(col, task["id"])[0] == 200
    again = scrape(col)
    assert delta(col_after, again, "collector_stop_requests_total",
                 '{outcome="already_stopped"}') == 1
    assert delta(col_after, again, "collector_executor_call_seconds_count",
                 '{call="cancel",outcome="delivered"}') == 0
    assert stop(col, 987654)[0] == 404
    assert delta(col_after, scrape(col), "collector_stop_requests_total",
                 '{outcome="not_found"}') == 1
    # A refused request is a stop request too.
    assert stop(col, task["id"], reason="r" * 1001)[0] == 400
    assert col.call("POST", "/api/collect-task/x/stop")[0] == 400
    assert delta(col_after, scrape(col), "collector_stop_requests_total",
                 '{outcome="rejected"}') == 2


def test_a_dying_tree_is_watched_in_its_cgroup_and_proc_is_scanned_once(start_executor, pid_file):
    """While a case's tree dies the executor watches its cgroup; the whole of
    /proc is read once, to confirm that nothing of the case is left elsewhere."""
    ex = start_executor(name="scans")
    if not ex.cgroups:
        pytest.skip("no writable cgroup v2 here: every look is a /proc scan")
    path = pid_file()
    code, body = ex.call("POST", "/test-case-execution/execute", {
        "taskId": "scans-1", "script": "fake_case.py",
        "args": ["--pid-file", path, "--children", "5", "--depth", "2"]})
    assert code == 200, body
    wait_pid_file(path, 31)
    before = scrape(ex)
    code, body = ex.call("POST", "/test-case-execution/cancel/scans-1")
    assert code == 200 and body["data"]["signalled"] == 31, body
    assert delta(before, scrape(ex), "executor_proc_scans_total") == 1


def test_undelivered_cancels_and_exceptions_are_counted(
        start_executor, start_collector, pid_file):
    import sqlite3
    lab = start_executor(host="127.0.0.2", name="lab")
    col = start_collector([lab.address], retry_max=30)
    path = pid_file()
    task = create(col, [fake_case(path)])
    start(col, task["id"])
    wait_pid_file(path, 1)
    lab.kill9()
    before = scrape(col)
    assert stop(col, task["id"])[0] == 200
    after = scrape(col)
    assert delta(before, after, "collector_executor_call_seconds_count",
                 '{call="cancel",outcome="refused"}') == 1
    assert after[("collector_pending_cancels", "")] == 1
    assert detail(col, task["id"])["stopConfirmedAt"] is None
    assert delta(before, after, "collector_stops_complete_total") == 0

    conn = sqlite3.connect(col.db)
    conn.execute("DROP TABLE collect_task")
    conn.commit()
    conn.close()
    assert col.call("GET", "/api/collect-task")[0] == 500
    assert delta(before, scrape(col), "collector_exceptions_total",
                 '{place="GET /api/collect-task"}') == 1


def test_log_lines_of_one_stop_name_what_they_concern(start_executor, start_collector, pid_file):
    lab = start_executor(host="127.0.0.2", name="lab", args=["--log-level", "DEBUG"])
    col = start_collector([lab.address], args=["--log-format", "json"])
    path = pid_file()
    task = create(col, [fake_case(path, "--children", "1")])
    start(col, task["id"])
    entries = wait_pid_file(path, 2)
    inst = detail(col, task["id"])["instances"][0]
    assert stop(col, task["id"], reason="lunch", user="dora")[0] == 200
    wait_until(lambda: detail(col, task["id"])["stopConfirmedAt"], 10, 0.05, "stop complete")

    events = [json.loads(line) for line in col.log_text().splitlines()
              if line.startswith("{")]
    assert events and all({"time", "level", "logger", "message"} <= set(e) for e in events)
    mine = [e["message"] for e in events if e.get("task") == str(task["id"])]
    expect = ["execute sent", "execute answered HTTP 200 in",
              "stop requested by dora (reason: lunch)", "status -> STOPPED",
              f"instance={inst['id']} execution={inst['executionTaskId']}",
              "cancel attempt 1: DELIVERED in", "stop complete"]
    for words in expect:
        assert any(words in m for m in mine), (words, mine)

    execution = inst["executionTaskId"]
    text = wait_until(lambda: f"task={execution} reported CANCELLED to collector (HTTP 200) in"
                      in (t := lab.log_text()) and t, 10, 0.05, "the executor's report line")
    assert f"task={execution} report attempt 1: CANCELLED to collector" in text
    for words in [f"task={execution} cancel requested", f"task={execution} status -> CANCELLING",
                  f"task={execution} cancel: signalled=2 terminated=2 killed=0 survivors=0",
                  f"task={execution} status -> CANCELLED"]:
        assert words in text
    for pid, _ in entries:
        assert f"pid={pid} SIGTERM" in text and f"pid={pid} SIGSTOP" in text


# -- case logs -------------------------------------------------------------------------

def test_case_output_outlives_the_case_and_pages(start_executor, start_collector, pid_file):
    lab = start_executor(host="127.0.0.2", name="lab")
    col = start_collector([lab.address])
    task = create(col, [fake_case(pid_file(), "--children", "2")])
    start(col, task["id"])
    wait_pid_file(task["instances"][0]["args"][1], 3)
    stop(col, task["id"])
    inst = detail(col, task["id"])["instances"][0]
    path = f"/test-case-execution/log/{inst['executionTaskId']}"
    code, body = lab.call("GET", path)
    assert code == 200
    tail = body["data"]
    assert "fake_case pid=" in tail["text"] and tail["size"] == tail["nextOffset"]
    code, body = lab.call("GET", path + "?offset=0&limit=9")
    page = body["data"]
    assert (page["offset"], page["nextOffset"], page["text"]) == (0, 9, tail["text"][:9])
    code, body = lab.call("GET", f"{path}?offset={page['nextOffset']}&limit=100000")
    assert page["text"] + body["data"]["text"] == tail["text"]


def test_the_collector_serves_case_logs_with_the_executor_token(start_executor, start_collector,
                                                               pid_file):
    """The page's log link works where the executor needs a token the browser has
    not got, or cannot be reached from the person's desk at all."""
    token = {"CASE_EXEC_TOKEN": "log-token"}
    lab = start_executor(host="127.0.0.2", name="lab", env=token)
    col = start_collector([lab.address], env=token)
    task = create(col, [fake_case(pid_file(), "--children", "1")])
    start(col, task["id"])
    wait_pid_file(task["instances"][0]["args"][1], 2)
    stop(col, task["id"])
    inst = detail(col, task["id"])["instances"][0]
    assert inst["logUrl"] == f"/api/execution-instance/{inst['id']}/log"
    assert lab.call("GET", f"/test-case-execution/log/{inst['executionTaskId']}")[0] == 401
    code, body = col.call("GET", inst["logUrl"])
    assert code == 200 and "fake_case pid=" in body["data"]["text"], body
    code, body = col.call("GET", inst["logUrl"] + "?offset=0&limit=9")
    assert (body["data"]["offset"], body["data"]["nextOffset"]) == (0, 9)
    for query, code, words in (("?offset=-1", 400, "'offset'"), ("?limit=x", 400, "'limit'"),
                               ("?limit=0", 400, "'limit'"), ("?step=7", 404, "no step 7")):
        status, body = col.call("GET", inst["logUrl"] + query)
        assert status == code and words in body["message"], (query, body)
    lab.stop()
    code, body = col.call("GET", inst["logUrl"])
    assert code == 502 and "did not answer" in body["message"], body
    pending = create(col, [fake_case(pid_file())])["instances"][0]
    code, body = col.call("GET", f"/api/execution-instance/{pending['id']}/log")
    assert code == 404 and "no log yet" in body["message"]


CHATTY = '''import sys, time
line = "x" * 999 + "\\n"
deadline = time.time() + float(sys.argv[1])
while time.time() < deadline:
    sys.stdout.write(line * 20)
    sys.stdout.flush()
    time.sleep(0.02)
'''


def test_a_chatty_case_cannot_fill_the_disk(start_executor, tmp_path):
    cases = cases_dir(tmp_path, chatty=CHATTY)
    cap = 100_000
    lab = start_executor(cases_dir=cases, args=["--log-max-bytes", str(cap)])
    code, body = lab.call("POST", "/test-case-execution/execute",
                          {"taskId": "chatty", "script": "chatty.py", "args": ["4"]})
    log = tmp_path / "executor0" / "logs" / "chatty.log"
    wait_until(lambda: os.path.exists(f"{log}.1"), 10, 0.05, "the log to be capped once")
    sizes = []
    while lab.call("GET", "/test-case-execution/status/chatty")[1]["data"]["status"] == "RUNNING":
        sizes.append(os.path.getsize(log) + os.path.getsize(f"{log}.1"))
        time.sleep(0.05)
    # About 1 MB/s for 4 s; the cap is checked twice a second.
    assert max(sizes) < cap + cap // 2 + 700_000
    assert os.path.getsize(f"{log}.1") <= cap // 2
    code, body = lab.call("GET", "/test-case-execution/log/chatty")
    assert body["data"]["olderCopy"] is True


FLOOD = '''import os, sys
block = b"x" * 1048575 + b"\\n"
for _ in range(int(sys.argv[1])):
    os.write(1, block)
'''


def test_a_case_that_floods_its_log_leaves_at_most_the_cap(start_executor, tmp_path):
    """Faster than the watcher looks: the copy holds the newest half of the cap,
    and the log itself is capped when the step ends."""
    cases = cases_dir(tmp_path, flood=FLOOD)
    cap = 1_000_000
    lab = start_executor(cases_dir=cases, args=["--log-max-bytes", str(cap)])
    code, body = lab.call("POST", "/test-case-execution/execute",
                          {"taskId": "flood", "script": "flood.py", "args": ["200"]})
    assert code == 200, body
    wait_until(lambda: lab.call("GET", "/test-case-execution/status/flood")[1]["data"]
               ["status"] == "SUCCESS", 30, 0.05, "the flood to end")
    log = tmp_path / "executor0" / "logs" / "flood.log"
    assert os.path.getsize(log) <= cap
    assert os.path.getsize(f"{log}.1") <= cap // 2


def test_old_logs_of_finished_cases_are_removed_after_retention(start_executor, pid_file,
                                                                tmp_path):
    lab = start_executor(args=["--log-retention-days", "1"])
    logs = tmp_path / "executor0" / "logs"
    done = "old-done"
    lab.call("POST", "/test-case-execution/execute",
             {"taskId": done, "script": "fake_case.py", "args": ["--duration", "0"]})
    wait_until(lambda: lab.call("GET", f"/test-case-execution/status/{done}")[1]["data"]["status"]
               == "SUCCESS", 10, message="the case to end")
    running = "old.logs-running"     # '.log' inside a taskId once hid it from this check
    path = pid_file()
    lab.call("POST", "/test-case-execution/execute",
             {"taskId": running, "script": "fake_case.py", "args": ["--pid-file", path]})
    wait_pid_file(path, 1)
    ten_days_ago = time.time() - 10 * 86400
    for task_id in (done, running):
        os.utime(logs / f"{task_id}.log", (ten_days_ago, ten_days_ago))
    lab.stop()
    lab.start()             # retention is applied at start and every 10 minutes
    assert not (logs / f"{done}.log").exists()
    assert (logs / f"{running}.log").exists(), "a running case keeps its log"
    assert lab.call("POST", f"/test-case-execution/cancel/{running}")[0] == 200


def test_no_two_tasks_share_a_log_file(start_executor):
    lab = start_executor()
    step = {"script": "fake_case.py", "args": ["--duration", "0"]}
    for task_id, steps in (("lg", [step, step]), ("lg.step-1", [step]), ("lg.step-1.log", [step])):
        code, body = lab.call("POST", "/test-case-execution/execute",
                              {"taskId": task_id, "steps": steps})
        assert code == 200, body
        wait_until(lambda: lab.call("GET", f"/test-case-execution/status/{task_id}")[1]
                   ["data"]["status"] == "SUCCESS", 10, message=f"{task_id} to end")
    texts = [lab.call("GET", route)[1]["data"]["text"]
             for route in ("/test-case-execution/log/lg?step=1",
                           "/test-case-execution/log/lg.step-1",
                           "/test-case-execution/log/lg.step-1.log")]
    pids = [re.findall(r"fake_case pid=(\d+)", text) for text in texts]
    assert all(len(p) == 1 for p in pids) and len({p[0] for p in pids}) == 3, texts


def test_log_names_give_back_their_taskid():
    from executor import LOG_NAME_RE
    for name, task_id in (("a.log", "a"), ("a.log.1", "a"), ("a+step-2.log", "a"),
                          ("a+step-2.log.1", "a"), ("a.log.log", "a.log"),
                          ("a.step-1.log", "a.step-1"), ("x.logs-y.log", "x.logs-y")):
        assert LOG_NAME_RE.fullmatch(name).group(1) == task_id, name
    assert LOG_NAME_RE.fullmatch("notes.txt") is None


@pytest.mark.parametrize("service", ["executor", "collector"])
def test_metrics_are_open_like_health(service, start_executor, start_collector):
    svc = start_executor(env={"CASE_EXEC_TOKEN": "t"}) if service == "executor" else \
        start_collector(env={"CASE_EXEC_TOKEN": "t", "COLLECTOR_API_TOKENS": "a"})
    code, text = http_json(svc.address, "GET", "/metrics")
    assert code == 200 and f"{service}_exceptions_total" in text
