"""Memory and time of reading COCO-format annotations at COCO 2017 / LVIS v1 train scale.

    python benchmarks/coco_index_memory.py                  # both files at full scale
    python benchmarks/coco_index_memory.py --scale 0.05     # a quick check

``samref prepare-coco`` parses every annotation file it is given
(``samref_jax.data.coco.load_annotation_file``) and merges them into one image index
(``index_images``) on every host before it writes that host's shards. This script writes
synthetic files with the real files' counts (COCO 2017 train: 118,287 images, 860,001
annotations; LVIS v1 train: 100,170 images over the same pictures, 1,270,141 annotations),
one polygon per annotation with ``--coco-coords`` / ``--lvis-coords`` numbers (defaults chosen so
that the files come out near the real ones' sizes, 448 MB and about 1.1 GB; printed), then, in
a fresh process per step, measures the peak RSS and wall time of parsing LVIS, parsing both,
and parsing + indexing both, with a peer: LVIS parsed by plain ``json.load`` into Python's
own objects; then, with a flat 640x480 JPEG written for every image, one host's share of
``samref prepare-coco`` (process 0 of ``--process-count``: its ``--num-shards`` shards written,
records and all). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import machine_line  # noqa: E402

COCO_TRAIN = dict(images=118_287, annotations=860_001)
LVIS_TRAIN = dict(images=100_170, annotations=1_270_141)


def write_file(path: Path, n_images: int, n_anns: int, coords: int, seed: int) -> int:
    """A COCO-format JSON with ``n_images`` 640x480 images and ``n_anns`` polygon annotations
    spread over them; returns its size in bytes. Written as text, one annotation at a time."""
    rng = np.random.default_rng(seed)
    with path.open("w") as fh:
        fh.write('{"info": {}, "categories": [{"id": 1, "name": "thing"}], "images": [')
        for i in range(n_images):
            sep = "," if i else ""
            fh.write(
                f'{sep}{{"id": {i + 1}, "file_name": "{i + 1:012d}.jpg", '
                f'"height": 480, "width": 640}}'
            )
        fh.write('], "annotations": [')
        image_ids = rng.integers(1, n_images + 1, n_anns)
        for j in range(n_anns):
            xy = rng.uniform(0, 480, coords).round(2)
            poly = ",".join(f"{v:g}" for v in xy)
            sep = "," if j else ""
            fh.write(
                f'{sep}{{"id": {j + 1}, "image_id": {int(image_ids[j])}, "category_id": 1, '
                f'"iscrowd": 0, "area": 1234.5, "bbox": [1, 2, 30, 40], '
                f'"segmentation": [[{poly}]]}}'
            )
        fh.write("]}")
    return path.stat().st_size


_STEP = """
import resource, sys, time
from samref_jax.data import coco
t0 = time.perf_counter()
files = sys.argv[2:]
if sys.argv[1] == "prepare":  # one of P processes: its shards j with j % P == 0, written
    from samref_jax.data.coco_tfds import prepare_coco
    images, out, n, procs = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    files = sys.argv[6:]
    prepare_coco("bench", files, [images], out, num_shards=n, shards=range(0, n, procs),
                 log=lambda *a: None)
elif sys.argv[1] == "plain":  # the peer: Python's own JSON objects
    import json
    parsed = [json.load(open(f, "rb")) for f in files]
else:
    parsed = [coco.load_annotation_file(f) for f in files]
if sys.argv[1] == "index":
    entries = coco.index_images(parsed, files)
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_images(folder: Path, n_images: int) -> None:
    """``n_images`` 640x480 JPEG files named as ``write_file`` lists them (one flat picture)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (120, 110, 100)).save(buf, "JPEG")
    folder.mkdir()
    for i in range(n_images):
        (folder / f"{i + 1:012d}.jpg").write_bytes(buf.getvalue())


def measure(step: str, files: list[Path], *extra: object) -> tuple[float, float]:
    """(wall s, peak RSS GiB) of one step in a fresh interpreter."""
    out = (
        subprocess.run(
            [sys.executable, "-c", _STEP, step, *map(str, extra), *map(str, files)],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        .stdout.splitlines()[-1]
        .split()
    )  # TFDS prints its progress too
    return float(out[0]), float(out[1]) / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the real counts")
    ap.add_argument("--coco-coords", type=int, default=60, help="polygon numbers per COCO ann")
    ap.add_argument("--lvis-coords", type=int, default=110, help="polygon numbers per LVIS ann")
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temp dir)")
    ap.add_argument(
        "--num-shards", type=int, default=64, help="prepare step: shards (0: no prepare step)"
    )
    ap.add_argument(
        "--process-count", type=int, default=8, help="prepare step: processes sharing them"
    )
    a = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        tmp = Path(tmp)
        sizes = {}
        t0 = time.perf_counter()
        for name, counts, coords, seed in (
            ("lvis", LVIS_TRAIN, a.lvis_coords, 0),
            ("coco", COCO_TRAIN, a.coco_coords, 1),
        ):
            n_img = max(1, round(counts["images"] * a.scale))
            n_ann = max(1, round(counts["annotations"] * a.scale))
            size = write_file(tmp / f"{name}.json", n_img, n_ann, coords, seed)
            sizes[name] = (n_img, n_ann, size)
        print(f"wrote the files in {time.perf_counter() - t0:.0f} s")
        lvis, both = [tmp / "lvis.json"], [tmp / "lvis.json", tmp / "coco.json"]
        rows = [
            ("peer: parse LVIS with plain `json.load`", *measure("plain", lvis)),
            ("parse LVIS", *measure("parse", lvis)),
            ("parse LVIS + COCO", *measure("parse", both)),
            ("parse + index LVIS + COCO", *measure("index", both)),
        ]
        if a.num_shards:
            t0 = time.perf_counter()
            write_images(tmp / "images", sizes["coco"][0])
            print(f"wrote {sizes['coco'][0]:,} images in {time.perf_counter() - t0:.0f} s")
            n, p = a.num_shards, a.process_count
            mine = len(range(0, n, p))
            rows.append(
                (
                    f"prepare-coco, process 0 of {p}: parse, index, write {mine} of {n} shards",
                    *measure("prepare", both, tmp / "images", tmp / "tfds", n, p),
                )
            )

    print()
    print(machine_line())
    print(
        f"scale {a.scale:g}; "
        + "; ".join(
            f"{k}: {n_img:,} images, {n_ann:,} annotations, {size / 1e6:.0f} MB"
            for k, (n_img, n_ann, size) in sizes.items()
        )
    )
    print()
    print("| step (fresh process) | wall | peak RSS |")
    print("|---|---|---|")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.1f} s | {rss:.2f} GiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
