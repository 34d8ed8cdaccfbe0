"""Who may call, what may run, and bad input: a clear 4xx envelope, nothing changed."""

import json
import os
import socket
import sqlite3

import pytest

import collector as collector_module
import executor as executor_module
from support import (cases_dir, create, db_dump, detail, fake_case, http_json, report_route,
                     start, stop, wait_pid_file, wait_until)

TOKEN = "s3cret-shared"
API_TOKENS = "alice:alice-key,bob:bob-key"


def case_processes(ex):
    import psutil
    return sorted(p.pid for p in psutil.Process(ex.proc.pid).children(recursive=True))


def one_running_instance(start_executor, start_collector, pid_file):
    """An executor and a collector with one started task of one fake case:
    (executor, collector, task, instance)."""
    ex = start_executor(host="127.0.0.2")
    col = start_collector([ex.address])
    task = create(col, [fake_case(pid_file())])
    start(col, task["id"])
    return ex, col, task, detail(col, task["id"])["instances"][0]


def assert_envelope(body, code):
    assert isinstance(body, dict) and set(body) == {"code", "message", "data"}, body
    assert body["code"] == code and isinstance(body["message"], str) and body["message"]
    assert "Traceback" not in json.dumps(body)


# -- who may call ---------------------------------------------------------------------

def test_executor_with_a_token_refuses_callers_without_it(start_executor, pid_file):
    ex = start_executor(env={"CASE_EXEC_TOKEN": TOKEN})
    path = pid_file()
    execute = {"taskId": "guarded", "script": "fake_case.py", "args": ["--pid-file", path]}
    for token in (None, "wrong", TOKEN + "x", "", "\xff\xfe"):
        for method, route, body in [("POST", "/test-case-execution/execute", execute),
                                    ("POST", "/test-case-execution/cancel/guarded", None),
                                    ("GET", "/test-case-execution/status/guarded", None),
                                    ("GET", "/test-case-execution/tasks", None)]:
            code, resp = ex.call(method, route, body, token=token)
            assert code == 401, (method, route, token)
            assert_envelope(resp, 401)
    assert not os.path.exists(path) and case_processes(ex) == []
    assert ex.call("GET", "/health")[0] == 200
    assert ex.call("POST", "/test-case-execution/execute", execute, token=TOKEN)[0] == 200
    wait_pid_file(path, 1)
    assert ex.call("POST", "/test-case-execution/cancel/guarded", token=TOKEN)[0] == 200


def test_collector_api_tokens_and_who_stopped(start_executor, start_collector, pid_file):
    ex = start_executor(host="127.0.0.2", env={"CASE_EXEC_TOKEN": TOKEN})
    col = start_collector([ex.address], env={"CASE_EXEC_TOKEN": TOKEN,
                                             "COLLECTOR_API_TOKENS": API_TOKENS})
    body = {"name": "guarded", "cases": [fake_case(pid_file())]}
    code, resp = col.call("POST", "/api/collect-task", body)
    assert code == 401
    assert_envelope(resp, 401)
    assert col.call("GET", "/api/collect-task")[1]["data"] == []
    code, resp = col.call("POST", "/api/collect-task", body, token="alice-key")
    assert code == 201
    task_id = resp["data"]["id"]
    assert col.call("POST", f"/api/collect-task/{task_id}/start", token="nope")[0] == 401
    assert col.call("POST", f"/api/collect-task/{task_id}/start", token="bob-key")[0] == 200
    assert col.call("POST", f"/api/collect-task/{task_id}/stop")[0] == 401
    assert detail(col, task_id)["status"] == "RUNNING"
    code, resp = col.call("POST", f"/api/collect-task/{task_id}/stop", {"reason": "done"},
                          token="bob-key")
    assert code == 200
    assert (resp["data"]["stoppedBy"], resp["data"]["stopReason"]) == ("bob", "done")
    assert resp["data"]["instances"][0]["cancel"]["state"] == "DELIVERED"

    # The front end's X-User wins over the token's name.
    code, resp = col.call("POST", "/api/collect-task", body, token="alice-key")
    code, resp = col.call("POST", f"/api/collect-task/{resp['data']['id']}/stop",
                          token="alice-key", headers={"X-User": "carol"})
    assert resp["data"]["stoppedBy"] == "carol"


