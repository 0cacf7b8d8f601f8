"""Host cost of one training example of the vit_b recipe's input pipeline, per CPU core.

    python benchmarks/input_pipeline.py --data-dir $SAMREF_DATA_DIR [--examples 60]

The recipe (``configs/samref_vit_b.py``) reads COCO-format image records and, per example,
draws an instance (``coco_sample``), augments it at PatchDiff's image scale (2 x the 1024
frame: random scale, crop, flip, colour jitter; ``augment``) and brings it to the frame with
its 2048 detail image, drawing the first click there (``detail_example``). This script builds
such records from the COCO_MVal masks (grouped by COCO image, compressed RLE,
``samref prepare-coco``) in a temporary folder, then, in one process on one core:

- times each stage per example, in turn on the same records and seeds;
- times reading one stored view of the embedding cache (what training on cached embeddings
  does per example instead), writing it (what ``samref cache-embeddings`` does per view in its
  main process), and reading the same views with their pixels zlib-compressed inside the
  record (the peer format);
- times the Grain dataset of the recipe as training builds it (``make_train_dataset``, batch 1,
  no worker processes: what one worker does);
- and a peer in the same run: the floor any SAM loader pays, Pillow decode of the same JPEG plus
  SAM's own preprocessing (longest side resized to 1024, padded).

Medians over ``--examples`` examples; prints a markdown table and, from the Grain row, the
worker cores that a given accelerator throughput needs (``--images-per-s``).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import struct
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import host_setup, machine_line, table  # noqa: E402


def coco_mval_records(mval: Path, tmp: Path) -> tuple[Path, Path]:
    """A COCO-format JSON of the COCO_MVal masks (one image per COCO image id) -> (json, images)."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    by_image: dict[str, list[Path]] = defaultdict(list)
    for p in sorted((mval / "gt").glob("*.png")):
        by_image[p.stem.rsplit("_", 1)[1]].append(p)
    images, anns = [], []
    for iid, masks in sorted(by_image.items()):
        first = masks[0].stem + ".jpg"
        h = w = None
        for p in masks:
            m = np.asarray(Image.open(p).convert("L")) == 255
            h, w = m.shape
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            seg = {"size": [h, w], "counts": rle["counts"].decode()}
            anns.append(
                {"id": len(anns) + 1, "image_id": int(iid), "category_id": 1, "iscrowd": 0}
                | {"segmentation": seg}
            )
        images.append({"id": int(iid), "file_name": first, "height": h, "width": w})
    path = tmp / "coco_mval.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path, mval / "img"


def zlib_record(example: dict) -> bytes:
    """An embedding-cache record whose pixel fields are zlib-compressed (level 1) inside it."""
    fields, chunks = [], []
    for name, value in example.items():
        a = np.asarray(value)
        z = name in ("image", "gt", "detail_image")
        data = zlib.compress(a.tobytes(), 1) if z else a.tobytes()
        fields.append([name, str(a.dtype), list(a.shape), z, len(data)])
        chunks.append(data)
    header = json.dumps(fields).encode()
    return b"".join([b"SREC", struct.pack("<I", len(header)), header, *chunks])


