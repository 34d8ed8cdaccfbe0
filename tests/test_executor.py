"""The executor over real HTTP, with real process trees from fake_case.py."""

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest

from support import (ROOT, assert_all_gone, cases_dir, drop_cap_kill, free_port, read_pid_file,
                     running, wait_gone, wait_pid_file, wait_until)

GRACE = 1.0


def new_task_id():
    return f"t-{uuid.uuid4().hex[:12]}"


def start_case(ex, path, *args, expect, task_id=None):
    """Run fake_case.py through the executor; wait until `expect` processes are up."""
    task_id = task_id or new_task_id()
    code, body = ex.call("POST", "/test-case-execution/execute", {
        "taskId": task_id, "script": "fake_case.py",
        "args": ["--pid-file", path, *args]})
    assert code == 200, body
    assert body["data"]["taskId"] == task_id
    entries = wait_pid_file(path, expect)
    return task_id, entries


def cancel(ex, task_id):
    return ex.call("POST", f"/test-case-execution/cancel/{task_id}")


def status(ex, task_id):
    code, body = ex.call("GET", f"/test-case-execution/status/{task_id}")
    assert code == 200, body
    return body["data"]


# name, fake_case options, processes to wait for before cancelling
TOPOLOGIES = [
    ("wide-200", ["--children", "200"], 201),
    ("depth-4", ["--children", "2", "--depth", "4"], 31),
    ("chain-10", ["--children", "1", "--depth", "10"], 11),
    ("sh-c-wrapper", ["--via-shell", "--children", "3", "--depth", "2"], 14),
    ("orphans", ["--orphan", "--children", "2", "--depth", "3"], 15),
    ("setsid-daemon", ["--daemonize", "--children", "2"], 5),
    ("new-pgid", ["--new-pgid", "--children", "3", "--depth", "2"], 13),
    ("self-stopped", ["--self-stop", "--children", "4"], 5),
    ("ignores-sigterm", ["--ignore-sigterm", "--children", "3", "--depth", "2"], 13),
    ("fork-storm", ["--fork-storm", "--storm-limit", "300"], 20),
    ("everything", ["--children", "2", "--depth", "3", "--new-pgid", "--orphan",
                    "--daemonize", "--self-stop", "--ignore-sigterm"], 17),
]


@pytest.mark.parametrize("name,args,expect", TOPOLOGIES, ids=[t[0] for t in TOPOLOGIES])
def test_cancel_leaves_no_process_of_any_topology(start_executor, pid_file, name, args, expect):
    ex = start_executor(grace=GRACE)
    path = pid_file()
    task_id, _ = start_case(ex, path, *args, expect=expect)
    code, body = cancel(ex, task_id)
    assert code == 200, body
    data = body["data"]
    assert body["message"] == "task cancelled"
    assert data["survivors"] == 0 and data["taskId"] == task_id
    assert data["signalled"] >= 1
    assert data["terminated"] + data["killed"] == data["signalled"]
    # Re-read: a storm may have registered more processes while it was being frozen.
    assert_all_gone(read_pid_file(path))
    assert status(ex, task_id)["status"] == "CANCELLED"


def test_cooperative_tree_gets_sigterm_first_and_stops_before_the_grace(
        start_executor, pid_file, tmp_path):
    ex = start_executor(grace=5)
    markers = tmp_path / "markers"
    markers.mkdir()
    path = pid_file()
    task_id, entries = start_case(ex, path, "--children", "3", "--depth", "2",
                                  "--graceful", str(markers), expect=13)
    asked = time.monotonic()
    code, body = cancel(ex, task_id)
    answered = time.monotonic() - asked
    assert code == 200, body
    assert body["data"]["killed"] == 0
    assert body["data"]["elapsedMs"] < 5000, "a cooperative tree must not sleep out the grace"
    assert answered < 5, "the cancel answers once the tree is gone, not after a grace's wait"
    assert sorted(int(f.name[5:]) for f in markers.iterdir()) == sorted(p for p, _ in entries)
    assert_all_gone(entries)