def test_a_report_needs_the_key_only_its_executor_was_given(start_executor, start_collector,
                                                           pid_file):
    """With no token at all (or only --api-token), a caller who can read the task
    still cannot mark its instance finished: the report route carries a key that
    was sent only to the executor, and no read of the API shows it."""
    ex = start_executor(host="127.0.0.2", args=["--log-level", "DEBUG"])
    col = start_collector([ex.address], env={"COLLECTOR_API_TOKENS": "ui:" + TOKEN},
                          args=["--log-level", "DEBUG"])
    code, resp = col.call("POST", "/api/collect-task",
                          {"name": "keyed", "cases": [fake_case(pid_file())]}, token=TOKEN)
    assert code == 201, resp
    task = resp["data"]
    assert col.call("POST", f"/api/collect-task/{task['id']}/start", token=TOKEN)[0] == 200
    inst = detail(col, task["id"])["instances"][0]
    key = report_route(col, inst["id"]).rsplit("/", 1)[1]
    readable = json.dumps([col.call("GET", "/api/collect-task")[1],
                           col.call("GET", f"/api/collect-task/{task['id']}")[1]])
    assert key not in readable
    report = {"executionTaskId": inst["executionTaskId"], "status": "SUCCESS", "exitCode": 0}
    before = db_dump(col.db)
    for route, token in ((report_route(col, inst["id"], key="guess"), TOKEN),
                         (report_route(col, inst["id"], key=key[:-1]), None)):
        code, resp = col.call("POST", route, report, token=token)
        assert code == 404 and "report key" in resp["message"], resp
    assert db_dump(col.db) == before
    code, resp = col.call("POST", f"/api/collect-task/{task['id']}/stop", token=TOKEN)
    assert code == 200, resp
    wait_until(lambda: detail(col, task["id"])["instances"][0]["steps"], 10, 0.05,
               "the executor's report")
    assert "/report/***" in col.log_text(), "the request line of the report is logged"
    assert key not in col.log_text() and key not in ex.log_text()
    # Both databases hold report keys or URLs: owner only.
    for db in (col.db, ex.db):
        assert os.stat(db).st_mode & 0o077 == 0, oct(os.stat(db).st_mode)


def test_reports_need_the_executor_token(start_executor, start_collector, pid_file):
    ex = start_executor(host="127.0.0.2", env={"CASE_EXEC_TOKEN": TOKEN})
    col = start_collector([ex.address], env={"CASE_EXEC_TOKEN": TOKEN})
    task = create(col, [fake_case(pid_file())])
    start(col, task["id"])
    inst = detail(col, task["id"])["instances"][0]
    report = {"executionTaskId": inst["executionTaskId"], "status": "SUCCESS", "exitCode": 0}
    before = db_dump(col.db)
    for token in (None, "wrong"):
        code, resp = col.call("POST", report_route(col, inst["id"]), report, token=token)
        assert code == 401
    assert db_dump(col.db) == before
    assert detail(col, task["id"])["instances"][0]["status"] == "RUNNING"
    assert stop(col, task["id"])[0] == 200


def test_executor_will_not_listen_beyond_loopback_without_a_token(capsys):
    with pytest.raises(SystemExit) as e:
        executor_module.parse_args(["--host", "0.0.0.0"])
    assert e.value.code != 0
    assert "without a token" in capsys.readouterr().err
    for args in (["--host", "0.0.0.0", "--token", "t"], ["--host", "10.1.2.3", "--insecure"],
                 ["--host", "127.0.0.5"], ["--host", "localhost"], ["--host", "::1"]):
        config, _ = executor_module.parse_args(args)
    assert executor_module.parse_args([])[0].host == "127.0.0.1"


def test_token_from_the_environment_is_not_visible_in_ps(start_executor):
    import psutil
    ex = start_executor(env={"CASE_EXEC_TOKEN": TOKEN})
    assert TOKEN not in " ".join(psutil.Process(ex.proc.pid).cmdline())


# -- what may run -----------------------------------------------------------------

