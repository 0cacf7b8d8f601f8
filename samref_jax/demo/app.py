"""Browser demo (Gradio): click on an image, see SAM vs SAM-REF, download the mask.

Run it with ``samref demo [--checkpoint DIR|tiny] [--port N]``, or in a notebook/Colab::

    from samref_jax.demo.app import build_app
    build_app("tiny").launch()          # share=True in Colab for a public link

Left-click adds a point with the sign chosen in "Click adds" (object by default); right-click
always adds a background point. The image embedding is computed once per image: every click
reuses it and runs one jit-compiled SAM-REF step (the first click on a new image size, and the
first click in a new mode, compile that step once).

The model logic is in :class:`DemoBackend` (no Gradio needed, unit-testable); :func:`build_app`
is the thin Gradio layer. Every handler turns errors into a message in the status line (never a
stack trace in the page); unexpected errors are logged on the server with their traceback.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from samref_jax import viz

try:  # optional (the `demo` extra); DemoBackend works without it
    import gradio as gr
except ImportError:  # pragma: no cover
    gr = None
from samref_jax.demo.examples import example_paths

__all__ = ["DemoBackend", "UserState", "UserError", "build_app", "launch"]

log = logging.getLogger("samref.demo")

MODES = ("sam", "global", "full")
MODE_LABELS = {
    "sam": "SAM (refiners off)",
    "global": "SAM + GlobalDiff",
    "full": "SAM-REF (GlobalDiff + PatchDiff)",
}
SIGN_POSITIVE = "object (+)"
SIGN_NEGATIVE = "background (-)"
MAX_DISPLAY = 1024  # longest side of the picture shown in the page (clicks are scaled back)
# Mask files kept on disk: each user's latest only, for at most this many users (the oldest
# users' files go first). Gradio serves copies from its own cache (cleaned by `delete_cache`).
MAX_MASK_USERS = 64


class UserError(Exception):
    """Something the user can fix; shown as a message in the page."""


@dataclasses.dataclass
class UserState:
    """One user's image and clicks (kept in ``gr.State``, one per browser tab)."""

    key: str
    name: str
    image: np.ndarray
    mode: str = "full"
    clicks: list[tuple[float, float, bool]] = dataclasses.field(default_factory=list)
    results: list[Any] = dataclasses.field(default_factory=list)  # ClickResult per click
    last_click_s: float | None = None
    # This user's own click loop: a fork of the shared predictor holding this image's context
    # and click states (shared parameters and compiled steps).
    predictor: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def result(self) -> Any | None:
        return self.results[-1] if self.results else None

    @property
    def display_scale(self) -> float:
        """Displayed pixels per original pixel (<= 1)."""
        h, w = self.image.shape[:2]
        return min(1.0, MAX_DISPLAY / max(h, w))


