"""The dashboards of a search, checked in a real browser, as a person would see them.

The suite's Ray head (conftest's ``head``: `ray start --head`, token authentication) runs a
2-trial rectangle search submitted with `ray job submit`, exactly as the README says, beside
two single jobs (ray_head.suite_jobs, shared with test_job_submit.py); then
headless Chromium (Debian's `chromium` and `chromium-driver`, driven through Selenium) opens

* the Ray dashboard, signing in with the cluster's token in the dashboard's own dialog: the
  job list and the job's page (status SUCCEEDED, no failed task in "Ray Core Overview"), the
  Actors and Cluster pages;
* TensorBoard, started here on 127.0.0.1 on the search's ``tensorboard/`` folder: the first
  cards are the search's metric, and the HParams table has one row per trial with its learning
  rate, best and final ``valid_consistency``, the same numbers as the search's results.csv.

It also reads Ray Train's state API (``/api/train/v2/runs/v1``): one finished run per trial.
Every page waits for the text it checks (no fixed sleeps) and is saved as a PNG under the
test's temp dir (``.../screenshots/``). Skipped, saying why, where Chromium, chromedriver or
Selenium is missing: the README's test command installs them as root.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SERVER_START_S, free_port, stop_group, wait_for_http
from ray_head import SEARCH_LEARNING_RATES as LEARNING_RATES
from ray_head import processes_of

from lstm.cluster import HEAD_RAY_CONFIG

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")]

METRIC = "valid_consistency"
# For a page to show what the test looks for: measured 1 to 10 s on 2 busy cores; 9x that.
WAIT_S = 90
OTHER_JOBS = ("default", "ptb")  # ray_head.suite_jobs: one Train run each, beside the search
TOKEN_BOX = "input[placeholder='Enter your authentication token']"


def chromium() -> tuple[str, str]:
    """(browser, driver) paths; skip if either, or Selenium, is missing."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip(
            "no headless browser: Chromium and chromedriver are not installed (as root on Debian: "
            "apt-get install -y chromium chromium-driver; the README's test command does this)"
        )
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # SwiftShader: software WebGL, without which TensorBoard's charts have no lines
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--enable-unsafe-swiftshader"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1000")
    session = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield session
    finally:
        session.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def search(head, head_jobs):
    """The suite's head (still up) and its finished search job: ``(head, job, search folder)``."""
    chromium()  # skip with the reason before waiting for the jobs if no browser can look at them
    jobs, storage = head_jobs
    job = jobs["search"]
    assert job.returncode == 0 and job.status == "SUCCEEDED", job.output[-6000:]
    return head, job, storage / "search"


@pytest.fixture(scope="module")
def tensorboard(search):
    """TensorBoard on 127.0.0.1, on the search's tensorboard/ folder: its URL."""
    _, _, folder = search
    port = free_port()
    log = folder / "tensorboard-server.log"
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(folder / "tensorboard")]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/data/logdir", proc, log, timeout_s=SERVER_START_S)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc)


# --------------------------------------------------------------------------- the browser


def show(browser, url: str, *texts: str) -> str:
    """Open ``url``; wait until every one of ``texts`` is visible; return the page's text."""
    browser.get(url)
    return wait_for(browser, lambda body: all(t in body for t in texts), f"{url}: {texts}")


def wait_for(browser, ok, what: str) -> str:
    """The page's text, once ``ok(text)`` holds (fail after WAIT_S seconds, showing the page)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def check(driver):
        body = driver.find_element(By.TAG_NAME, "body").text
        return body if ok(body) else False

    try:
        return WebDriverWait(browser, WAIT_S, poll_frequency=0.5).until(check)
    except Exception:
        body = browser.find_element(By.TAG_NAME, "body").text
        pytest.fail(f"{what}: not shown within {WAIT_S}s; the page shows:\n{body[:3000]}")


def filter_log(browser, keyword: str, expected: list[str]) -> str:
    """Type ``keyword`` into the job page's log filter; the page's text once ``expected`` shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    box = (
        By.XPATH,
        "//label[normalize-space()='Keyword']/following-sibling::div//input | //input[@placeholder='Keyword']",
    )
    field = WebDriverWait(browser, WAIT_S).until(seen.visibility_of_element_located(box))
    field.send_keys(keyword, Keys.ENTER)
    browser.execute_script("arguments[0].scrollIntoView()", field)  # the log lines below it in view
    return wait_for(browser, lambda body: all(e in body for e in expected), f"log lines with {expected}")


