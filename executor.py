#!/usr/bin/env python3
"""CaseExecuteService: runs case scripts on a lab machine and, on cancel,
ends each case's whole process tree.

    python executor.py --host 127.0.0.1 --port 8081 --cases-dir cases/

A case is `python <script> <args>` started in its own session with the
environment markers CASE_EXEC_TASK_ID=<taskId> and CASE_EXEC_RUN=<nonce>.
Cancel freezes the case's processes, sends SIGTERM, waits one shared grace
period, sends SIGKILL to whatever is left and waits until everything is reaped. The executor is a child
subreaper, so a case's orphans become its children instead of init's.

Linux only. Deployable alone: this file, schema.sql and `pip install bottle`.
collector.py imports the web plumbing below (envelope, errors, server, DB,
HTTP client) so that both services answer and fail the same way.
"""

import argparse
import ctypes
import dataclasses
import hmac
import http.client
import ipaddress
import json
import logging
import os
import re
import signal
import socketserver
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import uuid
import wsgiref.simple_server
from contextlib import contextmanager
from urllib.parse import urlsplit

import bottle

log = logging.getLogger("executor")

###############################################################################
# Config and defaults ##########################################################
###############################################################################

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA_PATH = os.path.join(HERE, "schema.sql")
MARKER_ENV = "CASE_EXEC_TASK_ID"     # tells the case its taskId
RUN_MARKER_ENV = "CASE_EXEC_RUN"     # unique per execution: how its processes are found
TASK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # also a file name: no '..'
MAX_BODY_BYTES = 1024 * 1024
CONNECT_TIMEOUT = 10.0   # the design's RestTemplate numbers
READ_TIMEOUT = 30.0
GRACE_SECONDS = 5.0
TOMBSTONE_SECONDS = 600  # how long a cancel of an unknown taskId blocks a late execute
TOKEN_ENV = "CASE_EXEC_TOKEN"      # the token shared by collector and executors
SECRET_ENVS = (TOKEN_ENV, "COLLECTOR_API_TOKENS")   # never handed down to a case


@dataclasses.dataclass
class ExecutorConfig:
    host: str = "127.0.0.1"
    port: int = 8081
    cases_dir: str = "cases"
    db: str = os.path.join("var", "executor.db")
    log_dir: str = os.path.join("var", "case-logs")
    work_dir: str = os.path.join("var", "work")
    grace_seconds: float = GRACE_SECONDS
    keep_leftovers: bool = False
    token: str = ""
    connect_timeout: float = CONNECT_TIMEOUT
    read_timeout: float = READ_TIMEOUT
    report_retry_max: float = 30.0


###############################################################################
# Web plumbing shared with collector.py ########################################
###############################################################################

# One table of the API's error codes and what each means to a caller.
ERRORS = {
    400: "bad request",
    401: "missing or wrong token",
    404: "not found",
    405: "method not allowed",
    409: "conflict",
    413: "request body too large",
    500: "internal error",
}


def envelope(code, message, data=None):
    """The design's Result: every response, errors included, has this shape."""
    return {"code": code, "message": message, "data": data}


class ApiError(bottle.HTTPResponse):
    """An error that is its own HTTP response, bottle style."""

    status_code_default = 500

    def __init__(self, message=None, data=None, status=None):
        status = status or self.status_code_default
        self.message = message or ERRORS[status]
        body = json.dumps(envelope(status, self.message, data))
        super().__init__(body, status, {"Content-Type": "application/json"})


class BadRequest(ApiError):
    status_code_default = 400


class Unauthorized(ApiError):
    status_code_default = 401


class NotFound(ApiError):
    status_code_default = 404


class Conflict(ApiError):
    status_code_default = 409


class TooLarge(ApiError):
    status_code_default = 413


class InternalError(ApiError):
    status_code_default = 500


def internal_error(where, message="internal error", data=None):
    """Log the current exception under a fresh error id; the caller sees only the id."""
    error_id = uuid.uuid4().hex[:12]
    log.error("error id=%s in %s\n%s", error_id, where, traceback.format_exc())
    return InternalError(f"{message} (error id {error_id})", dict(data or {}, errorId=error_id))


