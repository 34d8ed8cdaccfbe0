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
import queue
import re
import signal
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
TASK_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # also a file name: no '..'
REPORT_KEY_RE = re.compile(r"(/report/)[^/\s?]+")
LOG_NAME_RE = re.compile(r"(.+?)(?:\+step-[0-9]+)?\.log(?:\.1)?")   # <taskId>[+step-N].log[.1]
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
    log_max_bytes: int = 10 * 1024 * 1024     # per case log; one older copy is kept
    log_retention_days: float = 7.0
    cgroups: str = "auto"       # auto: a cgroup per case when the executor may create them
    max_grace_seconds: float = 60.0     # the most an execution may ask for as its grace


###############################################################################
# Database (shared with collector.py) ##########################################
###############################################################################

class Database:
    """SQLite in WAL mode with a busy timeout; one connection per thread."""

    def __init__(self, path):
        self.path = path
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            # Owner only: it holds report keys and report URLs. SQLite gives its
            # -wal and -shm files the same mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
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


def compare_and_set(conn, table, key, key_value, moves, to, column="status", **fields):
    """Move a row's `column` to state `to` only from a state `moves` allows; True
    if it moved.

    The single place a state changes, so a late writer can never overwrite a
    state it was not allowed to leave (a report after STOPPED, say)."""
    allowed = [s for s, targets in moves.items() if to in targets]
    sets = ", ".join([f"{column} = ?"] + [f"{k} = ?" for k in fields])
    marks = ", ".join("?" * len(allowed))
    cur = conn.execute(
        f"UPDATE {table} SET {sets} WHERE {key} = ? AND {column} IN ({marks})",
        [to, *fields.values(), key_value, *allowed])
    return cur.rowcount == 1


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
    502: "an executor did not answer",
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


class BadGateway(ApiError):
    status_code_default = 502


def internal_error(where, metrics, message="internal error", data=None):
    """Log the current exception under a fresh error id; the caller sees only the id."""
    error_id = uuid.uuid4().hex[:12]
    logging.getLogger(metrics.service).error("error id=%s in %s\n%s", error_id, where,
                                             traceback.format_exc())
    metrics.inc("exceptions_total", place=where)
    return InternalError(f"{message} (error id {error_id})", dict(data or {}, errorId=error_id))


def make_bottle(name, metrics):
    """A bottle app whose every answer, including bottle's own 404/405, is an envelope."""
    app = bottle.Bottle()
    app.config["name"] = name
    metrics.declare("exceptions_total", "counter", "Unexpected exceptions, by place.")

    def json_errors(res):
        bottle.response.content_type = "application/json"
        code = res.status_code
        if code == 404:
            message = f"no such endpoint: {bottle.request.method} {bottle.request.path}"
        elif code == 405:
            message = f"method {bottle.request.method} not allowed on {bottle.request.path}"
        elif code >= 500:
            error_id = uuid.uuid4().hex[:12]
            logging.getLogger(name).error("error id=%s in %s %s\n%s", error_id,
                                          bottle.request.method, bottle.request.path,
                                          res.traceback)
            metrics.inc("exceptions_total", place="http")
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
                route = bottle.request.route.rule if bottle.request.route else "?"
                raise internal_error(f"{bottle.request.method} {route}", metrics)
        return wrapper

    app.default_error_handler = json_errors
    app.install(catch_everything)
    return app


