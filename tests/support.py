"""Helpers shared by the tests and the demo: start the real services, talk
real HTTP, and check real processes with psutil.

Every process the tests start carries CASE_TEST_RUN=<id of this run> in its
environment (cases inherit it through the executor), so the run can prove at
the end that it left nothing behind, and clean up only what is its own.
"""

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_RUN_ENV = "CASE_TEST_RUN"
TEST_RUN = os.environ.setdefault(TEST_RUN_ENV, uuid.uuid4().hex)


# -- waiting -------------------------------------------------------------------

def wait_until(predicate, timeout=10.0, interval=0.02, message="condition"):
    """Poll predicate until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


# -- HTTP ----------------------------------------------------------------------

def http_json(address, method, path, body=None, token=None, headers=None, raw=None,
              timeout=30.0):
    """(status, parsed JSON body) from one real HTTP request."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": "application/json"}
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        hdrs.update(headers or {})
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        text = resp.read()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text.decode("utf-8", "replace")
    finally:
        conn.close()


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_or_free(host, port):
    """port if nothing listens there on host, else any free one."""
    with socket.socket() as s:
        # As the servers bind: a port with only TIME-WAIT connections left is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return port
        except OSError:
            return free_port(host)


# -- services ------------------------------------------------------------------

class Service:
    """One real executor.py or collector.py process on a loopback address."""

    def __init__(self, script, host, port, args, log_path, env=None, preexec=None):
        self.script, self.host, self.port = script, host, port
        self.address = f"{host}:{port}"
        self.args, self.log_path = args, log_path
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.preexec = preexec      # runs in the child before exec (e.g. drop a capability)
        self.proc = None

    def start(self, timeout=15.0):
        """Start it and wait until /health answers; log_path None keeps the terminal."""
        log = open(self.log_path, "ab") if self.log_path else None
        try:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, self.script), "--host", self.host,
                 "--port", str(self.port), *self.args],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT if log else None,
                stdin=subprocess.DEVNULL, preexec_fn=self.preexec)
        finally:
            if log:
                log.close()
        wait_until(self.healthy, timeout, 0.05, f"{self.script} on {self.address} to answer")
        return self

    def healthy(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.script} exited with {self.proc.returncode}:\n"
                                 + self.log_tail())
        try:
            return http_json(self.address, "GET", "/health", timeout=2)[0] == 200
        except OSError:
            return False

    def call(self, method, path, body=None, **kw):
        return http_json(self.address, method, path, body, **kw)

    def stop(self):
        """SIGTERM, as an operator would; SIGKILL if it hangs."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def log_tail(self, lines=40):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def log_text(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()


# -- processes -----------------------------------------------------------------

def read_pid_file(path):
    """[(pid, create_time)] from a fake_case.py --pid-file; [] until it exists."""
    try:
        with open(path) as f:
            return [(e["pid"], e["create_time"]) for e in json.load(f)]
    except (OSError, ValueError):
        return []


def wait_pid_file(path, count, timeout=15.0):
    return wait_until(lambda: len(read_pid_file(path)) >= count and read_pid_file(path),
                      timeout, 0.05, f"{count} processes in {path}")


def exists(pid, create_time):
    """True while that very process exists, even as a zombie."""
    try:
        return abs(psutil.Process(pid).create_time() - create_time) < 0.02
    except psutil.NoSuchProcess:
        return False


def running(pid, create_time):
    try:
        p = psutil.Process(pid)
        return (abs(p.create_time() - create_time) < 0.02
                and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def wait_gone(entries, timeout=10.0):
    """Wait until no process in entries exists, not even as a zombie."""
    wait_until(lambda: not [e for e in entries if exists(*e)], timeout, 0.02,
               "processes to be gone")


def assert_all_gone(entries):
    left = [e for e in entries if exists(*e)]
    assert not left, f"processes still there: {describe(left)}"


def describe(entries):
    out = []
    for pid, ctime in entries:
        try:
            p = psutil.Process(pid)
            out.append(f"{pid}({p.status()}, ppid {p.ppid()}, {' '.join(p.cmdline())[:80]})")
        except psutil.Error:
            out.append(str(pid))
    return ", ".join(out)


def processes_marked(name, value):
    """Live processes whose environment holds name=value."""
    marker = f"{name}={value}".encode()
    found = []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        try:
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.append(p)
        except OSError:
            pass
    return found


def remove_cgroups(base):
    """After a test: end whatever is left in an executor's case cgroups (ours,
    escapees without markers included) and remove them. None: it had none."""
    if not base or not os.path.isdir(base):
        return
    for dirpath, _, files in os.walk(base):
        if "cgroup.kill" in files and dirpath != base:
            with open(os.path.join(dirpath, "cgroup.kill"), "w") as f:
                f.write("1")

    def populated():
        with open(os.path.join(base, "cgroup.events")) as f:
            return "populated 1" in f.read()
    wait_until(lambda: not populated(), 10, 0.02, f"{base} to empty")
    for dirpath, _, _ in sorted(os.walk(base), key=lambda w: -len(w[0])):
        os.rmdir(dirpath)


def kill_marked(name, value):
    """SIGKILL every process carrying our own marker; returns what it found."""
    found = processes_marked(name, value)
    for p in found:
        try:
            p.send_signal(signal.SIGCONT)
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(found, timeout=5)
    return found


# -- network faults ------------------------------------------------------------

class SilentListener:
    """A port where the kernel completes every connect and nobody ever answers:
    a hung executor. With backlog=0 and one connection parked in the queue,
    further connects never complete at all."""

    def __init__(self, host="127.0.0.1", port=0, backlog=128):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(backlog)
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.parked = []

    def fill_backlog(self):
        host, port = self.sock.getsockname()
        self.parked.append(socket.create_connection((host, port), timeout=2))
        return self

    def close(self):
        for s in self.parked:
            s.close()
        self.sock.close()


def unconnectable(host="127.0.0.1"):
    """An address whose connect never completes (its accept queue is full)."""
    return SilentListener(host, backlog=0).fill_backlog()


def closed_address(host="127.0.0.1"):
    """An address where nothing listens: connects are refused at once."""
    return f"{host}:{free_port(host)}"


# -- databases -----------------------------------------------------------------

def db_dump(path):
    """Every row of every table, to prove a rejected request changed nothing."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}
    finally:
        conn.close()