def actors_of_class(browser, url: str, name: str, count: int) -> str:
    """The Actors page filtered by class (it shows 10 actors a page), once it lists ``count``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{url}/#/actors")
    box = (By.XPATH, "//label[normalize-space()='Class']/following-sibling::div//input")
    field = WebDriverWait(browser, WAIT_S).until(seen.visibility_of_element_located(box))
    field.send_keys(Keys.CONTROL, "a")  # the page keeps the last filter
    field.send_keys(Keys.BACKSPACE, name, Keys.ENTER)
    return wait_for(browser, lambda body: body.count(name) == count, f"{count} actors of class {name}")


def snap(browser, path: Path) -> None:
    """Save a screenshot once the page has drawn two more frames (TensorBoard draws its charts
    after their data arrives, in a canvas of its own)."""
    browser.set_script_timeout(WAIT_S)
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1];requestAnimationFrame(() => requestAnimationFrame(() => done()));"
    )
    browser.save_screenshot(str(path))


def wait_for_lines(browser) -> None:
    """Until every chart canvas on the page shows coloured pixels: TensorBoard draws its lines
    in a worker, some frames after the data (and the text this test waits for) arrived."""
    import io

    import numpy as np
    from PIL import Image
    from selenium.webdriver.support.ui import WebDriverWait

    def drawn(driver) -> bool:
        rects = driver.execute_script(
            "return Array.from(document.querySelectorAll('canvas')).map(c => c.getBoundingClientRect())"
            ".filter(r => r.width > 0).map(r => [r.left, r.top, r.right, r.bottom]);"
        )
        shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("HSV")
        regions = [np.asarray(shot.crop(r)) for r in rects]  # rows x columns x (H, S, V)
        saturated = [int(((hsv[..., 1] > 100) & (hsv[..., 2] > 80)).sum()) for hsv in regions]
        return bool(rects) and min(saturated) > 50

    WebDriverWait(browser, WAIT_S, poll_frequency=1.0).until(drawn)


def sign_in(browser, url: str, token: str) -> None:
    """Type the cluster's token into the dashboard's "Authentication Token Required" dialog."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{url}/#/jobs")
    wait = WebDriverWait(browser, WAIT_S)
    wait.until(seen.visibility_of_element_located((By.CSS_SELECTOR, TOKEN_BOX))).send_keys(token)
    browser.find_element(By.XPATH, "//button[translate(normalize-space(), 'submit', 'SUBMIT')='SUBMIT']").click()
    wait.until(seen.invisibility_of_element_located((By.CSS_SELECTOR, TOKEN_BOX)))


def results(folder: Path) -> dict[str, dict[str, str]]:
    """The search's results.csv, by trial id."""
    with open(folder / "results.csv") as f:
        return {row["trial"]: row for row in csv.DictReader(f)}


# --------------------------------------------------------------------------- the tests


def test_the_heads_dashboard_waits_for_a_dead_workers_last_task_events(head):
    """The head's dashboard process runs with HEAD_RAY_CONFIG (lstm/cluster.py), as cluster.yaml
    starts it: a trial actor that ends right after its last call does not count it FAILED."""
    environs = {}
    for pid in processes_of(os.getpgid(head.proc.pid)):
        try:
            if b"dashboard/dashboard.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                variables = Path(f"/proc/{pid}/environ").read_text().split("\0")
                environs[pid] = dict(v.split("=", 1) for v in variables if "=" in v)
        except OSError:  # a process that ended meanwhile
            continue
    assert environs, "no dashboard process under the head"
    assert all(env.items() >= HEAD_RAY_CONFIG.items() for env in environs.values())


