"""What the benchmarks stand on: the real services, real process trees, real
sockets, and the bookkeeping that ends everything the bench started.

Standard library plus the project's own requirements (psutil). Nothing here
imports tests/, so the bench keeps working while the suite changes.

Every process the bench starts carries BENCH_RUN=<id of this run> in its
environment (cases inherit it through the executor), so cleanup can end
exactly what is ours and nothing else on the machine.
"""

import http.client
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import uuid

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where the measured code lives: the working tree, or an export of one commit
# (run.py --ref) so that edits made meanwhile do not leak into the figures.
CODE = {"root": ROOT}
CODE_FILES = ("executor.py", "collector.py", "schema.sql", "fake_case.py", "bench/idle_case.py")


def code_root():
    return CODE["root"]


def export_code(ref, dest):
    """Write the measured files as they are in commit ref under dest; use them."""
    for name in CODE_FILES:
        data = subprocess.run(["git", "-C", ROOT, "show", f"{ref}:{name}"], check=True,
                              capture_output=True, timeout=30).stdout
        path = os.path.join(dest, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    CODE["root"] = dest
    return dest
BENCH_RUN_ENV = "BENCH_RUN"
RUN_ID = uuid.uuid4().hex
MY_PID = os.getpid()
# psutil create times of one process may differ by a few ms between reads.
SAME_TIME = 0.02
SECRET_ENVS = ("CASE_EXEC_TOKEN", "COLLECTOR_API_TOKENS", "EXECUTOR_TOKEN")


def log(text=""):
    print(text, file=sys.stderr, flush=True)


def new_id(prefix="bench"):
    """A unique execution taskId (the executor accepts [A-Za-z0-9._-]{1,64})."""
    return f"{prefix}-{uuid.uuid4().hex}"


# -- waiting -------------------------------------------------------------------

def wait_until(predicate, timeout, interval=0.02, message="condition"):
    """Poll predicate until truthy; raise after timeout. Bounded by construction."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


# -- HTTP ----------------------------------------------------------------------

def http_json(address, method, path, body=None, timeout=60.0):
    """(status, parsed JSON) from one HTTP request; raises OSError without an answer."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else b""
        conn.request(method, path, body=data,
                      headers={"Content-Type": "application/json",
                               "Content-Length": str(len(data))})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, {"message": raw[:200].decode("utf-8", "replace")}
    finally:
        conn.close()


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- services ------------------------------------------------------------------

class Service:
    """One real executor.py or collector.py, in its own session, marked as ours."""

    def __init__(self, script, host, args, log_path, port=None):
        self.script, self.host = script, host
        self.port = port or free_port(host)
        self.address = f"{host}:{self.port}"
        self.args, self.log_path = list(args), log_path
        self.proc = None
        self.frozen = False
        self.parked = []        # client sockets that fill its accept queue

    def launch(self):
        # Tokenless on loopback: a token in the caller's environment would
        # otherwise reach some services and not the bench's own calls.
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENVS}
        env["PYTHONUNBUFFERED"] = "1"
        env[BENCH_RUN_ENV] = RUN_ID
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(code_root(), self.script), "--host", self.host,
                 "--port", str(self.port), *self.args],
                cwd=code_root(), env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_healthy(self, timeout=30.0):
        wait_until(self.healthy, timeout, 0.05, f"{self.script} on {self.address}")
        return self

    def healthy(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.script} on {self.address} exited with "
                               f"{self.proc.returncode}:\n{self.log_tail()}")
        try:
            return http_json(self.address, "GET", "/health", timeout=2)[0] == 200
        except OSError:
            return False

    def log_tail(self, lines=20):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    @property
    def pid(self):
        return self.proc.pid

    def call(self, method, path, body=None, timeout=60.0):
        return http_json(self.address, method, path, body, timeout)

    # A frozen service is a black hole with the socket behaviour of
    # tests/support.py's SilentListener: the kernel completes every connect
    # into the listen queue and nobody ever reads or answers. With its accept
    # queue filled as well (fill_accept_queue), it is support.unconnectable():
    # further SYNs are dropped and a connect never completes.
    def freeze(self, unconnectable=False):
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True
        if unconnectable:
            self.parked = fill_accept_queue(self.host, self.port)

    def thaw(self):
        for s in self.parked:
            s.close()
        self.parked = []
        if self.frozen and self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
        self.frozen = False

    def stop(self):
        self.thaw()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def cpu_seconds(self):
        """User + system CPU of the service itself (not of its reaped cases)."""
        t = psutil.Process(self.pid).cpu_times()
        return t.user + t.system

    def rss(self):
        return psutil.Process(self.pid).memory_info().rss

    def peak_rss(self):
        """VmHWM: the high-water mark of the resident set since the service started."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0


def start_services(services, timeout=60.0):
    """Launch several at once (they import in parallel), then wait for each."""
    for s in services:
        s.launch()
    for s in services:
        s.wait_healthy(timeout)
    return services


def executor_service(host, base, grace, name, extra=()):
    d = os.path.join(base, name)
    os.makedirs(d, exist_ok=True)
    return Service("executor.py", host,
                   ["--cases-dir", code_root(), "--db", os.path.join(d, "executor.db"),
                    "--log-dir", os.path.join(d, "logs"), "--work-dir", os.path.join(d, "work"),
                    "--grace-seconds", str(grace), "--log-level", "WARNING", *extra],
                   os.path.join(d, "service.log"))


def collector_service(base, executors, name="collector", connect_timeout=10.0,
                      read_timeout=30.0, stop_wait=3.0, retry_max=30.0):
    d = os.path.join(base, name)
    os.makedirs(d, exist_ok=True)
    return Service("collector.py", "127.0.0.1",
                   ["--db", os.path.join(d, "collector.db"),
                    *[a for e in executors for a in ("--executor", e.address)],
                    "--connect-timeout", str(connect_timeout), "--read-timeout",
                    str(read_timeout), "--stop-wait", str(stop_wait),
                    "--retry-max", str(retry_max), "--log-level", "WARNING"],
                   os.path.join(d, "service.log"))


def fill_accept_queue(host, port, limit=5000, timeout=0.3):
    """Connect until a connect no longer completes: the listen queue is full.

    Only on a service we froze, so nothing accepts meanwhile. Returns the
    parked client sockets; closing them does not empty the server's queue,
    only the service's accept() (after thaw) does."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = min(limit, max(16, soft - 256))
    parked = []
    for _ in range(limit):
        s = socket.socket()
        s.settimeout(timeout)
        try:
            s.connect((host, port))
        except (TimeoutError, socket.timeout):
            s.close()
            return parked
        except OSError:
            s.close()
            for p in parked:
                p.close()
            raise
        parked.append(s)
    for p in parked:
        p.close()
    raise RuntimeError(f"the accept queue of {host}:{port} did not fill in {limit} connects")


