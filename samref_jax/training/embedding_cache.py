"""Cached image embeddings for training with a frozen image encoder.

With the encoder frozen, its forward pass is the same work every time an example is seen, and
at 1024 pixels it dominates the training step. :func:`build_cache` runs it once, over a fixed
number of augmented views of every training instance (``data.cached_views``; the pipeline's
augmentation changes the pixels the encoder sees, so the views are drawn once and stored), and
writes each view's training example together with its embedding::

    image uint8 (F, F, 3), gt int8 (F, F), valid_hw int32 (2,), first_click int32 (2,),
    radius float32 (), embedding float32 | bfloat16 (S, S, D)   (``data.cache_dtype``)

Layout (``cache_location``: ``data.cache_dir``, else beside the prepared TFDS records as
``<data_dir>/embeddings/<builder>/<split>-<fingerprint>/``)::

    views-00000-of-00012.array_record   records [0, R), [R, 2R), ... (R = records per shard)
    metadata.json                       written last: the cache is complete

Record ``k * V + v`` is view ``v`` of the k-th training instance (``split_indices``), drawn
with ``np.random.default_rng((seed, 7919, instance, v))`` by ``pipeline.augment``: the
cache's content does not depend on the number of processes or devices that built it.
``fingerprint`` hashes every config field that changes the stored bytes (dataset, split,
held-out instances, seed, augmentation, SAM's architecture, the initial checkpoint, compute and
storage dtypes, views), so a changed config looks in another folder instead of reading stale
embeddings.

Records are ArrayRecord files (the ``array_record`` package, zstd-compressed per record,
read back with Grain's ``ArrayRecordDataSource``; no TensorFlow). Each record is a small
self-describing container: ``b"SREC"``, a little-endian uint32 header length, a JSON header
(name, dtype, shape, zlib flag and byte count per field), then the fields' raw bytes (a field
with the zlib flag is inflated on reading; ArrayRecord's zstd reads back faster than zlib
inflates and compresses the images as well: docs/benchmarks.md, ``input_pipeline.py``).

Several processes: shards are dealt round-robin (shard ``j`` to process ``j % P``), each
process makes its views with Grain (``data.num_workers`` worker processes, ``data.read_threads``
threads each: the augmentation, not the encoder, is the host's work), embeds them in batches
over its local devices (one ``jax.jit`` over a mesh of them, the next batch augmented
meanwhile), and writes each shard under a temporary name first (renamed, or copied for a cloud
location, when complete); an interrupted build resumes at the first missing shard. Process 0
writes ``metadata.json`` after all processes are done.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import tempfile
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from samref_jax.paths import as_path, is_local

__all__ = [
    "CacheNotFoundError",
    "CachedViews",
    "build_cache",
    "cache_location",
    "decode_record",
    "encode_record",
    "fingerprint",
    "open_cache",
]

_MAGIC = b"SREC"
_WRITER_OPTIONS = "group_size:1,zstd:3"  # one record per chunk: random access
_VIEW_SEED = 7919  # separates the cache's view streams from the pipeline's seeds
CACHE_DTYPES = ("float32", "bfloat16")


class CacheNotFoundError(FileNotFoundError):
    """No complete embedding cache where the config points; the message gives the command."""


# ----------------------------------------------------------------------------- records


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def encode_record(example: dict[str, np.ndarray]) -> bytes:
    """One example (dict of numpy arrays) -> record bytes (module docstring)."""
    fields, chunks = [], []
    for name, value in example.items():
        a = np.asarray(value)
        data = a.tobytes()  # C order, whatever the strides (and 0-d stays 0-d)
        fields.append([name, str(a.dtype), list(a.shape), False, len(data)])
        chunks.append(data)
    header = json.dumps(fields, separators=(",", ":")).encode()
    return b"".join([_MAGIC, struct.pack("<I", len(header)), header, *chunks])


def decode_record(record: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_record`."""
    if record[:4] != _MAGIC:
        raise ValueError("not an embedding-cache record")
    (n,) = struct.unpack("<I", record[4:8])
    fields = json.loads(record[8 : 8 + n])
    out, pos = {}, 8 + n
    for name, dtype, shape, z, size in fields:
        data = record[pos : pos + size]
        pos += size
        if z:
            data = zlib.decompress(data)
        out[name] = np.frombuffer(data, _dtype(dtype)).reshape(shape)
    return out


# ------------------------------------------------------------------------------ location


