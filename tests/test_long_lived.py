"""A long-lived process stays bounded: many images of many sizes through one predictor compile
a bounded set of programs (none once the resize tiles are warm) and hold steady memory.

``python -m pytest -q -s tests/test_long_lived.py`` prints the measured numbers quoted in
docs/design.md ("Long-lived processes").
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterator

import jax
import numpy as np

from samref_jax.sam.transforms import get_preprocess_shape, resize_programs, resize_tiles

# Emitted once per program lowered for compilation (whether XLA compiles it or finds it in
# the persistent compilation cache): one per new program in this process.
_LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@contextlib.contextmanager
def _count_programs() -> Iterator[list[str]]:
    """Yields a list that collects the name of each program lowered inside the block."""
    seen: list[str] = []

    def listener(event: str, duration: float, **kw) -> None:
        if event == _LOWERED:
            seen.append(str(kw.get("fun_name", "?")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _rss_mib() -> float:
    """Resident memory of this process now (MiB); the peak where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _tile_key(h: int, w: int, frame: int) -> tuple[int, int, bool]:
    """What the resize programs of an (h, w) image depend on: tile lengths and axis order."""
    w_in = get_preprocess_shape(h, w, frame)[1]
    return resize_tiles(h)[1], resize_tiles(w)[1], w > w_in


def test_samref_predictor_100_images_30_sizes_stay_bounded():
    """100 images of 30 random sizes (three clicks each, "full" mode) after a warm-up of one
    image per resize tile shape at other sizes: no program is compiled for the 100 images, and
    resident memory over the second 50 grows by less than 32 MiB."""
    from samref_jax.samref.predictor import SamRefPredictor

    predictor = SamRefPredictor.from_checkpoint("tiny", mode="full")
    frame = predictor.sam_config.img_size
    rng = np.random.default_rng(0)
    sizes: list[tuple[int, int]] = []
    while len(sizes) < 30:
        h, w = (int(v) for v in rng.integers(24, 1400, 2))
        if (h, w) not in sizes and min(get_preprocess_shape(h, w, frame)) >= 1:
            sizes.append((h, w))

    def run(h: int, w: int) -> None:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        predictor.set_image(image)
        for k in range(3):
            result = predictor.click(w * (k + 1) / 4, h / 2, positive=k != 1)
        assert result.mask.shape == (h, w)

    # Warm-up: one image per tile shape the 30 sizes need, at sizes not among them.
    warm: dict[tuple[int, int, bool], tuple[int, int]] = {}
    for h, w in sizes:
        key = _tile_key(h, w, frame)
        for dh, dw in [(-1, -1), (1, 1), (-1, 1), (1, -1), (-2, -2), (2, 2)]:
            other = (h + dh, w + dw)
            if key not in warm and other not in sizes and _tile_key(*other, frame) == key:
                warm[key] = other
        assert key in warm
    with _count_programs() as warm_up:
        for h, w in warm.values():
            run(h, w)
    assert len(warm) < len(sizes)
    warm_resize = resize_programs()

    order = list(range(len(sizes))) + [int(i) for i in rng.integers(0, len(sizes), 70)]
    rss = []
    with _count_programs() as compiled:
        for n, i in enumerate(order):
            run(*sizes[i])
            if n + 1 in (1, 50, 100):
                rss.append(_rss_mib())
    print(
        f"\n{len(sizes)} sizes, {len(order)} images x 3 clicks: warm-up {len(warm)} images "
        f"compiled {len(warm_up)} programs ({warm_resize} resize tiles), then {len(compiled)}; "
        f"RSS after image 1 / 50 / 100: {rss[0]:.0f} / {rss[1]:.0f} / {rss[2]:.0f} MiB"
    )
    assert compiled == [], compiled  # new image sizes in warm tiles compile nothing
    assert resize_programs() == warm_resize
    assert rss[2] - rss[1] < 32, rss


def test_sam_predictor_new_image_sizes_compile_nothing_once_tiles_are_warm():
    """SamPredictor (tiny random weights): `predict` and `predict_batch` on images of new
    sizes whose resize tiles are warm compile no program."""
    from samref_jax.sam import sam_config
    from samref_jax.sam.build import SamModel
    from samref_jax.sam.model import init_sam_params
    from samref_jax.sam.predictor import SamPredictor

    cfg = sam_config("tiny")
    predictor = SamPredictor(SamModel(cfg, init_sam_params(cfg, jax.random.key(0, impl="rbg"))))
    rng = np.random.default_rng(1)

    def run(h: int, w: int) -> None:
        predictor.set_image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        masks, _, _ = predictor.predict(np.array([[w / 2, h / 2]]), np.array([1]))
        assert masks.shape == (3, h, w)
        pts = np.array([[[w / 3, h / 3]], [[w / 2, h / 4]]])
        masks, _, _ = predictor.predict_batch(pts, np.ones((2, 1)), multimask_output=False)
        assert masks.shape == (2, 1, h, w)

    run(200, 300)
    with _count_programs() as compiled:
        for h, w in [(199, 299), (250, 380), (230, 260), (211, 383)]:  # tiles 256 x 384
            run(h, w)
    assert compiled == [], compiled