def json_body(request=None):
    """The request body as a JSON object; {} when empty."""
    request = request or bottle.request
    length = whole_number(request.environ.get("CONTENT_LENGTH") or "0")
    if length is None:
        raise BadRequest("Content-Length must be a non-negative integer")
    if length > MAX_BODY_BYTES:
        # Read (a bounded amount of) what the client is still sending, so that it
        # gets to read the 413 instead of a broken pipe.
        stream, left = request.environ["wsgi.input"], min(length, 4 * MAX_BODY_BYTES)
        try:
            while left > 0 and (chunk := stream.read(min(left, 65536))):
                left -= len(chunk)
        except OSError:     # it stopped sending: the answer is the same
            pass
        raise TooLarge(f"request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        raw = request.body.read(MAX_BODY_BYTES + 1)
    except OSError:
        raise BadRequest(f"request body ended or stalled before its Content-Length "
                         f"({length} bytes) arrived")
    if len(raw) > MAX_BODY_BYTES:
        raise TooLarge(f"request body is larger than {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
        json.dumps(body, ensure_ascii=False).encode("utf-8")    # no lone surrogates
    except RecursionError:
        raise BadRequest("request body is nested too deeply")
    except (ValueError, UnicodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}")
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def whole_number(text):
    """A non-negative integer written in ASCII digits, or None. (str.isdigit
    accepts '²', which int() refuses.)"""
    return int(text) if isinstance(text, str) and re.fullmatch(r"[0-9]{1,18}", text) else None


def flag_type(convert, ok, what):
    """An argparse type: a command-line value converted, then checked; a bad one
    is a usage error that says what is wanted."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse


SECONDS = flag_type(float, lambda v: 0 <= v < float("inf"), "a number of seconds, 0 or more")
POSITIVE_SECONDS = flag_type(float, lambda v: 0 < v < float("inf"),
                             "a number of seconds above 0")
PORT = flag_type(int, lambda v: 0 <= v <= 65535, "a port from 0 to 65535")
COUNT = flag_type(int, lambda v: v >= 1, "a whole number, 1 or more")


def string_list(value, name, max_items=1000, max_length=32768):
    """A list of plain strings: no NUL (it cannot reach a program's argv), bounded."""
    if (not isinstance(value, list) or len(value) > max_items
            or not all(isinstance(a, str) and "\0" not in a and len(a) <= max_length
                       for a in value)):
        raise BadRequest(f"'{name}' must be a list of at most {max_items} strings of at most "
                         f"{max_length} characters, without NUL")
    return value


def header_text(name, max_length=100):
    """A printable header value, or None."""
    # Raw from the environ: bottle's own accessor fails on bytes that are not UTF-8.
    value = bottle.request.environ.get("HTTP_" + name.upper().replace("-", "_"), "")
    if not value:
        return None
    if len(value) > max_length or not value.isprintable() or not value.isascii():
        raise BadRequest(f"header {name} must be printable ASCII of at most {max_length} characters")
    return value


def check_script(script, name="script"):
    """A script is named relative to the cases directory, never outside it."""
    if not isinstance(script, str) or not script or "\0" in script or len(script) > 1024:
        raise BadRequest(f"'{name}' must be a non-empty string of at most 1024 characters")
    if os.path.isabs(script) or ".." in script.replace("\\", "/").split("/"):
        raise BadRequest(f"'{name}' {script!r} must be a relative path inside the cases directory")
    if not script.endswith(".py"):
        raise BadRequest(f"'{name}' {script!r} must be a Python script (*.py)")
    return script


def check_report_url(url):
    if url is None:
        return None
    try:
        parts = urlsplit(url) if isinstance(url, str) and len(url) <= 2048 else None
        ok = (parts is not None and parts.scheme == "http" and parts.hostname
              and parts.port and not parts.query and not parts.fragment and "\0" not in url)
    except ValueError:      # a port that is not a number from 0 to 65535
        ok = False
    if not ok:
        raise BadRequest("'reportUrl' must be an http://host:port/path URL")
    return url


def seconds(value, name, maximum, zero_ok=False):
    """An optional number of seconds, positive (or zero) and at most maximum."""
    if value is None:
        return None
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not (0 <= value if zero_ok else 0 < value) or value > maximum):
        raise BadRequest(f"'{name}' must be a number of seconds up to {maximum:g}")
    return float(value)


def check_steps(body, prefix=""):
    """An execution's steps: `steps` [{script, args, group, always, timeoutSeconds}],
    or the `script`/`args` shorthand for one step."""
    if "steps" in body:
        if "script" in body:
            raise BadRequest(f"give '{prefix}steps' or '{prefix}script', not both")
        steps = body["steps"]
        if not isinstance(steps, list) or not 1 <= len(steps) <= 50:
            raise BadRequest(f"'{prefix}steps' must be a list of 1 to 50 steps")
    else:
        steps = [{"script": body.get("script"), "args": body.get("args", [])}]
    out = []
    for i, step in enumerate(steps):
        where = f"{prefix}steps[{i}]" if "steps" in body else prefix.rstrip(".") or "case"
        if not isinstance(step, dict):
            raise BadRequest(f"'{where}' must be an object with 'script'")
        name = f"{where}.script" if "steps" in body else f"{prefix}script"
        group = step.get("group")
        if group is not None and (not isinstance(group, str) or not 0 < len(group) <= 64):
            raise BadRequest(f"'{where}.group' must be a string of 1 to 64 characters")
        if not isinstance(step.get("always", False), bool):
            raise BadRequest(f"'{where}.always' must be true or false")
        out.append({"script": check_script(step.get("script"), name),
                    "args": string_list(step.get("args", []),
                                        f"{where}.args" if "steps" in body else f"{prefix}args"),
                    "group": group, "always": step.get("always", False),
                    "timeoutSeconds": seconds(step.get("timeoutSeconds"),
                                              f"{where}.timeoutSeconds", 86400)})
        if out[-1]["timeoutSeconds"] is None:
            del out[-1]["timeoutSeconds"]
    return out


def check_task_id(task_id, name="taskId"):
    if not isinstance(task_id, str) or not TASK_ID_RE.fullmatch(task_id):
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
    # Raw from the environ (bytes as latin-1): bottle's accessor fails on non-UTF-8.
    given = bottle.request.environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
    found = None
    for name, secret in tokens.items():
        if hmac.compare_digest(given, f"Bearer {secret}".encode()):
            found = name
    if found is None:
        raise Unauthorized("missing or wrong bearer token (Authorization: Bearer <token>)")
    return found


class Metrics:
    """Counters, histograms and gauges in the Prometheus text format, by hand:
    the few the design's indicators need do not justify a dependency."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

    def __init__(self, service):
        self.service = service
        self.prefix = service + "_"
        self.lock = threading.Lock()
        self.families = {}      # name -> (type, help)
        self.values = {}        # name -> {labels tuple: value or [bucket counts, sum, count]}
        self.gauges = {}        # name -> function returning the value

    def declare(self, name, kind, help_text, gauge=None):
        self.families[name] = (kind, help_text)
        self.values.setdefault(name, {})
        if gauge is not None:
            self.gauges[name] = gauge

    def inc(self, name, amount=1, **labels):
        key = tuple(sorted(labels.items()))
        with self.lock:
            series = self.values[name]
            series[key] = series.get(key, 0) + amount

    def observe(self, name, seconds, **labels):
        key = tuple(sorted(labels.items()))
        with self.lock:
            counts, total, n = self.values[name].get(key, ([0] * len(self.BUCKETS), 0.0, 0))
            counts = [c + (seconds <= b) for c, b in zip(counts, self.BUCKETS)]
            self.values[name][key] = (counts, total + seconds, n + 1)

    def render(self):
        out = []
        with self.lock:
            snapshot = {name: dict(series) for name, series in self.values.items()}
        for short, (kind, help_text) in self.families.items():
            name = self.prefix + short
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            if short in self.gauges:
                out.append(f"{name} {self.gauges[short]()}")
            for key, value in sorted(snapshot[short].items()):
                if kind == "histogram":
                    counts, total, n = value
                    for bound, c in zip(self.BUCKETS, counts):
                        out.append(f"{name}_bucket{labels_text(key + (('le', str(bound)),))} {c}")
                    out.append(f"{name}_bucket{labels_text(key + (('le', '+Inf'),))} {n}")
                    out.append(f"{name}_sum{labels_text(key)} {total}")
                    out.append(f"{name}_count{labels_text(key)} {n}")
                else:
                    out.append(f"{name}{labels_text(key)} {value}")
        return "\n".join(out) + "\n"


def labels_text(key):
    if not key:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               for _, v in key)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(key, escaped)) + "}"


def serve_metrics(metrics):
    bottle.response.content_type = "text/plain; version=0.0.4; charset=utf-8"
    return metrics.render()


class ThreadingWSGIServer(wsgiref.simple_server.WSGIServer):
    """wsgiref with a thread for every request in flight, so a slow cancel never
    blocks /health; threads are kept for the next request (up to max_idle
    waiting), so a burst of stops does not pay a new thread and a new SQLite
    connection per request."""
    allow_reuse_address = True
    request_queue_size = 256
    max_idle = 32

    def server_activate(self):
        super().server_activate()
        self.requests = queue.SimpleQueue()
        self.idle_lock = threading.Lock()
        self.idle = 0           # workers waiting for a request nobody has claimed

    def process_request(self, request, client_address):
        with self.idle_lock:
            spawn = self.idle == 0
            if not spawn:
                self.idle -= 1  # claimed: that worker takes this request
        self.requests.put((request, client_address))
        if spawn:
            threading.Thread(target=self.serve_requests, name="http", daemon=True).start()

    def serve_requests(self):
        while True:
            request, client_address = self.requests.get()
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
            with self.idle_lock:
                if self.idle >= self.max_idle:
                    return
                self.idle += 1


class QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    timeout = 30    # a client that stops sending mid-request does not hold a thread for ever

    def log_message(self, fmt, *args):
        # A report route carries the instance's report key: never in a log.
        logging.getLogger(self.server.service_name).debug(
            "http %s %s", self.client_address[0], REPORT_KEY_RE.sub(r"\1***", fmt % args))

    def send_error(self, code, message=None, explain=None):
        """Malformed HTTP, before any route runs: still the JSON envelope."""
        body = json.dumps(envelope(code, message or ERRORS.get(code, "bad request"))).encode()
        self.request_version = "HTTP/1.0"   # a garbled request line is not HTTP/0.9: answer with headers
        try:
            self.send_response(code, message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and code >= 200:
                self.wfile.write(body)
        except OSError:
            pass


def make_server(app, host, port):
    try:
        server = wsgiref.simple_server.make_server(
            host, port, app, server_class=ThreadingWSGIServer, handler_class=QuietHandler)
        server.service_name = app.config["name"]      # whose logger names each request
        return server
    except OSError as e:
        sys.exit(f"cannot listen on {host}:{port}: {e.strerror}")


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
    """When the machine booted; 0 without /proc, where only collector.py (which
    imports the plumbing above) may run."""
    try:
        with open("/proc/stat") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("btime"))
    except OSError:
        return 0


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
    try:        # os.open/os.read: half the cost of open(), and a scan does this per process
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
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

    def case_members(self, run_marker, root_pid, root_create_time, known, cgroup_pids=()):
        """Every live process of one case: the root, the processes of its session,
        anything started after the root that carries its run marker (how Jenkins
        finds escaped build processes), any member seen before that is still
        alive, everything in the case's cgroup, and the descendants of them all.
        `known` (key -> Proc) is kept up to date."""
        me = os.getpid()
        members = {}
        root = self.procs.get(root_pid)
        root_alive = same_process(root, root_pid, root_create_time)
        if root_alive:
            members[root_pid] = root
        # The session id is the root's pid; once that pid is reused it names another session.
        session_ours = root is None or root_alive
        since = root_create_time - 0.05
        for pid, p in self.procs.items():
            if pid in members or pid == me or p.create_time < since:
                continue
            if (session_ours and p.sid == root_pid) or self.markers.get(p.key) == run_marker:
                members[pid] = p
        for pid in cgroup_pids:
            if pid in self.procs and pid != me:
                members.setdefault(pid, self.procs[pid])
        for key, p in list(known.items()):
            now = self.current(p)
            if now is None:
                known.pop(key, None)    # the watcher and a stop may both look
            else:
                members.setdefault(p.pid, now)
        # The descendants of every member, not only of the root: what an escaped
        # daemon forks after clearing its environment is still the case's.
        stack = list(members)
        while stack:
            for child in self.children.get(stack.pop(), ()):
                if child not in members and child != me:
                    members[child] = self.procs[child]
                    stack.append(child)
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
        self.scans = 0

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
        self.scans += 1     # under the cond's `scanning` flag: one scan at a time
        started = time.monotonic()
        procs = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                p = read_proc(int(name))
                if p is not None:
                    procs[p.pid] = p
        seen = self.markers
        self.markers = markers = {}
        for p in procs.values():
            key = p.key
            markers[key] = seen[key] if key in seen else read_run_marker(p.pid)
        return Snapshot(procs, markers, started)


PROCESS_TABLE = ProcessTable()


def case_finder(run_marker, root_pid, root_create_time, known, cgroup=None,
                table=PROCESS_TABLE):
    """find() -> the case's live processes. The first call may use any scan that
    started after the finder was made, so the stops of many cases at once share
    scans; each later call uses a scan started after the call, so whatever was
    forked before the caller froze what it had found is in it."""
    made = [time.monotonic()]

    def find():
        snap = table.snapshot(made.pop() if made else None)
        members = snap.case_members(run_marker, root_pid, root_create_time, known,
                                    cgroup_pids(cgroup) if cgroup else ())
        # The scan may be older than the call: drop who has died since.
        return [p for p in members if (now := read_proc(p.pid)) is not None
                and now.key == p.key and now.alive]
    return find


def cgroup_finder(cgroup, known):
    """find() -> the live processes in a case's cgroup and those seen before:
    no /proc scan, so polling while a tree dies costs what the tree costs, not
    what the machine holds. stop_tree still confirms "nothing left" with
    case_finder, for a privileged case that moved itself out of its cgroup."""
    me = os.getpid()

    def find():
        live = {}
        for pid in cgroup_pids(cgroup):
            p = read_proc(pid)
            if p is not None and p.alive and pid != me:
                live[p.key] = p
        for key, p in list(known.items()):
            now = read_proc(p.pid)
            if not same_process(now, *key):
                known.pop(key, None)
            elif now.alive:
                live.setdefault(key, now)
        known.update(live)
        return list(live.values())
    return find


CGROUP_MOUNT = None     # where cgroup v2 is mounted, once cgroup_base found it

# A case in its own cgroup (v2) cannot leave it without privilege: not by
# double-forking, not by a new session, not by clearing its environment. When
# the executor may create cgroups (root, or systemd's Delegate=yes) every case
# gets one; elsewhere the scan above is all there is.

def cgroup_base(name):
    """A writable cgroup v2 directory for this executor's case cgroups, or None."""
    global CGROUP_MOUNT
    try:
        with open("/proc/self/mounts") as f:
            mount = CGROUP_MOUNT = next(line.split()[1] for line in f
                                        if line.split()[2] == "cgroup2")
        with open("/proc/self/cgroup") as f:
            own = next(line.strip()[3:] for line in f if line.startswith("0::"))
        base = os.path.join(mount, own.lstrip("/"), name)
        os.makedirs(base, exist_ok=True)
        probe = os.path.join(base, f"probe-{os.getpid()}")
        os.mkdir(probe)
        os.rmdir(probe)
        return base
    except (OSError, StopIteration):
        return None


def cgroup_pids(path):
    """Every pid in a cgroup and the cgroups below it."""
    pids = set()
    for dirpath, _, _ in os.walk(path):
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            pass
    return pids


def cgroup_go_home(home):
    """A case may write any pid it can signal into its own cgroup, the executor's
    too. Then a cgroup.kill of the case would end the executor, its cgroup could
    not be removed, and later cases would start inside it: move back to home (the
    executor's own cgroup). True if the executor is there."""
    try:
        with open("/proc/self/cgroup") as f:
            away = next(line.strip()[3:] for line in f if line.startswith("0::"))
        if os.path.join(CGROUP_MOUNT, away.lstrip("/")).rstrip("/") == home.rstrip("/"):
            return True
        with open(os.path.join(home, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        log.warning("the executor itself was put into %s; moved itself back", away)
        return True
    except (OSError, StopIteration) as e:
        log.warning("the executor could not move back to its own cgroup: %s", e)
        return False


def cgroup_kill(path, home):
    """SIGKILL everything in the cgroup at once, seen or not (Linux 5.14+), but
    never the executor: if it cannot get out of the way, it leaves this round to
    the per-process SIGKILL, which skips it."""
    if not cgroup_go_home(home) or os.getpid() in cgroup_pids(path):
        log.warning("the executor is inside %s; not using cgroup.kill", path)
        return
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
    except OSError:
        pass


def cgroup_remove(path):
    """Remove an empty case cgroup (and any the case made below it)."""
    for dirpath, _, _ in sorted(os.walk(path), key=lambda w: -len(w[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


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


def stop_tree(find, grace, poll=0.02, kill_wait=2.0, reap_wait=2.0, kill_all=None,
              find_quick=None):
    """End every process find() lists: SIGTERM, one shared grace, SIGKILL, reap.

    1. freeze the whole set (SIGSTOP, rescanning until nothing new appears: a
       stopped process cannot fork, so even a fork storm converges);
    2. SIGTERM all, then SIGCONT all, so stopped processes act on it at once;
    3. wait until all are gone, up to one grace deadline for the whole set,
       terminating any newcomer found meanwhile;
    4. at the deadline SIGKILL whatever is left (and kill_all(), which may
       reach what no scan saw), until a scan is empty;
    5. wait until the dead are reaped; anything still alive is a survivor.
    find_quick, if given, is a cheaper look (a case's cgroup) used until the
    set seems empty; "nothing left" is only believed when find() says so too."""
    started = time.monotonic()
    deadline = started + grace
    signals = Signaller()
    members = {}
    killed = set()

    quick = find_quick or find

    def remaining():
        """The quick look while it sees something; "nothing left" only when the
        full look agrees."""
        return quick() or (find() if quick is not find else [])

    def freeze_newcomers():
        fresh = []
        for _ in range(1000):
            live = remaining()
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
        if live:
            if kill_all:
                kill_all()
            kill_deadline = time.monotonic() + kill_wait
            while live and time.monotonic() < kill_deadline:
                for p in live:
                    members.setdefault(p.key, p)
                    killed.add(p.key)
                    signals.send(p, signal.SIGKILL)
                time.sleep(poll)
                live = remaining()
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

def cap_log(path, max_bytes):
    """Keep a case log under max_bytes: copy it to path.1 and truncate it.

    The case appends (O_APPEND) to the file it inherited, so renaming would
    not help; after truncation its next write lands at the new, empty end.
    At most two copies per case stay on disk."""
    try:
        size = os.path.getsize(path)
        if size <= max_bytes:
            return
        keep = max_bytes // 2       # the newest half as of this look, not what follows it
        with open(path, "rb") as src, open(path + ".1", "wb") as dst:
            src.seek(size - keep)
            dst.write(src.read(keep))
        os.truncate(path, 0)
    except OSError:
        pass


RUNNING, CANCELLING, CANCELLED, SUCCESS, FAILED, TIMEOUT = (
    "RUNNING", "CANCELLING", "CANCELLED", "SUCCESS", "FAILED", "TIMEOUT")
FINAL = (CANCELLED, SUCCESS, FAILED, TIMEOUT)
# The only moves an execution's status may make. CANCELLING lasts while the
# cleanup steps run, and stays put when a tree could not be ended completely,
# so that a later cancel tries again.
MOVES = {RUNNING: (CANCELLING, SUCCESS, FAILED, TIMEOUT), CANCELLING: (CANCELLED,)}
# A step: PENDING, then RUNNING, then one of SUCCESS FAILED TIMEOUT CANCELLED;
# or SKIPPED when it never started (an earlier step failed, or a cancel).
PENDING, SKIPPED = "PENDING", "SKIPPED"
STEP_MOVES = {PENDING: (RUNNING, SKIPPED), RUNNING: (SUCCESS, FAILED, TIMEOUT, CANCELLED)}
CLEANUP_TIMEOUT = 60.0
STOP_SLACK = 10.0       # beyond the grace: SIGKILL, reaping and the runner closing the phase
ADOPTED_POLL = 0.2      # how often the runner checks a step it cannot wait for
IDLE_LOOK = 5.0         # the longest the runner sleeps without being woken


def move_step(step, to, **fields):
    """The one place a step's state changes (in memory; save_steps stores it).
    A step a cancel has marked CANCELLED stays so when its root then exits."""
    if to not in STEP_MOVES.get(step["state"], ()):
        return False
    step.update(state=to, **fields)
    return True


def make_steps(steps):
    """Step specs as the executor keeps them: every field present, state PENDING."""
    return [{"index": i, "script": s["script"], "args": s.get("args", []),
             "group": s.get("group"), "always": bool(s.get("always")),
             "timeoutSeconds": s.get("timeoutSeconds",
                                     CLEANUP_TIMEOUT if s.get("always") else None),
             "state": PENDING, "pid": None, "createTime": None, "cgroup": None,
             "exitCode": None, "startedAt": None, "endedAt": None, "note": None,
             "unended": False, "escaped": []}
            for i, s in enumerate(steps)]


def stages(steps):
    """Steps in the order they run: consecutive steps of one group side by side;
    the normal steps first, then those marked always."""
    out = []
    for always in (False, True):
        for step in (s for s in steps if s["always"] == always):
            last = out[-1] if out else None
            if (last and step["group"] is not None and last[0]["group"] == step["group"]
                    and last[0]["always"] == always):
                last.append(step)
            else:
                out.append([step])
    return out


class Unit:
    """One step's running process tree: its root and what finds its processes."""

    def __init__(self, step, marker, pid, create_time, cgroup, child=True):
        self.step = step            # the step's dict, shared with the execution
        self.marker = marker
        self.pid = pid
        self.create_time = create_time
        self.cgroup = cgroup        # its own cgroup v2 directory, when there is one
        self.child = child          # False when adopted after an executor restart
        self.exit_code = None       # set by the reaper; unknown for adopted roots
        self.exited = False
        self.deadline = None
        self.known = {}
        self.ended_by_cancel = False    # a cancel ended its whole tree

    def find(self):
        return case_finder(self.marker, self.pid, self.create_time, self.known, self.cgroup)

    def find_quick(self):
        return cgroup_finder(self.cgroup, self.known) if self.cgroup else self.find()


class Execution:
    """In-memory side of one execution: its steps, what runs now, and whether
    it has been told to stop. `lock` guards cancelled/phase/units, so that a
    cancel and the start of the next step can never cross."""

    def __init__(self, task_id, steps, grace, max_runtime, started_at):
        self.task_id = task_id
        self.steps = steps
        self.grace = grace
        self.deadline = started_at + max_runtime if max_runtime else None   # time.time()
        self.lock = threading.Lock()
        self.phase = "normal"       # normal -> cleanup -> done
        self.cancelled = None       # None, CANCELLED or TIMEOUT: no further normal step
        self.cleanup_cancelled = False
        self.units = {}             # step index -> Unit, while it runs
        self.wake = threading.Event()
        self.stop_lock = threading.Lock()
        self.save_lock = threading.RLock()     # see Executor.save_steps
        self.stopping = False       # a cancel's stop is under way; another cancel joins it
        self.last_stop = None
        self.unended = {}           # step index -> Unit a cancel could not end completely
        self.phase_changed = threading.Condition(self.lock)

    def running_units(self):
        return list(self.units.values())


class Executor:
    """The registry of executions and everything that changes them."""

    def __init__(self, config):
        self.config = config
        self.db = Database(config.db)
        self.cases_dir = os.path.realpath(config.cases_dir)
        self.lock = threading.RLock()
        self.running = {}           # taskId -> Execution
        self.by_pid = {}            # step root pid -> (Execution, Unit), for the reaper
        self.tombstones = {}        # taskId -> expiry, cancelled before it was executed
        self.metrics = self.declare_metrics()
        # Named by host and port: two executors on one machine never share cases.
        self.cgroups = (cgroup_base(re.sub(r"[^A-Za-z0-9.-]", "_",
                                           f"case-executor-{config.host}-{config.port}"))
                        if config.cgroups == "auto" else None)
        self.cgroup_home = os.path.dirname(self.cgroups) if self.cgroups else None
        self.child_started = threading.Event()
        self.report_due = threading.Event()
        self.stopping = threading.Event()
        for d in (config.log_dir, config.work_dir):
            os.makedirs(d, exist_ok=True)

    # -- start and stop -------------------------------------------------------

    def declare_metrics(self):
        m = Metrics("executor")
        m.declare("cancel_requests_total", "counter",
                  "Cancel requests, by outcome: cancelled, not_found, incomplete.")
        m.declare("processes_terminated_total", "counter",
                  "Case processes that ended after SIGTERM, within the grace.")
        m.declare("processes_killed_total", "counter", "Case processes that needed SIGKILL.")
        m.declare("termination_failures_total", "counter",
                  "Case processes still alive after SIGKILL (survivors).")
        m.declare("tree_stop_seconds", "histogram",
                  "Time to end a case's process trees, by reason: cancel, timeout, leftovers.")
        m.declare("reports_total", "counter", "Outcome reports to the collector, by outcome.")
        m.declare("proc_scans_total", "counter",
                  "Full scans of /proc, shared by every tree stop in progress.",
                  gauge=lambda: PROCESS_TABLE.scans)
        m.declare("running_cases", "gauge", "Executions currently running or being cancelled.",
                  gauge=lambda: len(self.running))
        return m

    def start(self):
        become_subreaper()
        self.adopt_survivors()
        self.prune_logs()
        for target in (self.reap_forever, self.watch_forever, self.report_forever):
            self.in_thread(target)

    def in_thread(self, target, *args):
        """Run target in a daemon thread; an exception is logged and counted, not lost."""
        def run():
            try:
                target(*args)
            except Exception:
                internal_error(target.__name__, self.metrics)
        threading.Thread(target=run, name=target.__name__, daemon=True).start()

    def close(self):
        """Cases keep running: lab work survives an executor restart and is adopted."""
        if self.cgroups:
            cgroup_remove(self.cgroups)     # only if no case is left in it
        self.stopping.set()
        self.child_started.set()
        self.report_due.set()

    # -- execute ---------------------------------------------------------------

    def inside_cases_dir(self, path):
        return os.path.commonpath([os.path.realpath(path), self.cases_dir]) == self.cases_dir

    def resolve_script(self, script):
        check_script(script)
        path = os.path.realpath(os.path.join(self.cases_dir, script))
        if not self.inside_cases_dir(path):
            raise BadRequest(f"script '{script}' resolves outside the cases directory")
        if not os.path.isfile(path):
            raise BadRequest(f"script '{script}' not found in the cases directory")
        return path

    def execute(self, task_id, steps, report_url=None, grace=None, max_runtime=None):
        """Register the execution and start its first steps; the rest is the runner's."""
        for step in steps:
            self.resolve_script(step["script"])
        now = time.time()
        grace = self.config.grace_seconds if grace is None else grace
        steps = make_steps(steps)
        with self.lock:
            self.forget_expired_tombstones()
            if task_id in self.tombstones:
                raise Conflict(f"task {task_id} was cancelled before it started",
                               {"taskId": task_id})
            try:
                with self.db.transaction() as c:
                    c.execute(
                        "INSERT INTO execution (task_id, run_marker, script, args, status,"
                        " log_path, report_url, created_at, steps, grace_seconds,"
                        " max_runtime_seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (task_id, uuid.uuid4().hex, steps[0]["script"],
                         json.dumps(steps[0]["args"]), RUNNING, self.log_path(task_id, 0),
                         report_url, now, json.dumps(steps), grace, max_runtime))
            except sqlite3.IntegrityError:
                raise Conflict(f"task {task_id} already exists", {"taskId": task_id})
            ex = Execution(task_id, steps, grace, max_runtime, now)
            self.running[task_id] = ex
            try:
                first = self.start_stage(ex, stages(steps)[0])
            except Exception:
                self.running.pop(task_id, None)
                self.db.run("DELETE FROM execution WHERE task_id = ?", (task_id,))
                raise internal_error("execute", self.metrics, f"could not start {task_id}")
            self.db.run("UPDATE execution SET root_pid = ?, root_create_time = ?, cgroup = ?"
                        " WHERE task_id = ?", (first.pid, first.create_time,
                                               first.cgroup, task_id))
        self.in_thread(self.run_steps, ex)
        return {"taskId": task_id, "pid": first.pid}

    def start_stage(self, ex, stage):
        """Start the steps of one stage; the caller holds self.lock or ex.lock."""
        units = []
        for step in stage:
            unit = self.spawn(ex, step)
            units.append(unit)
        self.save_steps(ex)
        self.child_started.set()
        return units[0]

    def spawn(self, ex, step):
        """Start one step in its own session (and cgroup), output to its own log,
        marked by the environment. The reaper owns every child's exit status,
        adopted orphans included, so the Popen is told it is done: it must never
        waitpid() a pid that may by then belong to another case."""
        task_id, i = ex.task_id, step["index"]
        work = os.path.join(self.config.work_dir, task_id)
        os.makedirs(work, exist_ok=True)
        marker = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENVS}
        env.update(PYTHONUNBUFFERED="1", CASE_EXEC_STEP=str(i))
        env[MARKER_ENV] = task_id
        env[RUN_MARKER_ENV] = marker
        argv = [sys.executable, self.resolve_script(step["script"]), *step["args"]]
        cgroup = self.task_cgroup(task_id, f"step-{i}") if self.cgroups else None
        gate = os.pipe() if cgroup else None
        if cgroup:
            # The shell waits on the gate (its stdin) until it is in the step's
            # cgroup, then becomes the step (same pid): nothing runs outside it.
            argv = ["/bin/sh", "-c", 'read _; exec "$@" </dev/null', "case", *argv]
        try:
            with open(self.log_path(task_id, i), "ab") as out:
                popen = subprocess.Popen(
                    argv, cwd=work, env=env, stdin=gate[0] if gate else subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            popen.returncode = 0
            if cgroup:
                try:
                    os.makedirs(cgroup, exist_ok=True)
                    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                        f.write(str(popen.pid))
                except OSError as e:
                    log.warning("task=%s step=%s runs without its own cgroup: %s", task_id, i, e)
                    cgroup = None
        finally:
            if gate:
                os.write(gate[1], b"go\n")
                os.close(gate[0])
                os.close(gate[1])
        unit = Unit(step, marker, popen.pid, read_proc(popen.pid).create_time, cgroup)
        if step["timeoutSeconds"]:
            unit.deadline = time.time() + step["timeoutSeconds"]
        move_step(step, RUNNING, pid=unit.pid, createTime=unit.create_time, cgroup=cgroup,
                  marker=marker, startedAt=time.time())
        ex.units[i] = unit
        with self.lock:
            self.by_pid[unit.pid] = (ex, unit)
        log.info("task=%s step=%s started pid=%s script=%s args=%s", task_id, i, unit.pid,
                 step["script"], step["args"])
        return unit

    def save_steps(self, ex, conn=None):
        """Write the steps as they are now. The caller of a transaction takes
        ex.save_lock before it (the one order), so a state written late never
        overwrites a newer one."""
        with ex.save_lock:
            (conn or self.db.conn()).execute("UPDATE execution SET steps = ? WHERE task_id = ?",
                                             (json.dumps(ex.steps), ex.task_id))

    # -- the runner: steps in order, cleanup always, time limits -----------------

    def run_steps(self, ex):
        """Run the stages one after another, then the cleanup stages, then finish.
        Whether the next stage may start is decided under ex.lock, where a
        cancel marks the execution: no step can start after a cancel."""
        for stage in stages(ex.steps):
            cleanup = stage[0]["always"]
            with ex.lock:
                if cleanup and ex.phase == "normal":
                    ex.phase = "cleanup"
                    ex.phase_changed.notify_all()
                todo = [s for s in stage if s["state"] == PENDING]
                stopped = ex.cleanup_cancelled if cleanup else (
                    ex.cancelled or self.normal_failed(ex))
                if stopped:
                    for s in todo:
                        move_step(s, SKIPPED)
                    self.save_steps(ex)
                elif todo:
                    self.start_stage(ex, todo)
            self.wait_stage(ex, cleanup)
        self.finish(ex)

    def normal_failed(self, ex):
        return any(s["state"] in (FAILED, TIMEOUT) for s in ex.steps if not s["always"])

    def wait_stage(self, ex, cleanup):
        """Until every running step of the stage has ended: record each exit, end
        what a step left behind, and end steps that outrun their time limit."""
        while True:
            with ex.lock:
                units = ex.running_units()
            if not units:
                return
            now = time.time()
            ended = False
            for unit in units:
                if not unit.child and not unit.exited and not (
                        same_process(proc := read_proc(unit.pid), unit.pid, unit.create_time)
                        and proc.alive):
                    # Adopted: gone, exit status unknown. A zombie counts as gone: its
                    # parent is not us, and may take its time to reap it.
                    unit.exited = True
                if unit.exited:
                    self.step_exited(ex, unit)
                    ended = True
                elif unit.deadline and now >= unit.deadline:
                    unit.deadline = None
                    log.warning("task=%s step=%s ran past its timeoutSeconds",
                                ex.task_id, unit.step["index"])
                    self.stop_units(ex, [unit], "timeout", TIMEOUT)
            if not cleanup and ex.deadline and now >= ex.deadline and ex.cancelled is None:
                with ex.lock:
                    ex.cancelled = TIMEOUT
                    units = [u for u in ex.running_units() if not u.step["always"]]
                log.warning("task=%s ran past maxRuntimeSeconds", ex.task_id)
                self.stop_units(ex, units, "timeout", TIMEOUT)
            if not ended:       # after an exit, look again at once: the stage may be over
                ex.wake.wait(self.until_next_look(ex, units, cleanup))
                ex.wake.clear()

    def until_next_look(self, ex, units, cleanup):
        """How long the runner may sleep: the exit of a child of ours and a cancel
        wake it at once, so only a time limit falling due, or a step adopted after
        a restart (no exit status will tell us it ended), calls for a look."""
        if any(not u.child for u in units):
            return ADOPTED_POLL
        due = [u.deadline for u in units if u.deadline]
        if not cleanup and ex.deadline and ex.cancelled is None:
            due.append(ex.deadline)
        now = time.time()
        return max(0.01, min([IDLE_LOOK] + [d - now for d in due]))

    def step_exited(self, ex, unit):
        """A step's root ended: end what it left behind, then record the step."""
        step = unit.step
        with ex.stop_lock:
            if unit.step["index"] not in ex.units:
                return
            note = step["note"]
            if step["state"] == RUNNING and not self.config.keep_leftovers:
                result = self.end_tree(ex, [unit], "leftovers")
                if result.signalled:
                    note = f"ended {result.signalled} leftover process(es)"
                    log.warning("task=%s step=%s exited but left processes behind: %s",
                                ex.task_id, step["index"], result.as_dict())
            # The watcher caps logs twice a second; a step that ended between
            # two looks is capped here.
            cap_log(self.log_path(ex.task_id, step["index"]), self.config.log_max_bytes)
            code = unit.exit_code
            if step["state"] == RUNNING:
                if not unit.child and code is None:
                    state = FAILED
                    note = "ended after an executor restart; its exit code is unknown"
                else:
                    state = SUCCESS if code == 0 else FAILED
                move_step(step, state)
            step.update(exitCode=code, endedAt=time.time(), note=note)
            with ex.lock:
                del ex.units[step["index"]]
            with self.lock:
                self.by_pid.pop(unit.pid, None)
            self.save_steps(ex)
        log.info("task=%s step=%s ended %s exit=%s", ex.task_id, step["index"], step["state"],
                 code)

    def finish(self, ex):
        """All stages done: the execution's outcome, reported to the collector."""
        steps = ex.steps
        normal = [s for s in steps if not s["always"]]
        if ex.cancelled == CANCELLED:
            to = CANCELLED
        elif ex.cancelled == TIMEOUT or any(s["state"] == TIMEOUT for s in normal):
            to = TIMEOUT
        elif all(s["state"] == SUCCESS for s in steps):
            to = SUCCESS
        else:
            to = FAILED
        ended = [s for s in normal if s["state"] in (SUCCESS, FAILED, TIMEOUT, CANCELLED)]
        code = ended[-1]["exitCode"] if ended else None
        notes = [f"step {s['index']}: {s['note']}" if len(steps) > 1 else s["note"]
                 for s in steps if s["note"]]
        if any(s["always"] and s["state"] != SUCCESS for s in steps):
            notes.append("cleanup " + ", ".join(f"step {s['index']} {s['state']}"
                                                 for s in steps if s["always"]))
        if to == CANCELLED and self.still_unended(ex):
            # Not cleanly cancelled: it stays CANCELLING, and the next cancel (the
            # collector keeps retrying) tries again to end what is left.
            log.error("task=%s stays CANCELLING: processes of step(s) %s could not be ended",
                      ex.task_id, sorted(ex.unended))
            self.save_steps(ex)
            moved = False
        else:
            if self.cgroups:
                cgroup_go_home(self.cgroup_home)
                cgroup_remove(self.task_cgroup(ex.task_id))
            with ex.save_lock, self.db.transaction() as c:
                self.save_steps(ex, c)
                moved = self.move(c, ex.task_id, to, exit_code=code, finished_at=time.time(),
                                  note="; ".join(notes) or None)
                if moved:
                    self.queue_report(c, ex.task_id)
        if moved:
            self.report_due.set()   # after the commit, or the reporter finds nothing yet
            log.info("task=%s finished %s exit=%s", ex.task_id, to, code)
            self.forget(ex)
        with ex.lock:       # only now: a cancel waiting on this sees a final status
            ex.phase = "done"
            ex.phase_changed.notify_all()

    def still_unended(self, ex):
        """Whether anything a cancel could not end is still alive (a full look:
        this is the rare path of an unkillable process)."""
        with ex.lock:
            units = list(ex.unended.values())
        alive = [u for u in units if u.find()()]
        with ex.lock:
            for u in units:
                if u not in alive:
                    ex.unended.pop(u.step["index"], None)
                    u.step["unended"] = False
        return bool(alive)

    # -- cancel ----------------------------------------------------------------

    def cancel(self, task_id):
        """The design's cancel: end every running step's tree under one grace, start
        no further normal step, let the cleanup steps run. A cancel while only the
        cleanup runs ends the cleanup. 404 when unknown or finished."""
        log.info("task=%s cancel requested", task_id)    # every one, answered 404 or not
        with self.lock:     # execute inserts and registers under this lock: no late execute
            row = self.db.one("SELECT status FROM execution WHERE task_id = ?", (task_id,))
            ex = self.running.get(task_id)
            if row is None:
                self.tombstones[task_id] = time.monotonic() + TOMBSTONE_SECONDS
        if row is None or row["status"] in FINAL or ex is None:
            self.metrics.inc("cancel_requests_total", outcome="not_found")
            raise NotFound("task not found or already finished", {"taskId": task_id})
        with ex.lock:
            phase = ex.phase
            units = None if ex.stopping else self.units_to_cancel(ex)
            ex.stopping = ex.stopping or bool(units)
        if not units and phase == "done":
            self.metrics.inc("cancel_requests_total", outcome="not_found")
            raise NotFound("task not found or already finished", {"taskId": task_id})
        with self.db.transaction() as c:
            self.move(c, task_id, CANCELLING)
        if not units:
            # A stop of this phase is under way, or done and the runner is closing
            # the phase: join it and answer with its result.
            with ex.lock:
                ex.phase_changed.wait_for(lambda: not ex.stopping and (
                    ex.phase != phase or (ex.last_stop and ex.last_stop.survivors)),
                    ex.grace + STOP_SLACK)
            result = ex.last_stop or StopResult()
        else:
            try:
                result = self.stop_units(ex, units, "cancel", CANCELLED)
            finally:
                with ex.lock:
                    ex.stopping = False
                    ex.phase_changed.notify_all()
            self.note_unended(ex, units, result)
            if not result.survivors and phase == "done":
                self.finish(ex)     # what an earlier cancel could not end is gone at last
            elif not result.survivors:
                with ex.lock:     # answer once the cancelled phase is over
                    ex.phase_changed.wait_for(lambda: ex.phase != phase, ex.grace + STOP_SLACK)
        data = dict(result.as_dict(), taskId=task_id)
        self.db.run("UPDATE execution SET stop_result = ? WHERE task_id = ?",
                    (json.dumps(result.as_dict()), task_id))
        if result.survivors:
            self.metrics.inc("cancel_requests_total", outcome="incomplete")
            raise InternalError(f"cancel incomplete: {len(result.survivors)} process(es) survived",
                                data)
        self.metrics.inc("cancel_requests_total", outcome="cancelled")
        return data

    def units_to_cancel(self, ex):
        """The trees a cancel must end now (the caller holds ex.lock): the running
        steps of the phase, but for those a cancel already ended completely, and
        whatever an earlier cancel could not end. Marks the phase as cancelled."""
        if ex.phase == "normal":
            ex.cancelled = ex.cancelled or CANCELLED
            units = [u for u in ex.running_units() if not u.step["always"]]
        elif ex.phase == "cleanup":
            ex.cleanup_cancelled = True
            units = ex.running_units()
        else:
            units = []
        units = [u for u in units if not u.ended_by_cancel]
        return units + [u for u in ex.unended.values() if u not in units]

    def note_unended(self, ex, units, result):
        """Remember the trees a cancel could not end completely, also across a
        restart: the execution stays CANCELLING and the next cancel tries again."""
        with ex.lock:
            changed = False
            for u in units:
                u.ended_by_cancel = not result.survivors
                changed |= u.step.get("unended", False) != bool(result.survivors)
                u.step["unended"] = bool(result.survivors)
                if result.survivors:
                    ex.unended[u.step["index"]] = u
                else:
                    ex.unended.pop(u.step["index"], None)
            ex.last_stop = result
            ex.phase_changed.notify_all()
        if changed:
            self.save_steps(ex)

    def stop_units(self, ex, units, reason, state):
        """End some steps' trees under one grace; they are recorded as `state`."""
        for unit in units:
            move_step(unit.step, state)
        with ex.stop_lock:
            result = self.end_tree(ex, units, reason)
        ex.wake.set()
        return result

    def end_tree(self, ex, units, reason):
        """stop_tree over the trees of some steps at once, logged and counted."""
        finders = [u.find() for u in units]
        quick_finders = [u.find_quick() for u in units]
        cgroups = [u.cgroup for u in units if u.cgroup]
        if cgroups:
            cgroup_go_home(self.cgroup_home)

        def find():
            return [p for f in finders for p in f()]

        def find_quick():
            return [p for f in quick_finders for p in f()]

        def kill_all():
            for cg in cgroups:
                cgroup_kill(cg, self.cgroup_home)
        result = stop_tree(find, ex.grace, kill_all=kill_all if cgroups else None,
                           find_quick=find_quick if cgroups else None)
        if not result.survivors:
            if cgroups:
                cgroup_go_home(self.cgroup_home)    # once more: it may have moved meanwhile
            for cg in cgroups:
                cgroup_remove(cg)
        m = self.metrics
        m.inc("processes_terminated_total", result.terminated)
        m.inc("processes_killed_total", result.killed - len(result.survivors))
        m.inc("termination_failures_total", len(result.survivors))
        m.observe("tree_stop_seconds", result.elapsed_ms / 1000, reason=reason)
        log.info("task=%s %s: signalled=%d terminated=%d killed=%d survivors=%d elapsed=%dms",
                 ex.task_id, reason, result.signalled, result.terminated, result.killed,
                 len(result.survivors), result.elapsed_ms)
        if result.survivors:
            log.error("task=%s could not end pids %s", ex.task_id, result.survivors)
        return result

    def move(self, conn, task_id, to, **fields):
        """The one place an execution's status changes."""
        moved = compare_and_set(conn, "execution", "task_id", task_id, MOVES, to, **fields)
        if moved:
            log.info("task=%s status -> %s", task_id, to)
        return moved

    def forget_expired_tombstones(self):
        now = time.monotonic()
        for task_id in [t for t, expiry in self.tombstones.items() if expiry < now]:
            del self.tombstones[task_id]
        while len(self.tombstones) > 10000:     # bounded: oldest first
            del self.tombstones[next(iter(self.tombstones))]

    def forget(self, ex):
        with self.lock:
            self.running.pop(ex.task_id, None)

    # -- exits -----------------------------------------------------------------

    def reap_forever(self):
        """Collect the exit status of every child, step roots and adopted orphans alike."""
        while not self.stopping.is_set():
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                self.child_started.wait(0.5)
                self.child_started.clear()
                continue
            with self.lock:
                ex, unit = self.by_pid.get(pid, (None, None))
                if unit is not None:
                    unit.exit_code = os.waitstatus_to_exitcode(status)
                    unit.exited = True
            if ex is not None:
                ex.wake.set()

    def watch_forever(self):
        """Keep case logs within their size, remember the markers of processes of
        cases without a cgroup, and now and then remove old logs."""
        last_prune = time.monotonic()
        while not self.stopping.wait(0.5):
            with self.lock:
                running = list(self.running.values())
            uncontained = False
            for ex in running:
                for step in ex.steps:
                    if step["state"] == RUNNING:
                        cap_log(self.log_path(ex.task_id, step["index"]),
                                self.config.log_max_bytes)
                        uncontained |= not step["cgroup"]
            if uncontained:
                # Without a cgroup the run marker finds a case's escaped processes,
                # and a process may clear its environment: a scan remembers the
                # marker of every process it sees (ProcessTable.markers), and each
                # step remembers its members (remember_members).
                self.remember_members(running, PROCESS_TABLE.snapshot())
            if time.monotonic() - last_prune > 600:
                self.prune_logs()
                last_prune = time.monotonic()

    def remember_members(self, running, snap):
        """Without a cgroup: find each case's processes as a stop would, so that
        `known` keeps one whose parent (an escaped daemon, say) has since exited,
        and store those outside the case's session with the step: after a
        restart, no marker or session leads to them any more."""
        for ex in running:
            changed = False
            for unit in ex.running_units():
                if unit.cgroup:
                    continue
                members = snap.case_members(unit.marker, unit.pid, unit.create_time, unit.known)
                escaped = sorted([p.pid, p.create_time] for p in members if p.sid != unit.pid)
                if escaped != unit.step.get("escaped"):
                    unit.step["escaped"] = escaped
                    changed = True
            if changed:
                self.save_steps(ex)

    # -- registry after a restart -------------------------------------------------

    def adopt_survivors(self):
        """Reload unfinished executions and go on with them: their steps kept
        running while we were down (exit statuses of those are lost)."""
        for row in self.db.all("SELECT * FROM execution WHERE status IN (?, ?)",
                               (RUNNING, CANCELLING)):
            steps = json.loads(row["steps"])
            ex = Execution(row["task_id"], steps, row["grace_seconds"],
                           row["max_runtime_seconds"], row["created_at"])
            if row["status"] == CANCELLING:
                ex.cancelled = CANCELLED
            for step in steps:
                running = step["state"] in (RUNNING, CANCELLED, TIMEOUT) and step["pid"] \
                    and step["endedAt"] is None
                if running or step.get("unended"):
                    unit = Unit(step, step["marker"], step["pid"], step["createTime"],
                                step["cgroup"], child=False)
                    for pid, create_time in step.get("escaped", ()):
                        if same_process(proc := read_proc(pid), pid, create_time):
                            unit.known[proc.key] = proc
                    if step["timeoutSeconds"]:
                        unit.deadline = step["startedAt"] + step["timeoutSeconds"]
                    if running:
                        ex.units[step["index"]] = unit
                    if step.get("unended"):
                        ex.unended[step["index"]] = unit
            if any(s["always"] and s["state"] != PENDING for s in steps):
                ex.phase = "cleanup"
            with self.lock:
                self.running[ex.task_id] = ex
            log.info("task=%s adopted root pid=%s status=%s steps running=%s", ex.task_id,
                     row["root_pid"], row["status"], sorted(ex.units))
            self.in_thread(self.run_steps, ex)
            cut_short = ex.phase == "normal" and any(
                not u.step["always"] for u in ex.running_units())
            if row["status"] == CANCELLING and (cut_short or ex.unended):
                self.in_thread(self.resume_cancel, ex.task_id)

    def resume_cancel(self, task_id):
        """A cancel cut short by the executor's own death: finish it now rather
        than at the caller's next retry."""
        try:
            result = self.cancel(task_id)
            log.info("task=%s cancel resumed after a restart: %s", task_id, result)
        except ApiError as e:
            log.warning("task=%s cancel resumed after a restart: %s", task_id, e.message)

    # -- reports to the collector -------------------------------------------------

    def queue_report(self, conn, task_id):
        conn.execute("UPDATE execution SET report_state = 'PENDING' WHERE task_id = ?"
                     " AND report_url IS NOT NULL", (task_id,))

    def report_forever(self):
        """Deliver outcomes to the collector, retrying with capped backoff until it answers."""
        next_try = {}
        while not self.stopping.is_set():
            rows = self.db.all("SELECT task_id, status, exit_code, note, report_url, steps,"
                               " report_attempts FROM execution WHERE report_state = 'PENDING'")
            now = time.monotonic()
            for row in rows:
                if next_try.get(row["task_id"], 0) <= now:
                    self.report(row, next_try)
            self.report_due.wait(0.5 if rows else 2.0)
            self.report_due.clear()

    def report(self, row, next_try):
        url = urlsplit(row["report_url"])
        body = {"executionTaskId": row["task_id"], "status": row["status"],
                "exitCode": row["exit_code"], "note": row["note"],
                "steps": [{k: s[k] for k in ("index", "script", "always", "state", "exitCode",
                                             "note")} for s in json.loads(row["steps"])]}
        attempts = row["report_attempts"] + 1
        log.info("task=%s report attempt %d: %s to collector %s", row["task_id"], attempts,
                 row["status"], url.netloc)
        started = time.monotonic()
        try:
            code, payload = call_json(url.netloc, "POST", url.path, body, self.config.token,
                                      self.config.connect_timeout, self.config.read_timeout)
            error = None if code < 300 else f"HTTP {code}: {payload.get('message')}"
        except CallFailed as e:
            code, error = None, e.text
        ms = int((time.monotonic() - started) * 1000)
        if code in (400, 404, 409):
            # The collector will never take this report (unknown instance or key,
            # another execution): retrying cannot help. A 401 may, once tokens agree.
            self.db.run("UPDATE execution SET report_state = 'REJECTED', report_attempts = ?,"
                        " report_error = ? WHERE task_id = ?", (attempts, error, row["task_id"]))
            log.error("task=%s report of %s rejected by the collector in %dms: %s",
                      row["task_id"], row["status"], ms, error)
            self.metrics.inc("reports_total", outcome="rejected")
            next_try.pop(row["task_id"], None)
        elif error is None:
            self.db.run("UPDATE execution SET report_state = 'DELIVERED', report_attempts = ?,"
                        " report_error = NULL WHERE task_id = ?", (attempts, row["task_id"]))
            log.info("task=%s reported %s to collector (HTTP %s) in %dms", row["task_id"],
                     row["status"], code, ms)
            self.metrics.inc("reports_total", outcome="delivered")
            next_try.pop(row["task_id"], None)
        else:
            self.db.run("UPDATE execution SET report_attempts = ?, report_error = ?"
                        " WHERE task_id = ?", (attempts, error, row["task_id"]))
            log.warning("task=%s report attempt %d failed in %dms: %s", row["task_id"],
                        attempts, ms, error)
            self.metrics.inc("reports_total", outcome="failed")
            next_try[row["task_id"]] = time.monotonic() + backoff(
                attempts, self.config.report_retry_max)

    # -- case logs -------------------------------------------------------------

    def task_cgroup(self, task_id, *below):
        """A prefix, so that no taskId names one of cgroupfs's own files (cgroup.procs)."""
        return os.path.join(self.cgroups, f"task-{task_id}", *below)

    def log_path(self, task_id, step=0):
        """Each step's output has its own log; the first step's is <taskId>.log."""
        # '+' is not allowed in a taskId, so no task's log name is another's.
        name = f"{task_id}.log" if step == 0 else f"{task_id}+step-{step}.log"
        return os.path.join(self.config.log_dir, name)

    def prune_logs(self):
        """Remove logs of finished cases older than the retention period."""
        cutoff = time.time() - self.config.log_retention_days * 86400
        with self.lock:
            running = set(self.running)
        for name in os.listdir(self.config.log_dir):
            match = LOG_NAME_RE.fullmatch(name)
            if not match:
                continue
            task_id = match.group(1)
            path = os.path.join(self.config.log_dir, name)
            try:
                if task_id not in running and os.path.getmtime(path) < cutoff:
                    os.remove(path)
                    log.info("task=%s log %s removed after retention", task_id, name)
            except OSError:
                pass

    def read_log(self, task_id, offset, limit, step=0):
        """A page of a step's output: from offset, or the last `limit` bytes."""
        if step >= len(self.status(task_id)["steps"]):      # 404 for an unknown task
            raise NotFound(f"task {task_id} has no step {step}", {"taskId": task_id})
        path = self.log_path(task_id, step)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                start = max(0, size - limit) if offset is None else min(offset, size)
                f.seek(start)
                chunk = f.read(limit)
        except FileNotFoundError:
            size, start, chunk = 0, 0, b""
        return {"taskId": task_id, "step": step, "offset": start,
                "nextOffset": start + len(chunk),
                "size": size, "text": chunk.decode("utf-8", "replace"),
                "olderCopy": os.path.exists(path + ".1")}

    # -- queries ---------------------------------------------------------------

    def status(self, task_id):
        row = self.db.one("SELECT * FROM execution WHERE task_id = ?", (task_id,))
        if row is None:
            raise NotFound(f"task {task_id} not found", {"taskId": task_id})
        return public_execution(row, self.log_path)

    def tasks(self):
        rows = self.db.all("SELECT * FROM execution WHERE status IN (?, ?) ORDER BY created_at",
                           (RUNNING, CANCELLING))
        return [public_execution(r, self.log_path) for r in rows]

    def cases(self):
        """The scripts that may run: *.py under the cases directory, as relative paths."""
        found = []
        for dirpath, dirs, files in os.walk(self.cases_dir):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                if name.endswith(".py") and self.inside_cases_dir(path):
                    found.append(os.path.relpath(path, self.cases_dir))
        return found[:1000]


def public_steps(steps_json, log_path):
    return [{k: v for k, v in s.items() if k not in ("marker", "cgroup", "escaped")} | {
        "log": log_path(s["index"])} for s in json.loads(steps_json or "[]")]


def public_execution(row, log_path):
    return {
        "taskId": row["task_id"], "script": row["script"], "args": json.loads(row["args"]),
        "status": row["status"], "pid": row["root_pid"], "exitCode": row["exit_code"],
        "createdAt": row["created_at"], "finishedAt": row["finished_at"],
        "note": row["note"], "logPath": row["log_path"],
        "graceSeconds": row["grace_seconds"], "maxRuntimeSeconds": row["max_runtime_seconds"],
        "steps": public_steps(row["steps"], lambda i: log_path(row["task_id"], i)),
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
    app = make_bottle("executor", service.metrics)
    app.config["executor"] = service
    tokens = {"collector": config.token} if config.token else {}
    guarded = lambda: require_token(tokens)   # noqa: E731

    @app.post("/test-case-execution/execute")
    def execute():
        guarded()
        body = json_body()
        task_id = check_task_id(body.get("taskId", uuid.uuid4().hex))
        steps = check_steps(body)
        report_url = check_report_url(body.get("reportUrl"))
        grace = seconds(body.get("graceSeconds"), "graceSeconds", config.max_grace_seconds,
                        zero_ok=True)
        max_runtime = seconds(body.get("maxRuntimeSeconds"), "maxRuntimeSeconds", 7 * 86400)
        data = service.execute(task_id, steps, report_url, grace, max_runtime)
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

    @app.get("/test-case-execution/cases")
    def cases():
        guarded()
        return envelope(200, "ok", service.cases())

    @app.get("/test-case-execution/log/<task_id>")
    def case_log(task_id):
        guarded()
        check_task_id(task_id)
        query = bottle.request.query
        offset = query.get("offset")
        limit = whole_number(query.get("limit", "65536"))
        step = whole_number(query.get("step", "0"))
        if offset is not None and whole_number(offset) is None:
            raise BadRequest("'offset' must be a non-negative integer")
        if limit is None or not 1 <= limit <= MAX_BODY_BYTES:
            raise BadRequest(f"'limit' must be an integer from 1 to {MAX_BODY_BYTES}")
        if step is None:
            raise BadRequest("'step' must be a non-negative integer")
        data = service.read_log(task_id, whole_number(offset), limit, step)
        return envelope(200, "ok", data)

    @app.get("/metrics")
    def metrics():
        return serve_metrics(service.metrics)

    @app.get("/health")
    def health():
        return envelope(200, "ok", {"service": "executor", "pid": os.getpid(),
                                    "running": len(service.running),
                                    "cgroups": service.cgroups})

    return app


###############################################################################
# main #########################################################################
###############################################################################

def parse_args(argv, defaults=ExecutorConfig()):
    env = os.environ.get
    p = argparse.ArgumentParser(description="CaseExecuteService: run and cancel case scripts.")
    p.add_argument("--host", default=env("EXECUTOR_HOST", defaults.host))
    p.add_argument("--port", type=PORT, default=env("EXECUTOR_PORT", str(defaults.port)))
    p.add_argument("--cases-dir", default=env("EXECUTOR_CASES_DIR", defaults.cases_dir),
                   help="scripts are taken from here only")
    p.add_argument("--db", default=env("EXECUTOR_DB", defaults.db), help="SQLite file")
    p.add_argument("--log-dir", default=env("EXECUTOR_LOG_DIR", defaults.log_dir),
                   help="per-task stdout/stderr logs")
    p.add_argument("--work-dir", default=env("EXECUTOR_WORK_DIR", defaults.work_dir),
                   help="each case runs in <work-dir>/<taskId>")
    p.add_argument("--grace-seconds", type=SECONDS,
                   default=env("EXECUTOR_GRACE_SECONDS", str(defaults.grace_seconds)),
                   help="time between SIGTERM and SIGKILL (default 5)")
    p.add_argument("--max-grace-seconds", type=SECONDS, default=defaults.max_grace_seconds,
                   help="the largest graceSeconds an execution may ask for (default 60)")
    p.add_argument("--keep-leftovers", action="store_true",
                   help="do not end processes a case leaves behind when it exits by itself")
    p.add_argument("--token", default=env(TOKEN_ENV, ""),
                   help=f"require 'Authorization: Bearer <token>' (prefer ${TOKEN_ENV}: "
                        "arguments are visible in ps)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without a token")
    p.add_argument("--connect-timeout", type=POSITIVE_SECONDS, default=defaults.connect_timeout)
    p.add_argument("--read-timeout", type=POSITIVE_SECONDS, default=defaults.read_timeout)
    p.add_argument("--log-max-bytes", type=COUNT, default=defaults.log_max_bytes,
                   help="cap of a case log; one older copy (<taskId>.log.1) is kept")
    p.add_argument("--log-retention-days", type=SECONDS, default=defaults.log_retention_days,
                   help="case logs of finished cases older than this are removed")
    p.add_argument("--cgroups", choices=("auto", "off"), default=defaults.cgroups,
                   help="auto: run each case in its own cgroup v2 when allowed (default)")
    p.add_argument("--log-level", default=env("EXECUTOR_LOG_LEVEL", "INFO"))
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    a = p.parse_args(argv)
    if not os.path.isdir(a.cases_dir):
        p.error(f"--cases-dir {a.cases_dir!r} is not a directory")
    if not a.token and not a.insecure and not is_loopback(a.host):
        p.error(f"refusing to listen on {a.host} without a token: anyone who can reach it "
                f"could run and kill processes. Set ${TOKEN_ENV} (or --token), or pass "
                "--insecure if the network is trusted.")
    config = ExecutorConfig(
        host=a.host, port=a.port, cases_dir=a.cases_dir, db=a.db, log_dir=a.log_dir,
        work_dir=a.work_dir, grace_seconds=a.grace_seconds, keep_leftovers=a.keep_leftovers,
        token=a.token, connect_timeout=a.connect_timeout,
        read_timeout=a.read_timeout, log_max_bytes=a.log_max_bytes,
        log_retention_days=a.log_retention_days, cgroups=a.cgroups,
        max_grace_seconds=a.max_grace_seconds)
    return config, a


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, for log shippers; ids stay in the message."""

    def format(self, record):
        entry = {"time": self.formatTime(record), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        entry.update(re.findall(r"\b(task|instance|execution|executor|pid)=(\S+)",
                                entry["message"]))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level, fmt="text"):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def main(argv=None):
    config, opts = parse_args(argv)
    setup_logging(opts.log_level, opts.log_format)
    app = make_app(config)
    service = app.config["executor"]
    server = make_server(app, config.host, config.port)
    service.start()
    log.info("executor listening on http://%s:%s cases-dir=%s grace=%ss cgroups=%s",
             config.host, server.server_port, service.cases_dir, config.grace_seconds,
             service.cgroups or "off (scan only)")
    run_server(server, on_stop=service.close)
    return 0


if __name__ == "__main__":
    sys.exit(main())