def test_the_cases_list_offers_only_what_may_run(start_executor, tmp_path):
    """A sibling directory whose name starts like the cases directory is outside it."""
    cases, sibling = tmp_path / "hc", tmp_path / "hcX"
    cases.mkdir()
    sibling.mkdir()
    (cases / "good.py").write_text("pass\n")
    (sibling / "evil.py").write_text("pass\n")
    os.symlink(sibling / "evil.py", cases / "evil.py")
    ex = start_executor(cases_dir=cases)
    assert ex.call("GET", "/test-case-execution/cases")[1]["data"] == ["good.py"]
    code, body = ex.call("POST", "/test-case-execution/execute", {"script": "evil.py"})
    assert code == 400 and "outside" in body["message"], body


def test_a_case_gets_the_executor_environment_and_marker_but_no_secrets(
        start_executor, tmp_path):
    cases = cases_dir(tmp_path, env_dump=(
        "import json, os, sys\n"
        "json.dump(dict(os.environ), open(sys.argv[1], 'w'))\n"))
    ex = start_executor(cases_dir=cases, env={"CASE_EXEC_TOKEN": TOKEN,
                                             "COLLECTOR_API_TOKENS": API_TOKENS,
                                             "LAB_SETTING": "kept"})
    out = tmp_path / "env.json"
    code, resp = ex.call("POST", "/test-case-execution/execute", {
        "taskId": "env-1", "script": "env_dump.py", "args": [str(out)],
        "env": {"LD_PRELOAD": "/tmp/evil.so"}}, token=TOKEN)
    assert code == 200
    from support import wait_until
    env = wait_until(lambda: out.exists() and out.stat().st_size and json.loads(out.read_text()),
                     10, 0.05, "the case to dump its environment")
    assert env["CASE_EXEC_TASK_ID"] == "env-1" and env["CASE_EXEC_RUN"]
    assert env["LAB_SETTING"] == "kept"
    assert "CASE_EXEC_TOKEN" not in env and "COLLECTOR_API_TOKENS" not in env
    assert "LD_PRELOAD" not in env


def test_arguments_are_never_given_to_a_shell(start_executor, tmp_path):
    cases = cases_dir(tmp_path, argv_dump=(
        "import json, sys\njson.dump(sys.argv[1:], open(sys.argv[1], 'w'))\n"))
    ex = start_executor(cases_dir=cases)
    out = tmp_path / "argv.json"
    hostile = [str(out), "; touch /tmp/pwned-by-args", "$(id)", "`id`", "a b", "*"]
    assert ex.call("POST", "/test-case-execution/execute", {
        "script": "argv_dump.py", "args": hostile})[0] == 200
    from support import wait_until
    argv = wait_until(lambda: out.exists() and out.stat().st_size and json.loads(out.read_text()),
                      10, 0.05, "argv")
    assert argv == hostile and not os.path.exists("/tmp/pwned-by-args")


# -- bad input: a table over every endpoint ---------------------------------------------

BIG = b'{"name": "' + b"x" * (1024 * 1024) + b'"}'

