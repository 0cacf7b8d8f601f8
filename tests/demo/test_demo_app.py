"""Browser test of ``samref demo-app``: the real app in a subprocess, driven by headless Chromium.

Needs the ``demo`` extra (Gradio), the ``playwright`` Python package and Debian's ``chromium``
(``/usr/bin/chromium``, or ``$SAMREF_CHROMIUM``); Playwright never downloads a browser here.
Skips with the reason when one of them is missing. The screenshot after two clicks goes to
``$SAMREF_ARTIFACTS`` (default ``artifacts/`` in the repository) and its path is printed.
"""

from __future__ import annotations

import copy
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("SAMREF_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SLOW = 240_000  # ms: the first click on a new image size compiles the SAM-REF step


def _require_tools() -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        pytest.skip("gradio is not installed (pip install '.[demo]')")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright Python package is not installed")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_checkpoint, jax_cache_env, tmp_path_factory):
    _require_tools()
    port = _free_port()
    log = tmp_path_factory.mktemp("demo_app") / "server.log"
    env = {
        **os.environ,
        **jax_cache_env,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    cmd = [
        sys.executable,
        "-m",
        "samref_jax.cli",
        "demo-app",
        "--checkpoint",
        str(tiny_checkpoint),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
    ]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"demo-app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"demo-app did not answer in 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]


@pytest.fixture(scope="module")
def browser():
    _require_tools()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture()
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(SLOW)
    pg.goto(app_url)
    pg.locator("#samref-view img").wait_for(state="visible")
    yield pg
    context.close()


def _artifacts_dir() -> Path:
    d = Path(os.environ.get("SAMREF_ARTIFACTS", REPO / "artifacts"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _status(page):
    from playwright.sync_api import expect

    return expect(page.locator("#samref-status"))


def _view_png(page) -> np.ndarray:
    """Pixels of the picture shown in the click view (fetched from the server)."""
    src = page.locator("#samref-view img").get_attribute("src")
    if src.startswith("data:"):
        import base64

        data = base64.b64decode(src.split(",", 1)[1])
    else:
        data = page.request.get(src).body()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _click_image(page, x: int, y: int, button: str = "left") -> None:
    """Click image pixel (x, y) of the view (the <img> is drawn with object-fit: contain)."""
    img = page.locator("#samref-view img")
    box = page.evaluate(
        """(el) => { const r = el.getBoundingClientRect();
                     return [r.width, r.height, el.naturalWidth, el.naturalHeight]; }""",
        img.element_handle(),
    )
    w, h, nw, nh = box
    s = min(w / nw, h / nh)
    ox, oy = (w - nw * s) / 2, (h - nh * s) / 2
    img.click(position={"x": ox + (x + 0.5) * s, "y": oy + (y + 0.5) * s}, button=button)


def _download_mask(page) -> np.ndarray:
    with page.expect_download() as dl:
        page.locator("#samref-download").click()
    path = dl.value.path()
    return np.asarray(Image.open(path))


@pytest.mark.slow
def test_upload_click_undo_download(page, grabcut_dir):
    image_path = sorted((grabcut_dir / "data_GT").glob("*.jpg"))[0]
    w, h = Image.open(image_path).size
    page.locator("#samref-upload input[type=file]").set_input_files(str(image_path))
    _status(page).to_contain_text("Loaded", timeout=SLOW)
    before = _view_png(page)
    assert before.shape[:2] == (h, w)

    _click_image(page, w // 2, h // 2)
    _status(page).to_contain_text("Click 1 (object)", timeout=SLOW)
    first = _view_png(page)
    assert first.shape == before.shape and not np.array_equal(first, before), "no overlay"
    mask1 = _download_mask(page)
    assert mask1.shape == (h, w)
    assert set(np.unique(mask1)) <= {0, 255}

    _click_image(page, w // 5, h // 5, button="right")  # right-click: background point
    _status(page).to_contain_text("Click 2 (background)", timeout=SLOW)
    second = _view_png(page)
    assert not np.array_equal(second, first), "the overlay did not change"
    mask2 = _download_mask(page)
    assert mask2.shape == (h, w)
    shot = _artifacts_dir() / "demo_app_two_clicks.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot after two clicks: {shot}")
    assert shot.stat().st_size > 10_000

    page.locator("#samref-undo").click()
    _status(page).to_contain_text("Click 1 (object)", timeout=SLOW)
    undone = _view_png(page)
    np.testing.assert_array_equal(undone, first)
    np.testing.assert_array_equal(_download_mask(page), mask1)

    # The toggle: a left-click that adds a background point.
    page.locator("#samref-sign").get_by_text("background").click()
    _click_image(page, w - 10, h - 10)
    _status(page).to_contain_text("Click 2 (background)", timeout=SLOW)
    _status(page).to_contain_text("PatchDiff window")

    # Mode switch: the clicks are replayed with the refiners off (no PatchDiff window).
    page.locator("#samref-mode").get_by_text("SAM (refiners off)").click()
    _status(page).not_to_contain_text("PatchDiff window", timeout=SLOW)
    _status(page).to_contain_text("Click 2 (background)")
    assert "Traceback" not in page.content()


@pytest.mark.slow
def test_bad_input_shows_message(page, tmp_path):
    _click_image(page, 20, 20)  # before any image
    _status(page).to_contain_text("Upload an image or pick an example first", timeout=60_000)
    page.locator("#samref-undo").click()
    _status(page).to_contain_text("Nothing to undo", timeout=60_000)

    bad = tmp_path / "notes.txt"
    bad.write_text("this is not an image\n")
    page.locator("#samref-upload input[type=file]").set_input_files(str(bad))
    _status(page).to_contain_text("Could not read 'notes.txt' as an image", timeout=60_000)
    assert page.locator("#samref-status .samref-error").is_visible()
    content = page.content()
    assert "Traceback" not in content and 'File "' not in content

    # An example image can still be picked afterwards.
    page.get_by_text("blob_on_stripes.png").first.click()
    _status(page).to_contain_text("Loaded blob_on_stripes.png (320x240)", timeout=SLOW)


# ------------------------------------------------------------------ backend (no browser)
class _FakeResult:
    def __init__(self, mask, mode):
        self.mask = mask
        self.sam_mask = mask
        self.global_mask = mask
        self.logits = mask.astype(np.float32)
        self.window = (1.0, 1.0, 20.0, 20.0) if mode == "full" else None
        self.score = 0.5


class _FakePredictor:
    """Disks around positive clicks minus disks around negative ones (radius by mode)."""

    def __init__(self):
        self.mode = "full"
        self.embeds = 0
        self.hist = []
        self.root = self

    def fork(self, mode=None):
        other = copy.copy(self)
        other.hist = list(self.hist)
        other.mode = mode or self.mode
        return other

    def set_image(self, image):
        self.image = image
        self.root.embeds += 1
        self.hist = []

    def set_mode(self, mode):
        self.mode = mode

    def reset(self):
        self.hist = []

    def undo(self):
        if self.hist:
            self.hist.pop()
        return self.hist[-1][1] if self.hist else None

    def click(self, x, y, positive=True):
        h, w = self.image.shape[:2]
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError("outside")
        clicks = (self.hist[-1][0] if self.hist else []) + [(x, y, positive)]
        yy, xx = np.mgrid[:h, :w]
        r = 4 if self.mode == "sam" else 7
        mask = np.zeros((h, w), bool)
        for cx, cy, pos in clicks:
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            mask = (mask | disk) if pos else (mask & ~disk)
        res = _FakeResult(mask, self.mode)
        self.hist.append((clicks, res))
        return res


def test_backend_embeds_once_per_image(tmp_path):
    from samref_jax.demo.app import DemoBackend, UserError

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(a)
    Image.fromarray(np.full((30, 20, 3), 150, np.uint8)).save(b)
    fake = _FakePredictor()
    be = DemoBackend(fake, workdir=tmp_path / "work")

    s = be.load(a)
    assert fake.embeds == 1 and s.image.shape == (40, 50, 3)
    be.click(s, 10, 10, True)
    m1 = s.result.mask.copy()
    be.click(s, 30, 20, True)
    be.click(s, 12, 12, False)
    assert fake.embeds == 1 and len(s.predictor.hist) == 3 and fake.hist == []
    be.undo(s)
    be.undo(s)
    np.testing.assert_array_equal(s.result.mask, m1)
    assert len(s.predictor.hist) == 1  # predictor.undo, no replay
    be.set_mode(s, "sam")  # clicks again in the new mode, same embedding
    assert fake.embeds == 1 and s.result.window is None and s.result.mask.sum() < m1.sum()
    path = be.mask_file(s)
    mask = np.asarray(Image.open(path))
    assert mask.shape == (40, 50) and set(np.unique(mask)) <= {0, 255}

    t = be.load(b)  # another user: its own embedding and click loop
    be.click(t, 5, 5, True)
    assert fake.embeds == 2
    be.click(s, 20, 20, True)  # back to the first user: no re-embedding, no replay
    assert fake.embeds == 2 and len(s.clicks) == 2 and len(s.predictor.hist) == 2
    assert len(t.predictor.hist) == 1 and t.predictor.image.shape == (30, 20, 3)
    be.reset(s)
    assert s.result is None and s.predictor.hist == [] and len(t.predictor.hist) == 1

    with pytest.raises(UserError, match="outside"):
        be.click(s, 50, 3, True)
    with pytest.raises(UserError, match="first"):
        be.click(None, 1, 1, True)
    with pytest.raises(UserError, match="Nothing to undo"):
        be.undo(s)
    txt = tmp_path / "x.txt"
    txt.write_text("hello")
    with pytest.raises(UserError, match="Could not read 'x.txt' as an image"):
        be.load(txt)
    assert "Click 1 (object)" in be.describe(be.click(s, 3, 3, True))