def _fingerprint_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    from samref_jax.samref.model import detail_scale

    d, m, t = config.data, config.model, config.train
    coco = {}
    if str(d.get("format", "folder") or "folder") == "coco":  # the instance drawn per view
        coco = {"coco": {k: d.coco.get(k) for k in ("min_area", "merge_prob", "max_merged")}}
    detail = {}  # only when on, like copy-paste below
    if detail_scale(m) > 1:  # views hold the image at k x the frame (pipeline.detail_example)
        detail = {"image_scale": detail_scale(m)}
    paste = {}  # only when on: caches built before copy-paste existed keep their fingerprint
    if float(d.get("copy_paste_prob", 0.0) or 0.0) > 0:  # pasted views (pipeline.copy_paste)
        keys = ("prob", "scale", "distractor_prob", "max_cover")
        paste = {"copy_paste": {k: d.get("copy_paste_" + k) for k in keys}}
    aug = (
        "scale_min",
        "scale_max",
        "zoom_in",
        "flip",
        "jitter",
        "min_object_pixels",
        "first_click_frac",
    )
    return {
        "dataset": str(d.name),
        "split": str(d.split or ""),
        "heldout_every": int(d.heldout_every),
        "seed": int(config.seed),
        "augmentation": {k: d.get(k) for k in aug},
        "views": int(d.cached_views),
        "cache_dtype": str(d.cache_dtype),
        "sam_type": str(m.sam_type),
        "sam_overrides": m.get("sam_overrides"),
        "click_radius": float(m.click_radius),
        "compute_dtype": str(t.dtype),
        "init_checkpoint": str(t.get("init_checkpoint") or ""),
        "init_subtrees": list(t.get("init_subtrees", ()) or ()),
        **coco,
        **paste,
        **detail,
    }


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """12 hex digits of the config fields that change the cache's bytes (module docstring)."""
    fields = _fingerprint_fields(config)
    text = json.dumps(fields, sort_keys=True, default=lambda x: list(x) if x else None)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _builder_name(name: str, data_format: str = "folder") -> str:
    from samref_jax.data.folders import get_layout

    if data_format == "coco":  # samref prepare-coco's builder and dataset name
        return f"samref_coco_{name}"
    return "samref_" + get_layout(name).name.lower()


def cache_location(config: ml_collections.ConfigDict, data_dir: Any | None) -> epath.Path:
    """``data.cache_dir`` if set, else ``<data_dir>/embeddings/<builder>/<split>-<fp>``."""
    d = config.data
    if d.get("cache_dir"):
        return as_path(d.cache_dir)
    if not data_dir:
        raise ValueError(
            "the embedding cache needs --config.data.cache_dir or --config.data.data_dir"
        )
    split = str(d.split or "default")
    return (
        as_path(data_dir)
        / "embeddings"
        / _builder_name(d.name, str(d.get("format") or "folder"))
        / f"{split}-{fingerprint(config)}"
    )


def source_data_dir(source: Any) -> epath.Path | None:
    """The TFDS ``data_dir`` a prepared source was read from (``<data_dir>/<builder>/<ver>``)."""
    if hasattr(source, "shards") and hasattr(source, "data_dir"):  # coco_tfds.CocoSource
        return as_path(source.data_dir)
    info = getattr(source, "dataset_info", None)
    path = getattr(info, "data_dir", None)
    return as_path(path).parent.parent if path else None


def check_frozen_encoder(config: ml_collections.ConfigDict) -> None:
    """Cached embeddings are only right for a frozen encoder: refuse a trainable one."""
    from samref_jax.training.step import effective_trainable

    bad = [
        p for p in effective_trainable(config) if p == "sam" or p.startswith("sam/image_encoder")
    ]
    if bad:
        raise ValueError(
            f"cached embeddings need a frozen image encoder, but train.trainable has {bad}"
        )
    if str(config.data.cache_dtype) not in CACHE_DTYPES:
        raise ValueError(f"data.cache_dtype must be one of {CACHE_DTYPES}")
    if int(config.data.cached_views) < 1:
        raise ValueError("data.cached_views must be >= 1")


# ------------------------------------------------------------------------------- reading


class CachedViews:
    """Random access to a complete cache: ``views[k * V + v]`` -> example dict (with
    ``embedding``); ``num_instances``, ``views`` and ``metadata`` describe it. Picklable."""

    def __init__(self, directory: Any) -> None:
        import grain

        self.directory = as_path(directory)
        self.metadata = json.loads((self.directory / "metadata.json").read_text())
        paths = [str(self.directory / f) for f in self.metadata["files"]]
        self.source = grain.sources.ArrayRecordDataSource(paths)
        self.num_instances = int(self.metadata["num_instances"])
        self.views = int(self.metadata["views"])
        if len(self.source) != self.num_instances * self.views:
            raise ValueError(
                f"{self.directory}: {len(self.source)} records, expected "
                f"{self.num_instances} x {self.views}"
            )

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        return decode_record(self.source[int(r)])