EXECUTOR_BAD = [
    ("POST", "/test-case-execution/execute", b"{not json", 400, "not valid JSON"),
    ("POST", "/test-case-execution/execute", b"[]", 400, "JSON object"),
    ("POST", "/test-case-execution/execute", b'"str"', 400, "JSON object"),
    ("POST", "/test-case-execution/execute", b"{}", 400, "'script'"),
    ("POST", "/test-case-execution/execute", b'{"script": 42}', 400, "'script'"),
    ("POST", "/test-case-execution/execute", b'{"script": "/bin/sh"}', 400, "relative path"),
    ("POST", "/test-case-execution/execute", b'{"script": "../executor.py"}', 400, "relative"),
    ("POST", "/test-case-execution/execute", b'{"script": "nope.py"}', 400, "not found"),
    ("POST", "/test-case-execution/execute", b'{"script": "fake_case.py", "args": [1]}', 400,
     "list of at most"),
    ("POST", "/test-case-execution/execute", b'{"script": "fake_case.py", "args": "--x"}', 400,
     "list of at most"),
    ("POST", "/test-case-execution/execute", b'{"script": "fake_case.py", "taskId": "../x"}',
     400, "taskId"),
    ("POST", "/test-case-execution/execute",
     b'{"script": "fake_case.py", "taskId": "' + b"a" * 65 + b'"}', 400, "taskId"),
    ("POST", "/test-case-execution/execute", b'{"script": "fake_case.py", "taskId": 7}', 400,
     "taskId"),
    ("POST", "/test-case-execution/execute",
     b'{"script": "fake_case.py", "reportUrl": "file:///etc/passwd"}', 400, "reportUrl"),
    ("POST", "/test-case-execution/execute", BIG, 413, "larger than"),
    ("POST", "/test-case-execution/execute", b"[" * 20000 + b"]" * 20000, 400, "nested too deeply"),
    ("POST", "/test-case-execution/execute", b'{"script": "fake\\u0000case.py"}', 400, "'script'"),
    ("POST", "/test-case-execution/execute", b'{"script": "\\ud800.py"}', 400, "not valid JSON"),
    ("POST", "/test-case-execution/execute", b'{"script": "fake_case.py", "args": ["a\\u0000b"]}',
     400, "without NUL"),
    ("POST", "/test-case-execution/execute",
     b'{"script": "fake_case.py", "args": ["' + b"x" * 40000 + b'"]}', 400, "at most"),
    ("POST", "/test-case-execution/execute",
     b'{"script": "fake_case.py", "reportUrl": "http://h:99999/x"}', 400, "reportUrl"),
    ("POST", "/test-case-execution/execute",
     b'{"script": "fake_case.py", "reportUrl": "http://h:abc/x"}', 400, "reportUrl"),
    ("POST", "/test-case-execution/cancel/..", None, 400, "taskId"),
    ("GET", "/test-case-execution/log/unknown", None, 404, "not found"),
    ("GET", "/test-case-execution/log/keep?offset=-1", None, 400, "offset"),
    ("GET", "/test-case-execution/log/keep?limit=0", None, 400, "limit"),
    ("GET", "/test-case-execution/log/keep?offset=%B2", None, 400, "offset"),    # '²'.isdigit()
    ("GET", "/test-case-execution/log/keep?limit=%B2", None, 400, "limit"),
    ("GET", "/test-case-execution/log/keep?step=%C2%B2", None, 400, "step"),
    ("POST", "/test-case-execution/execute", b'{"script": "fake_case.py", "taskId": "nl\\n"}',
     400, "taskId"),
    ("POST", "/test-case-execution/execute", b'{"script": "cases/README.md"}', 400,
     "Python script"),
    ("POST", "/test-case-execution/cancel/%2e%2e", None, 400, "taskId"),
    ("POST", "/test-case-execution/cancel/a%20b", None, 400, "taskId"),
    ("GET", "/test-case-execution/status/%C3%A9t%C3%A9", None, 400, "taskId"),
    ("GET", "/test-case-execution/status/unknown", None, 404, "not found"),
    ("PUT", "/test-case-execution/execute", b"{}", 405, "not allowed"),
    ("DELETE", "/test-case-execution/cancel/x", None, 405, "not allowed"),
    ("GET", "/test-case-execution/nope", None, 404, "no such endpoint"),
    ("POST", "/test-case-execution/tasks", b"{}", 405, "not allowed"),
    ("DELETE", "/test-case-execution/cases", None, 405, "not allowed"),
    ("POST", "/health", b"{}", 405, "not allowed"),
    ("PUT", "/metrics", b"x", 405, "not allowed"),
    ("GET", "/health/x", None, 404, "no such endpoint"),
    ("GET", "/", None, 404, "no such endpoint"),
]


@pytest.mark.timeout(120)
def test_bad_requests_to_the_executor_change_nothing(start_executor, pid_file):
    ex = start_executor()
    path = pid_file()
    code, _ = ex.call("POST", "/test-case-execution/execute",
                      {"taskId": "keep", "script": "fake_case.py", "args": ["--pid-file", path]})
    wait_pid_file(path, 1)
    before_db, before_procs = db_dump(ex.db), case_processes(ex)
    for method, route, raw, code, words in EXECUTOR_BAD:
        status, body = ex.call(method, route, raw=raw)
        assert status == code, (method, route, body)
        assert_envelope(body, code)
        assert words in body["message"], (route, body["message"])
    assert db_dump(ex.db) == before_db
    assert case_processes(ex) == before_procs


