"""What a researcher sees, in a real browser: headless Chromium (Debian's `chromium` package,
driven by Playwright's Python package through `executable_path`: Playwright's own browser
download needs the internet) against a real `mlflow server` and a real `optuna-dashboard` over a
real sweep's store, with every request that leaves the machine refused (the views must work
offline).

Screenshots go to $TAILTUNE_SCREENSHOTS when set (else the test's temporary folder).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from playwright.sync_api import Page, sync_playwright

from results.leaderboard import main as leaderboard_main
from results.mlflow_logging import local_tracking_uri

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = "browse"
SWEEP = "seen"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Debian's chromium is not installed here (apt-get install chromium; .ci/run does)")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(command: list[str], url: str, health: str, log: Path, cwd: Path,
           env: dict | None = None) -> subprocess.Popen:
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{command[0]} exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + health, timeout=2) as answer:
                if answer.status == 200:
                    return process
        except OSError:
            time.sleep(0.5)
    _stop(process)
    pytest.fail(f"{command[0]} did not answer in 180 s: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen) -> None:
    """The server and the workers it started: its own process group, by id."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real sweep of the CLI (dro_lt, 3 trials, ASHA) with its plots."""
    storage = tmp_path_factory.mktemp("browse_store")
    command = [sys.executable, str(ROOT / "search" / "run.py"), "--space", "dro_lt",
               "--epochs", "6", "--num-samples", "3", "--storage", str(storage),
               "--experiment", EXPERIMENT, "--name", SWEEP]
    done = subprocess.run(command, cwd=storage, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return storage


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("TAILTUNE_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def mlflow_url(store: Path) -> Iterator[str]:
    port = _free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
               local_tracking_uri(store), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    url = f"http://127.0.0.1:{port}"
    process = _serve(command, url, "/health", store / "mlflow-server.log", store, env)
    try:
        yield url
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def page() -> Iterator[tuple[Page, list[str]]]:
    """A Chromium page that may reach this machine only; the refused URLs are listed."""
    refused: list[str] = []

    def local_only(route) -> None:
        url = route.request.url
        if url.startswith(("http://127.0.0.1", "file://", "data:", "blob:", "about:")):
            route.continue_()
        else:
            refused.append(url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1500, "height": 950})
        context.route("**/*", local_only)
        yield context.new_page(), refused
        browser.close()


def _sweep_runs(store: Path) -> tuple[str, str, list[str]]:
    """(experiment id, parent run id, trial keys) as MLflow holds them."""
    client = MlflowClient(local_tracking_uri(store))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"tags.`tailtune.sweep` = '{SWEEP}'")
    parent = next(r for r in runs if r.data.tags["tailtune.role"] == "sweep")
    trials = [r.data.tags["tailtune.trial_id"] for r in runs
              if r.data.tags["tailtune.role"] == "trial"]
    return experiment.experiment_id, parent.info.run_id, trials


def test_run_list_shows_the_parent_and_its_trials(store: Path, mlflow_url: str, page,
                                                  shots: Path) -> None:
    tab, refused = page
    experiment_id, _, trials = _sweep_runs(store)
    assert len(trials) == 3
    # straight to the run list (docs/mlflow_ui.md): MLflow 3 opens on its GenAI overview
    tab.goto(f"{mlflow_url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    name = tab.get_by_text(SWEEP, exact=True)
    name.wait_for(timeout=120_000)
    for key in trials:  # children are folded under their parent
        assert tab.get_by_text(key, exact=True).count() == 0
    row = tab.locator('[role="row"]', has=name)
    row.first.locator("button").first.click()  # the chevron beside the parent's name
    for key in trials:
        tab.get_by_text(key, exact=True).wait_for(timeout=30_000)
    tab.screenshot(path=str(shots / "mlflow_run_list.png"))
    assert refused == []


@pytest.mark.parametrize("plot", ["intermediate_values", "parallel_coordinate"])
def test_html_sweep_plot_renders_offline(store: Path, mlflow_url: str, page, shots: Path,
                                         plot: str) -> None:
    tab, refused = page
    experiment_id, parent, trials = _sweep_runs(store)
    tab.goto("about:blank")  # nothing of the page before (another plot's frame) lingers
    tab.goto(f"{mlflow_url}/#/experiments/{experiment_id}/runs/{parent}/artifacts/plots/"
             f"{plot}.html")
    # MLflow shows an HTML artifact in an iframe of its own; plotly draws SVG in it
    deadline = time.monotonic() + 120
    frame = None
    while time.monotonic() < deadline and frame is None:
        frame = next((f for f in tab.frames[1:] if f.locator(".main-svg").count()), None)
        tab.wait_for_timeout(500)
    assert frame is not None, "the plot did not render"
    if plot == "intermediate_values":  # one curve per trial, stopped early included
        assert frame.locator(".scatterlayer .trace").count() == len(trials)
    else:
        names = ("lam", "radius", "temperature", "val_all")  # an axis each, and the objective
        for _ in range(60):  # the axes are drawn after the first SVG
            text = frame.inner_text("body")
            if all(name in text for name in names):
                break
            tab.wait_for_timeout(500)
        assert all(name in text for name in names), text[:1000]
    tab.screenshot(path=str(shots / f"mlflow_{plot}.png"))
    assert refused == []


def test_leaderboard_html(store: Path, page, shots: Path, capsys) -> None:
    tab, refused = page
    target = store / "board.html"
    assert leaderboard_main(["--storage", str(store), "--experiment", EXPERIMENT,
                             "--include", "all", "--format", "html",
                             "--output", str(target)]) == 0
    tab.goto(target.as_uri())
    assert tab.locator("table.leaderboard tbody tr").count() == 3
    assert "val SE" in tab.inner_text("table.leaderboard thead")
    tab.screenshot(path=str(shots / "leaderboard.png"), full_page=True)
    assert refused == []


def test_optuna_dashboard_shows_the_live_study(store: Path, page, shots: Path) -> None:
    """optuna-dashboard over the sweep's study (the live view): every trial with its every-epoch
    intermediate values, served and drawn."""
    dashboard = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    assert dashboard, "optuna-dashboard is a test dependency (pyproject.toml)"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    database = store / SWEEP / "optuna.db"
    process = _serve([dashboard, f"sqlite:///{database}", "--host", "127.0.0.1", "--port",
                      str(port)], url, "/api/studies", store / "dashboard.log", store)
    try:
        with urllib.request.urlopen(f"{url}/api/studies", timeout=30) as answer:
            studies = json.load(answer)["study_summaries"]
        study = next(s for s in studies if s["study_name"] == SWEEP)
        with urllib.request.urlopen(f"{url}/api/studies/{study['study_id']}?after=0",
                                    timeout=30) as answer:
            detail = json.load(answer)
        assert len(detail["trials"]) == 3
        for trial in detail["trials"]:
            steps = [v["step"] for v in trial["intermediate_values"]]
            assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 5
        tab, refused = page
        tab.goto(f"{url}/dashboard/studies/{study['study_id']}")
        tab.get_by_text(SWEEP).first.wait_for(timeout=60_000)
        tab.wait_for_timeout(3000)
        tab.screenshot(path=str(shots / "optuna_dashboard.png"), full_page=True)
        assert refused == []
    finally:
        _stop(process)
