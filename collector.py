#!/usr/bin/env python3
"""DataCollectService: collect tasks, their case-execution instances, and Stop.

    python collector.py --port 8080 --executor 127.0.0.2:8081 --executor 127.0.0.3:8081

A collect task has one instance per case; start dispatches each instance to an
executor (CaseExecuteService). Stop marks the task and its unfinished
instances STOPPED in one transaction, then asks each executor to cancel its
instance's execution taskId. Cancels go out in parallel; the stop answers
within --stop-wait seconds; a cancel that could not be delivered stays PENDING
in SQLite and is retried with capped backoff until the executor confirms it or
says the task is gone, across collector restarts too.
"""

import argparse
import concurrent.futures
import dataclasses
import hmac
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from urllib.parse import urlencode

import bottle

from executor import (CONNECT_TIMEOUT, COUNT, PORT, POSITIVE_SECONDS, READ_TIMEOUT, SECONDS,
                      TOKEN_ENV, ApiError, BadGateway, BadRequest, CallFailed, Conflict,
                      Database, Metrics, NotFound, backoff, call_json, check_steps,
                      compare_and_set, envelope, header_text, is_loopback, json_body,
                      make_bottle, make_server, parse_tokens, require_token, run_server,
                      seconds, serve_metrics, setup_logging)

log = logging.getLogger("collector")
HERE = os.path.dirname(os.path.abspath(__file__))

###############################################################################
# Config and defaults ##########################################################
###############################################################################

# Always used with fullmatch: `$` would also match before a trailing newline.
EXECUTOR_ADDRESS_RE = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?):([0-9]{1,5})")
MAX_CASES = 1000
MAX_NAME = 200
MAX_REPORT_STEPS = 50           # an execution has at most 50 steps (check_steps)
# What an executor reports of each step (Executor.report), and the types allowed.
REPORT_STEP_FIELDS = {"index": (int,), "script": (str,), "always": (bool,), "state": (str,),
                      "exitCode": (int, type(None)), "note": (str, type(None))}


@dataclasses.dataclass
class CollectorConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    db: str = os.path.join("var", "collector.db")
    executors: list = dataclasses.field(default_factory=list)
    connect_timeout: float = CONNECT_TIMEOUT
    read_timeout: float = READ_TIMEOUT
    stop_wait: float = 3.0
    retry_max: float = 30.0       # cap of the backoff between cancel attempts
    advertise: str = ""           # host:port executors use to report back; default host:port
    token: str = ""               # shared with executors: sent to them, required on reports
    api_tokens: dict = dataclasses.field(default_factory=dict)  # name -> secret, for the API
    lane_workers: int = 16        # calls in flight to one executor at a time
    max_grace_seconds: float = 60.0   # keep at most the executors' own --max-grace-seconds


###############################################################################
# States #######################################################################
###############################################################################

PENDING, DISPATCHING, RUNNING, STOPPED, SUCCESS, FAILED = (
    "PENDING", "DISPATCHING", "RUNNING", "STOPPED", "SUCCESS", "FAILED")
TASK_MOVES = {PENDING: (RUNNING, STOPPED), RUNNING: (STOPPED, SUCCESS, FAILED)}
INSTANCE_MOVES = {
    PENDING: (DISPATCHING, STOPPED),
    DISPATCHING: (RUNNING, STOPPED, SUCCESS, FAILED),
    RUNNING: (STOPPED, SUCCESS, FAILED),
}
UNFINISHED = (PENDING, DISPATCHING, RUNNING)

# What happened to the cancel of one instance: PENDING ones are retried until the
# executor confirms (DELIVERED), says it has no such task (NOT_FOUND), or calls
# the request malformed (FAILED). A stop sets the first state together with the
# instance's status (move_instance); every later change goes through move_cancel.
NOT_NEEDED, CANCEL_PENDING, DELIVERED, NOT_FOUND = (
    "NOT_NEEDED", "PENDING", "DELIVERED", "NOT_FOUND")
CANCEL_MOVES = {
    NOT_NEEDED: (CANCEL_PENDING,),          # an execute answered after the stop
    NOT_FOUND: (CANCEL_PENDING,),           # ... whose first cancel came too early
    CANCEL_PENDING: (CANCEL_PENDING, DELIVERED, NOT_FOUND, FAILED),
}


def move_task(conn, task_id, to, **fields):
    """The one place a task's status changes."""
    moved = compare_and_set(conn, "collect_task", "id", task_id, TASK_MOVES, to, **fields)
    if moved:
        log.info("task=%s status -> %s", task_id, to)
    return moved


def move_cancel(conn, inst, to, only_from=None, **fields):
    """The one place an instance's cancel state changes after the stop set it;
    only_from narrows the moves allowed (an attempt's outcome counts only while
    the cancel is still pending)."""
    moves = {s: t for s, t in CANCEL_MOVES.items() if only_from is None or s in only_from}
    return compare_and_set(conn, "test_case_execution_instance", "id", inst["id"],
                           moves, to, column="cancel_state", **fields)