def make_bottle(name):
    """A bottle app whose every answer, including bottle's own 404/405, is an envelope."""
    app = bottle.Bottle()
    app.config["name"] = name

    def json_errors(res):
        bottle.response.content_type = "application/json"
        code = res.status_code
        if code == 404:
            message = f"no such endpoint: {bottle.request.method} {bottle.request.path}"
        elif code == 405:
            message = f"method {bottle.request.method} not allowed on {bottle.request.path}"
        elif code >= 500:
            error_id = uuid.uuid4().hex[:12]
            log.error("error id=%s in %s %s\n%s", error_id, bottle.request.method,
                      bottle.request.path, res.traceback)
            return json.dumps(envelope(500, f"internal error (error id {error_id})",
                                       {"errorId": error_id}))
        else:
            message = ERRORS.get(code, res.status_line)
        return json.dumps(envelope(code, message, None))

    def catch_everything(callback):
        def wrapper(*args, **kwargs):
            try:
                return callback(*args, **kwargs)
            except bottle.HTTPResponse:
                raise
            except Exception:
                raise internal_error(f"{bottle.request.method} {bottle.request.path}")
        return wrapper

    app.default_error_handler = json_errors
    app.install(catch_everything)
    return app


def json_body(request=None):
    """The request body as a JSON object; {} when empty."""
    request = request or bottle.request
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise TooLarge(f"request body is larger than {MAX_BODY_BYTES} bytes")
    raw = request.body.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise TooLarge(f"request body is larger than {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}")
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def string_list(value, name):
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise BadRequest(f"'{name}' must be a list of strings")
    return value


def check_script(script, name="script"):
    """A script is named relative to the cases directory, never outside it."""
    if not isinstance(script, str) or not script or "\0" in script:
        raise BadRequest(f"'{name}' must be a non-empty string")
    if os.path.isabs(script) or ".." in script.replace("\\", "/").split("/"):
        raise BadRequest(f"'{name}' {script!r} must be a relative path inside the cases directory")
    return script


def check_task_id(task_id, name="taskId"):
    if not isinstance(task_id, str) or not TASK_ID_RE.match(task_id):
        raise BadRequest(f"'{name}' must match {TASK_ID_RE.pattern}")
    return task_id


def parse_tokens(text, default_name):
    """'secret' or 'name:secret,name:secret' -> {name: secret}."""
    tokens = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        name, sep, secret = item.partition(":")
        tokens[name if sep else default_name] = secret if sep else item
    return tokens


def require_token(tokens):
    """The name of the valid bearer token on this request; 401 without one.
    Compared in constant time against every configured token. No tokens
    configured: anyone may call, and the name is None."""
    if not tokens:
        return None
    given = bottle.request.get_header("Authorization", "").encode()
    found = None
    for name, secret in tokens.items():
        if hmac.compare_digest(given, f"Bearer {secret}".encode()):
            found = name
    if found is None:
        raise Unauthorized("missing or wrong bearer token (Authorization: Bearer <token>)")
    return found


class ThreadingWSGIServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    """wsgiref, one thread per request: a slow cancel never blocks /health."""
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


class QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, fmt, *args):
        log.debug("http %s %s", self.client_address[0], fmt % args)


def make_server(app, host, port):
    return wsgiref.simple_server.make_server(
        host, port, app, server_class=ThreadingWSGIServer, handler_class=QuietHandler)


def run_server(server, on_stop=None):
    """Serve until SIGTERM or SIGINT, then shut down cleanly."""
    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        if on_stop:
            on_stop()


class Database:
    """SQLite in WAL mode with a busy timeout; one connection per thread."""

    def __init__(self, path):
        self.path = path
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._local = threading.local()
        with open(SCHEMA_PATH) as f:
            self.conn().executescript(f.read())

    def conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 30000")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self):
        """A short write transaction; never hold one across a network call."""
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def one(self, sql, args=()):
        row = self.conn().execute(sql, args).fetchone()
        return dict(row) if row else None

    def all(self, sql, args=()):
        return [dict(r) for r in self.conn().execute(sql, args).fetchall()]

    def run(self, sql, args=()):
        return self.conn().execute(sql, args).rowcount


def compare_and_set(conn, table, key, key_value, moves, to, **fields):
    """Move a row to state `to` only from a state `moves` allows; True if it moved.

    The single place a status changes, so a late writer can never overwrite a
    state it was not allowed to leave (a report after STOPPED, say)."""
    allowed = [s for s, targets in moves.items() if to in targets]
    sets = ", ".join(["status = ?"] + [f"{k} = ?" for k in fields])
    marks = ", ".join("?" * len(allowed))
    cur = conn.execute(
        f"UPDATE {table} SET {sets} WHERE {key} = ? AND status IN ({marks})",
        [to, *fields.values(), key_value, *allowed])
    return cur.rowcount == 1


class CallFailed(Exception):
    """A call that got no HTTP answer; kind is refused, connect_timeout, read_timeout or error."""

    def __init__(self, kind, text):
        super().__init__(text)
        self.kind = kind
        self.text = text