# -- processes -----------------------------------------------------------------

def read_pid_file(path):
    """[(pid, create_time)] from a fake_case.py --pid-file; [] until it exists."""
    try:
        with open(path) as f:
            return [(e["pid"], e["create_time"]) for e in json.load(f)]
    except (OSError, ValueError):
        return []


def proc_of(pid, ctime):
    """The very process (pid + create time), or None when it no longer exists."""
    try:
        p = psutil.Process(pid)
        return p if abs(p.create_time() - ctime) < SAME_TIME else None
    except psutil.Error:
        return None


CLK_TCK = os.sysconf("SC_CLK_TCK")
BOOT_TIME = psutil.boot_time()


def proc_stat(pid):
    """(state letter, ppid, create time) straight from /proc/<pid>/stat, or None.

    The create time is psutil's formula (boot time + start ticks), so it
    compares with the pid file's; one read instead of psutil's several keeps
    a poll of 200 processes to a few milliseconds."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[1]), BOOT_TIME + int(fields[19]) / CLK_TCK


class SurvivorCounter:
    """Counts which pid-file entries are not gone yet, cheaply and repeatedly.

    A running or stopped process is a survivor. A zombie is one only while its
    parent is the stopper (the bench for the baselines, the executor for its
    cancel): the stopper still owes it a wait(). Zombies whose parent is init
    (pid 1 here reaps them on its own schedule, within seconds) or another
    case process are counted as gone: they hold no resources but a pid.
    An entry once gone stays gone (pid + create time never come back)."""

    def __init__(self, stopper_pid):
        self.stopper_pid = stopper_pid
        self.gone = set()

    def count(self, entries):
        n = 0
        for entry in entries:
            if entry in self.gone:
                continue
            pid, ctime = entry
            st = proc_stat(pid)
            if st is None or abs(st[2] - ctime) >= SAME_TIME:
                self.gone.add(entry)
                continue
            if st[0] == "Z" and st[1] != self.stopper_pid:
                continue            # may still be reaped by its parent later: not final
            n += 1
        return n


def marked_pids(name, values):
    """pids of live processes whose environment holds name=<one of values>."""
    if isinstance(values, str):
        values = {values}
    wanted = {f"{name}={v}".encode() for v in values}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == MY_PID:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if any(v in wanted for v in env):
            found.append(int(entry))
    return found


def _kill(p):
    try:
        p.send_signal(signal.SIGCONT)     # stopped processes too
        p.send_signal(signal.SIGKILL)
    except psutil.Error:
        pass


def kill_everything(pid_file=None, marker=None, exclude=(), timeout=10.0):
    """SIGCONT + SIGKILL every process of the pid file and every process
    carrying marker (name, values), rescanning until a scan finds none
    (a fork storm keeps adding some). Returns how many were killed."""
    killed = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        targets = []
        if pid_file:
            for pid, ctime in read_pid_file(pid_file):
                p = proc_of(pid, ctime)
                if p is not None:
                    try:
                        if p.status() != psutil.STATUS_ZOMBIE:
                            targets.append(p)
                    except psutil.Error:
                        pass
        if marker:
            for pid in marked_pids(*marker):
                if pid in exclude:
                    continue
                try:
                    targets.append(psutil.Process(pid))
                except psutil.Error:
                    pass
        if not targets:
            return len(killed)
        for p in targets:
            _kill(p)
            killed.add(p.pid)
        time.sleep(0.02)
    return len(killed)


def reap_children():
    """Collect any exit status owed to the bench itself."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