COLLECTOR_BAD = [
    ("POST", "/api/collect-task", b"{oops", 400, "not valid JSON"),
    ("POST", "/api/collect-task", b"[1]", 400, "JSON object"),
    ("POST", "/api/collect-task", b"{}", 400, "'name'"),
    ("POST", "/api/collect-task", b'{"name": ""}', 400, "'name'"),
    ("POST", "/api/collect-task", b'{"name": 5, "cases": []}', 400, "'name'"),
    ("POST", "/api/collect-task", b'{"name": "' + b"n" * 201 + b'", "cases": []}', 400, "'name'"),
    ("POST", "/api/collect-task", b'{"name": "x"}', 400, "'cases'"),
    ("POST", "/api/collect-task", b'{"name": "x", "cases": []}', 400, "'cases'"),
    ("POST", "/api/collect-task", b'{"name": "x", "cases": {"a": 1}}', 400, "'cases'"),
    ("POST", "/api/collect-task", b'{"name": "x", "cases": ["a.py"]}', 400, "cases[0]"),
    ("POST", "/api/collect-task", b'{"name": "x", "cases": [{"args": []}]}', 400, "cases[0].script"),
    ("POST", "/api/collect-task", b'{"name": "x", "cases": [{"script": "/etc/x"}]}', 400,
     "relative path"),
    ("POST", "/api/collect-task", b'{"name": "x", "cases": [{"script": "a/../../b"}]}', 400,
     "relative path"),
    ("POST", "/api/collect-task", b'{"name": "x", "cases": [{"script": "a.py", "args": [1]}]}',
     400, "cases[0].args"),
    ("POST", "/api/collect-task", b'{"name": "x", "cases": [{"script": "a.py"}], "executors": []}',
     400, "'executors'"),
    ("POST", "/api/collect-task",
     b'{"name": "x", "cases": [{"script": "a.py"}], "executors": ["h:0"]}', 400, "port 1-65535"),
    ("POST", "/api/collect-task",
     b'{"name": "x", "cases": [{"script": "a.py"}], "executors": ["h:99999"]}', 400, "port"),
    ("POST", "/api/collect-task",
     b'{"name": "x", "cases": [{"script": "a.py"}], "executors": ["evil.com/x?:80"]}', 400,
     "host:port"),
    ("POST", "/api/collect-task",
     b'{"name": "x", "cases": [{"script": "a.py"}], "executors": ["h@x:80"]}', 400, "host:port"),
    ("POST", "/api/collect-task",
     b'{"name": "x", "cases": [{"script": "a.py"}], "executors": [8081]}', 400, "host:port"),
    ("POST", "/api/collect-task",
     b'{"name": "x", "cases": [{"script": "a.py"}], "executors": ["127.0.0.2:8081\\n"]}', 400,
     "host:port"),
    ("POST", "/api/collect-task", b'{"name": "x", "cases": [{"script": "a.py", "graceSeconds": 61}]}',
     400, "cases[0].graceSeconds"),
    ("POST", "/api/collect-task", BIG, 413, "larger than"),
    ("POST", "/api/collect-task", b"[" * 20000 + b"]" * 20000, 400, "nested too deeply"),
    ("POST", "/api/collect-task", b'{"name": "\\ud800", "cases": [{"script": "a.py"}]}', 400,
     "not valid JSON"),
    ("POST", "/api/collect-task", b'{"name": "x", "cases": [{"script": "' + b"s" * 2000 + b'"}]}',
     400, "at most 1024"),
    ("POST", "/api/collect-task",
     b'{"name": "x", "cases": [{"script": "a.py"}], "executors": ["127.0.0.9:1"]}', 400,
     "not one of this collector's"),
    ("GET", "/api/collect-task?limit=-1", None, 400, "limit"),
    ("GET", "/api/collect-task?limit=abc", None, 400, "limit"),
    ("GET", "/api/collect-task/abc", None, 400, "task id"),
    ("GET", "/api/collect-task/-1", None, 400, "task id"),
    ("GET", "/api/collect-task/0", None, 400, "task id"),
    ("GET", "/api/collect-task/1.5", None, 400, "task id"),
    ("GET", "/api/collect-task/99999999999999999999", None, 400, "task id"),
    ("GET", "/api/collect-task/424242", None, 404, "not found"),
    ("POST", "/api/collect-task/abc/stop", None, 400, "task id"),
    ("POST", "/api/collect-task/-3/start", None, 400, "task id"),
    ("POST", "/api/collect-task/424242/stop", None, 404, "not found"),
    ("POST", "/api/collect-task/424242/start", None, 404, "not found"),
    ("POST", "/api/collect-task/{task}/stop", b"{bad", 400, "not valid JSON"),
    ("POST", "/api/collect-task/{task}/stop", b'{"reason": 5}', 400, "'reason'"),
    ("POST", "/api/collect-task/{task}/stop", b'{"reason": "' + b"r" * 1001 + b'"}', 400,
     "'reason'"),
    ("POST", "/api/collect-task/{task}/start", b"{bad", 400, "not valid JSON"),
    ("POST", "{report}", b"{bad", 400, "not valid JSON"),
    ("POST", "{report}", b'{"status": "DONE"}', 400, "'status'"),
    ("POST", "{report}",
     b'{"status": "SUCCESS", "exitCode": "0", "executionTaskId": "x"}', 400, "'exitCode'"),
    ("POST", "{report}",
     b'{"status": "SUCCESS", "exitCode": true, "executionTaskId": "x"}', 400, "'exitCode'"),
    ("POST", "{report}", b'{"status": "SUCCESS", "exitCode": 0}',
     400, "'executionTaskId'"),
    ("POST", "{report}",
     b'{"status": "SUCCESS", "exitCode": 100000000000000000000, "executionTaskId": "x"}', 400,
     "'exitCode'"),
    ("POST", "{report}",
     b'{"status": "SUCCESS", "exitCode": 0, "executionTaskId": "x", "steps": "x"}', 400,
     "'steps'"),
    ("POST", "{report}",
     b'{"status": "SUCCESS", "exitCode": 0, "executionTaskId": "x", "steps": [1]}', 400,
     "'steps'"),
    ("POST", "{report}",
     b'{"status": "SUCCESS", "exitCode": 0, "executionTaskId": "not-this-one"}', 409,
     "does not match"),
    ("POST", "/api/execution-instance/424242/report/k",
     b'{"status": "SUCCESS", "exitCode": 0, "executionTaskId": "x"}', 404, "not found"),
    ("POST", "/api/execution-instance/{inst}/report/not-its-key",
     b'{"status": "SUCCESS", "exitCode": 0, "executionTaskId": "x"}', 404, "report key"),
    ("POST", "/api/execution-instance/{inst}/report/not-its-key", b'{"status": "DONE"}', 404,
     "report key"),
    ("POST", "/api/execution-instance/{inst}/report",
     b'{"status": "SUCCESS", "exitCode": 0, "executionTaskId": "x"}', 404, "no such endpoint"),
    ("POST", "/api/execution-instance/x/report/k", b"{}", 400, "instance id"),
    ("DELETE", "/api/collect-task/{task}", None, 405, "not allowed"),
    ("PUT", "/api/collect-task", b"{}", 405, "not allowed"),
    ("GET", "/api/collect-task/{task}/stop", None, 405, "not allowed"),
    ("GET", "/api/nothing-here", None, 404, "no such endpoint"),
    ("POST", "/api/executors", b"{}", 405, "not allowed"),
    ("POST", "/health", b"{}", 405, "not allowed"),
    ("DELETE", "/metrics", None, 405, "not allowed"),
    ("POST", "/", b"{}", 405, "not allowed"),
    ("GET", "/collector.html", None, 404, "no such endpoint"),
    ("GET", "/api/collect-task?limit=x", None, 400, "limit"),
    ("GET", "/api/collect-task?limit=-1", None, 400, "limit"),
    ("GET", "/api/collect-task/0", None, 400, "task id"),
]