def split_hostport(address):
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def call_json(address, method, path, body=None, token="",
              connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT):
    """One HTTP call with separate connect and read timeouts, as RestTemplate has.

    Returns (status, envelope); raises CallFailed when there is no answer."""
    host, port = split_hostport(address)
    conn = http.client.HTTPConnection(host, port, timeout=connect_timeout)
    try:
        try:
            conn.connect()
        except TimeoutError:
            raise CallFailed("connect_timeout",
                             f"connect to {address} timed out after {connect_timeout:g}s")
        except ConnectionRefusedError:
            raise CallFailed("refused", f"connection to {address} refused")
        except OSError as e:
            raise CallFailed("error", f"connect to {address} failed: {e}")
        conn.sock.settimeout(read_timeout)
        data = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data))}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except TimeoutError:
            raise CallFailed("read_timeout",
                             f"no answer from {address} within {read_timeout:g}s")
        except (OSError, http.client.HTTPException) as e:
            raise CallFailed("error", f"call to {address} failed: {e!r}")
        try:
            payload = json.loads(raw)
            if not isinstance(payload, dict):
                raise ValueError
        except ValueError:
            payload = envelope(resp.status, raw[:200].decode("utf-8", "replace"))
        return resp.status, payload
    finally:
        conn.close()


def backoff(attempts, cap, base=0.5):
    """Capped exponential backoff: 0.5, 1, 2, 4 … seconds, never above cap."""
    return min(cap, base * 2 ** max(0, attempts - 1))


###############################################################################
# Process trees ################################################################
###############################################################################
# Linux only, read straight from /proc: one scan of the whole table is shared
# by every stop in progress, which keeps many concurrent cancels cheap.

PR_SET_CHILD_SUBREAPER = 36
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def become_subreaper():
    """Make orphaned case processes reparent to us, not init, so we can find and reap them."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def boot_time():
    with open("/proc/stat") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("btime"))


BOOT_TIME = boot_time()


@dataclasses.dataclass(frozen=True)
class Proc:
    """One process as /proc showed it. (pid, create_time) is its identity:
    the same pid with another create time is another process."""
    pid: int
    ppid: int
    sid: int
    state: str
    create_time: float

    @property
    def key(self):
        return (self.pid, self.create_time)

    @property
    def alive(self):
        return self.state not in "ZX"


def read_proc(pid):
    """The process with this pid now, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces or ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    return Proc(pid, int(fields[1]), int(fields[3]), fields[0].decode(),
                round(BOOT_TIME + int(fields[19]) / CLOCK_TICKS, 2))


def same_process(proc, pid, create_time):
    return proc is not None and proc.pid == pid and abs(proc.create_time - create_time) < 0.02


def read_run_marker(pid):
    """The case run marker in a process's environment, or None (also if unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return None
    for item in env.split(b"\0"):
        if item.startswith(b"CASE_EXEC_RUN="):
            return item[len(b"CASE_EXEC_RUN="):].decode(errors="replace")
    return None


class Snapshot:
    """The process table at one moment, with each process's run marker."""

    def __init__(self, procs, markers, started):
        self.procs = procs          # pid -> Proc
        self.markers = markers      # (pid, create_time) -> marker or None
        self.started = started
        self.children = {}
        for p in procs.values():
            self.children.setdefault(p.ppid, []).append(p.pid)

    def current(self, proc):
        """proc as this snapshot sees it, or None if it is gone."""
        now = self.procs.get(proc.pid)
        return now if now is not None and now.key == proc.key else None

    def case_members(self, run_marker, root_pid, root_create_time, known):
        """Every live process of one case: the root's descendants, the processes
        of its session, anything started after the root that carries its run
        marker (how Jenkins finds escaped build processes), and any member seen
        before that is still alive. `known` (key -> Proc) is kept up to date."""
        me = os.getpid()
        members = {}
        root = self.procs.get(root_pid)
        root_alive = same_process(root, root_pid, root_create_time)
        if root_alive:
            stack = [root_pid]
            while stack:
                pid = stack.pop()
                members[pid] = self.procs[pid]
                stack.extend(self.children.get(pid, ()))
        # The session id is the root's pid; once that pid is reused it names another session.
        session_ours = root is None or root_alive
        since = root_create_time - 0.05
        for pid, p in self.procs.items():
            if pid in members or pid == me or p.create_time < since:
                continue
            if (session_ours and p.sid == root_pid) or self.markers.get(p.key) == run_marker:
                members[pid] = p
        for key, p in list(known.items()):
            now = self.current(p)
            if now is None:
                del known[key]
            else:
                members.setdefault(p.pid, now)
        live = [p for p in members.values() if p.alive]
        known.update((p.key, p) for p in live)
        return live