# -- numbers -------------------------------------------------------------------

def median(values):
    """Median; None (never) sorts last, so a majority of never is never."""
    vals = sorted(values, key=lambda v: (v is None, v if v is not None else 0))
    if not vals:
        return None
    n = len(vals)
    if n % 2:
        return vals[n // 2]
    a, b = vals[n // 2 - 1], vals[n // 2]
    if a is None or b is None:
        return None
    return (a + b) / 2


def percentile(values, q):
    """Nearest-rank percentile of numbers."""
    vals = sorted(values)
    if not vals:
        return None
    k = max(0, min(len(vals) - 1, int(-(-q * len(vals) // 100)) - 1))
    return vals[k]


def slope(points):
    """Least-squares slope and intercept of [(x, y)]."""
    n = len(points)
    if n < 2:
        return None, None
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if not sxx:
        return None, None
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return b, my - b * mx


def ms(seconds):
    return None if seconds is None else round(seconds * 1000, 1)


def fmt_ms(value):
    """Milliseconds for a table: 212 ms, 1.43 s, never."""
    if value is None:
        return "never"
    if value >= 10000:
        return f"{value / 1000:.1f} s"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    return f"{value:.0f} ms"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def call_with_timeouts(address, method, path, connect_timeout, read_timeout):
    """One call the way RestTemplate makes it: a connect timeout, then a
    separate read timeout. Returns the outcome: 'HTTP <status>',
    'connect_timeout', 'read_timeout', 'refused' or 'error'."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=connect_timeout)
    try:
        try:
            conn.connect()
        except (TimeoutError, socket.timeout):
            return "connect_timeout"
        except ConnectionRefusedError:
            return "refused"
        except OSError:
            return "error"
        conn.sock.settimeout(read_timeout)
        try:
            conn.request(method, path, body=b"",
                         headers={"Content-Type": "application/json", "Content-Length": "0"})
            resp = conn.getresponse()
            resp.read()
            return f"HTTP {resp.status}"
        except (TimeoutError, socket.timeout):
            return "read_timeout"
        except (OSError, http.client.HTTPException):
            return "error"
    finally:
        conn.close()