def open_cache(config: ml_collections.ConfigDict, data_dir: Any | None) -> CachedViews:
    """The complete cache of ``config`` (``cache_location``); ``CacheNotFoundError`` with the
    command to build it when it is missing or was built for another config."""
    where = cache_location(config, data_dir)
    meta = where / "metadata.json"
    if not meta.exists():
        raise CacheNotFoundError(
            f"no complete embedding cache at {where}; build it with: python -m "
            "samref_jax.training.cache_embeddings --config <the same config and overrides> "
            "[--workdir <the run's workdir>]"
        )
    cache = CachedViews(where)
    want = fingerprint(config)
    if cache.metadata.get("fingerprint") != want:
        raise CacheNotFoundError(
            f"the embedding cache at {where} was built for another config (fingerprint "
            f"{cache.metadata.get('fingerprint')} != {want}); rebuild it or drop data.cache_dir"
        )
    return cache


# ------------------------------------------------------------------------------- writing


class _View:
    """Record index -> (augmented example, record index); picklable for Grain workers."""

    def __init__(self, config: ml_collections.ConfigDict, source: Any, train_idx: Any) -> None:
        from samref_jax.samref.config import sam_config_from
        from samref_jax.samref.model import detail_scale

        self.source, self.train_idx = source, np.asarray(train_idx, np.int64)
        self.d = ml_collections.FrozenConfigDict(config.data)
        self.frame = sam_config_from(config.model).img_size
        self.k = detail_scale(config.model)  # > 1: views keep PatchDiff's detail image too
        self.radius = float(config.model.click_radius)
        self.seed, self.views = int(config.seed), int(config.data.cached_views)
        self._last: tuple[int, Any] = (-1, None)  # the V views of an instance are consecutive

    def __call__(self, r: int) -> dict[str, np.ndarray]:
        from samref_jax.training.pipeline import _Subset, detail_example, training_example

        k, v = divmod(int(r), self.views)
        inst = int(self.train_idx[k])
        last = self._last  # one read: Grain's threads call this concurrently
        if last[0] != inst:
            last = self._last = (inst, self.source[inst])
        rng = np.random.default_rng((self.seed, _VIEW_SEED, inst, v))
        # A folder sample: augment(sample, rng, ...); a COCO image record: one of its instances
        # drawn with the same rng first (fallback records from the training images).
        pool = _Subset(self.source, self.train_idx)
        f = self.frame * self.k  # k > 1: augmented at the detail scale, then brought to the frame
        ex = training_example(last[1], rng, f, self.d, self.radius, pool)
        if self.k > 1:
            ex = detail_example(ex, rng, self.frame, self.k, float(self.d.first_click_frac))
        return ex


def _view_stream(view: _View, records: list[int], d: Any, batch: int) -> Any:
    """Iterator over ``view(r)`` for ``records``, in order, made by Grain: ``d.num_workers``
    worker processes (0: this one), ``d.read_threads`` threads each, at most ``2 x batch``
    views ahead. The views do not depend on who makes them (each is seeded by its record)."""
    import grain

    from samref_jax.training.pipeline import read_with_workers

    ahead = max(2 * batch, int(d.get("read_threads", 16)))  # every thread has a view to make
    return iter(read_with_workers(grain.MapDataset.source(records).map(view), d, ahead))


def _embed_fn(config: ml_collections.ConfigDict, params: Any, devices: list) -> tuple[Any, Any]:
    """(jitted ``embed(params, image, valid_hw)`` over a mesh of ``devices``, params there)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from samref_jax.samref.config import sam_config_from
    from samref_jax.samref.model import SamRef
    from samref_jax.training import step as S

    model = S.model_of(config)
    sam_cfg = sam_config_from(config.model)
    out_dtype = jnp.bfloat16 if str(config.data.cache_dtype) == "bfloat16" else jnp.float32
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    rep, bsh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def embed(p, image, valid_hw):
        x = S.preprocess_frame(image, valid_hw, sam_cfg)
        return model.apply({"params": p}, x, method=SamRef.embed_image).astype(out_dtype)

    enc = {"sam": {"image_encoder": params["sam"]["image_encoder"]}}
    enc = jax.tree_util.tree_map(lambda x: jax.device_put(x, rep), enc)
    fn = jax.jit(embed, in_shardings=(rep, bsh, bsh), out_shardings=bsh)
    return (lambda image, valid_hw: fn(enc, image, valid_hw)), bsh


def _write_shard(path: epath.Path, records: list[bytes]) -> None:
    """Writes ``records`` to ``path`` under a temporary name first (never a partial file at
    ``path``)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    if is_local(path):
        tmp = path.parent / (path.name + ".tmp")
        w = ArrayRecordWriter(str(tmp), _WRITER_OPTIONS)
        for rec in records:
            w.write(rec)
        w.close()
        tmp.rename(path)
        return
    with tempfile.TemporaryDirectory() as td:  # a cloud location: write here, then copy
        local = epath.Path(td) / path.name
        w = ArrayRecordWriter(str(local), _WRITER_OPTIONS)
        for rec in records:
            w.write(rec)
        w.close()
        tmp = path.parent / (path.name + ".tmp")
        local.copy(tmp, overwrite=True)
        tmp.rename(path)