def test_the_job_page_shows_the_search_succeeded_without_failed_tasks(search, browser, screenshots):
    head, job, folder = search
    sign_in(browser, head.url, head.token)
    show(browser, f"{head.url}/#/jobs", job.submission_id, "SUCCEEDED", "jobs/search.py")
    snap(browser, screenshots / "1-jobs.png")
    page = show(browser, f"{head.url}/#/jobs/{job.submission_id}", "SUCCEEDED", "Ray Core Overview", "Finished:")
    snap(browser, screenshots / "2-job.png")
    counts = dict(re.findall(r"(Total|Finished|Failed|Running): (\d+)", page))
    failed = head.get("/api/v0/tasks?detail=1&filter_keys=state&filter_predicates=%3D&filter_values=FAILED")["data"][
        "result"
    ]["result"]
    assert int(counts.get("Failed", 0)) == 0, [(t["name"], t.get("error_message", "")[:300]) for t in failed]
    assert int(counts["Finished"]) == int(counts["Total"]) > 0
    # the driver's log, filtered as a person would: the search's line at each trial's end
    done = [f"trial {trial_id} done" for trial_id in results(folder)]
    log_lines = filter_log(browser, " done", done)
    assert all(line in log_lines for line in done), log_lines[:3000]
    snap(browser, screenshots / "2-job-log.png")
    # One-worker trials train in Tune's trial actors (reused from trial to trial), so the
    # search starts no Train controller or worker: those are the head's other jobs', one each.
    ray_job_id = head.get(f"/api/jobs/{job.submission_id}")["job_id"]
    trial_actors = [
        a
        for a in head.get("/api/v0/actors?filter_keys=class_name&filter_predicates=%3D&filter_values=ImplicitFunc")[
            "data"
        ]["result"]["result"]
        if a["job_id"] == ray_job_id
    ]
    assert 1 <= len(trial_actors) <= len(LEARNING_RATES)
    others = len(OTHER_JOBS)
    for name, count in (("TrainController", others), ("RayTrainWorker", others), ("ImplicitFunc", len(trial_actors))):
        page = actors_of_class(browser, head.url, name, count)
        assert page.count("DEAD") >= count  # every row, and the count of dead ones above them
    assert page.count("run_trial") == len(trial_actors)  # the trial actors' repr: the trainable's name
    snap(browser, screenshots / "3-actors.png")
    show(browser, f"{head.url}/#/cluster", "ALIVE", "(Head)", "CPU")
    snap(browser, screenshots / "4-cluster.png")


def test_the_train_state_api_lists_the_jobs_runs_and_no_trial_runs(search):
    """The other jobs' Train runs, one each, finished; one-worker trials start no Train run."""
    head, job, _ = search
    every = head.get("/api/train/v2/runs/v1")["train_runs"]
    assert not [r for r in every if r["job_details"]["submission_id"] == job.submission_id]
    assert len(every) == len(OTHER_JOBS)
    for run in every:
        (attempt,) = run["attempts"]
        assert run["status"] == "FINISHED" and [w["world_rank"] for w in attempt["workers"]] == [0]


def test_tensorboard_shows_the_metric_first_and_every_trial_in_hparams(search, browser, tensorboard, screenshots):
    _, _, folder = search
    table = results(folder)
    # the cards' titles, then their data tables (a value per trial at the last step)
    cards = show(browser, f"{tensorboard}/#timeseries", f"/best_{METRIC}", f"/{METRIC}", "Smoothed", *table)
    wait_for_lines(browser)
    snap(browser, screenshots / "5-tensorboard-time-series.png")
    first_group = cards.split("Pin cards for a quick view and comparison\n", 1)[1].split("\n")[:3]
    assert first_group == ["Search2 cards", "Search", f"/best_{METRIC}"], cards[:2000]
    page = show(browser, f"{tensorboard}/#hparams", f"best {METRIC}", f"final {METRIC}", *table)
    snap(browser, screenshots / "6-tensorboard-hparams.png")
    lines = page.split("\n")
    for trial_id, row in table.items():
        i = lines.index(trial_id)
        lr, best, final = (float(v) for v in lines[i + 1 : i + 4])
        assert lr == pytest.approx(float(row["learning_rate"]))
        assert best == pytest.approx(float(row[f"best {METRIC}"]), rel=1e-4)
        assert final == pytest.approx(float(row[f"final {METRIC}"]), rel=1e-4)
    assert sorted(float(row["learning_rate"]) for row in table.values()) == sorted(LEARNING_RATES)
    print(f"screenshots: {screenshots}")