class DemoBackend:
    """One loaded model for every user; each user (browser tab) has its own click loop.

    ``load`` forks the shared predictor (``SamRefPredictor.fork``: parameters and compiled steps
    shared) and sets the user's image on the fork, so each user's image context and click
    states live in their ``UserState``: users never wait for each other's clicks, an image is
    embedded once, and clicks are never replayed except to switch mode.
    """

    def __init__(self, predictor: Any, workdir: str | Path | None = None) -> None:
        self.predictor = predictor
        self.lock = threading.Lock()
        # Without a workdir: a temporary folder removed at exit (or when the backend goes).
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="samref_demo_")
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._mask_users: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.embeddings = 0  # number of set_image calls (the test checks "once per image")
        self._compiled: set[tuple[int, int, str]] = set()  # (h, w, mode) clicked at least once

    @classmethod
    def from_checkpoint(cls, checkpoint: str, mode: str = "full", **kw: Any) -> DemoBackend:
        from samref_jax.loading import load_predictor

        return cls(load_predictor(checkpoint, mode), **kw)

    # ------------------------------------------------------------------------- user state
    def load(self, path: str | Path | None, mode: str = "full") -> UserState:
        """Read an uploaded file and compute its embedding."""
        from samref_jax.data.decode import DataError, read_image

        if path is None:
            raise UserError("Choose an image file to upload.")
        p = Path(path)
        try:
            image = read_image(p)
        except DataError as e:
            reason = str(e).split(": ", 2)[-1] if "cannot decode" in str(e) else str(e)
            raise UserError(f"Could not read '{p.name}' as an image ({reason}).") from None
        except Exception as e:  # decompression bombs, truncated files ...
            name = type(e).__name__
            raise UserError(f"Could not read '{p.name}' as an image ({name}).") from None
        if min(image.shape[:2]) < 2:
            raise UserError(f"'{p.name}' is too small ({image.shape[1]}x{image.shape[0]}).")
        s = UserState(key=uuid.uuid4().hex, name=p.name, image=image, mode=mode)
        s.predictor = self.predictor.fork(mode)
        try:
            s.predictor.set_image(s.image)
        except ValueError as e:
            raise UserError(f"Could not use '{s.name}': {e}") from None
        with self.lock:
            self.embeddings += 1
        return s

    def click(self, s: UserState | None, x: float, y: float, positive: bool) -> UserState:
        """Add a click at (x, y) original pixels."""
        if s is None:
            raise UserError("Upload an image or pick an example first, then click on it.")
        h, w = s.image.shape[:2]
        if not (0 <= x < w and 0 <= y < h):
            raise UserError(f"Click ({x:.0f}, {y:.0f}) is outside the {w}x{h} image.")
        t0 = time.perf_counter()
        try:
            r = s.predictor.click(x, y, positive=positive)
        except ValueError as e:  # e.g. more clicks than the model's click slots
            raise UserError(str(e)) from None
        s.last_click_s = time.perf_counter() - t0
        with self.lock:
            self._compiled.add((*s.image.shape[:2], s.mode))
        s.clicks.append((float(x), float(y), bool(positive)))
        s.results.append(r)
        return s

    def undo(self, s: UserState | None) -> UserState:
        if s is None:
            raise UserError("Nothing to undo: upload an image or pick an example first.")
        if not s.clicks:
            raise UserError("Nothing to undo: no clicks yet.")
        s.clicks.pop()
        s.results.pop()
        s.predictor.undo()
        return s

    def reset(self, s: UserState | None) -> UserState:
        if s is None:
            raise UserError("Nothing to reset: upload an image or pick an example first.")
        s.clicks, s.results = [], []
        s.predictor.reset()
        return s

    def set_mode(self, s: UserState | None, mode: str) -> UserState | None:
        if mode not in MODES:
            raise UserError(f"Unknown mode {mode!r}.")
        if s is None:
            return None
        s.mode = mode
        s.predictor.set_mode(mode)
        if s.clicks:  # the states depend on the mode (what was fed back): click again
            s.predictor.reset()
            s.results = [s.predictor.click(x, y, positive=pos) for x, y, pos in s.clicks]
        return s

    # --------------------------------------------------------------------------- pictures
    def overlay(self, s: UserState) -> Image.Image:
        r = s.result
        im = viz.overlay(
            s.image,
            None if r is None else r.mask,
            s.clicks,
            None if r is None else r.window,
        )
        k = s.display_scale
        if k < 1.0:
            im = im.resize((round(im.width * k), round(im.height * k)), Image.BILINEAR)
        return im

    def comparison(self, s: UserState) -> Image.Image | None:
        """SAM | GlobalDiff | final masks of the last click, side by side (small)."""
        r = s.result
        if r is None:
            return None
        h, w = s.image.shape[:2]
        k = min(1.0, 360 / max(h, w))
        size = (max(1, round(w * k)), max(1, round(h * k)))
        panels, titles = [], []
        for name, mask, win in (
            ("SAM", r.sam_mask, None),
            ("GlobalDiff", r.global_mask, None),
            (f"final ({s.mode})", r.mask, r.window),
        ):
            panels.append(viz.overlay(s.image, mask, s.clicks, win).resize(size, Image.BILINEAR))
            titles.append(name)
        return viz.side_by_side(panels, titles)

    def mask_file(self, s: UserState) -> Path | None:
        """Write the current mask as a 0/255 PNG of the image's size; its path (None: no mask).

        Each call writes a new path (so the page fetches the new mask) and removes this user's
        earlier files, and the files of all but the `MAX_MASK_USERS` most recent users: the
        folder stays bounded however long the server runs.
        """
        r = s.result
        if r is None:
            return None
        user = self.workdir / s.key
        folder = user / f"{len(s.clicks):02d}_{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{Path(s.name).stem}_mask.png"
        viz.mask_image(r.mask).save(path)
        with self.lock:
            for old in user.iterdir():
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
            self._mask_users[s.key] = None
            self._mask_users.move_to_end(s.key)
            while len(self._mask_users) > MAX_MASK_USERS:
                key, _ = self._mask_users.popitem(last=False)
                shutil.rmtree(self.workdir / key, ignore_errors=True)
        return path

    def describe(self, s: UserState) -> str:
        h, w = s.image.shape[:2]
        if not s.clicks:
            text = (
                f"Loaded **{s.name}** ({w}x{h}). Click on the object; right-click or the "
                "'background' toggle adds a background point."
            )
            if (h, w, s.mode) not in self._compiled:
                text += " The first click on a new image size compiles the model (some seconds)."
            return text
        x, y, pos = s.clicks[-1]
        r = s.result
        text = (
            f"Click {len(s.clicks)} ({'object' if pos else 'background'}) at ({x:.0f}, {y:.0f}): "
            f"mask covers {100 * r.mask.mean():.1f}% of the image, SAM score {r.score:.2f}"
        )
        if r.window is not None:
            text += ", PatchDiff window (" + ", ".join(f"{v:.0f}" for v in r.window) + ")"
        if s.last_click_s is not None:
            text += f", {1000 * s.last_click_s:.0f} ms"
        return text + "."


