"""The report a platform engineer opens: a real job on the demo model through `bitsmith up` and
`bitsmith quantize`, its report from `bitsmith report` and from the coordinator's HTTP port, opened
in headless Chromium (the system's, driven by Playwright) and checked as rendered: every chart drawn
with a size on screen, one bar per layer and target, a screenshot that is not blank."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from bitsmith.demo import CALIB_FILES, DEMO_MODEL, EVAL_FILES
from bitsmith.rpc.discovery import running_stack_http

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
LAYERS = 4 * 7  # blocks x linears of the demo model
CLI = [sys.executable, "-m", "bitsmith_services.cli"]


def _chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (.ci/run does) for the report's browser test")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A stack started the way users start one: `bitsmith up`, stopped with `bitsmith down`."""
    env = {**os.environ, "BITSMITH_HOME": str(tmp_path_factory.mktemp("home"))}
    subprocess.run([*CLI, "up"], env=env, check=True, capture_output=True, timeout=300)
    yield env
    subprocess.run([*CLI, "down"], env=env, check=False, capture_output=True, timeout=120)


def test_report_of_a_real_job_renders_in_chromium(home: dict[str, str], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    out = tmp_path / "out"
    quantize = subprocess.run(
        [*CLI, "quantize", str(DEMO_MODEL), "--method", "gptq", "--bits", "4", "--group-size", "128",
         *(arg for f in CALIB_FILES for arg in ("--calib", str(f))), "--samples", "32", "--seq-len", "256",
         "--format", "gptq", "--format", "gguf:Q4_K_M", "--out", str(out),
         *(arg for f in EVAL_FILES for arg in ("--eval", str(f))), "--eval-seq-len", "256", "--json"],
        env=home, check=True, capture_output=True, text=True, timeout=1500,
    )
    job = json.loads(quantize.stdout.strip().splitlines()[-1])
    assert job["state"] == "succeeded", job

    report = tmp_path / "report.html"
    subprocess.run([*CLI, "report", job["job_id"], "--out", str(report)], env=home, check=True,
                   capture_output=True, timeout=300)
    http = running_stack_http(Path(home["BITSMITH_HOME"]))
    assert http, "the stack file records the coordinator's HTTP address"
    with urllib.request.urlopen(f"http://{http}/jobs/{job['job_id']}/report", timeout=120) as served:
        assert served.headers["Content-Type"] == "text/html; charset=utf-8"
        assert served.read().decode() == report.read_text(), "the CLI and the coordinator serve one report"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(report.as_uri())
        assert requests == [report.as_uri()], "the page fetches nothing"

        charts = {"size-quality": "#size-quality-chart svg", "layers gptq": "#layer-chart-1 svg",
                  "layers gguf:Q4_K_M": "#layer-chart-2 svg", "blocks": "#block-chart svg",
                  "timeline": "#timeline-chart svg"}
        for name, selector in charts.items():
            box = page.locator(selector).bounding_box()
            assert box is not None and box["width"] > 300 and box["height"] > 150, (name, box)
        assert page.locator("#layer-chart-1").get_attribute("data-target") == "gptq"
        for target in ("gptq", "gguf:Q4_K_M"):
            bars = page.locator(f'[id^="layer:{target}:"]')
            assert bars.count() == LAYERS and page.locator(f'[id^="rtn:{target}:"]').count() == LAYERS
            assert all((bars.nth(i).bounding_box() or {}).get("width", 0) > 0 for i in range(LAYERS))
        assert page.locator('[id^="block:"]').count() == 4
        assert page.locator('[id^="artifact:"]').count() == 2 * len(EVAL_FILES)

        screenshot = tmp_path / "report.png"
        page.screenshot(path=str(screenshot), full_page=True)
        layer_chart = page.locator("#layer-chart-1").screenshot()
        browser.close()

    from PIL import Image

    with Image.open(io.BytesIO(layer_chart)) as chart:
        colors = chart.convert("RGB").getcolors(maxcolors=1 << 16) or []
    solved = sum(n for n, rgb in colors if rgb == (0x34, 0x65, 0xA4))
    assert solved > 500, "the solved layers' bars are painted"
    with Image.open(screenshot) as shot:
        assert shot.size[0] == 1300 and shot.size[1] > 2000
    if saved := os.environ.get("BITSMITH_REPORT_SCREENSHOT"):
        shutil.copy(screenshot, saved)