def build_cache(
    config: ml_collections.ConfigDict,
    source: Any,
    cache_dir: Any,
    params: Any,
    *,
    records_per_shard: int = 256,
    batch_per_device: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    finalize: bool = True,
    progress: bool = False,
) -> dict:
    """Embeds ``data.cached_views`` views of every training instance of ``source`` with the
    image encoder of ``params`` and writes them to ``cache_dir`` (module docstring). Returns the
    metadata (written only when ``finalize``, by process 0, after a barrier)."""
    from samref_jax.samref.config import sam_config_from
    from samref_jax.training.distributed import barrier
    from samref_jax.training.pipeline import split_indices

    check_frozen_encoder(config)
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    cache_dir = as_path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    d = config.data
    train_idx, _ = split_indices(len(source), int(d.heldout_every))
    V = int(d.cached_views)
    n_records = len(train_idx) * V
    R = max(int(records_per_shard), 1)
    n_shards = max(-(-n_records // R), 1)
    files = [f"views-{j:05d}-of-{n_shards:05d}.array_record" for j in range(n_shards)]
    devices = jax.local_devices()
    per_dev = int(batch_per_device or d.per_device_batch_size)
    B = per_dev * len(devices)
    embed, _ = _embed_fn(config, params, devices)
    view = _View(config, source, train_idx)
    sam_cfg = sam_config_from(config.model)

    t0, done = time.time(), 0
    mine = [j for j in range(n_shards) if j % pc == pi and not (cache_dir / files[j]).exists()]
    shard_recs = {j: list(range(j * R, min((j + 1) * R, n_records))) for j in mine}
    views = _view_stream(view, [r for j in mine for r in shard_recs[j]], d, B) if mine else None
    for j in mine:
        recs = shard_recs[j]
        out: list[bytes] = []
        pending = None  # (examples, device array): the next batch is augmented meanwhile
        for s in range(0, len(recs) + B, B):
            batch = [next(views) for _ in recs[s : s + B]]
            launched = None
            if batch:
                pad = batch + [batch[-1]] * (B - len(batch))
                launched = (
                    batch,
                    embed(
                        np.stack([e["image"] for e in pad]), np.stack([e["valid_hw"] for e in pad])
                    ),
                )
            if pending is not None:
                exs, emb = pending
                emb = np.asarray(jax.device_get(emb))
                for i, e in enumerate(exs):
                    out.append(encode_record({**e, "embedding": emb[i]}))
            pending = launched
        _write_shard(cache_dir / files[j], out)
        done += len(recs)
        if progress:
            rate = done / max(time.time() - t0, 1e-9)
            print(
                f"process {pi}: shard {j + 1}/{n_shards} written ({rate:.2f} views/s)",
                file=sys.stderr,
                flush=True,
            )
    meta = {
        "fingerprint": fingerprint(config),
        "config": json.loads(json.dumps(_fingerprint_fields(config), default=str)),
        "num_instances": len(train_idx),
        "instances": [int(i) for i in train_idx],
        "views": V,
        "num_records": n_records,
        "records_per_shard": R,
        "files": files,
        "frame": int(sam_cfg.img_size),
        "embedding_shape": [
            int(sam_cfg.image_embedding_size),
            int(sam_cfg.image_embedding_size),
            int(sam_cfg.prompt_embed_dim),
        ],
        "embedding_dtype": str(d.cache_dtype),
    }
    if not finalize:
        return meta
    barrier("samref_embedding_cache")
    if pi == 0:
        missing = [f for f in files if not (cache_dir / f).exists()]
        if missing:
            raise RuntimeError(f"{cache_dir}: shards missing after the build: {missing[:4]}")
        (cache_dir / "metadata.json").write_text(json.dumps(meta, indent=1) + "\n")
    barrier("samref_embedding_cache_done")
    return meta