@pytest.mark.timeout(120)
def test_bad_requests_to_the_collector_change_nothing(start_executor, start_collector, pid_file):
    ex, col, task, inst = one_running_instance(start_executor, start_collector, pid_file)
    before_db, before_procs = db_dump(col.db), case_processes(ex)
    for method, route, raw, code, words in COLLECTOR_BAD:
        route = route.format(task=task["id"], inst=inst["id"],
                             report=report_route(col, inst["id"]))
        status, body = col.call(method, route, raw=raw)
        assert status == code, (method, route, body)
        assert_envelope(body, code)
        assert words in body["message"], (route, body["message"])
    assert db_dump(col.db) == before_db
    assert case_processes(ex) == before_procs
    assert stop(col, task["id"])[0] == 200


def steps_of_size(size, count=1):
    """count step objects whose JSON text is exactly size bytes."""
    steps = [{"note": ""} for _ in range(count)]
    steps[0]["note"] = "n" * (size - len(json.dumps(steps)))
    assert len(json.dumps(steps).encode()) == size
    return steps


def test_a_report_with_bad_steps_changes_nothing(start_executor, start_collector, pid_file):
    ex, col, task, inst = one_running_instance(start_executor, start_collector, pid_file)
    route = report_route(col, inst["id"])
    report = {"executionTaskId": inst["executionTaskId"], "status": "SUCCESS", "exitCode": 0}
    before = db_dump(col.db)
    for steps, words in [("x", "list of at most 50 objects"), ({"index": 0}, "list"),
                         ([{"index": 0}, "step"], "objects"), ([{}] * 51, "at most 50"),
                         ([{"index": 0, "html": "<b>"}], "unknown field 'html'"),
                         ([{"index": "0"}], "steps[0].index"), ([{"index": True}], "index"),
                         ([{"state": "SUCCESS"}, {"exitCode": 1.5}], "steps[1].exitCode")]:
        code, body = col.call("POST", route, {**report, "steps": steps})
        assert code == 400, (steps if len(str(steps)) < 200 else len(str(steps)), body)
        assert_envelope(body, 400)
        assert words in body["message"], body["message"]
    assert db_dump(col.db) == before
    assert detail(col, task["id"])["instances"][0]["status"] == "RUNNING"
    assert stop(col, task["id"])[0] == 200
    wait_until(lambda: detail(col, task["id"])["instances"][0]["steps"], 10, 0.05,
               "the executor's own report, which would overwrite the steps below")

    # Large steps are kept whole (a cut once stored invalid JSON), and the task still reads.
    for steps in (steps_of_size(900_000), steps_of_size(900_000, 50)):
        code, body = col.call("POST", route, {**report, "steps": steps})
        assert code == 200 and body["data"]["changed"] is False, body
        assert detail(col, task["id"])["instances"][0]["steps"] == steps


