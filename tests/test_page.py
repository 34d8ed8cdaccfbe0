"""The task list page (collector.html) in a real browser: headless Chromium
driven by selenium, against a real collector and a real executor.

Needs Debian's chromium and chromium-driver (`.ci/run` installs them) and the
selenium package (requirements-dev.txt); without them this test is skipped and
says why. Selenium is given /usr/bin/chromedriver, so it never downloads one."""

import importlib.util
import os
import shutil

import psutil
import pytest

from support import ROOT, detail, read_pid_file, wait_gone, wait_pid_file, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
SCREENSHOT = os.path.join(ARTIFACTS, "page.png")
# Without these Chromium stalls on a closed network (or as root).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000")


def missing_browser():
    """Why the browser test cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return (f"{path} not found: install Debian's chromium and chromium-driver "
                    f"(.ci/run does) to run the browser test")
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed: pip install -r requirements-dev.txt"
    return None


@pytest.fixture
def browser(tmp_path, capsys):
    """A headless Chromium; quit, with every process it started gone, at teardown."""
    reason = missing_browser()
    if reason:
        with capsys.disabled():     # printed even without -rs
            print(f"\nSKIPPED browser test: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        # Chromium's processes carry this run's marker: none may outlive the test.
        try:
            spawned = psutil.Process(service.process.pid).children(recursive=True)
        except psutil.Error:
            spawned = []
        driver.quit()
        gone, alive = psutil.wait_procs(spawned, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def screenshot_on_failure(browser, request):
    """test-artifacts/page-failure.png when the test fails."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        os.makedirs(ARTIFACTS, exist_ok=True)
        try:
            browser.save_screenshot(os.path.join(ARTIFACTS, "page-failure.png"))
        except Exception:       # the browser itself may be what failed
            pass


# -- page helpers ---------------------------------------------------------------

def by_css(driver, css):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.CSS_SELECTOR, css)


def all_css(driver, css):
    from selenium.webdriver.common.by import By
    return driver.find_elements(By.CSS_SELECTOR, css)


def task_cell(driver, task_id, css):
    return by_css(driver, f'tbody[data-task-id="{task_id}"] {css}')


def wait_page(driver, predicate, timeout, message):
    """Poll the page; a stale or missing element just means 'not yet'."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    def check():
        try:
            return predicate()
        except (NoSuchElementException, StaleElementReferenceException, IndexError):
            return False
    try:
        return wait_until(check, timeout, 0.1, message)
    except AssertionError:
        errors = [e.text for e in all_css(driver, "#messages li.error, #form-error") if e.text]
        raise AssertionError(f"timed out after {timeout}s waiting for {message}; "
                             f"errors on the page: {errors}") from None


def task_status(driver, task_id):
    return task_cell(driver, task_id, "tr.summary .status").text


def script_errors(driver):
    """The page's JavaScript errors (an HTTP error status the page shows is no error)."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]


def stop_requests(col):
    """Stop requests the collector counted, from /metrics."""
    code, text = col.call("GET", "/metrics")
    assert code == 200
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("collector_stop_requests_total{"))


