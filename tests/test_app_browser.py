"""End to end in a real browser: ``streamlit run app/main.py`` as a subprocess, driven by Playwright through
the system Chromium (never ``playwright install``), on a tiny toy run built here.

Environment:
  HPR_APP_TEST_RUN=DIR      drive the app on an existing run folder instead (its model must be loadable, e.g.
                            HPR_CACHE_DIR pointing at the toy model's cache)
  HPR_APP_SCREENSHOTS=DIR   keep the screenshots there (default: pytest's tmp dir)
  HPR_APP_CHROMIUM=PATH     the browser (default /usr/bin/chromium)

It prints the time from launching the server to the first rendered figure.
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("HPR_APP_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# `streamlit run` in a process whose "toy" is the tiny test world (the tiny_world fixture), for the tiny run's
# model. The world's config travels as JSON in HPR_TEST_TINY_WORLD; JSON has no tuples, so lists become tuples.
TINY_WORLD_ENV = "HPR_TEST_TINY_WORLD"
TINY_FROM_ENV = (
    "ToyWorldConfig(**{k: tuple(v) if isinstance(v, list) else v "
    f"for k, v in json.loads(os.environ[{TINY_WORLD_ENV!r}]).items()}})"
)
TINY_LAUNCH = (
    "import json, os, sys; import hpr.toyworld; from hpr.toyworld import ToyWorldConfig; "
    f"hpr.toyworld.DEFAULT = {TINY_FROM_ENV}; "
    "from streamlit.web import cli; sys.argv[0] = 'streamlit'; sys.exit(cli.main())"
)

if not Path(CHROMIUM).exists():
    pytest.skip(
        f"no Chromium at {CHROMIUM} (apt-get install chromium, or set HPR_APP_CHROMIUM)", allow_module_level=True
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytest.importorskip("streamlit", reason="streamlit is not installed")


@pytest.fixture(scope="module")
def run_folder(tiny_run_folder, tiny_world, toy_cache, tmp_path_factory):
    """(run folder, HPR_CACHE_DIR, the tiny world's config as JSON if the server must use it, else None)."""
    if os.environ.get("HPR_APP_TEST_RUN"):
        yield Path(os.environ["HPR_APP_TEST_RUN"]).resolve(), os.environ.get("HPR_CACHE_DIR"), None
        return
    tiny = json.dumps(dataclasses.asdict(tiny_world))
    # the server rebuilds exactly this config from the JSON (the same expression as in TINY_LAUNCH)
    assert (
        eval(
            TINY_FROM_ENV,
            {"json": json, "ToyWorldConfig": type(tiny_world), "os": SimpleNamespace(environ={TINY_WORLD_ENV: tiny})},
        )
        == tiny_world
    )
    with tiny_run_folder(tmp_path_factory.mktemp("browser") / "run", "base,hpr,iti15,iti200") as out:
        pass
    yield out, str(toy_cache), tiny


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer at {url} within {timeout} s")


def settle(page, title: str, plots: int = 0, frames: int = 0, code: int = 0, timeout: float = 120) -> None:
    """Wait until the page titled ``title`` has finished its script run and shows at least so many figures,
    dataframes and code blocks; then check that no exception is shown."""
    page.locator("h1", has_text=title).first.wait_for(timeout=timeout * 1000)
    page.wait_for_function(
        """([plots, frames, code]) => {
            const app = document.querySelector('[data-testid="stApp"]');
            const n = (sel) => document.querySelectorAll(sel).length;
            return app && app.getAttribute('data-test-script-state') === 'notRunning'
                && n('.js-plotly-plot') >= plots && n('[data-testid="stDataFrame"]') >= frames
                && n('[data-testid="stCode"]') >= code;
        }""",
        arg=[plots, frames, code],
        timeout=timeout * 1000,
        polling=200,
    )
    assert page.locator('[data-testid="stException"]').count() == 0, f"{title}: an exception is shown"


def test_every_page_in_a_real_browser(run_folder, tmp_path):
    folder, cache, tiny = run_folder
    shots = Path(os.environ.get("HPR_APP_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "HPR_APP_RUN": str(folder),
        "HPR_APP_RUNS_ROOT": str(folder.parent),
        "HPR_APP_DEVICE": "cpu",
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
    }
    if cache:
        env["HPR_CACHE_DIR"] = cache
    if tiny:
        env[TINY_WORLD_ENV] = tiny
    launcher = ["-c", TINY_LAUNCH] if tiny else ["-m", "streamlit"]
    cmd = [
        sys.executable,
        *launcher,
        "run",
        "app/main.py",
        "--server.headless",
        "true",
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
        "--server.fileWatcherType",
        "none",
    ]
    log = open(tmp_path / "streamlit.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc, timeout=90)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"{url}/probes")
                settle(page, "Probes", plots=1, frames=1)
                first_figure = time.perf_counter() - t0
                print(f"\nlaunch to first rendered figure: {first_figure:.1f} s ({folder})")
                page.screenshot(path=shots / "probes.png", full_page=True)

                def visit(title, **expect):
                    page.locator('[data-testid="stSidebarNav"] a', has_text=title).first.click()
                    settle(page, title, **expect)

                visit("Runs", frames=1, code=1)
                assert page.get_by_text(f"Open: {folder}").count() >= 1
                page.screenshot(path=shots / "runs.png", full_page=True)
                visit("Norms", plots=2, frames=1, timeout=300)
                page.screenshot(path=shots / "norms.png", full_page=True)
                visit("Results", plots=1, frames=2)
                page.get_by_role("button", name="Compute the sweep").click()
                settle(page, "Results", plots=2, frames=3, timeout=400)
                page.screenshot(path=shots / "results.png", full_page=True)
                visit("Generations", code=3, timeout=180)  # the prompt, base, and each chosen method
                assert page.get_by_text("base", exact=True).count() >= 1
                page.screenshot(path=shots / "generations.png", full_page=True)
                visit("Export", plots=1, frames=1)
                page.get_by_role("button", name="Prepare the file").click()  # PNG through kaleido
                button = page.get_by_role("button", name="Download probe_accuracy.png")
                button.wait_for(timeout=120_000)
                with page.expect_download() as download:
                    button.click()
                assert Path(download.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                page.screenshot(path=shots / "export.png", full_page=True)
            finally:
                browser.close()
    except Exception:
        log.flush()
        print((tmp_path / "streamlit.log").read_text()[-4000:])
        raise
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    print("screenshots:", ", ".join(sorted(p.name for p in shots.glob("*.png"))), "in", shots)