def test_grace_beyond_what_executors_accept_is_refused_at_create(
        start_executor, start_collector, pid_file):
    ex = start_executor(host="127.0.0.2")      # its --max-grace-seconds is the default, 60
    col = start_collector([ex.address])
    tight = start_collector([ex.address], args=["--max-grace-seconds", "5"])
    for svc, grace, limit in ((col, 60.5, "60"), (col, 3600, "60"), (tight, 5.5, "5")):
        before = db_dump(svc.db)
        code, body = svc.call("POST", "/api/collect-task", {
            "name": "x", "cases": [dict(fake_case(pid_file()), graceSeconds=grace)]})
        assert code == 400, body
        assert_envelope(body, 400)
        assert f"'cases[0].graceSeconds' must be a number of seconds up to {limit}" \
            in body["message"]
        assert db_dump(svc.db) == before
    assert create(tight, [dict(fake_case(pid_file()), graceSeconds=5)])["status"] == "PENDING"
    # What the collector accepts by default, a default executor starts.
    task = create(col, [dict(fake_case(pid_file()), graceSeconds=60)])
    assert [i["status"] for i in start(col, task["id"])["instances"]] == ["RUNNING"]
    assert stop(col, task["id"])[0] == 200


def test_an_executor_address_with_a_trailing_newline_is_refused(start_collector):
    col = start_collector()         # no --executor: any well-formed address may be named
    before = db_dump(col.db)
    for address in ("127.0.0.2:8081\n", "[::1]:8081\n", "lab2\n:8081"):
        code, body = col.call("POST", "/api/collect-task", {
            "name": "x", "cases": [{"script": "fake_case.py"}], "executors": [address]})
        assert code == 400, (address, body)
        assert_envelope(body, 400)
        assert "must be host:port" in body["message"]
    assert db_dump(col.db) == before
    assert col.call("GET", "/api/collect-task")[1]["data"] == []