def test_wide_cooperative_tree_of_200_stops_well_under_a_second(start_executor, pid_file):
    ex = start_executor(grace=5)
    task_id, entries = start_case(ex, pid_file(), "--children", "200", expect=201)
    code, body = cancel(ex, task_id)
    assert code == 200, body
    assert body["data"]["signalled"] == 201 and body["data"]["killed"] == 0
    assert body["data"]["elapsedMs"] < 5000
    assert_all_gone(entries)


def test_sigterm_ignoring_tree_is_killed_after_one_shared_grace(start_executor, pid_file):
    ex = start_executor(grace=GRACE)
    task_id, entries = start_case(ex, pid_file(), "--ignore-sigterm", "--children", "5",
                                  "--depth", "2", expect=31)
    code, body = cancel(ex, task_id)
    assert code == 200, body
    data = body["data"]
    assert data["killed"] == 31 and data["terminated"] == 0
    # One deadline for the whole set, not one per process (31 x grace).
    assert GRACE * 1000 <= data["elapsedMs"] < GRACE * 1000 + 3000
    assert_all_gone(entries)


@pytest.mark.timeout(90)
def test_default_grace_is_five_seconds(tmp_path, start_executor, pid_file):
    ex = start_executor(grace=5.0)
    code, body = ex.call("GET", "/health")
    task_id, entries = start_case(ex, pid_file(), "--ignore-sigterm", expect=1)
    code, body = cancel(ex, task_id)
    assert code == 200, body
    assert 5000 <= body["data"]["elapsedMs"] < 8000
    assert_all_gone(entries)


def test_grace_default_is_documented_number():
    import executor
    config, _ = executor.parse_args([])
    assert config.grace_seconds == 5.0 and config.port == 8081
    assert config.connect_timeout == 10.0 and config.read_timeout == 30.0


def test_unknown_task_and_second_cancel_are_404(start_executor, pid_file):
    ex = start_executor()
    code, body = cancel(ex, "no-such-task")
    assert code == 404
    assert body == {"code": 404, "message": "task not found or already finished",
                    "data": {"taskId": "no-such-task"}}
    task_id, entries = start_case(ex, pid_file(), "--children", "2", expect=3)
    assert cancel(ex, task_id)[0] == 200
    code, body = cancel(ex, task_id)
    assert code == 404 and body["message"] == "task not found or already finished"


@pytest.mark.parametrize("exit_code,final", [(0, "SUCCESS"), (3, "FAILED")])
def test_case_that_exits_on_its_own_is_recorded_with_its_exit_code(
        start_executor, pid_file, exit_code, final):
    ex = start_executor()
    task_id, entries = start_case(ex, pid_file(), "--duration", "0.3",
                                  "--exit-code", str(exit_code), expect=1)
    # The exit is noticed at once (the reaper wakes the runner), well before
    # the runner's idle look would come round.
    wait_until(lambda: status(ex, task_id)["status"] != "RUNNING", 3, message="case to end")
    st = status(ex, task_id)
    assert (st["status"], st["exitCode"]) == (final, exit_code)
    assert cancel(ex, task_id)[0] == 404
    wait_gone(entries)
    code, body = ex.call("GET", "/test-case-execution/tasks")
    assert task_id not in [t["taskId"] for t in body["data"]]


def test_leftovers_of_a_finished_case_are_ended(start_executor, pid_file):
    ex = start_executor()
    path = pid_file()
    task_id, _ = start_case(ex, path, "--duration", "1", "--daemonize", "--children", "2",
                            expect=5)
    wait_until(lambda: status(ex, task_id)["status"] != "RUNNING", 15, message="case to end")
    st = status(ex, task_id)
    assert st["status"] == "SUCCESS" and st["exitCode"] == 0
    assert "leftover" in (st["note"] or "")
    wait_gone(read_pid_file(path))
    assert "left processes behind" in ex.log_text()


def test_keep_leftovers_leaves_them_running(start_executor, pid_file):
    ex = start_executor(args=["--keep-leftovers"])
    path = pid_file()
    task_id, entries = start_case(ex, path, "--duration", "0.5", "--children", "2", expect=3)
    wait_until(lambda: status(ex, task_id)["status"] == "SUCCESS", 10, message="case to end")
    children = [e for e in read_pid_file(path)][1:]
    assert all(running(*e) for e in children)   # teardown ends them


