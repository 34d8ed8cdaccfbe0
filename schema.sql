-- One schema for both services, applied at start with executescript.
-- The executor uses `execution`; the collector uses `collect_task` and
-- `test_case_execution_instance`. Each service normally has its own file.
-- Times are Unix seconds (REAL); states are changed only by compare-and-set.

PRAGMA journal_mode = WAL;

-- Executor: one row per execution taskId it was asked to run.
CREATE TABLE IF NOT EXISTS execution (
    task_id          TEXT PRIMARY KEY,
    run_marker       TEXT NOT NULL,                  -- CASE_EXEC_RUN in every case process
    script           TEXT NOT NULL,
    args             TEXT NOT NULL DEFAULT '[]',     -- JSON list
    status           TEXT NOT NULL,                  -- RUNNING CANCELLING CANCELLED SUCCESS FAILED
    root_pid         INTEGER,
    root_create_time REAL,                           -- with root_pid: the process identity
    cgroup           TEXT,                           -- the case's own cgroup v2, if any
    exit_code        INTEGER,
    log_path         TEXT,
    report_url       TEXT,                           -- where the collector wants the outcome
    report_state     TEXT NOT NULL DEFAULT 'NONE',   -- NONE PENDING DELIVERED REJECTED
    report_attempts  INTEGER NOT NULL DEFAULT 0,
    report_error     TEXT,
    stop_result      TEXT,                           -- JSON of the last tree stop
    note             TEXT,
    steps            TEXT NOT NULL DEFAULT '[]',     -- JSON: each step's spec and state
    grace_seconds    REAL,
    max_runtime_seconds REAL,
    created_at       REAL NOT NULL,
    finished_at      REAL
);
CREATE INDEX IF NOT EXISTS execution_status ON execution(status);

-- Collector: a collect task and its case-execution instances.
CREATE TABLE IF NOT EXISTS collect_task (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,
    status      TEXT NOT NULL DEFAULT 'PENDING',     -- PENDING RUNNING STOPPED SUCCESS FAILED
    created_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    stopped_at  REAL,
    stop_confirmed_at REAL,                          -- every cancel confirmed by its executor
    stopped_by  TEXT,
    stop_reason TEXT
);

CREATE TABLE IF NOT EXISTS test_case_execution_instance (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    collect_task_id     INTEGER NOT NULL REFERENCES collect_task(id),
    script              TEXT NOT NULL,
    args                TEXT NOT NULL DEFAULT '[]',  -- JSON list (of the first step)
    spec                TEXT NOT NULL DEFAULT '{}',  -- JSON sent to the executor: steps, limits
    steps               TEXT,                        -- JSON: each step's outcome, as reported
    executor            TEXT NOT NULL,               -- host:port
    execution_task_id   TEXT NOT NULL UNIQUE,
    report_key          TEXT NOT NULL,               -- secret in the reportUrl: only its executor can report
    status              TEXT NOT NULL DEFAULT 'PENDING', -- PENDING DISPATCHING RUNNING STOPPED SUCCESS FAILED
    exit_code           INTEGER,
    error               TEXT,                        -- why it FAILED without an exit code
    created_at          REAL NOT NULL,
    started_at          REAL,
    finished_at         REAL,
    -- The cancel sent to the executor on stop; PENDING ones are retried.
    cancel_state        TEXT NOT NULL DEFAULT 'NOT_NEEDED', -- NOT_NEEDED PENDING DELIVERED NOT_FOUND FAILED
    cancel_attempts     INTEGER NOT NULL DEFAULT 0,
    cancel_error        TEXT,
    cancel_next_at      REAL,                        -- next attempt; also a lease while one is in flight
    cancel_confirmed_at REAL,
    cancel_result       TEXT                         -- JSON the executor answered
);
CREATE INDEX IF NOT EXISTS instance_task ON test_case_execution_instance(collect_task_id);
CREATE INDEX IF NOT EXISTS instance_cancel ON test_case_execution_instance(cancel_state, cancel_next_at);