class ProcessTable:
    """Scans of /proc, shared: whoever asks for a scan newer than a moment gets
    the next one that started after it, so concurrent stops coalesce."""

    def __init__(self):
        self.cond = threading.Condition()
        self.latest = None
        self.scanning = False
        self.markers = {}   # read once per process: the environment is set at exec

    def snapshot(self, not_before=None):
        not_before = time.monotonic() if not_before is None else not_before
        with self.cond:
            while True:
                if self.latest is not None and self.latest.started >= not_before:
                    return self.latest
                if not self.scanning:
                    self.scanning = True
                    break
                self.cond.wait()
        try:
            snap = self.scan()
        finally:
            with self.cond:
                self.scanning = False
                self.cond.notify_all()
        with self.cond:
            self.latest = snap
        return snap

    def scan(self):
        started = time.monotonic()
        procs = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                p = read_proc(int(name))
                if p is not None:
                    procs[p.pid] = p
        markers = {}
        for p in procs.values():
            markers[p.key] = (self.markers[p.key] if p.key in self.markers
                              else read_run_marker(p.pid))
        self.markers = markers
        return Snapshot(procs, markers, started)


PROCESS_TABLE = ProcessTable()


def case_finder(run_marker, root_pid, root_create_time, known, table=PROCESS_TABLE):
    """find() -> the case's live processes, from a scan taken after the call."""
    return lambda: table.snapshot().case_members(run_marker, root_pid, root_create_time, known)


@dataclasses.dataclass
class StopResult:
    signalled: int = 0
    terminated: int = 0
    killed: int = 0
    survivors: list = dataclasses.field(default_factory=list)
    elapsed_ms: int = 0

    def as_dict(self):
        return {"signalled": self.signalled, "terminated": self.terminated,
                "killed": self.killed, "survivors": len(self.survivors),
                "survivorPids": self.survivors, "elapsedMs": self.elapsed_ms}


class Signaller:
    """Signals processes through pidfds opened after checking identity, so a
    pid reused by another process mid-stop is never hit."""

    def __init__(self):
        self.fds = {}

    def send(self, proc, sig):
        """False only when we may not signal it (the kernel says permission denied)."""
        try:
            fd = self.fds.get(proc.key)
            if fd is None:
                fd = os.pidfd_open(proc.pid)
                if not same_process(read_proc(proc.pid), *proc.key):
                    os.close(fd)
                    return True
                self.fds[proc.key] = fd
            signal.pidfd_send_signal(fd, sig)
            log.debug("pid=%s %s", proc.pid, sig.name)
            return True
        except ProcessLookupError:
            return True
        except PermissionError:
            log.warning("pid=%s cannot be sent %s: permission denied", proc.pid, sig.name)
            return False

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def awaiting_reap(proc):
    """Alive, or a zombie that we, its parent, have not collected yet. A zombie
    of an adopted case belongs to init; waiting for it here would be in vain."""
    now = read_proc(proc.pid)
    if not same_process(now, *proc.key):
        return False
    return now.alive or now.ppid == os.getpid()


def stop_tree(find, grace, poll=0.02, kill_wait=2.0, reap_wait=2.0):
    """End every process find() lists: SIGTERM, one shared grace, SIGKILL, reap.

    1. freeze the whole set (SIGSTOP, rescanning until nothing new appears: a
       stopped process cannot fork, so even a fork storm converges);
    2. SIGTERM all, then SIGCONT all, so stopped processes act on it at once;
    3. wait until all are gone, up to one grace deadline for the whole set,
       terminating any newcomer found meanwhile;
    4. at the deadline SIGKILL whatever is left, until a scan is empty;
    5. wait until the dead are reaped; anything still alive is a survivor."""
    started = time.monotonic()
    deadline = started + grace
    signals = Signaller()
    members = {}
    killed = set()

    def freeze_newcomers():
        fresh = []
        for _ in range(1000):
            live = find()
            new = [p for p in live if p.key not in members]
            if not new:
                return fresh, live
            for p in new:
                signals.send(p, signal.SIGSTOP)
                members[p.key] = p
            fresh += new
        return fresh, live

    try:
        while True:
            fresh, live = freeze_newcomers()
            for p in fresh:
                signals.send(p, signal.SIGTERM)
            for p in fresh:
                signals.send(p, signal.SIGCONT)
            if not live or time.monotonic() >= deadline:
                break
            time.sleep(poll)
        kill_deadline = time.monotonic() + kill_wait
        while live and time.monotonic() < kill_deadline:
            for p in live:
                members.setdefault(p.key, p)
                killed.add(p.key)
                signals.send(p, signal.SIGKILL)
            time.sleep(poll)
            live = find()
        reap_deadline = time.monotonic() + reap_wait
        while any(awaiting_reap(p) for p in members.values()):
            if time.monotonic() >= reap_deadline:
                break
            time.sleep(poll)
    finally:
        signals.close()
    survivors = [p.pid for p in members.values() if (now := read_proc(p.pid))
                 and same_process(now, *p.key) and now.alive]
    return StopResult(signalled=len(members), terminated=len(members) - len(killed),
                      killed=len(killed), survivors=sorted(survivors),
                      elapsed_ms=int((time.monotonic() - started) * 1000))