def test_other_tasks_are_never_touched(start_executor, pid_file):
    ex = start_executor()
    victim, victim_pids = start_case(ex, pid_file(), "--children", "3", expect=4)
    bystander, bystander_pids = start_case(ex, pid_file(), "--children", "3", expect=4)
    assert cancel(ex, victim)[0] == 200
    assert_all_gone(victim_pids)
    assert all(running(*e) for e in bystander_pids)
    assert psutil.Process(ex.proc.pid).is_running()
    assert status(ex, bystander)["status"] == "RUNNING"
    assert cancel(ex, bystander)[0] == 200


def test_concurrent_cancels_of_20_tasks_all_succeed(start_executor, pid_file):
    ex = start_executor()
    cases = [start_case(ex, pid_file(), "--children", "2", expect=3) for _ in range(20)]
    results = {}

    def stop(task_id):
        results[task_id] = cancel(ex, task_id)

    threads = [threading.Thread(target=stop, args=(t,)) for t, _ in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(code == 200 for code, _ in results.values()), results
    assert len(results) == 20
    for _, entries in cases:
        assert_all_gone(entries)


def test_two_cancels_of_one_task_at_once_both_succeed(start_executor, pid_file):
    ex = start_executor(grace=GRACE)
    task_id, entries = start_case(ex, pid_file(), "--ignore-sigterm", "--children", "2",
                                  expect=3)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cancel(ex, task_id)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(code for code, _ in results) in ([200, 200], [200, 404])
    assert_all_gone(entries)


def test_health_answers_while_a_slow_cancel_runs(start_executor, pid_file):
    ex = start_executor(grace=3)
    task_id, entries = start_case(ex, pid_file(), "--ignore-sigterm", expect=1)
    slow = threading.Thread(target=cancel, args=(ex, task_id))
    slow.start()
    wait_until(lambda: "cancel requested" in ex.log_text(), 5, message="cancel to start")
    started = time.monotonic()
    assert ex.call("GET", "/health")[0] == 200
    assert time.monotonic() - started < 1.0
    assert slow.is_alive(), "health must be answered while the cancel is still waiting"
    slow.join(15)
    assert_all_gone(entries)


def test_running_task_id_is_409_and_bad_scripts_are_400_with_nothing_started(
        start_executor, pid_file, tmp_path):
    ex = start_executor()
    task_id, entries = start_case(ex, pid_file(), expect=1)
    code, body = ex.call("POST", "/test-case-execution/execute",
                         {"taskId": task_id, "script": "fake_case.py"})
    assert code == 409 and body["code"] == 409 and "already exists" in body["message"]
    before = {p.pid for p in psutil.Process(ex.proc.pid).children(recursive=True)}
    outside = tmp_path / "outside.py"
    outside.write_text("print('never')\n")
    link = os.path.join(ROOT, "tests", f"link-{uuid.uuid4().hex[:6]}.py")
    os.symlink(outside, link)
    try:
        for script in ["/etc/passwd", "../outside.py", "tests/../../x.py", "missing.py",
                       os.path.relpath(link, ROOT), "", 5]:
            code, body = ex.call("POST", "/test-case-execution/execute",
                                 {"taskId": new_task_id(), "script": script})
            assert code == 400, (script, body)
            assert body["code"] == 400 and body["data"] is None and body["message"]
    finally:
        os.unlink(link)
    after = {p.pid for p in psutil.Process(ex.proc.pid).children(recursive=True)}
    assert after == before
    code, body = ex.call("GET", "/test-case-execution/tasks")
    assert [t["taskId"] for t in body["data"]] == [task_id]


@pytest.mark.parametrize("method,path,raw,code", [
    ("GET", "/nope", None, 404),
    ("DELETE", "/health", None, 405),
    ("GET", "/test-case-execution/cancel/x", None, 405),
    ("POST", "/test-case-execution/execute", b"{not json", 400),
    ("POST", "/test-case-execution/execute", b"[1, 2]", 400),
    ("POST", "/test-case-execution/execute", b'{"script": "fake_case.py", "args": "x"}', 400),
    ("POST", "/test-case-execution/execute", b'{"script": "fake_case.py", "taskId": "a/b"}', 400),
    ("POST", "/test-case-execution/cancel/bad%20id", None, 400),
])
def test_errors_are_envelopes(start_executor, method, path, raw, code):
    ex = start_executor()
    status_code, body = ex.call(method, path, raw=raw)
    assert status_code == code
    assert set(body) == {"code", "message", "data"} and body["code"] == code
    assert "Traceback" not in json.dumps(body)


def test_execute_without_task_id_generates_one(start_executor):
    ex = start_executor()
    code, body = ex.call("POST", "/test-case-execution/execute",
                         {"script": "fake_case.py", "args": ["--duration", "0.1"]})
    assert code == 200 and len(body["data"]["taskId"]) >= 16
    wait_until(lambda: status(ex, body["data"]["taskId"])["status"] == "SUCCESS", 10,
               message="case to end")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as another user")
def test_stop_tree_reports_a_process_it_cannot_signal_as_a_survivor():
    """The design's 'process cannot be terminated': stop_tree, without the right
    to signal it, against a real process; it must say so, not claim success."""
    victim = subprocess.Popen(["sleep", "60"], user="nobody")
    try:
        script = (
            "import json, executor\n"
            f"find = lambda: [p for p in [executor.read_proc({victim.pid})] if p and p.alive]\n"
            "r = executor.stop_tree(find, 0.3, kill_wait=0.5, reap_wait=0.2)\n"
            "print(json.dumps(r.as_dict()))\n")
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                             text=True, timeout=30, preexec_fn=drop_cap_kill)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["survivors"] == 1 and result["survivorPids"] == [victim.pid]
        assert "permission denied" in out.stderr
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