def placeholder(size: tuple[int, int] = (480, 320)) -> Image.Image:
    """The picture shown before any image is loaded (clicking it explains what to do)."""
    w, h = size
    im = Image.new("RGB", (w, h), (236, 238, 242))
    d = ImageDraw.Draw(im)
    for i in range(-h, w, 24):
        d.line((i, 0, i + h, h), fill=(226, 229, 235), width=8)
    lines = ["Upload an image or pick an example,", "then click on the object."]
    y = h // 2 - 14
    for line in lines:
        box = d.textbbox((0, 0), line)
        d.text(((w - (box[2] - box[0])) / 2, y), line, fill=(60, 64, 72))
        y += 18
    return im


# ------------------------------------------------------------------------------- Gradio
_CSS = """
#samref-status p { font-size: 1.05em; margin: 0.2em 0; }
#samref-status .samref-error { color: #b00020; font-weight: 600; }
#samref-view img { cursor: crosshair; }
"""

# Right-click on the picture: compute the image pixel under the pointer (the <img> is drawn
# with object-fit: contain) and send it through a hidden textbox + button.
_HEAD = """
<script>
(() => {
  const send = (x, y) => {
    const box = document.querySelector('#samref-rclick textarea, #samref-rclick input');
    const btn = document.querySelector('#samref-rclick-btn');
    if (!box || !btn) return;
    box.value = `${x},${y},${Date.now()}`;
    box.dispatchEvent(new Event('input', {bubbles: true}));
    setTimeout(() => btn.click(), 30);
  };
  document.addEventListener('contextmenu', (e) => {
    const img = e.target.closest ? e.target.closest('#samref-view img') : null;
    if (!img || !img.naturalWidth) return;
    e.preventDefault();
    const r = img.getBoundingClientRect();
    const s = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
    const ox = r.left + (r.width - img.naturalWidth * s) / 2;
    const oy = r.top + (r.height - img.naturalHeight * s) / 2;
    const x = Math.floor((e.clientX - ox) / s), y = Math.floor((e.clientY - oy) / s);
    if (x < 0 || y < 0 || x >= img.naturalWidth || y >= img.naturalHeight) return;
    send(x, y);
  }, true);
})();
</script>
"""


def _error_md(message: str) -> str:
    return f'<span class="samref-error">⚠️ {message}</span>'