def test_an_internal_error_carries_an_error_id_that_is_in_the_log(start_collector):
    col = start_collector()
    task = create(col, [{"script": "x.py"}], executors=["127.0.0.9:9"])
    conn = sqlite3.connect(col.db)
    conn.execute("DROP TABLE test_case_execution_instance")     # a damaged database
    conn.commit()
    conn.close()
    code, body = col.call("GET", f"/api/collect-task/{task['id']}")
    assert code == 500
    assert_envelope(body, 500)
    error_id = body["data"]["errorId"]
    assert error_id in body["message"]
    log = col.log_text()
    assert f"error id={error_id}" in log and "Traceback" in log
    assert "no such table" not in json.dumps(body)


def test_raw_http_garbage_gets_an_envelope(start_executor, start_collector):
    ex = start_executor()
    col = start_collector([ex.address])
    code, body = http_json(ex.address, "POST", "/test-case-execution/execute",
                           raw=b"\xff\xfe\x00garbage")
    assert code == 400
    assert_envelope(body, 400)
    code, body = http_json(ex.address, "POST", "/test-case-execution/execute", raw=b"{}",
                           headers={"Content-Length": "abc"})
    assert code == 400 and "Content-Length" in body["message"]
    code, body = http_json(ex.address, "POST", "/test-case-execution/execute", raw=b"{}",
                           headers={"Content-Length": "\xb2"})
    assert code == 400 and "Content-Length" in body["message"]
    task = create(col, [{"script": "fake_case.py"}])
    code, body = http_json(col.address, "POST", f"/api/collect-task/{task['id']}/stop",
                           headers={"X-User": "caf\xe9\x01"})
    assert code == 400 and "X-User" in body["message"]
    assert detail(col, task["id"])["status"] == "PENDING"
    for request in (b"GARBAGE\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"):
        host, port = ex.address.split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(request)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.split()[1] in (b"400", b"414"), head
        assert_envelope(json.loads(payload), int(head.split()[1]))


def test_executor_flags_are_validated(capsys, tmp_path):
    for bad, words in ((["--grace-seconds", "nan"], "number of seconds"),
                       (["--grace-seconds", "-1"], "number of seconds"),
                       (["--port", "70000"], "port from 0 to 65535"),
                       (["--read-timeout", "0"], "above 0"),
                       (["--log-max-bytes", "0"], "1 or more"),
                       (["--cases-dir", str(tmp_path / "nowhere")], "not a directory")):
        with pytest.raises(SystemExit):
            executor_module.parse_args(bad)
        assert words in capsys.readouterr().err, bad
    assert executor_module.parse_args(["--grace-seconds", "0.5"])[0].grace_seconds == 0.5


def test_collector_flags_are_validated():
    for bad in (["--executor", "not an address"], ["--executor", "127.0.0.2:8081\n"],
                ["--executor", "h:99999"], ["--executor", "h:0"],
                ["--max-grace-seconds", "-1"], ["--max-grace-seconds", "nan"],
                ["--stop-wait", "-1"], ["--read-timeout", "0"], ["--connect-timeout", "inf"],
                ["--retry-max", "0"], ["--lane-workers", "0"], ["--port", "70000"]):
        with pytest.raises(SystemExit):
            collector_module.parse_args(bad)
    assert collector_module.parse_args(["--max-grace-seconds", "5"])[0].max_grace_seconds == 5
    config, _ = collector_module.parse_args(["--api-token", "alice:a,bob:b"])
    assert config.api_tokens == {"alice": "a", "bob": "b"}
    assert collector_module.parse_args(["--api-token", "plain"])[0].api_tokens == {"api": "plain"}