ESCAPE = '''"""Leaves every heuristic behind: double fork, new session, empty environment
(after argv[3] seconds, the time a scan has to notice it)."""
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open(sys.argv[1] + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(float(sys.argv[3]))
        os.execvp("env", ["env", "-i", "/bin/sleep", "300"])
    os._exit(0)
time.sleep(float(sys.argv[2]))
'''


ESCAPE_LATER = '''"""A double-forked daemon that keeps the marker, and argv[3] seconds later
forks a child that leaves its session and environment at once; the daemon
then lives argv[4] seconds more (default: for ever)."""
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(float(sys.argv[3]))
        if os.fork() == 0:
            os.setsid()
            with open(sys.argv[1] + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(sys.argv[1] + ".tmp", sys.argv[1])
            os.execve("/bin/sleep", ["sleep", "300"], {})
        time.sleep(float(sys.argv[4]) if len(sys.argv) > 4 else 300)
    os._exit(0)
time.sleep(float(sys.argv[2]))
'''


@pytest.fixture
def run_escape(start_executor, tmp_path):
    """run_escape(task_id, root_seconds, delay=0, cgroups=True) -> (executor,
    escapee identity): a case whose grandchild leaves its tree, session and
    (after `delay` seconds) environment."""
    cases = tmp_path / "escape-cases"
    cases.mkdir()
    (cases / "escape.py").write_text(ESCAPE)
    (cases / "escape_later.py").write_text(ESCAPE_LATER)

    def run(task_id, root_seconds, delay=0.0, cgroups=True, script="escape.py", extra=()):
        ex = start_executor(cases_dir=cases, name=f"ex-{task_id}",
                            args=[] if cgroups else ["--cgroups", "off"])
        if cgroups and not ex.cgroups:
            pytest.skip("no writable cgroup v2 here: such an escapee is out of reach (README)")
        marker = str(tmp_path / f"{task_id}.pid")
        code, body = ex.call("POST", "/test-case-execution/execute", {
            "taskId": task_id, "script": script,
            "args": [marker, str(root_seconds), str(delay), *extra]})
        assert code == 200
        root_pid = body["data"]["pid"]
        pid = int(wait_until(lambda: os.path.exists(marker) and open(marker).read(), 10, 0.02,
                             "the escapee"))
        p = psutil.Process(pid)
        wait_until(lambda: p.name() == "sleep" and p.ppid() != root_pid, 5 + delay, 0.02,
                   "the escapee to be orphaned and exec sleep")
        assert "CASE_EXEC_RUN" not in p.environ() and os.getsid(pid) != root_pid
        return ex, (pid, p.create_time())
    return run