###############################################################################
# Executions ###################################################################
###############################################################################

RUNNING, CANCELLING, CANCELLED, SUCCESS, FAILED = (
    "RUNNING", "CANCELLING", "CANCELLED", "SUCCESS", "FAILED")
FINAL = (CANCELLED, SUCCESS, FAILED)
# The only moves an execution's status may make. CANCELLING stays put when a
# tree could not be ended completely, so a later cancel tries again.
MOVES = {RUNNING: (CANCELLING, SUCCESS, FAILED), CANCELLING: (CANCELLED,)}


class Execution:
    """In-memory side of one running case: its root and what stops it."""

    def __init__(self, task_id, run_marker, root_pid, root_create_time, child=True):
        self.task_id = task_id
        self.run_marker = run_marker
        self.root_pid = root_pid
        self.root_create_time = root_create_time
        self.child = child          # False when adopted after an executor restart
        self.exit_code = None       # set by the reaper; unknown for adopted roots
        self.root_gone = False
        self.known = {}
        self.stop_lock = threading.Lock()
        self.last_stop = None

    def find(self):
        return case_finder(self.run_marker, self.root_pid, self.root_create_time, self.known)


class Executor:
    """The registry of executions and everything that changes them."""

    def __init__(self, config):
        self.config = config
        self.db = Database(config.db)
        self.cases_dir = os.path.realpath(config.cases_dir)
        self.lock = threading.RLock()
        self.running = {}           # taskId -> Execution
        self.by_pid = {}            # root pid -> Execution, for the reaper
        self.tombstones = {}        # taskId -> expiry, cancelled before it was executed
        self.child_started = threading.Event()
        self.report_due = threading.Event()
        self.stopping = threading.Event()
        for d in (config.log_dir, config.work_dir):
            os.makedirs(d, exist_ok=True)

    # -- start and stop -------------------------------------------------------

    def start(self):
        become_subreaper()
        self.adopt_survivors()
        for target in (self.reap_forever, self.watch_adopted, self.report_forever):
            threading.Thread(target=target, name=target.__name__, daemon=True).start()

    def close(self):
        """Cases keep running: lab work survives an executor restart and is adopted."""
        self.stopping.set()
        self.child_started.set()
        self.report_due.set()

    # -- execute ---------------------------------------------------------------

    def resolve_script(self, script):
        check_script(script)
        path = os.path.realpath(os.path.join(self.cases_dir, script))
        if os.path.commonpath([path, self.cases_dir]) != self.cases_dir:
            raise BadRequest(f"script '{script}' resolves outside the cases directory")
        if not os.path.isfile(path):
            raise BadRequest(f"script '{script}' not found in the cases directory")
        return path

    def execute(self, task_id, script, args, report_url=None):
        path = self.resolve_script(script)
        now = time.time()
        with self.lock:
            self.forget_expired_tombstones()
            if task_id in self.tombstones:
                raise Conflict(f"task {task_id} was cancelled before it started")
            log_path = os.path.join(self.config.log_dir, f"{task_id}.log")
            run_marker = uuid.uuid4().hex
            try:
                with self.db.transaction() as c:
                    c.execute(
                        "INSERT INTO execution (task_id, run_marker, script, args, status,"
                        " log_path, report_url, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (task_id, run_marker, script, json.dumps(args), RUNNING, log_path,
                         report_url, now))
            except sqlite3.IntegrityError:
                raise Conflict(f"task {task_id} already exists")
            try:
                pid = self.spawn(task_id, run_marker, path, args, log_path)
                ctime = read_proc(pid).create_time
            except Exception:
                self.db.run("DELETE FROM execution WHERE task_id = ?", (task_id,))
                raise internal_error("execute", f"could not start {script}")
            self.db.run("UPDATE execution SET root_pid = ?, root_create_time = ? WHERE task_id = ?",
                        (pid, ctime, task_id))
            ex = Execution(task_id, run_marker, pid, ctime)
            self.running[task_id] = ex
            self.by_pid[pid] = ex
        self.child_started.set()
        log.info("task=%s started pid=%s script=%s args=%s", task_id, pid, script, args)
        return {"taskId": task_id, "pid": pid}

    def spawn(self, task_id, run_marker, path, args, log_path):
        """Start the case in its own session, output to its log, marked by the environment.

        Returns the pid. The reaper owns every child's exit status, adopted
        orphans included, so the Popen is told it is done: it must never
        waitpid() a pid that may by then belong to another case."""
        work = os.path.join(self.config.work_dir, task_id)
        os.makedirs(work, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENVS}
        env["PYTHONUNBUFFERED"] = "1"
        env[MARKER_ENV] = task_id
        env[RUN_MARKER_ENV] = run_marker
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(
                [sys.executable, path, *args], cwd=work, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        popen.returncode = 0
        return popen.pid

    # -- cancel ----------------------------------------------------------------

    def cancel(self, task_id):
        """The design's cancel: end the whole tree; 404 when unknown or finished."""
        with self.lock:     # the same lock as execute's check-and-insert: no late execute
            row = self.db.one("SELECT status FROM execution WHERE task_id = ?", (task_id,))
            if row is None:
                self.tombstones[task_id] = time.monotonic() + TOMBSTONE_SECONDS
        if row is None or row["status"] in FINAL:
            raise NotFound("task not found or already finished", {"taskId": task_id})
        with self.db.transaction() as c:
            compare_and_set(c, "execution", "task_id", task_id, MOVES, CANCELLING)
        ex = self.running.get(task_id)
        if ex is None:
            raise NotFound("task not found or already finished", {"taskId": task_id})
        log.info("task=%s cancel requested", task_id)
        with ex.stop_lock:
            status = self.db.one("SELECT status FROM execution WHERE task_id = ?",
                                 (task_id,))["status"]
            if status == CANCELLED and ex.last_stop is not None:
                result = ex.last_stop   # a concurrent cancel already did it
            else:
                result = stop_tree(ex.find(), self.config.grace_seconds)
                ex.last_stop = result
                self.record_stop(ex, result)
        data = dict(result.as_dict(), taskId=task_id)
        if result.survivors:
            raise InternalError(f"cancel incomplete: {len(result.survivors)} process(es) survived",
                                data)
        return data

    def record_stop(self, ex, result):
        log.info("task=%s stop: signalled=%d terminated=%d killed=%d survivors=%s elapsed=%dms",
                 ex.task_id, result.signalled, result.terminated, result.killed,
                 result.survivors or 0, result.elapsed_ms)
        if result.survivors:
            log.error("task=%s could not end pids %s", ex.task_id, result.survivors)
        with self.db.transaction() as c:
            c.execute("UPDATE execution SET stop_result = ? WHERE task_id = ?",
                      (json.dumps(result.as_dict()), ex.task_id))
            if not result.survivors and compare_and_set(
                    c, "execution", "task_id", ex.task_id, MOVES, CANCELLED,
                    finished_at=time.time(), exit_code=ex.exit_code):
                self.queue_report(c, ex.task_id)
        if not result.survivors:
            self.forget(ex)

    def forget_expired_tombstones(self):
        now = time.monotonic()
        for task_id in [t for t, expiry in self.tombstones.items() if expiry < now]:
            del self.tombstones[task_id]
        while len(self.tombstones) > 10000:     # bounded: oldest first
            del self.tombstones[next(iter(self.tombstones))]

    def forget(self, ex):
        with self.lock:
            self.running.pop(ex.task_id, None)
            if self.by_pid.get(ex.root_pid) is ex:
                del self.by_pid[ex.root_pid]

    # -- cases that end on their own --------------------------------------------

    def reap_forever(self):
        """Collect the exit status of every child, case roots and adopted orphans alike."""
        while not self.stopping.is_set():
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                self.child_started.wait(0.5)
                self.child_started.clear()
                continue
            with self.lock:
                ex = self.by_pid.get(pid)
                if ex is not None:
                    ex.exit_code = os.waitstatus_to_exitcode(status)
            if ex is not None:
                threading.Thread(target=self.root_exited, args=(ex,), daemon=True).start()

    def watch_adopted(self):
        """Adopted roots are not our children: poll them, since no exit status arrives."""
        while not self.stopping.wait(0.5):
            with self.lock:
                adopted = [ex for ex in self.running.values() if not ex.child]
            for ex in adopted:
                alive = same_process(read_proc(ex.root_pid), ex.root_pid, ex.root_create_time)
                if not alive and not ex.root_gone:
                    ex.root_gone = True
                    threading.Thread(target=self.root_exited, args=(ex,), daemon=True).start()

    def root_exited(self, ex):
        """The script ended by itself: end what it left behind, then record its outcome."""
        code = ex.exit_code
        with ex.stop_lock:
            row = self.db.one("SELECT status FROM execution WHERE task_id = ?", (ex.task_id,))
            if row is None or row["status"] != RUNNING:
                return      # a cancel owns this execution
            note = None
            if not self.config.keep_leftovers:
                result = stop_tree(ex.find(), self.config.grace_seconds)
                if result.signalled:
                    note = f"ended {result.signalled} leftover process(es)"
                    log.warning("task=%s script exited but left processes behind: %s",
                                ex.task_id, result.as_dict())
            if code is None:
                to, note = FAILED, "ended while the executor was down; exit code unknown"
            else:
                to = SUCCESS if code == 0 else FAILED
            with self.db.transaction() as c:
                moved = compare_and_set(c, "execution", "task_id", ex.task_id, MOVES, to,
                                        exit_code=code, finished_at=time.time(), note=note)
                if moved:
                    self.queue_report(c, ex.task_id)
            if moved:
                log.info("task=%s finished status=%s exit=%s", ex.task_id, to, code)
                self.forget(ex)

    # -- registry after a restart -------------------------------------------------

    def adopt_survivors(self):
        """Reload unfinished executions; their processes kept running while we were down."""
        for row in self.db.all("SELECT * FROM execution WHERE status IN (?, ?)",
                               (RUNNING, CANCELLING)):
            ex = Execution(row["task_id"], row["run_marker"], row["root_pid"],
                           row["root_create_time"], child=False)
            with self.lock:
                self.running[ex.task_id] = ex
                self.by_pid[ex.root_pid] = ex
            log.info("task=%s adopted root pid=%s status=%s",
                     ex.task_id, ex.root_pid, row["status"])

    # -- reports to the collector -------------------------------------------------

    def queue_report(self, conn, task_id):
        conn.execute("UPDATE execution SET report_state = 'PENDING' WHERE task_id = ?"
                     " AND report_url IS NOT NULL", (task_id,))
        self.report_due.set()

    def report_forever(self):
        """Deliver outcomes to the collector, retrying with capped backoff until it answers."""
        next_try = {}
        while not self.stopping.is_set():
            rows = self.db.all("SELECT task_id, status, exit_code, note, report_url, "
                               "report_attempts FROM execution WHERE report_state = 'PENDING'")
            now = time.monotonic()
            for row in rows:
                if next_try.get(row["task_id"], 0) <= now:
                    self.report(row, next_try)
            self.report_due.wait(0.5 if rows else 2.0)
            self.report_due.clear()

    def report(self, row, next_try):
        url = urlsplit(row["report_url"])
        body = {"executionTaskId": row["task_id"], "status": row["status"],
                "exitCode": row["exit_code"], "note": row["note"]}
        try:
            code, payload = call_json(url.netloc, "POST", url.path, body, self.config.token,
                                      self.config.connect_timeout, self.config.read_timeout)
            error = None if code < 500 else f"HTTP {code}: {payload.get('message')}"
        except CallFailed as e:
            error = e.text
        attempts = row["report_attempts"] + 1
        if error is None:
            self.db.run("UPDATE execution SET report_state = 'DELIVERED', report_attempts = ?,"
                        " report_error = NULL WHERE task_id = ?", (attempts, row["task_id"]))
            log.info("task=%s reported %s to collector (HTTP %s)", row["task_id"],
                     row["status"], code)
            next_try.pop(row["task_id"], None)
        else:
            self.db.run("UPDATE execution SET report_attempts = ?, report_error = ?"
                        " WHERE task_id = ?", (attempts, error, row["task_id"]))
            log.warning("task=%s report attempt %d failed: %s", row["task_id"], attempts, error)
            next_try[row["task_id"]] = time.monotonic() + backoff(
                attempts, self.config.report_retry_max)

    # -- queries ---------------------------------------------------------------

    def status(self, task_id):
        row = self.db.one("SELECT * FROM execution WHERE task_id = ?", (task_id,))
        if row is None:
            raise NotFound(f"task {task_id} not found", {"taskId": task_id})
        return public_execution(row)

    def tasks(self):
        rows = self.db.all("SELECT * FROM execution WHERE status IN (?, ?) ORDER BY created_at",
                           (RUNNING, CANCELLING))
        return [public_execution(r) for r in rows]


def public_execution(row):
    return {
        "taskId": row["task_id"], "script": row["script"], "args": json.loads(row["args"]),
        "status": row["status"], "pid": row["root_pid"], "exitCode": row["exit_code"],
        "createdAt": row["created_at"], "finishedAt": row["finished_at"],
        "note": row["note"], "logPath": row["log_path"],
        "lastStop": json.loads(row["stop_result"]) if row["stop_result"] else None,
        "report": {"state": row["report_state"], "attempts": row["report_attempts"],
                   "error": row["report_error"]},
    }


###############################################################################
# HTTP routes ##################################################################
###############################################################################

def make_app(config):
    """The executor's bottle app; app.config['executor'] is the running service."""
    service = Executor(config)
    app = make_bottle("executor")
    app.config["executor"] = service
    tokens = {"collector": config.token} if config.token else {}
    guarded = lambda: require_token(tokens)   # noqa: E731

    @app.post("/test-case-execution/execute")
    def execute():
        guarded()
        body = json_body()
        task_id = check_task_id(body.get("taskId", uuid.uuid4().hex))
        args = string_list(body.get("args", []), "args")
        report_url = body.get("reportUrl")
        if report_url is not None:
            parts = urlsplit(report_url) if isinstance(report_url, str) else None
            if parts is None or parts.scheme != "http" or not parts.hostname or not parts.port:
                raise BadRequest("'reportUrl' must be an http://host:port/path URL")
        data = service.execute(task_id, body.get("script"), args, report_url)
        return envelope(200, "task started", data)

    @app.post("/test-case-execution/cancel/<task_id>")
    def cancel(task_id):
        guarded()
        check_task_id(task_id)
        return envelope(200, "task cancelled", service.cancel(task_id))

    @app.get("/test-case-execution/status/<task_id>")
    def status(task_id):
        guarded()
        check_task_id(task_id)
        return envelope(200, "ok", service.status(task_id))

    @app.get("/test-case-execution/tasks")
    def tasks():
        guarded()
        return envelope(200, "ok", service.tasks())

    @app.get("/health")
    def health():
        return envelope(200, "ok", {"service": "executor", "pid": os.getpid(),
                                    "running": len(service.running)})

    return app


###############################################################################
# main #########################################################################
###############################################################################

def parse_args(argv, defaults=ExecutorConfig()):
    env = os.environ.get
    p = argparse.ArgumentParser(description="CaseExecuteService: run and cancel case scripts.")
    p.add_argument("--host", default=env("EXECUTOR_HOST", defaults.host))
    p.add_argument("--port", type=int, default=int(env("EXECUTOR_PORT", defaults.port)))
    p.add_argument("--cases-dir", default=env("EXECUTOR_CASES_DIR", defaults.cases_dir),
                   help="scripts are taken from here only")
    p.add_argument("--db", default=env("EXECUTOR_DB", defaults.db), help="SQLite file")
    p.add_argument("--log-dir", default=env("EXECUTOR_LOG_DIR", defaults.log_dir),
                   help="per-task stdout/stderr logs")
    p.add_argument("--work-dir", default=env("EXECUTOR_WORK_DIR", defaults.work_dir),
                   help="each case runs in <work-dir>/<taskId>")
    p.add_argument("--grace-seconds", type=float,
                   default=float(env("EXECUTOR_GRACE_SECONDS", defaults.grace_seconds)),
                   help="time between SIGTERM and SIGKILL (default 5)")
    p.add_argument("--keep-leftovers", action="store_true",
                   help="do not end processes a case leaves behind when it exits by itself")
    p.add_argument("--token", default=env(TOKEN_ENV, ""),
                   help=f"require 'Authorization: Bearer <token>' (prefer ${TOKEN_ENV}: "
                        "arguments are visible in ps)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without a token")
    p.add_argument("--connect-timeout", type=float, default=defaults.connect_timeout)
    p.add_argument("--read-timeout", type=float, default=defaults.read_timeout)
    p.add_argument("--log-level", default=env("EXECUTOR_LOG_LEVEL", "INFO"))
    a = p.parse_args(argv)
    if not a.token and not a.insecure and not is_loopback(a.host):
        p.error(f"refusing to listen on {a.host} without a token: anyone who can reach it "
                f"could run and kill processes. Set ${TOKEN_ENV} (or --token), or pass "
                "--insecure if the network is trusted.")
    config = ExecutorConfig(
        host=a.host, port=a.port, cases_dir=a.cases_dir, db=a.db, log_dir=a.log_dir,
        work_dir=a.work_dir, grace_seconds=a.grace_seconds, keep_leftovers=a.keep_leftovers,
        token=a.token, connect_timeout=a.connect_timeout,
        read_timeout=a.read_timeout)
    return config, a.log_level


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def setup_logging(level):
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def main(argv=None):
    config, level = parse_args(argv)
    setup_logging(level)
    app = make_app(config)
    service = app.config["executor"]
    server = make_server(app, config.host, config.port)
    service.start()
    log.info("executor listening on http://%s:%s cases-dir=%s grace=%ss", config.host,
             server.server_port, service.cases_dir, config.grace_seconds)
    run_server(server, on_stop=service.close)
    return 0


if __name__ == "__main__":
    sys.exit(main())