def move_instance(conn, inst, to, **fields):
    """The one place an instance's status changes; inst is its row."""
    moved = compare_and_set(conn, "test_case_execution_instance", "id", inst["id"],
                            INSTANCE_MOVES, to, **fields)
    if moved:
        log.info("task=%s instance=%s execution=%s status -> %s", inst["collect_task_id"],
                 inst["id"], inst["execution_task_id"], to)
    return moved


###############################################################################
# Core logic ###################################################################
###############################################################################

class Lanes:
    """One bounded pool of call threads per executor. Calls stuck on a hung
    machine wait in its lane and never hold up the calls to another machine."""

    def __init__(self, per_lane):
        self.per_lane = per_lane
        self.lock = threading.Lock()
        self.pools = {}
        self.last_failure = {}      # address -> monotonic time a call found no answer
        self.closed = False

    def submit(self, address, fn, *args):
        """fn(*args, queued_at=...) in address's lane."""
        with self.lock:
            if self.closed:
                raise RuntimeError("collector is stopping")
            pool = self.pools.get(address)
            if pool is None:
                pool = self.pools[address] = concurrent.futures.ThreadPoolExecutor(
                    self.per_lane, f"call-{address}")
        return pool.submit(fn, *args, queued_at=time.monotonic())

    def failed(self, address):
        self.last_failure[address] = time.monotonic()

    def failed_since(self, address, since):
        return self.last_failure.get(address, -1.0) > since

    def close(self):
        with self.lock:
            self.closed = True
            pools = list(self.pools.values())
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)