def test_a_process_that_escapes_session_tree_and_environment_is_still_ended(run_escape):
    ex, escapee = run_escape("escape-1", 300)
    code, body = cancel(ex, "escape-1")
    assert code == 200 and body["data"]["survivors"] == 0
    assert_all_gone([escapee])
    assert not os.path.exists(os.path.join(ex.cgroups, "task-escape-1"))


def test_without_cgroups_an_escapee_that_clears_its_environment_later_is_still_ended(
        run_escape):
    """Without a cgroup the run marker is what finds an escapee; the executor
    looks at every process twice a second while such a case runs, so one that
    clears its environment later than that is still known by its marker."""
    ex, escapee = run_escape("escape-3", 300, delay=1.5, cgroups=False)
    code, body = cancel(ex, "escape-3")
    assert code == 200 and body["data"]["survivors"] == 0, body
    assert_all_gone([escapee])


def test_without_cgroups_what_an_escaped_daemon_forks_later_is_still_ended(run_escape):
    """The child leaves session and environment in the same instant it starts, so
    no scan sees its marker: it is found as a descendant of a known member."""
    ex, escapee = run_escape("escape-4", 300, delay=1.0, cgroups=False,
                             script="escape_later.py")
    code, body = cancel(ex, "escape-4")
    assert code == 200 and body["data"]["survivors"] == 0, body
    assert_all_gone([escapee])


def test_without_cgroups_the_orphan_of_an_escaped_daemon_is_still_ended(run_escape):
    """The daemon exits after its child left session and marker: the child, now
    the executor's (the subreaper's) child, is no one's descendant any more; it
    is known because the executor looked while its parent was alive."""
    ex, orphan = run_escape("escape-6", 300, delay=0.5, cgroups=False,
                            script="escape_later.py", extra=["1.5"])
    wait_until(lambda: psutil.Process(orphan[0]).ppid() == ex.proc.pid, 10, 0.05,
               "the daemon to exit, leaving its child to the executor")
    code, body = cancel(ex, "escape-6")
    assert code == 200 and body["data"]["survivors"] == 0, body
    assert_all_gone([orphan])


def escaped_of(ex, task_id):
    """What the executor stored of a step's processes outside its session."""
    conn = sqlite3.connect(f"file:{ex.db}?mode=ro", uri=True)
    try:
        steps, = conn.execute("SELECT steps FROM execution WHERE task_id = ?",
                              (task_id,)).fetchone()
    finally:
        conn.close()
    return [tuple(e) for e in json.loads(steps)[0]["escaped"]]


def test_without_cgroups_an_orphan_made_while_the_executor_was_down_is_ended_after(
        run_escape):
    ex, orphan = run_escape("escape-7", 300, delay=0.5, cgroups=False,
                            script="escape_later.py", extra=["1.5"])
    def stored_with_orphan():
        stored = escaped_of(ex, "escape-7")
        return orphan[0] in [pid for pid, _ in stored] and stored
    stored = wait_until(stored_with_orphan, 5, 0.05, "the executor to store the daemon's child")
    daemon = [e for e in stored if e[0] != orphan[0]]
    assert daemon, stored
    ex.kill9()
    wait_until(lambda: not any(running(*e) for e in daemon), 10, 0.05,
               "the daemon to exit while the executor is down")
    ex.start()
    code, body = cancel(ex, "escape-7")
    assert code == 200 and body["data"]["survivors"] == 0, body
    wait_gone([orphan], 5)


def test_without_cgroups_an_executor_restart_keeps_what_carried_the_marker(run_escape):
    """The marker an escapee cleared is remembered in SQLite, not only in memory."""
    ex, escapee = run_escape("escape-5", 300, delay=1.5, cgroups=False)
    ex.kill9()
    ex.start()
    assert "adopted root" in ex.log_text()
    code, body = cancel(ex, "escape-5")
    assert code == 200 and body["data"]["survivors"] == 0, body
    # Killed; its parent is now init (the old executor is gone), which reaps it.
    wait_gone([escapee], 5)


