import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from support import (ROOT, TEST_RUN, TEST_RUN_ENV, Service, free_port, kill_marked,  # noqa: E402
                     remove_cgroups)

DEFAULT_TIMEOUT = 60


def pytest_collection_modifyitems(items):
    """Every test is bounded, however pytest is invoked."""
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    """The run leaves no process behind: whatever carries its marker at the end is a leak."""
    yield
    leaked = kill_marked(TEST_RUN_ENV, TEST_RUN)
    if leaked:
        pytest.fail(f"the test run left {len(leaked)} process(es) behind: "
                    f"{[p.pid for p in leaked]}", pytrace=False)


@pytest.fixture
def start_executor(tmp_path):
    """start_executor(host='127.0.0.1', grace=1, *extra_args) -> a running executor.

    Its cases are taken from the repository, so scripts are 'fake_case.py' and
    'cases/...'. Each executor's processes carry their own marker, so teardown
    ends exactly what this test started even when cases outlive the executor."""
    started = []

    def start(host="127.0.0.1", grace=1.0, args=(), port=None, name=None, db=None,
              cases_dir=ROOT, env=None, preexec=None):
        name = name or f"executor{len(started)}"
        owner = f"{TEST_RUN}-{os.path.basename(str(tmp_path))}-{name}"
        base = tmp_path / name
        base.mkdir(exist_ok=True)
        svc = Service(
            "executor.py", host, port or free_port(host),
            ["--cases-dir", str(cases_dir), "--db", db or str(base / "executor.db"),
             "--log-dir", str(base / "logs"), "--work-dir", str(base / "work"),
             "--grace-seconds", str(grace), *args],
            str(base / "service.log"), env={"CASE_TEST_OWNER": owner, **(env or {})},
            preexec=preexec)
        svc.owner = owner
        svc.db = db or str(base / "executor.db")
        started.append(svc)
        svc.start()
        svc.cgroups = svc.call("GET", "/health")[1]["data"]["cgroups"]
        return svc

    yield start
    for svc in started:
        svc.stop()
    for svc in started:
        kill_marked("CASE_TEST_OWNER", svc.owner)
        remove_cgroups(svc.cgroups)


@pytest.fixture
def pid_file(tmp_path):
    counter = iter(range(1000))
    return lambda: str(tmp_path / f"pids-{next(counter)}.json")



@pytest.fixture
def start_collector(tmp_path):
    """start_collector(executors, *extra_args) -> a running collector on 127.0.0.1.

    Short timeouts and retry cap for tests; the documented defaults are tested
    separately."""
    started = []

    def start(executors=(), args=(), port=None, db=None, connect_timeout=1.0,
              read_timeout=3.0, stop_wait=3.0, retry_max=0.5, env=None):
        name = f"collector{len(started)}"
        base = tmp_path / name
        base.mkdir(exist_ok=True)
        port = port or free_port()
        executor_args = [a for e in executors for a in ("--executor", e)]
        svc = Service(
            "collector.py", "127.0.0.1", port,
            ["--db", db or str(base / "collector.db"), *executor_args,
             "--connect-timeout", str(connect_timeout), "--read-timeout", str(read_timeout),
             "--stop-wait", str(stop_wait), "--retry-max", str(retry_max), *args],
            str(base / "service.log"), env=env)
        svc.db = db or str(base / "collector.db")
        started.append(svc)
        return svc.start()

    yield start
    for svc in started:
        svc.stop()


@pytest.fixture
def two_machines(start_executor):
    """Executors on 127.0.0.2 and 127.0.0.3, as on two lab machines."""
    return [start_executor(host="127.0.0.2", name="lab2"),
            start_executor(host="127.0.0.3", name="lab3")]