def per_example(fn, n: int) -> float:
    """Median seconds of ``fn(i)`` over i = 0..n-1 (after one untimed call)."""
    fn(0)
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder holding COCO_MVal/ (gt/, img/)")
    ap.add_argument("--examples", type=int, default=60, help="examples per timed row")
    ap.add_argument(
        "--images-per-s", type=float, default=132.0, help="accelerator throughput to feed"
    )
    a = ap.parse_args(argv)
    host_setup()

    import grain
    import ml_collections
    import ml_dtypes
    from etils import epath
    from PIL import Image

    from configs.samref_vit_b import get_config
    from samref_jax.data.coco_tfds import coco_source, prepare_coco
    from samref_jax.samref.model import detail_scale
    from samref_jax.training import pipeline as P
    from samref_jax.training.embedding_cache import _write_shard, decode_record, encode_record

    mval = Path(a.data_dir) / "COCO_MVal"
    if not (mval / "gt").is_dir():
        mval = Path(a.data_dir)
    n = int(a.examples)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ann, img_dir = coco_mval_records(mval, tmp)
        t0 = time.perf_counter()
        prepare_coco("bench_coco", [str(ann)], [str(img_dir)], tmp / "tfds", log=lambda *x: None)
        prep_s = time.perf_counter() - t0
        src = coco_source("bench_coco", tmp / "tfds")

        config = get_config()
        config.data.name, config.data.data_dir = "bench_coco", str(tmp / "tfds")
        config.data.per_device_batch_size, config.data.num_workers = 1, 0
        d = ml_collections.FrozenConfigDict(config.data)
        k = detail_scale(config.model)
        frame = 1024
        radius = float(config.model.click_radius)
        order = np.random.default_rng(0).permutation(len(src))
        records = [src[int(order[i % len(src)])] for i in range(n + 1)]
        rngs = lambda i: np.random.default_rng([1, i])  # noqa: E731

        samples = [P.coco_sample(records[i], rngs(i), d, src) for i in range(n + 1)]
        big = [
            P.augment(samples[i], rngs(i), frame * k, d, radius, src, k == 1) for i in range(n + 1)
        ]

        def stage_record(i):
            return P.coco_sample(src[int(order[i % len(src)])], rngs(i), d, src)

        def stage_augment(i):
            return P.augment(samples[i], rngs(i), frame * k, d, radius, src, k == 1)

        def stage_detail(i):
            return P.detail_example(big[i], rngs(i), frame, k, float(d.first_click_frac))

        def peer(i):
            with Image.open(io.BytesIO(bytes(records[i]["image"]))) as im:
                im = im.convert("RGB")
                s = frame / max(im.size)
                im = im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.BILINEAR)
                out = np.zeros((frame, frame, 3), np.uint8)
                arr = np.asarray(im)
                out[: arr.shape[0], : arr.shape[1]] = arr
            return out

        rows_s = [
            ("record read + instance sampled (`coco_sample`)", per_example(stage_record, n)),
            (f"augment at {frame * k} (`augment`)", per_example(stage_augment, n)),
            (
                f"to the {frame} frame + detail image (`detail_example`)",
                per_example(stage_detail, n),
            ),
        ]
        rows_s.append(("sum of the stages", sum(s for _, s in rows_s)))
        # Training on cached embeddings reads stored views instead: one record per example,
        # written and read as the cache does (`CachedViews`).
        emb = np.random.default_rng(0).standard_normal((64, 64, 256)).astype(ml_dtypes.bfloat16)
        shard = epath.Path(tmp) / "views.array_record"
        nv = min(n + 1, 8)
        made = [stage_detail(i) | {"embedding": emb} for i in range(nv)]
        t0 = time.perf_counter()
        _write_shard(shard, [encode_record(ex) for ex in made])
        write_s = (time.perf_counter() - t0) / nv
        view_src = grain.sources.ArrayRecordDataSource([str(shard)])
        view_mb = shard.stat().length / nv / 1e6
        rows_s.append(
            (
                f"cached view: read + decode (`embedding_cache`, {view_mb:.1f} MB on disk, bf16)",
                per_example(lambda i: decode_record(view_src[i % nv]), n),
            )
        )
        rows_s.append((f"cached view: encode + write (`cache-embeddings`, mean of {nv})", write_s))
        # Peer format: the pixel fields zlib-compressed (level 1) inside the record.
        zshard = epath.Path(tmp) / "views_zlib.array_record"
        _write_shard(zshard, [zlib_record(stage_detail(i) | {"embedding": emb}) for i in range(nv)])
        zsrc = grain.sources.ArrayRecordDataSource([str(zshard)])
        rows_s.append(
            (
                f"cached view, pixels zlib'd in the record ({zshard.stat().length / nv / 1e6:.1f} "
                "MB on disk)",
                per_example(lambda i: decode_record(zsrc[i % nv]), n),
            )
        )
        peer_row = (
            "peer: Pillow decode + resize to 1024 + pad (SAM's preprocessing)",
            per_example(peer, n),
        )
        # Grain runs the maps in its read threads: CPU time (all threads) per example drawn,
        # after the first few, from a fresh iterator of the training dataset.
        it = iter(P.make_train_dataset(config, src, 0, 1))
        for _ in range(4):
            batch = next(it)
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            next(it)
        grain_cpu = (time.process_time() - c0) / n
        grain_wall = (time.perf_counter() - w0) / n
        del it
        rows_s.append(("the recipe's Grain dataset (`make_train_dataset`), CPU time", grain_cpu))
        rows_s.append(peer_row)
        shapes = {kk: tuple(np.asarray(v).shape) for kk, v in batch.items()}

    grain_s, peer_s = rows_s[-2][1], rows_s[-1][1]
    cached_s = next(s for r, s in rows_s if r.startswith("cached view: read"))
    print()
    print(machine_line())
    print(
        f"COCO_MVal as COCO-format records: {len(src)} images; prepared in {prep_s:.1f} s; "
        f"{n} examples per row; example arrays {shapes}"
    )
    print()
    print(
        table(
            ["per example, one core", "median", "examples/s", "x peer"],
            [[r, f"{s * 1e3:.1f} ms", f"{1 / s:.1f}", f"{s / peer_s:.2f}"] for r, s in rows_s],
        )
    )
    print()
    print(
        f"feeding {a.images_per_s:g} images/s takes about {a.images_per_s * grain_s:.1f} worker "
        f"cores (Grain row), {a.images_per_s * cached_s:.1f} reading cached views (the reads "
        f"alone), {a.images_per_s * peer_s:.1f} for the peer alone; Grain here: "
        f"{grain_wall * 1e3:.0f} ms per example on the wall clock, {grain_cpu / grain_wall:.1f} "
        "cores busy"
    )
    print(
        f"cache-embeddings writes at most {1 / write_s:.0f} views/s per process (its main process "
        "encodes and compresses each view)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