def test_an_escapee_left_behind_by_a_finished_case_is_ended(run_escape):
    ex, escapee = run_escape("escape-2", 0.5)
    wait_until(lambda: status(ex, "escape-2")["status"] == "SUCCESS", 15, message="case end")
    assert "leftover" in status(ex, "escape-2")["note"]
    wait_gone([escapee], 5)


def test_a_case_runs_inside_its_cgroup_from_its_first_instruction(start_executor, tmp_path):
    cases = cases_dir(tmp_path, where=(
        "import sys\nopen(sys.argv[1], 'w').write(open('/proc/self/cgroup').read())\n"))
    ex = start_executor(cases_dir=cases)
    if not ex.cgroups:
        pytest.skip("no writable cgroup v2 here")
    out = tmp_path / "cgroup.txt"
    # A taskId that is also the name of a cgroupfs file still gets its own cgroup.
    assert ex.call("POST", "/test-case-execution/execute",
                   {"taskId": "cgroup.procs", "script": "where.py", "args": [str(out)]})[0] == 200
    text = wait_until(lambda: out.exists() and out.read_text(), 10, 0.02, "the case's cgroup")
    own = next(line for line in text.splitlines() if line.startswith("0::"))
    assert own.endswith(f"/case-executor-{ex.host}-{ex.port}/task-cgroup.procs/step-0"), own


def test_two_executors_on_one_machine_and_port_never_share_a_case(start_executor, pid_file):
    port = free_port("127.0.0.2")
    labs = [start_executor(host=host, port=port, name=f"lab-{host}")
            for host in ("127.0.0.2", "127.0.0.3")]
    if not labs[0].cgroups:
        pytest.skip("no writable cgroup v2 here")
    assert labs[0].cgroups != labs[1].cgroups
    trees = [start_case(lab, pid_file(), "--children", str(n), task_id="shared", expect=n + 1)
             for lab, n in zip(labs, (1, 3))]
    code, body = cancel(labs[0], "shared")
    assert code == 200 and body["data"]["signalled"] == 2, body
    assert_all_gone(trees[0][1])
    assert all(running(*e) for e in trees[1][1]), "the other executor's case was touched"
    assert cancel(labs[1], "shared")[0] == 200
    assert_all_gone(trees[1][1])


CAPTOR = '''"""Puts the executor into its own cgroup, so that a cgroup.kill of the case would
end the executor too; with argv[2] == "ignore" it ignores SIGTERM so that the kill comes."""
import os, signal, sys, time
if sys.argv[2:] == ["ignore"]:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
mount = next(l.split()[1] for l in open("/proc/self/mounts") if l.split()[2] == "cgroup2")
own = next(l.strip()[3:] for l in open("/proc/self/cgroup") if l.startswith("0::"))
with open(os.path.join(mount, own.lstrip("/"), "cgroup.procs"), "w") as f:
    f.write(str(os.getppid()))
open(sys.argv[1], "w").close()
time.sleep(300)
'''


@pytest.mark.parametrize("on_term", ["ignore", "exit"])
def test_a_case_that_puts_the_executor_into_its_cgroup_does_not_get_it_killed(
        start_executor, tmp_path, on_term):
    cases = cases_dir(tmp_path, captor=CAPTOR)
    ex = start_executor(cases_dir=cases, grace=0.3)
    if not ex.cgroups:
        pytest.skip("no writable cgroup v2 here")
    done = tmp_path / "moved"
    code, body = ex.call("POST", "/test-case-execution/execute",
                         {"taskId": "captor", "script": "captor.py",
                          "args": [str(done), on_term]})
    assert code == 200, body
    case = psutil.Process(body["data"]["pid"])
    wait_until(done.exists, 10, 0.02, "the executor to be moved")
    assert "task-captor" in open(f"/proc/{ex.proc.pid}/cgroup").read()
    code, body = cancel(ex, "captor")
    assert code == 200 and body["data"]["survivors"] == 0, body
    assert ex.proc.poll() is None and ex.healthy()
    assert "task-captor" not in open(f"/proc/{ex.proc.pid}/cgroup").read()
    assert "moved itself back" in ex.log_text()
    assert_all_gone([(case.pid, case.create_time())])
    wait_until(lambda: not os.path.exists(os.path.join(ex.cgroups, "task-captor")), 5, 0.05,
               "the case's cgroup to be removed")