# -- the collector's API, as the tests and the demo use it ----------------------

def drop_cap_kill():
    """Runs in a child before exec: without CAP_KILL, root may not signal
    another user's process, which is a real 'permission denied'."""
    import ctypes
    PR_CAPBSET_DROP, CAP_KILL = 24, 5
    if ctypes.CDLL(None, use_errno=True).prctl(PR_CAPBSET_DROP, CAP_KILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def cases_dir(tmp_path, **scripts):
    """A cases directory for an executor, holding <name>.py for each name=source."""
    cases = tmp_path / "cases"
    cases.mkdir(exist_ok=True)
    for name, source in scripts.items():
        (cases / f"{name}.py").write_text(source)
    return cases


def fake_case(path, *args):
    return {"script": "fake_case.py", "args": ["--pid-file", path, *args]}


def create(col, cases, executors=None, name="collect"):
    body = {"name": name, "cases": cases}
    if executors is not None:
        body["executors"] = executors
    code, resp = col.call("POST", "/api/collect-task", body)
    assert code == 201, resp
    return resp["data"]


def detail(col, task_id):
    code, resp = col.call("GET", f"/api/collect-task/{task_id}")
    assert code == 200, resp
    return resp["data"]


def start(col, task_id):
    code, resp = col.call("POST", f"/api/collect-task/{task_id}/start")
    assert code == 200, resp
    return resp["data"]


def stop(col, task_id, reason=None, user=None):
    headers = {"X-User": user} if user else None
    return col.call("POST", f"/api/collect-task/{task_id}/stop",
                    {"reason": reason} if reason else None, headers=headers)


def report_route(col, inst_id, key=None):
    """The route an executor reports to: it carries the instance's report key,
    which only the collector's database and that executor know."""
    if key is None:
        conn = sqlite3.connect(f"file:{col.db}?mode=ro", uri=True)
        try:
            key, = conn.execute("SELECT report_key FROM test_case_execution_instance"
                                " WHERE id = ?", (inst_id,)).fetchone()
        finally:
            conn.close()
    return f"/api/execution-instance/{inst_id}/report/{key}"


def wait_task(col, task_id, status, timeout=15):
    return wait_until(lambda: (d := detail(col, task_id))["status"] == status and d,
                      timeout, 0.05, f"task {task_id} to be {status}")