def build_app(
    checkpoint: str | Any = "tiny",
    examples: Sequence[str | Path] | None = None,
    title: str = "SAM-REF interactive segmentation",
):
    """The Gradio Blocks app. ``checkpoint``: directory, bundled name, or a ready predictor."""
    if gr is None:
        raise ImportError("the browser demo needs Gradio: pip install 'samref-jax[demo]'")

    if isinstance(checkpoint, (str, Path)):
        backend = DemoBackend.from_checkpoint(str(checkpoint))
        ck_label = str(checkpoint)
    else:
        backend = DemoBackend(checkpoint)
        ck_label = type(checkpoint).__name__
    examples = [str(p) for p in (example_paths() if examples is None else examples)]

    def outputs(s: UserState | None, message: str | None = None):
        """(state, view, comparison, status, download) for a user's state."""
        if s is None:
            return (
                None,
                placeholder(),
                None,
                message or "Upload an image or pick an example.",
                gr.DownloadButton(value=None, interactive=False),
            )
        mask = backend.mask_file(s)
        return (
            s,
            backend.overlay(s),
            backend.comparison(s),
            message or backend.describe(s),
            gr.DownloadButton(value=str(mask) if mask else None, interactive=mask is not None),
        )

    def guarded(fn):
        @functools.wraps(fn)
        def run(*args):
            try:
                return fn(*args)
            except UserError as e:
                message = str(e)
            except Exception as e:  # never a stack trace in the page
                log.exception("demo handler %s failed", fn.__name__)
                message = f"Something went wrong ({type(e).__name__}: {e}). See the server log."
            return gr.skip(), gr.skip(), gr.skip(), _error_md(message), gr.skip()

        return run

    @guarded
    def on_upload(path, mode):
        if path is None:  # the file was removed from the upload box: keep the current image
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return outputs(backend.load(path, mode))

    @guarded
    def on_select(s, sign, evt: gr.SelectData):
        if s is None:
            raise UserError("Upload an image or pick an example first, then click on it.")
        x, y = _scaled(s, evt.index)
        return outputs(backend.click(s, x, y, sign == SIGN_POSITIVE))

    @guarded
    def on_right_click(s, spec):
        if s is None:
            raise UserError("Upload an image or pick an example first, then click on it.")
        try:
            x, y = (float(v) for v in str(spec).split(",")[:2])
        except ValueError:
            raise UserError("Could not read the right-click position.") from None
        x, y = _scaled(s, (x, y))
        return outputs(backend.click(s, x, y, False))

    @guarded
    def on_undo(s):
        return outputs(backend.undo(s))

    @guarded
    def on_reset(s):
        return outputs(backend.reset(s))

    @guarded
    def on_mode(s, mode):
        s = backend.set_mode(s, mode)
        if s is None:
            return gr.skip(), gr.skip(), gr.skip(), f"Mode: {MODE_LABELS[mode]}.", gr.skip()
        return outputs(s, None if s.clicks else f"Mode: {MODE_LABELS[mode]}.")

    # Gradio copies each mask it serves into its cache: every 30 min, drop copies over 1 h old.
    with gr.Blocks(title=title, delete_cache=(1800, 3600)) as demo:
        gr.Markdown(
            f"## {title}\n"
            "Upload an image (or pick an example), then **left-click** to add a point "
            "(object or background, per the toggle) and **right-click** to add a background "
            "point. The mask is tinted blue, the PatchDiff window is the yellow dashed box. "
            f"Model: `{ck_label}`."
        )
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                view = gr.Image(
                    value=placeholder(),
                    label="Click on the image",
                    type="pil",
                    format="png",
                    interactive=False,
                    elem_id="samref-view",
                    buttons=[],
                )
            with gr.Column(scale=2):
                upload = gr.File(label="Upload an image", type="filepath", elem_id="samref-upload")
                if examples:
                    gr.Examples(
                        examples=[[p] for p in examples],
                        inputs=[upload],
                        label="Examples (procedurally generated)",
                    )
                sign = gr.Radio(
                    [SIGN_POSITIVE, SIGN_NEGATIVE],
                    value=SIGN_POSITIVE,
                    label="Left-click adds",
                    elem_id="samref-sign",
                )
                mode = gr.Radio(
                    [(MODE_LABELS[m], m) for m in MODES],
                    value="full",
                    label="Mode",
                    elem_id="samref-mode",
                )
                with gr.Row():
                    undo = gr.Button("Undo", elem_id="samref-undo")
                    reset = gr.Button("Reset", elem_id="samref-reset")
                download = gr.DownloadButton(
                    "Download mask PNG", value=None, interactive=False, elem_id="samref-download"
                )
                status = gr.Markdown("Upload an image or pick an example.", elem_id="samref-status")
        compare = gr.Image(
            label="Last click: SAM | GlobalDiff | final",
            show_label=False,
            type="pil",
            format="png",
            interactive=False,
            elem_id="samref-compare",
        )
        rclick = gr.Textbox(visible="hidden", elem_id="samref-rclick")
        rclick_btn = gr.Button("right-click", visible="hidden", elem_id="samref-rclick-btn")

        outs = [state, view, compare, status, download]
        upload.change(on_upload, [upload, mode], outs)
        view.select(on_select, [state, sign], outs)
        rclick_btn.click(on_right_click, [state, rclick], outs)
        undo.click(on_undo, [state], outs)
        reset.click(on_reset, [state], outs)
        mode.change(on_mode, [state, mode], outs)
    demo.samref_backend = backend  # for tests and notebooks
    return demo


def _scaled(s: UserState, index: Sequence[float]) -> tuple[float, float]:
    """Displayed-pixel click -> original pixel (clipped inside the image)."""
    h, w = s.image.shape[:2]
    k = s.display_scale
    x = (float(index[0]) + 0.5) / k - 0.5
    y = (float(index[1]) + 0.5) / k - 0.5
    return float(np.clip(round(x), 0, w - 1)), float(np.clip(round(y), 0, h - 1))


def launch(
    checkpoint: str = "tiny",
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    **kw: Any,
):
    """Build and serve the app (blocks until stopped unless ``prevent_thread_lock=True``)."""
    demo = build_app(checkpoint)
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        css=_CSS,
        head=_HEAD,
        show_error=False,
        footer_links=[],
        **kw,
    )
