"""COCO-format instance data (COCO 2017, LVIS v1, merged) as TFDS ArrayRecord, one record per
IMAGE, prepared in shards by any number of processes and read with Grain.

``samref prepare-coco`` (:func:`main`) or :func:`prepare_coco` reads the annotation JSONs
(merged by image file name, :mod:`samref_jax.data.coco`), finds each image in the image
folders, and writes every image once, as its encoded file, with its instances as compressed
RLE strings (record fields: :mod:`samref_jax.data.coco`)::

    samref prepare-coco --name coco_lvis --data-dir gs://bucket/tfds \\
        --annotations lvis_v1_train.json --annotations instances_train2017.json \\
        --images gs://bucket/coco/train2017 --num-shards 64 \\
        --process-index $I --process-count 8

Sharding: the images of a split, sorted by file name, are dealt round-robin to ``num_shards``
shards (image ``k`` to shard ``k % N``, as its ``k // N``-th record). Each shard is a complete
TFDS dataset of the builder ``samref_coco`` (no TensorFlow; the recipe of
``tfds_builders.py``) with the config ``<name>-<j>-of-<N>``, under
``<data_dir>/samref_coco/<name>-0000j-of-0000N/1.0.0/``. A process writes the shards ``j`` with
``j % process_count == process_index`` (every process runs the same command with its own index;
a shard appears only when complete, so an interrupted run resumes at the missing ones). Every
process reads all annotation files (they decide the order); a shard process converts only its
images' masks.

Reading (:class:`CocoSource`, :func:`coco_source`): the shards interleaved back, record ``k`` =
image ``k``, so the source is the same for any number of shards (a training run's data order
does not depend on how its data was prepared). ``len`` is the number of images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from samref_jax.data import coco
from samref_jax.data.decode import DataError
from samref_jax.paths import as_path

__all__ = [
    "BUILDER_NAME",
    "CocoInstancesBuilder",
    "CocoNotPreparedError",
    "CocoShardConfig",
    "CocoSource",
    "coco_source",
    "main",
    "prepare_coco",
    "source_for_config",
]

BUILDER_NAME = "samref_coco"
_VERSION = "1.0.0"
_SHARD_RE = re.compile(r"^(?P<name>[a-z0-9_]+)-(?P<j>\d{5})-of-(?P<n>\d{5})$")


class CocoNotPreparedError(FileNotFoundError):
    """The prepared COCO-format data is missing or incomplete; the message gives the command."""


@dataclasses.dataclass(eq=False)
class CocoShardConfig(tfds.core.BuilderConfig):
    """One shard: ``images[split]`` are its images (in record order), ``dedup_iou`` the merge
    rule. ``description`` holds the preparation's JSON summary (sources, sizes, shard)."""

    images: dict = dataclasses.field(default_factory=dict, repr=False)
    dedup_iou: float | None = 0.8


def shard_config_name(name: str, j: int, n: int) -> str:
    return f"{name}-{j:05d}-of-{n:05d}"


class CocoInstancesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder: one example per image of COCO-format instance annotations (one shard)."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version(_VERSION)
    RELEASE_NOTES = {_VERSION: "Initial release (samref-jax)."}
    code_path = None  # no checksums file (see tfds_builders.py)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.builder_config.description if self.builder_config else "",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "id": tfds.features.Text(),
                    "image_id": tfds.features.Tensor(shape=(), dtype=np.int64),
                    "hw": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                    "masks": tfds.features.Sequence(tfds.features.Text()),
                    "area": tfds.features.Tensor(shape=(None,), dtype=np.float32),
                    "category": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "crowd": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                    "ann_id": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                    "source": tfds.features.Tensor(shape=(None,), dtype=np.int8),
                }
            ),
            disable_shuffling=True,  # record order = image order (module docstring)
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        cfg = self.builder_config
        return {s: self._generate_examples(imgs, cfg.dedup_iou) for s, imgs in cfg.images.items()}

    def _generate_examples(self, images: list, dedup_iou: float | None) -> Any:
        for e in images:
            try:
                data = as_path(e.path).read_bytes()
                size = coco.image_size(data)
            except OSError as err:
                raise DataError(f"cannot read image {e.path}: {err}") from None
            except Exception as err:  # Pillow: not an image
                raise DataError(f"cannot decode image {e.path}: {err}") from None
            if size != (e.width, e.height):
                raise DataError(
                    f"image {e.path} is {size[0]}x{size[1]}, its annotations say "
                    f"{e.width}x{e.height}"
                )
            yield (
                e.key,
                {
                    "image": data,
                    "id": e.key,
                    "image_id": e.image_id,
                    "hw": np.array([e.height, e.width], np.int32),
                    **coco.encode_instances(e, dedup_iou),
                },
            )