class Collector:
    def __init__(self, config):
        self.config = config
        self.db = Database(config.db)
        self.metrics = self.declare_metrics()
        self.lanes = Lanes(config.lane_workers)
        self.retry_due = threading.Event()
        self.stopping = threading.Event()
        self.advertise = config.advertise or f"{config.host}:{config.port}"

    def declare_metrics(self):
        m = Metrics("collector")
        m.declare("stop_requests_total", "counter",
                  "Stop requests, by outcome: stopped, already_stopped, not_found, "
                  "finished, rejected.")
        m.declare("stops_complete_total", "counter",
                  "Stopped tasks whose every cancel was confirmed by its executor.")
        m.declare("executor_call_seconds", "histogram",
                  "Calls to executors, by call (execute, cancel, cases) and outcome (delivered, "
                  "not_found, rejected, refused, timeout, error).")
        m.declare("executor_calls_skipped_total", "counter",
                  "Calls not sent because a call to the same executor found no answer "
                  "while they waited in its lane, by call.")
        m.declare("pending_cancels", "gauge", "Cancels not yet confirmed by an executor.",
                  gauge=lambda: self.db.one("SELECT COUNT(*) AS n FROM test_case_execution_instance"
                                            " WHERE cancel_state = 'PENDING'")["n"])
        return m

    def start(self):
        """Pick up where a previous run of this collector stopped."""
        now = time.time()
        with self.db.transaction() as c:
            # Whether an execute cut short by a restart started its case is unknown:
            # fail the instance and cancel it, which is harmless if nothing runs.
            interrupted = sum(
                move_instance(c, r, FAILED, finished_at=now, cancel_state=CANCEL_PENDING,
                              error="collector restarted during dispatch")
                for r in c.execute("SELECT * FROM test_case_execution_instance"
                                   " WHERE status = ?", (DISPATCHING,)).fetchall())
            # No attempt of ours is in flight after a restart: every lease is stale.
            resumed = c.execute("UPDATE test_case_execution_instance SET cancel_next_at = ?"
                                " WHERE cancel_state = 'PENDING'", (now,)).rowcount
        if interrupted or resumed:
            log.info("restart: %d interrupted dispatch(es) failed, %d pending cancel(s) resumed",
                     interrupted, resumed)
        for task_id in {r["collect_task_id"] for r in self.db.all(
                "SELECT collect_task_id FROM test_case_execution_instance i JOIN collect_task t"
                " ON t.id = i.collect_task_id WHERE t.status = ?", (RUNNING,))}:
            self.finish_task_if_done(task_id)
        threading.Thread(target=self.retry_forever, name="cancel-retry", daemon=True).start()

    def close(self):
        self.stopping.set()
        self.retry_due.set()
        self.lanes.close()

    def lease(self):
        """How long one attempt may be in flight before someone else may retry it."""
        return self.config.connect_timeout + self.config.read_timeout + 5

    def call_executor(self, call, address, method, path, body=None, queued_at=None,
                      timeouts=None):
        """One call to an executor, timed and counted by outcome.

        A call that waited in its executor's lane (queued_at) is not sent if a
        call to that executor found no answer meanwhile: it fails at once as
        "skipped" instead of spending another full timeout on a dead machine."""
        if queued_at is not None and self.lanes.failed_since(address, queued_at):
            self.metrics.inc("executor_calls_skipped_total", call=call)
            raise CallFailed("skipped", f"not sent: a call to {address} made meanwhile "
                             f"found no answer")
        log.debug("executor=%s %s %s: sent", address, method, path)
        started = time.monotonic()
        try:
            code, payload = call_json(address, method, path, body, self.config.token,
                                      *(timeouts or (self.config.connect_timeout,
                                                     self.config.read_timeout)))
        except CallFailed as e:
            outcome = {"refused": "refused", "error": "error"}.get(e.kind, "timeout")
            if queued_at is not None:   # a person's quick look outside the lanes skips no work
                self.lanes.failed(address)
            raise
        else:
            outcome = ("delivered" if code < 300 else "not_found" if code == 404
                       else "rejected" if code < 500 else "error")
            return code, payload
        finally:
            elapsed = time.monotonic() - started
            self.metrics.observe("executor_call_seconds", elapsed, call=call, outcome=outcome)
            log.debug("executor=%s %s %s: %s in %dms", address, method, path, outcome,
                      elapsed * 1000)

    # -- create ----------------------------------------------------------------

    def create_task(self, body):
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
            raise BadRequest(f"'name' must be a non-empty string of at most {MAX_NAME} characters")
        cases = body.get("cases")
        if not isinstance(cases, list) or not 1 <= len(cases) <= MAX_CASES:
            raise BadRequest(f"'cases' must be a list of 1 to {MAX_CASES} cases")
        specs = []
        for i, case in enumerate(cases):
            if not isinstance(case, dict):
                raise BadRequest(f"cases[{i}] must be an object with 'script' and 'args', "
                                 "or 'steps'")
            # The executor's rules, checked here so a bad case never becomes a row.
            steps = check_steps(case, f"cases[{i}].")
            # A grace beyond what executors accept would make a task that fails at start.
            limits = {k: seconds(case.get(k), f"cases[{i}].{k}", maximum, zero_ok=zero_ok)
                      for k, maximum, zero_ok in (("graceSeconds",
                                                   self.config.max_grace_seconds, True),
                                                  ("maxRuntimeSeconds", 7 * 86400, False))}
            specs.append({"steps": steps, **{k: v for k, v in limits.items() if v is not None}})
        executors = body.get("executors", self.config.executors)
        if not isinstance(executors, list) or not executors:
            raise BadRequest("'executors' must be a non-empty list of host:port "
                             "(none given and none configured)")
        for address in executors:
            check_executor_address(address)
            if self.config.executors and address not in self.config.executors:
                raise BadRequest(f"executor {address!r} is not one of this collector's "
                                 f"--executor addresses")
        now = time.time()
        with self.db.transaction() as c:
            task_id = c.execute("INSERT INTO collect_task (name, status, created_at)"
                                " VALUES (?, ?, ?)", (name.strip(), PENDING, now)).lastrowid
            for i, spec in enumerate(specs):
                first = spec["steps"][0]
                c.execute(
                    "INSERT INTO test_case_execution_instance (collect_task_id, script, args,"
                    " spec, executor, execution_task_id, report_key, status, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (task_id, first["script"], json.dumps(first["args"]), json.dumps(spec),
                     executors[i % len(executors)], f"ct{task_id}-{i}-{secrets.token_hex(4)}",
                     secrets.token_urlsafe(24), PENDING, now))
        log.info("task=%s created with %d case(s) on %s", task_id, len(cases), executors)
        return self.task_detail(task_id)

    # -- start -----------------------------------------------------------------

    def start_task(self, task_id):
        """Dispatch every PENDING instance; each execution taskId is stored before
        its execute is sent, so a stop that arrives mid-dispatch can address it."""
        with self.db.transaction() as c:
            task = self.get_task(c, task_id)
            if task["status"] == RUNNING:
                return self.task_detail(task_id), "task already running"
            if not move_task(c, task_id, RUNNING, started_at=time.time()):
                raise Conflict(f"task {task_id} is {task['status']} and cannot be started",
                               {"status": task["status"]})
            claimed = []
            for inst in c.execute("SELECT * FROM test_case_execution_instance"
                                  " WHERE collect_task_id = ? AND status = ?",
                                  (task_id, PENDING)).fetchall():
                if move_instance(c, inst, DISPATCHING):
                    claimed.append(dict(inst))
        log.info("task=%s starting %d instance(s)", task_id, len(claimed))
        futures = [self.lanes.submit(inst["executor"], self.dispatch, inst) for inst in claimed]
        # Like the stop: a hung executor must not hold the person who pressed Start.
        concurrent.futures.wait(futures, timeout=self.config.stop_wait)
        detail = self.task_detail(task_id)
        counts = detail["instanceCounts"]
        if detail["status"] == STOPPED:
            return detail, "task stopped while it was starting"
        if detail["status"] == FAILED and counts.get(FAILED) == len(detail["instances"]):
            return detail, "no instance could be dispatched; task FAILED"
        notes = [f"{n} instance(s) {what}" for n, what in (
            (counts.get(FAILED, 0), "failed to dispatch"),
            (counts.get(DISPATCHING, 0), "still being dispatched")) if n]
        return detail, "; ".join(["task started", *notes])

    def dispatch(self, inst, queued_at=None):
        body = {"taskId": inst["execution_task_id"], **json.loads(inst["spec"]),
                "reportUrl": f"http://{self.advertise}/api/execution-instance/{inst['id']}"
                             f"/report/{inst['report_key']}"}
        where = f"task={inst['collect_task_id']} instance={inst['id']} " \
                f"execution={inst['execution_task_id']} executor={inst['executor']}"
        # It may have waited in its lane behind a slow executor while the task
        # was stopped: then there is nothing to start.
        row = self.db.one("SELECT status FROM test_case_execution_instance WHERE id = ?",
                          (inst["id"],))
        if row["status"] != DISPATCHING:
            log.info("%s execute not sent: the instance is %s", where, row["status"])
            return
        log.info("%s execute sent", where)
        started = time.monotonic()
        try:
            code, payload = self.call_executor("execute", inst["executor"], "POST",
                                               "/test-case-execution/execute", body, queued_at)
        except CallFailed as e:
            # Refused or never sent: nothing started. Else it may have, so cancel it.
            log.warning("%s execute failed in %dms: %s", where,
                        int((time.monotonic() - started) * 1000), e.text)
            self.dispatch_failed(inst, f"execute failed: {e.text}",
                                 may_have_started=e.kind not in ("refused", "skipped"))
            return
        ms = int((time.monotonic() - started) * 1000)
        log.info("%s execute answered HTTP %s in %dms", where, code, ms)
        if code == 200:
            with self.db.transaction() as c:
                if move_instance(c, inst, RUNNING, started_at=time.time()):
                    return
                # Stopped while the execute was in flight: its cancel may have
                # reached the executor first and found nothing, so send another.
                row = c.execute("SELECT status FROM test_case_execution_instance"
                                " WHERE id = ?", (inst["id"],)).fetchone()
                if row["status"] == STOPPED:
                    move_cancel(c, inst, CANCEL_PENDING, cancel_next_at=time.time())
            self.retry_due.set()
        else:
            self.dispatch_failed(inst, f"executor answered HTTP {code}: {payload.get('message')}",
                                 may_have_started=code >= 500)

    def dispatch_failed(self, inst, error, may_have_started):
        with self.db.transaction() as c:
            fields = dict(finished_at=time.time(), error=error)
            if may_have_started:
                fields.update(cancel_state=CANCEL_PENDING, cancel_next_at=time.time())
            move_instance(c, inst, FAILED, **fields)
        if may_have_started:
            self.retry_due.set()
        self.finish_task_if_done(inst["collect_task_id"])

    # -- stop ------------------------------------------------------------------

    def stop_task(self, task_id, reason=None, who=None):
        """The design's stop. Returns (detail, message)."""
        deadline = time.monotonic() + self.config.stop_wait
        log.info("task=%s stop requested by %s (reason: %s)", task_id, who or "anonymous", reason)
        now = time.time()
        with self.db.transaction() as c:
            task = self.get_task(c, task_id)
            if task["status"] == STOPPED:
                return self.task_detail(task_id), "task already stopped"
            if task["status"] in (SUCCESS, FAILED):
                raise Conflict("task already finished", {"status": task["status"]})
            move_task(c, task_id, STOPPED, stopped_at=now, stopped_by=who, stop_reason=reason)
            claimed = []
            for inst in c.execute("SELECT * FROM test_case_execution_instance"
                                  " WHERE collect_task_id = ? AND status IN (?, ?, ?)",
                                  (task_id, *UNFINISHED)).fetchall():
                dispatched = inst["status"] != PENDING
                move_instance(c, inst, STOPPED, finished_at=now,
                              cancel_state=CANCEL_PENDING if dispatched else NOT_NEEDED,
                              cancel_attempts=1 if dispatched else 0,
                              cancel_next_at=now + self.lease() if dispatched else None)
                if dispatched:
                    claimed.append(dict(inst, cancel_attempts=1))
        log.info("task=%s stopped: %d cancel(s) to send", task_id, len(claimed))
        futures = [self.lanes.submit(inst["executor"], self.deliver_cancel, inst)
                   for inst in claimed]
        concurrent.futures.wait(futures, timeout=max(0, deadline - time.monotonic()))
        if not claimed:
            self.confirm_stop_if_complete(task_id)
        detail = self.task_detail(task_id)
        pending = sum(1 for i in detail["instances"] if i["cancel"]["state"] == "PENDING")
        message = "task stopped" + (f"; {pending} cancel(s) pending retry" if pending else "")
        return detail, message

    def deliver_cancel(self, inst, queued_at=None):
        """One attempt to cancel one instance on its executor; the outcome is recorded."""
        where = f"task={inst['collect_task_id']} instance={inst['id']} " \
                f"execution={inst['execution_task_id']} executor={inst['executor']}"
        attempt = inst["cancel_attempts"]
        started = time.monotonic()
        log.info("%s cancel attempt %d", where, attempt)
        try:
            code, payload = self.call_executor(
                "cancel", inst["executor"], "POST",
                f"/test-case-execution/cancel/{inst['execution_task_id']}", queued_at=queued_at)
        except CallFailed as e:
            code, payload, error = None, None, e.text
        else:
            error = None if code in (200, 404) else f"HTTP {code}: {payload.get('message')}"
        ms = int((time.monotonic() - started) * 1000)
        now = time.time()
        if code == 200:
            state, fields = DELIVERED, dict(cancel_confirmed_at=now, cancel_error=None,
                                            cancel_result=json.dumps(payload.get("data")))
        elif code == 404:
            state, fields = NOT_FOUND, dict(cancel_confirmed_at=now, cancel_error=None)
        elif code == 400:
            state, fields = FAILED, dict(cancel_error=error)     # retrying cannot help
        else:
            state, fields = CANCEL_PENDING, dict(
                cancel_error=error, cancel_next_at=now + backoff(attempt, self.config.retry_max))
        with self.db.transaction() as c:
            move_cancel(c, inst, state, only_from=(CANCEL_PENDING,), **fields)
        log_at = logging.INFO if state in (DELIVERED, NOT_FOUND) else logging.WARNING
        log.log(log_at, "%s cancel attempt %d: %s in %dms%s", where, attempt, state, ms,
                f" ({error})" if error else "")
        if state == CANCEL_PENDING:
            self.retry_due.set()    # the retrier's next wake-up depends on this outcome
        else:
            self.confirm_stop_if_complete(inst["collect_task_id"])
        return state

    def confirm_stop_if_complete(self, task_id):
        """Once no cancel of a stopped task is pending, its stop is complete: every
        executor confirmed. Recorded once (compare-and-set) and counted."""
        done = self.db.run(
            "UPDATE collect_task SET stop_confirmed_at = ? WHERE id = ? AND status = ?"
            " AND stop_confirmed_at IS NULL AND NOT EXISTS (SELECT 1 FROM"
            " test_case_execution_instance WHERE collect_task_id = ? AND cancel_state"
            " IN ('PENDING', 'FAILED'))", (time.time(), task_id, STOPPED, task_id))
        if done:
            self.metrics.inc("stops_complete_total")
            log.info("task=%s stop complete: every cancel confirmed", task_id)

    def retry_forever(self):
        """Send every due PENDING cancel; one attempt per instance at a time (a lease)."""
        while not self.stopping.is_set():
            now = time.time()
            due = self.db.all("SELECT * FROM test_case_execution_instance"
                              " WHERE cancel_state = 'PENDING' AND cancel_next_at <= ?", (now,))
            for inst in due:
                claimed = self.db.run(
                    "UPDATE test_case_execution_instance SET cancel_attempts ="
                    " cancel_attempts + 1, cancel_next_at = ? WHERE id = ?"
                    " AND cancel_state = 'PENDING' AND cancel_next_at <= ?",
                    (now + self.lease(), inst["id"], now))
                if claimed:
                    inst["cancel_attempts"] += 1
                    try:
                        self.lanes.submit(inst["executor"], self.deliver_cancel, inst)
                    except RuntimeError:     # lanes closed: we are stopping
                        return
            nxt = self.db.one("SELECT MIN(cancel_next_at) AS t FROM test_case_execution_instance"
                              " WHERE cancel_state = 'PENDING'")["t"]
            wait = 5.0 if nxt is None else min(5.0, max(0.05, nxt - time.time()))
            self.retry_due.wait(wait)
            self.retry_due.clear()

    # -- reports from executors --------------------------------------------------

    def report(self, instance_id, key, body):
        # The key first: who has not got it learns nothing, not even what a body needs.
        # It went only to the executor this instance was dispatched to, so nobody
        # who can merely read the task can mark it finished.
        inst = self.db.one("SELECT report_key FROM test_case_execution_instance WHERE id = ?",
                           (instance_id,))
        if inst is None or not hmac.compare_digest(inst["report_key"].encode(), key.encode()):
            raise NotFound(f"instance {instance_id} with that report key not found")
        execution_task_id = body.get("executionTaskId")
        status, exit_code = body.get("status"), body.get("exitCode")
        if status not in (SUCCESS, FAILED, "CANCELLED", "TIMEOUT"):
            raise BadRequest("'status' must be SUCCESS, FAILED, CANCELLED or TIMEOUT")
        if exit_code is not None and (not isinstance(exit_code, int) or isinstance(exit_code, bool)
                                      or not -2**31 <= exit_code < 2**31):
            raise BadRequest("'exitCode' must be a 32-bit integer or null")
        if not isinstance(execution_task_id, str):
            raise BadRequest("'executionTaskId' must be a string")
        note = body.get("note")
        note = note[:2000] if isinstance(note, str) else None
        steps = report_steps(body.get("steps"))
        if status == "TIMEOUT":
            note = "timeout" + (f": {note}" if note else "")
        with self.db.transaction() as c:
            inst = c.execute("SELECT * FROM test_case_execution_instance WHERE id = ?",
                             (instance_id,)).fetchone()
            if inst["execution_task_id"] != execution_task_id:
                raise Conflict("executionTaskId does not match this instance")
            to = {"CANCELLED": STOPPED, "TIMEOUT": FAILED}.get(status, status)
            changed = move_instance(c, inst, to, exit_code=exit_code,
                                    finished_at=time.time(), error=note)
            # Whatever the instance's state, keep what the executor says of each step
            # (a cleanup step's outcome after a stop); a report without steps keeps
            # the ones an earlier report gave.
            if steps is not None:
                c.execute("UPDATE test_case_execution_instance SET steps = ? WHERE id = ?",
                          (steps, instance_id))
        if changed:
            log.info("task=%s instance=%s reported %s exit=%s", inst["collect_task_id"],
                     instance_id, to, exit_code)
            self.finish_task_if_done(inst["collect_task_id"])
        else:
            log.info("task=%s instance=%s late report %s ignored (instance is %s)",
                     inst["collect_task_id"], instance_id, status, inst["status"])
        return {"changed": changed, "status": to if changed else inst["status"]}

    def finish_task_if_done(self, task_id):
        """A RUNNING task whose instances have all ended becomes SUCCESS or FAILED."""
        with self.db.transaction() as c:
            rows = c.execute("SELECT status, COUNT(*) AS n FROM test_case_execution_instance"
                             " WHERE collect_task_id = ? GROUP BY status", (task_id,)).fetchall()
            counts = {r["status"]: r["n"] for r in rows}
            if any(counts.get(s) for s in UNFINISHED):
                return
            to = SUCCESS if set(counts) <= {SUCCESS} else FAILED
            if move_task(c, task_id, to, finished_at=time.time()):
                log.info("task=%s finished %s", task_id, to)

    # -- queries ---------------------------------------------------------------

    def person_timeouts(self):
        """For calls a person waits on, made outside the lanes (a lane may be busy
        with cancels to a hung machine): short, and never above the configured."""
        return min(2.0, self.config.connect_timeout), min(5.0, self.config.read_timeout)

    def case_log(self, instance_id, query):
        """An instance's case log, fetched from its executor with the executor token,
        so the page needs neither the token nor a route to the lab machine."""
        inst = self.db.one("SELECT * FROM test_case_execution_instance WHERE id = ?",
                           (instance_id,))
        if inst is None:
            raise NotFound(f"instance {instance_id} not found")
        if inst["status"] == PENDING:
            raise NotFound(f"instance {instance_id} has not run: no log yet")
        path = f"/test-case-execution/log/{inst['execution_task_id']}?{urlencode(query)}"
        try:
            code, payload = self.call_executor("log", inst["executor"], "GET", path,
                                               timeouts=self.person_timeouts())
        except CallFailed as e:
            raise BadGateway(f"executor {inst['executor']} did not answer: {e.text}")
        if code in (400, 404):      # what the caller asked for is wrong or gone
            raise ApiError(payload.get("message"), payload.get("data"), status=code)
        if code != 200:
            raise BadGateway(f"executor {inst['executor']} answered HTTP {code}: "
                             f"{payload.get('message')}")
        return payload["data"]

    def executors(self):
        """The configured executors, whether they answer, and the cases each offers."""
        timeouts = self.person_timeouts()

        def ask(address):
            try:
                code, payload = self.call_executor("cases", address, "GET",
                                                   "/test-case-execution/cases",
                                                   timeouts=timeouts)
            except CallFailed as e:
                return {"address": address, "reachable": False, "error": e.text, "cases": []}
            ok = code == 200
            return {"address": address, "reachable": ok, "cases": payload["data"] if ok else [],
                    "error": None if ok else f"HTTP {code}: {payload.get('message')}"}
        if not self.config.executors:
            return []
        with concurrent.futures.ThreadPoolExecutor(len(self.config.executors)) as pool:
            return list(pool.map(ask, self.config.executors))

    def get_task(self, conn, task_id):
        row = conn.execute("SELECT * FROM collect_task WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise NotFound(f"collect task {task_id} not found")
        return dict(row)

    def task_detail(self, task_id):
        task = self.get_task(self.db.conn(), task_id)
        instances = self.db.all("SELECT * FROM test_case_execution_instance"
                                " WHERE collect_task_id = ? ORDER BY id", (task_id,))
        out = public_task(task, count_by_status(instances))
        out["instances"] = [public_instance(i) for i in instances]
        return out

    def list_tasks(self, limit):
        tasks = self.db.all("SELECT * FROM collect_task ORDER BY id DESC LIMIT ?", (limit,))
        if not tasks:
            return []
        marks = ", ".join("?" * len(tasks))
        counts = {}
        for r in self.db.all(f"SELECT collect_task_id AS t, status, COUNT(*) AS n"
                             f" FROM test_case_execution_instance WHERE collect_task_id"
                             f" IN ({marks}) GROUP BY t, status", [t["id"] for t in tasks]):
            counts.setdefault(r["t"], {})[r["status"]] = r["n"]
        return [public_task(t, counts.get(t["id"], {})) for t in tasks]


def count_by_status(instances):
    counts = {}
    for i in instances:
        counts[i["status"]] = counts.get(i["status"], 0) + 1
    return counts


def public_task(t, counts):
    return {"id": t["id"], "name": t["name"], "status": t["status"],
            "createdAt": t["created_at"], "startedAt": t["started_at"],
            "finishedAt": t["finished_at"], "stoppedAt": t["stopped_at"],
            "stopConfirmedAt": t["stop_confirmed_at"],
            "stoppedBy": t["stopped_by"], "stopReason": t["stop_reason"],
            "instanceCounts": counts}


def public_instance(i):
    return {
        "id": i["id"], "script": i["script"], "args": json.loads(i["args"]),
        "spec": json.loads(i["spec"]), "steps": json.loads(i["steps"]) if i["steps"] else None,
        "executor": i["executor"], "executionTaskId": i["execution_task_id"],
        "status": i["status"], "exitCode": i["exit_code"], "error": i["error"],
        "createdAt": i["created_at"], "startedAt": i["started_at"],
        "finishedAt": i["finished_at"],
        "logUrl": f"/api/execution-instance/{i['id']}/log" if i["status"] != PENDING else None,
        "cancel": {"state": i["cancel_state"], "attempts": i["cancel_attempts"],
                   "error": i["cancel_error"], "confirmedAt": i["cancel_confirmed_at"],
                   "nextAttemptAt": i["cancel_next_at"] if i["cancel_state"] == "PENDING" else None,
                   "result": json.loads(i["cancel_result"]) if i["cancel_result"] else None},
    }


def report_steps(steps):
    """A report's steps as the JSON text to store, or None when it carries none.

    Stored whole (the request body is capped already): a cut would store
    invalid JSON, and every read of the task would fail on it from then on."""
    if steps is None:
        return None
    if (not isinstance(steps, list) or len(steps) > MAX_REPORT_STEPS
            or not all(isinstance(s, dict) for s in steps)):
        raise BadRequest(f"'steps' must be null or a list of at most {MAX_REPORT_STEPS} "
                         "objects")
    for i, step in enumerate(steps):
        for name, value in step.items():
            kinds = REPORT_STEP_FIELDS.get(name)
            if kinds is None:
                raise BadRequest(f"steps[{i}] has an unknown field {name[:50]!r}; known: "
                                 f"{', '.join(REPORT_STEP_FIELDS)}")
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise BadRequest(f"steps[{i}].{name} has the wrong type")
    return json.dumps(steps)


def check_executor_address(address):
    m = EXECUTOR_ADDRESS_RE.fullmatch(address) if isinstance(address, str) else None
    if not m or not 1 <= int(m.group(1)) <= 65535:
        raise BadRequest(f"executor address {address!r} must be host:port with a port 1-65535")
    return address


def positive_id(value, what="id"):
    if not re.fullmatch(r"[0-9]{1,18}", value or "") or int(value) < 1:
        raise BadRequest(f"{what} must be a positive integer, got {value!r}")
    return int(value)


###############################################################################
# HTTP routes ##################################################################
###############################################################################

def make_app(config):
    """The collector's bottle app; app.config['collector'] is the running service."""
    service = Collector(config)
    app = make_bottle("collector", service.metrics)
    app.config["collector"] = service
    executor_tokens = {"executor": config.token} if config.token else {}
    caller = lambda: require_token(config.api_tokens)    # noqa: E731

    @app.post("/api/collect-task")
    def create():
        caller()
        bottle.response.status = 201
        return envelope(201, "task created", service.create_task(json_body()))

    @app.get("/api/collect-task")
    def list_tasks():
        limit = bottle.request.query.get("limit", "100")
        return envelope(200, "ok", service.list_tasks(min(positive_id(limit, "limit"), 1000)))

    @app.get("/api/collect-task/<task_id>")
    def detail(task_id):
        return envelope(200, "ok", service.task_detail(positive_id(task_id, "task id")))

    @app.post("/api/collect-task/<task_id>/start")
    def start(task_id):
        caller()
        task_id = positive_id(task_id, "task id")
        json_body()
        detail, message = service.start_task(task_id)
        return envelope(200, message, detail)

    @app.post("/api/collect-task/<task_id>/stop")
    def stop(task_id):
        try:        # every stop request is counted, refused ones too
            token_name = caller()
            task_id = positive_id(task_id, "task id")
            body = json_body()
            reason = body.get("reason")
            if reason is not None and (not isinstance(reason, str) or len(reason) > 1000):
                raise BadRequest("'reason' must be a string of at most 1000 characters")
            who = header_text("X-User") or token_name
            detail, message = service.stop_task(task_id, reason, who)
        except ApiError as e:
            outcome = {404: "not_found", 409: "finished"}.get(e.status_code, "rejected")
            service.metrics.inc("stop_requests_total", outcome=outcome)
            raise
        outcome = "already_stopped" if message == "task already stopped" else "stopped"
        service.metrics.inc("stop_requests_total", outcome=outcome)
        return envelope(200, message, detail)

    @app.post("/api/execution-instance/<instance_id>/report/<key>")
    def report(instance_id, key):
        require_token(executor_tokens)      # only an executor may report
        instance_id = positive_id(instance_id, "instance id")
        return envelope(200, "report recorded", service.report(instance_id, key, json_body()))

    @app.get("/api/execution-instance/<instance_id>/log")
    def case_log(instance_id):
        instance_id = positive_id(instance_id, "instance id")
        # Passed on encoded; the executor checks them and its 400 comes back as is.
        query = {name: value for name in ("offset", "limit", "step")
                 if (value := bottle.request.query.get(name)) is not None}
        return envelope(200, "ok", service.case_log(instance_id, query))

    @app.get("/api/executors")
    def executors():
        return envelope(200, "ok", service.executors())

    @app.get("/")
    def page():
        return bottle.static_file("collector.html", root=HERE)

    @app.get("/metrics")
    def metrics():
        return serve_metrics(service.metrics)

    @app.get("/health")
    def health():
        return envelope(200, "ok", {"service": "collector", "pid": os.getpid()})

    return app


###############################################################################
# main #########################################################################
###############################################################################

def parse_args(argv, defaults=CollectorConfig()):
    env = os.environ.get
    p = argparse.ArgumentParser(description="DataCollectService: collect tasks and Stop.")
    p.add_argument("--host", default=env("COLLECTOR_HOST", defaults.host))
    p.add_argument("--port", type=PORT, default=env("COLLECTOR_PORT", str(defaults.port)))
    p.add_argument("--db", default=env("COLLECTOR_DB", defaults.db), help="SQLite file")
    p.add_argument("--executor", action="append", default=[], metavar="HOST:PORT",
                   help="an executor cases may run on (repeatable)")
    p.add_argument("--connect-timeout", type=POSITIVE_SECONDS, default=defaults.connect_timeout,
                   help="seconds to connect to an executor (default 10)")
    p.add_argument("--read-timeout", type=POSITIVE_SECONDS, default=defaults.read_timeout,
                   help="seconds to wait for an executor's answer (default 30)")
    p.add_argument("--stop-wait", type=SECONDS, default=defaults.stop_wait,
                   help="the stop and start APIs answer within this many seconds (default 3)")
    p.add_argument("--retry-max", type=POSITIVE_SECONDS, default=defaults.retry_max,
                   help="cap of the backoff between attempts of a pending cancel (default 30)")
    p.add_argument("--lane-workers", type=COUNT, default=defaults.lane_workers,
                   help="calls in flight to one executor at a time (default 16); each "
                        "executor has its own, so a hung one never holds up the others")
    p.add_argument("--max-grace-seconds", type=SECONDS, default=defaults.max_grace_seconds,
                   help="the largest graceSeconds a case may ask for (default 60); keep it "
                        "at most the executors' own --max-grace-seconds")
    p.add_argument("--advertise", default="",
                   help="host:port executors use to reach this collector (default host:port)")
    p.add_argument("--token", default=env(TOKEN_ENV, ""),
                   help=f"shared with the executors: sent to them, required on their reports "
                        f"(prefer ${TOKEN_ENV}: arguments are visible in ps)")
    p.add_argument("--api-token", default=env("COLLECTOR_API_TOKENS", ""),
                   help="require a bearer token on create/start/stop: 'secret' or "
                        "'name:secret,name:secret' (prefer $COLLECTOR_API_TOKENS)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without tokens")
    p.add_argument("--log-level", default=env("COLLECTOR_LOG_LEVEL", "INFO"))
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    a = p.parse_args(argv)
    if not (a.token and a.api_token) and not a.insecure and not is_loopback(a.host):
        p.error(f"refusing to listen on {a.host} without --token and --api-token (or "
                f"${TOKEN_ENV} and $COLLECTOR_API_TOKENS): anyone who can reach it could "
                "start, stop or finish tasks. Pass --insecure if the network is trusted.")
    if a.host in ("0.0.0.0", "::", "[::]") and not a.advertise:
        p.error(f"--host {a.host} needs --advertise HOST:PORT: the address executors "
                "report back to")
    executors = a.executor or [e for e in env("COLLECTOR_EXECUTORS", "").split(",") if e]
    for address in executors:
        try:
            check_executor_address(address)
        except BadRequest as e:
            p.error(f"--executor: {e.message}")
    config = CollectorConfig(
        host=a.host, port=a.port, db=a.db, executors=executors,
        connect_timeout=a.connect_timeout, read_timeout=a.read_timeout,
        stop_wait=a.stop_wait, retry_max=a.retry_max, advertise=a.advertise,
        lane_workers=a.lane_workers, max_grace_seconds=a.max_grace_seconds,
        token=a.token, api_tokens=parse_tokens(a.api_token, "api"))
    return config, a


def main(argv=None):
    config, opts = parse_args(argv)
    setup_logging(opts.log_level, opts.log_format)
    app = make_app(config)
    service = app.config["collector"]
    server = make_server(app, config.host, config.port)
    service.start()
    log.info("collector listening on http://%s:%s executors=%s", config.host,
             server.server_port, config.executors)
    run_server(server, on_stop=service.close)
    return 0


if __name__ == "__main__":
    sys.exit(main())