# -- the test ---------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_page_create_start_stop_in_a_real_browser(
        start_executor, start_collector, pid_file, browser, screenshot_on_failure):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    ex = start_executor(host="127.0.0.2", name="lab2")
    col = start_collector([ex.address])
    driver = browser
    driver.get(f"http://{col.address}/")

    # Identity: the name goes with the stop as X-User.
    by_css(driver, "#user-name").send_keys("alice")

    # The new-task form lists the executor and the scripts it offers.
    box = wait_page(driver, lambda: by_css(driver, f'input[name=executor][value="{ex.address}"]'),
                    30, "the executor in the form")
    assert box.is_selected()
    wait_page(driver, lambda: by_css(driver, ".case-row select.case-script"), 10,
              "the script list")

    # Two cases; the second ignores SIGTERM, so its cancel takes the 1 s grace and
    # the page has time to show "stopping…".
    paths = [pid_file(), pid_file()]
    args = [["--children", "2", "--pid-file", paths[0]],
            ["--children", "2", "--ignore-sigterm", "--pid-file", paths[1]]]
    by_css(driver, "#new-task-name").send_keys("browser stop")
    for i, case_args in enumerate(args):
        if i:
            by_css(driver, "#add-case").click()
        row = all_css(driver, ".case-row")[i]
        Select(by_css(row, "select.case-script")).select_by_value("fake_case.py")
        by_css(row, ".case-args").send_keys(" ".join(case_args))
    by_css(driver, "#create-task").click()

    # The task appears, newest first, PENDING; Start it from its row.
    first = wait_page(driver, lambda: all_css(driver, "#tasks tbody.task")[0], 10, "the task row")
    task_id = int(first.get_attribute("data-task-id"))
    wait_page(driver, lambda: task_status(driver, task_id) == "PENDING", 10, "PENDING")
    assert task_cell(driver, task_id, ".name").text == "browser stop"
    created = detail(col, task_id)
    assert [(i["script"], i["args"]) for i in created["instances"]] == [
        ("fake_case.py", a) for a in args]
    assert [i["executor"] for i in created["instances"]] == [ex.address] * 2

    task_cell(driver, task_id, ".btn-start").click()
    wait_page(driver, lambda: task_status(driver, task_id) == "RUNNING", 20, "RUNNING")
    entries = [e for p in paths for e in wait_pid_file(p, 3)]
    wait_page(driver, lambda: "RUNNING 2" in task_cell(driver, task_id, ".counts").text, 10,
              "both instances RUNNING")
    assert all(psutil.pid_exists(pid) for pid, _ in entries)
    assert stop_requests(col) == 0

    # Stop: a double click opens one dialog, a double click on Confirm sends one stop.
    stop_button = task_cell(driver, task_id, ".btn-stop")
    assert stop_button.is_enabled()
    ActionChains(driver).double_click(stop_button).perform()
    dialog = wait_page(driver, lambda: (d := by_css(driver, "#stop-dialog")).is_displayed() and d,
                       5, "the stop dialog")
    assert f"Stop task {task_id}?" in dialog.text
    by_css(driver, "#stop-reason").send_keys("wrong rig")
    ActionChains(driver).double_click(by_css(driver, "#stop-confirm")).perform()
    wait_page(driver, lambda: (b := task_cell(driver, task_id, ".btn-stop")).text == "stopping…"
              and not b.is_enabled(), 5, '"stopping…" while the stop runs')
    assert not by_css(driver, "#stop-dialog").is_displayed()

    wait_page(driver, lambda: task_status(driver, task_id) == "STOPPED", 20, "STOPPED")
    wait_gone(entries, timeout=15)
    assert entries == [e for p in paths for e in read_pid_file(p)]   # nothing new started

    # Per-instance outcome, in words; who stopped it and why; the Stop button disabled.
    outcome = wait_page(
        driver, lambda: (items := all_css(driver, f'tbody[data-task-id="{task_id}"] '
                                                  '.outcome .cancel-outcome'))
        and len(items) == 2 and all(i.text.startswith("delivered") for i in items) and items,
        15, "both cancels delivered")
    assert [i.text for i in outcome] == [
        "delivered: 3 process(es) signalled, 3 ended on SIGTERM, 0 killed, 0 survivor(s)",
        "delivered: 3 process(es) signalled, 0 ended on SIGTERM, 3 killed, 0 survivor(s)"]
    assert task_cell(driver, task_id, ".stopped-by").text == "alice: wrong rig"
    assert "stopped " in task_cell(driver, task_id, ".ended").text
    assert not task_cell(driver, task_id, ".btn-stop").is_enabled()
    assert "Stopped at" in task_cell(driver, task_id, ".stop-summary").text
    assert not all_css(driver, "#messages li.error"), \
        [e.text for e in all_css(driver, "#messages li.error")]

    stopped = detail(col, task_id)
    assert (stopped["status"], stopped["stoppedBy"], stopped["stopReason"]) == \
        ("STOPPED", "alice", "wrong rig")
    assert [i["cancel"]["state"] for i in stopped["instances"]] == ["DELIVERED"] * 2
    assert stop_requests(col) == 1, "the double clicks sent more than one stop"

    # Instances in the detail: executor, execution taskId, cancel state, a log link.
    rows = all_css(driver, f'tbody[data-task-id="{task_id}"] table.instances tbody tr')
    assert len(rows) == 2
    for row, inst in zip(rows, stopped["instances"]):
        assert by_css(row, ".executor").text == ex.address
        assert by_css(row, ".execution").text == inst["executionTaskId"]
        assert by_css(row, ".cancel").text.startswith("DELIVERED, 1 attempt(s)")
        log_link = by_css(row, ".log a").get_attribute("href")
        assert log_link == f"http://{col.address}{inst['logUrl']}"

    # An API error is shown in words: Start on the stopped task, forced through the page.
    driver.execute_script("startTask(arguments[0])", task_id)
    wait_page(driver, lambda: any("409" in e.text and "cannot be started" in e.text
                                  for e in all_css(driver, "#messages li.error")),
              10, "the 409 shown as a message")
    for close in all_css(driver, "#messages li.error button"):
        close.click()

    assert not script_errors(driver)

    os.makedirs(ARTIFACTS, exist_ok=True)
    driver.save_screenshot(SCREENSHOT)
    with open(SCREENSHOT, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("UPDATE_DOCS_SCREENSHOT"):
        shutil.copy(SCREENSHOT, os.path.join(ROOT, "docs", "page.png"))


@pytest.mark.timeout(120)
def test_page_with_api_token_and_a_cancel_pending_retry(
        start_executor, start_collector, pid_file, browser, screenshot_on_failure):
    """With COLLECTOR_API_TOKENS the page says why it is refused until a token is
    given; a stop while the executor is down shows 'pending retry' with the error,
    and turns into 'delivered' by itself once the executor is back."""
    from selenium.webdriver.support.ui import Select

    lab = start_executor(host="127.0.0.2", name="lab2")
    col = start_collector([lab.address], env={"COLLECTOR_API_TOKENS": "alice:key-a"})
    driver = browser
    driver.get(f"http://{col.address}/")
    wait_page(driver, lambda: by_css(driver, '.case-row select.case-script option[value="fake_case.py"]'),
              30, "the script list")

    path = pid_file()
    by_css(driver, "#new-task-name").send_keys("needs a token")
    Select(by_css(driver, ".case-row select.case-script")).select_by_value("fake_case.py")
    by_css(driver, ".case-row .case-args").send_keys(f"--pid-file {path} --children 1")
    by_css(driver, "#create-and-start").click()
    wait_page(driver, lambda: "HTTP 401" in by_css(driver, "#form-error").text
              and "API token" in by_css(driver, "#form-error").text, 10, "the 401 in words")
    assert not all_css(driver, "#tasks tbody.task")

    by_css(driver, "#api-token").send_keys("key-a")
    by_css(driver, "#create-and-start").click()
    first = wait_page(driver, lambda: all_css(driver, "#tasks tbody.task")[0], 10, "the task row")
    task_id = int(first.get_attribute("data-task-id"))
    wait_page(driver, lambda: task_status(driver, task_id) == "RUNNING", 20, "RUNNING")
    entries = wait_pid_file(path, 2)

    lab.kill9()                                 # the case keeps running without its executor
    task_cell(driver, task_id, ".btn-stop").click()
    by_css(driver, "#stop-confirm").click()     # no name: the token's name is recorded
    wait_page(driver, lambda: task_status(driver, task_id) == "STOPPED", 20, "STOPPED")
    pending = wait_page(
        driver, lambda: (o := task_cell(driver, task_id, ".outcome .cancel-outcome")).text
        .startswith("pending retry") and o.text, 10, "pending retry")
    assert "refused" in pending, pending
    assert task_cell(driver, task_id, ".stopped-by").text == "alice"
    assert any("pending retry" in m.text for m in all_css(driver, "#messages li"))
    assert all(psutil.pid_exists(pid) for pid, _ in entries)

    lab.start()                                 # back: the retry delivers, the page follows
    wait_page(driver, lambda: task_cell(driver, task_id, ".outcome .cancel-outcome").text
              .startswith("delivered"), 30, "the retried cancel delivered")
    wait_gone(entries, timeout=15)
    wait_page(driver, lambda: "every executor confirmed" in
              task_cell(driver, task_id, ".stop-summary").text, 10, "the stop confirmed")
    assert not script_errors(driver)