# ------------------------------------------------------------------------------- reading


def _shard_dirs(name: str, data_dir: Any) -> dict[int, dict[int, Any]]:
    """``{num_shards: {j: dataset dir}}`` of the complete shards of ``name`` under data_dir."""
    root = as_path(data_dir) / BUILDER_NAME
    out: dict[int, dict[int, Any]] = {}
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _SHARD_RE.match(p.name)
        if m and m["name"] == name and (p / _VERSION / "dataset_info.json").is_file():
            out.setdefault(int(m["n"]), {})[int(m["j"])] = p / _VERSION
    return out


def _description(ds_dir: Any) -> dict:
    info = json.loads((as_path(ds_dir) / "dataset_info.json").read_text())
    return json.loads(info.get("description") or "{}")


def _prepare_command(name: str, data_dir: Any) -> str:
    return (
        f"samref prepare-coco --name {name} --data-dir {data_dir} --annotations FILE.json "
        "--images IMAGE_FOLDER (or set data.coco.annotations and data.coco.images)"
    )


class CocoSource:
    """Random access to a prepared split: ``source[k]`` is image ``k``'s record (a dict of
    numpy values, fields in :mod:`samref_jax.data.coco`). Picklable (Grain worker processes).

    Attributes: ``name``, ``split``, ``data_dir`` (the TFDS data_dir), ``num_shards``,
    ``description`` (the preparation's sources and sizes).
    """

    def __init__(
        self, name: str, data_dir: Any, split: str = "train", num_shards: int | None = None
    ) -> None:
        self.name, self.split = coco.check_name(name), split or "train"
        self.data_dir = as_path(data_dir)
        found = _shard_dirs(name, self.data_dir)
        if num_shards is not None:
            found = {n: s for n, s in found.items() if n == int(num_shards)}
        complete = {n: s for n, s in found.items() if len(s) == n}
        where = self.data_dir / BUILDER_NAME
        if not complete:
            if found:
                n, s = max(found.items(), key=lambda kv: len(kv[1]))
                missing = [j for j in range(n) if j not in s]
                raise CocoNotPreparedError(
                    f"{name} under {where} is incomplete: {len(missing)} of {n} shards missing "
                    f"(first: {missing[:4]}); rerun the prepare-coco command for them"
                )
            raise CocoNotPreparedError(
                f"{name} is not prepared under {where}; run: {_prepare_command(name, data_dir)}"
            )
        if len(complete) > 1:
            raise DataError(
                f"{name} under {where} is prepared with several shard counts "
                f"{sorted(complete)}; delete all but one"
            )
        (self.num_shards, dirs) = next(iter(complete.items()))
        descs = [_description(dirs[j]) for j in range(self.num_shards)]
        self.description = {k: v for k, v in descs[0].items() if k != "shard_index"}
        for j, d in enumerate(descs):
            if {k: v for k, v in d.items() if k != "shard_index"} != self.description:
                raise DataError(
                    f"shard {j} of {name} under {where} comes from another preparation "
                    "(other sources or settings); prepare all shards with the same command"
                )
        sizes = self.description.get("split_sizes", {})
        if self.split not in sizes:
            raise CocoNotPreparedError(
                f"{name} under {where} has splits {sorted(sizes)}, not {self.split!r}"
            )
        self._n = int(sizes[self.split])
        self.shards = [
            tfds.builder_from_directory(os.fspath(dirs[j])).as_data_source(split=self.split)
            for j in range(self.num_shards)
        ]
        for j, s in enumerate(self.shards):
            if len(s) != len(range(j, self._n, self.num_shards)):
                raise DataError(f"shard {j} of {name} under {where} has {len(s)} records")

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, k: int) -> dict:
        k = int(k)
        if not -self._n <= k < self._n:
            raise IndexError(k)
        k %= self._n
        return self.shards[k % self.num_shards][k // self.num_shards]

    def __repr__(self) -> str:
        return (
            f"CocoSource({self.name!r}, {os.fspath(self.data_dir)!r}, split={self.split!r}, "
            f"n={self._n}, shards={self.num_shards})"
        )


def coco_source(
    name: str, data_dir: Any, split: str = "train", num_shards: int | None = None
) -> CocoSource:
    """The prepared split ``split`` of ``name`` under ``data_dir`` (:class:`CocoSource`)."""
    return CocoSource(name, data_dir, split, num_shards)


# ------------------------------------------------------------------------------- writing


def _split_annotations(annotations: Any) -> dict[str, list[str]]:
    """``{split: [files]}`` from a dict, or a list of ``[SPLIT=]FILE`` strings."""
    if isinstance(annotations, dict):
        out = {str(k): [os.fspath(f) for f in v] for k, v in annotations.items()}
    else:
        out = {}
        for a in [annotations] if isinstance(annotations, str | os.PathLike) else annotations:
            a = os.fspath(a)
            m = re.match(r"^([a-z][a-z0-9_]*)=(.+)$", a)
            split, f = (m[1], m[2]) if m else ("train", a)
            out.setdefault(split, []).append(f)
    if not out or not all(out.values()):
        raise DataError("give at least one annotation file")
    return out


def prepare_coco(
    name: str,
    annotations: Any,
    images: Sequence[Any] | str,
    data_dir: Any,
    *,
    num_shards: int = 1,
    shards: Sequence[int] | None = None,
    dedup_iou: float | None = 0.8,
    allow_missing_images: bool = False,
    log: Any = None,
) -> dict:
    """Write shards ``shards`` (default: all) of ``name`` under ``data_dir`` (module docstring).

    Args:
      name: the prepared dataset's name (``[a-z0-9_]+``; ``data.name`` of a training config).
      annotations: ``{split: [annotation files]}``, or ``[SPLIT=]FILE`` strings (split
        ``train`` when not given); files of a split are merged in order (LVIS first).
      images: folder(s) holding the image files (local or ``gs://``).
      data_dir: the TFDS data directory.
      num_shards: shards per split; ``shards``: the ones this process writes.
      dedup_iou: IoU at which a later file's instance duplicates an earlier one (None: off).
      allow_missing_images: skip annotated images absent from every folder (else an error).
      log: ``print``-like for progress lines (default: stderr).

    Returns:
      ``{"split_sizes", "written", "skipped_existing", "missing_images"}``.
    """
    log = log or (lambda *a: print(*a, file=sys.stderr, flush=True))
    name = coco.check_name(name)
    ann = _split_annotations(annotations)
    folders = [os.fspath(f) for f in ([images] if isinstance(images, str) else images)]
    if not folders:
        raise DataError("give at least one image folder")
    n = int(num_shards)
    if n < 1 or n > 99999:
        raise DataError(f"num_shards must be in 1..99999, got {n}")
    todo = list(range(n)) if shards is None else sorted({int(j) for j in shards})
    if any(not 0 <= j < n for j in todo):
        raise DataError(f"shard indices must be in 0..{n - 1}, got {todo}")
    for f in folders:  # before the (long) annotation reading
        if not as_path(f).is_dir():
            raise DataError(f"image folder not found: {f}")
    data_dir = as_path(data_dir)
    settings = {
        "name": name,
        "annotations": ann,
        "images": folders,
        "dedup_iou": None if not dedup_iou else float(dedup_iou),
        "allow_missing_images": bool(allow_missing_images),
        "num_shards": n,
    }
    done = _shard_dirs(name, data_dir).get(n, {})
    for j in todo:
        if j in done:
            old = {k: v for k, v in _description(done[j]).items() if k in settings}
            if old != settings:
                raise DataError(
                    f"{done[j]} was prepared from other sources or settings; use another "
                    "--name or --data-dir, or delete it"
                )
    pending = [j for j in todo if j not in done]
    summary: dict[str, Any] = {
        "written": pending,
        "skipped_existing": [j for j in todo if j in done],
    }
    if not pending:
        return summary

    per_split: dict[str, list[coco.CocoImage]] = {}
    missing_total = 0
    for split, files in ann.items():
        log(f"{split}: reading {len(files)} annotation file(s)")
        parsed = [coco.load_annotation_file(f) for f in files]
        entries = coco.index_images(parsed, files)
        del parsed
        missing = coco.resolve_image_files(entries, folders)
        if missing and not allow_missing_images:
            raise DataError(
                f"{split}: {len(missing)} annotated image(s) are in none of the image folders "
                f"(first: {missing[0].names[-1]}); add --images folders or "
                "--allow-missing-images"
            )
        missing_total += len(missing)
        gone = {id(e) for e in missing}
        per_split[split] = [e for e in entries if id(e) not in gone]
        log(f"{split}: {len(per_split[split])} images, {len(missing)} missing")
    sizes = {s: len(v) for s, v in per_split.items()}
    mine = set(pending)
    for v in per_split.values():  # other processes' images: their annotations are not needed
        for k, e in enumerate(v):
            if k % n not in mine:
                e.anns = []
    summary |= {"split_sizes": sizes, "missing_images": missing_total}
    for j in pending:
        desc = {**settings, "split_sizes": sizes, "shard_index": j}
        cfg = CocoShardConfig(
            name=shard_config_name(name, j, n),
            description=json.dumps(desc, sort_keys=True),
            images={s: v[j::n] for s, v in per_split.items()},
            dedup_iou=settings["dedup_iou"],
        )
        b = CocoInstancesBuilder(
            data_dir=os.fspath(data_dir), config=cfg, file_format="array_record"
        )
        b.download_and_prepare()
        log(f"shard {j + 1}/{n} written: {b.data_dir}")
    return summary


# ------------------------------------------------------------------------------ training


def source_for_config(config: Any, data_dir: Any) -> CocoSource:
    """The training source of a ``data.format = "coco"`` config: ``data.name`` prepared under
    ``data_dir``; prepared here first (all shards, this process) when it is not and
    ``data.coco.annotations`` and ``data.coco.images`` are set."""
    d = config.data
    c = d.coco
    split = d.split or "train"
    try:
        return coco_source(d.name, data_dir, split)
    except CocoNotPreparedError:
        if not (c.get("annotations") and c.get("images")):
            raise
    prepare_coco(
        d.name,
        {split: list(c.annotations)},
        list(c.images),
        data_dir,
        num_shards=int(c.get("num_shards", 1) or 1),
        dedup_iou=c.get("dedup_iou"),
    )
    return coco_source(d.name, data_dir, split)


# ------------------------------------------------------------------------------ command line

DESCRIPTION = (
    "Convert COCO-format instance annotations (COCO 2017, LVIS v1; several files are merged by\n"
    "image file name, in the given order) and their images into TFDS ArrayRecord files under\n"
    "--data-dir: one record per image (the image file once, its instances as compressed RLE,\n"
    "area, category, crowd flag). Train on them with --config.data.format=coco\n"
    "--config.data.name=NAME --config.data.data_dir=DATA_DIR.\n"
    "Several processes: run the same command in each with --process-index I --process-count P;\n"
    "process I writes the shards j with j % P == I of the --num-shards N. Rerunning skips the\n"
    "shards already written."
)
EXAMPLE = (
    "samref prepare-coco --name coco_lvis --data-dir /data/tfds \\\n"
    "      --annotations /data/lvis/lvis_v1_train.json \\\n"
    "      --annotations /data/coco/annotations/instances_train2017.json \\\n"
    "      --images /data/coco/train2017 --num-shards 8 --process-index 0 --process-count 1"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser(prog: str = "samref prepare-coco") -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description=DESCRIPTION,
        epilog=f"example:\n  {EXAMPLE}",
        formatter_class=_Formatter,
    )
    p.add_argument("--name", required=True, help="dataset name ([a-z0-9_]+), e.g. coco_lvis")
    p.add_argument("--data-dir", required=True, help="TFDS data directory (local or gs://)")
    p.add_argument(
        "--annotations",
        action="append",
        required=True,
        metavar="[SPLIT=]FILE",
        help="COCO-format JSON; repeat to merge files (LVIS first, then COCO); a SPLIT= prefix "
        "names the split (default: train)",
    )
    p.add_argument(
        "--images",
        action="append",
        required=True,
        metavar="FOLDER",
        help="folder with the image files (repeat for several, e.g. train2017 and val2017)",
    )
    p.add_argument(
        "--dedup-iou",
        type=float,
        default=0.8,
        help="drop a later file's instance whose mask IoU with an earlier file's instance of "
        "the same image is at least this (0: keep all; default 0.8)",
    )
    p.add_argument("--num-shards", type=int, default=1, help="shards per split (default 1)")
    p.add_argument("--process-index", type=int, default=0, help="this process (default 0)")
    p.add_argument("--process-count", type=int, default=1, help="processes (default 1)")
    p.add_argument(
        "--allow-missing-images",
        action="store_true",
        help="skip annotated images found in no --images folder (default: an error)",
    )
    return p


def main(argv: Sequence[str] | None = None, prog: str = "samref prepare-coco") -> int:
    """``samref prepare-coco`` (module docstring); exit status 2 with one line on user errors."""
    args = build_parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.process_count < 1 or not 0 <= args.process_index < args.process_count:
            raise DataError(
                f"--process-index must be in 0..{args.process_count - 1} "
                f"(--process-count {args.process_count})"
            )
        if args.num_shards < 1:
            raise DataError(f"--num-shards must be >= 1, got {args.num_shards}")
        shards = [j for j in range(args.num_shards) if j % args.process_count == args.process_index]
        summary = prepare_coco(
            args.name,
            args.annotations,
            args.images,
            args.data_dir,
            num_shards=args.num_shards,
            shards=shards,
            dedup_iou=args.dedup_iou or None,
            allow_missing_images=args.allow_missing_images,
        )
    except (DataError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else repr(e)
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    print(
        f"{args.name}: shards {summary['written'] or 'none'} written, "
        f"{summary['skipped_existing'] or 'none'} already there"
        + (f"; split sizes {summary['split_sizes']}" if "split_sizes" in summary else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
