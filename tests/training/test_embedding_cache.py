"""Cached frozen-encoder embeddings: the record format, the cache build (the same records for
any number of processes), the step on a cached batch == the step running the encoder, and
training end to end from a cache with checkpoint + resume."""

from __future__ import annotations

import json
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from samref_jax.training import step as S
from samref_jax.training.testing import tiny_test_config, write_fake_coco_mval

FRAME = 64


def _config(tmp_path, views: int = 2):
    cfg = tiny_test_config("full", FRAME, rounds=2)
    cfg.train.trainable = ("sam/mask_decoder", "sam/prompt_encoder", "global_diff", "patch_diff")
    cfg.data.manual_dir = str(write_fake_coco_mval(tmp_path / "COCO_MVal", n=5))
    cfg.data.data_dir = str(tmp_path / "tfds")
    cfg.data.cached_views = views
    cfg.data.cache_dtype = "float32"
    return cfg


def test_record_roundtrip_bfloat16():
    from samref_jax.training.embedding_cache import decode_record, encode_record

    rng = np.random.default_rng(0)
    ex = {
        "image": rng.integers(0, 256, (8, 8, 3)).astype(np.uint8),
        "gt": rng.integers(-1, 2, (8, 8)).astype(np.int8),
        "valid_hw": np.array([8, 6], np.int32),
        "radius": np.float32(2.5),
        "embedding": rng.standard_normal((4, 4, 16)).astype(ml_dtypes.bfloat16),
    }
    back = decode_record(encode_record(ex))
    assert list(back) == list(ex)
    for k, v in ex.items():
        assert back[k].dtype == np.asarray(v).dtype and back[k].shape == np.shape(v), k
        np.testing.assert_array_equal(back[k], v)
    # A field stored zlib-compressed (its header flag set) is inflated on reading.
    import json
    import struct
    import zlib

    raw = ex["image"].tobytes()
    header = json.dumps([["image", "uint8", [8, 8, 3], True, len(zlib.compress(raw))]]).encode()
    rec = b"SREC" + struct.pack("<I", len(header)) + header + zlib.compress(raw)
    np.testing.assert_array_equal(decode_record(rec)["image"], ex["image"])


@pytest.mark.slow
def test_cached_step_equals_in_step_encoder(tmp_path):
    """The same examples: losses, IoUs and gradients of the step given the cached embedding
    equal those of the step that runs the encoder (float32); the cache's records do not depend
    on the number of processes that built it, nor on Grain's worker processes."""
    from samref_jax.training.embedding_cache import build_cache, cache_location, open_cache
    from samref_jax.training.pipeline import make_train_dataset, prepare_source

    cfg = _config(tmp_path)
    src = prepare_source(cfg, cfg.data.data_dir)
    params = S.init_params(cfg, jax.random.key(int(cfg.seed), impl="rbg"))
    where = cache_location(cfg, cfg.data.data_dir)
    assert str(where).startswith(str(tmp_path / "tfds" / "embeddings" / "samref_coco_mval"))
    # Two "processes" (shards dealt round-robin), then one process in another folder.
    build_cache(
        cfg,
        src,
        where,
        params,
        records_per_shard=3,
        process_index=1,
        process_count=2,
        finalize=False,
    )
    assert not (where / "metadata.json").exists()
    build_cache(cfg, src, where, params, records_per_shard=3, process_index=0, process_count=2)
    meta = json.loads((where / "metadata.json").read_text())
    assert meta["num_records"] == 10 and len(meta["files"]) == 4
    one = tmp_path / "one"
    workers = cfg.copy_and_resolve_references()
    workers.data.num_workers = 2  # the views made by Grain worker processes
    build_cache(workers, src, one, params, records_per_shard=4)
    cfg.data.use_cached_embeddings = True
    a = open_cache(cfg, cfg.data.data_dir)
    cfg_one = cfg.copy_and_resolve_references()
    cfg_one.data.cache_dir = str(one)
    b = open_cache(cfg_one, None)
    assert len(a) == len(b) == 10
    for r in range(len(a)):
        x, y = a[r], b[r]
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])

    batch = next(iter(make_train_dataset(cfg, src)))
    assert batch["embedding"].shape == (2, *meta["embedding_shape"])
    assert batch["embedding"].dtype == np.float32
    no_emb = {k: v for k, v in batch.items() if k != "embedding"}
    grad_fn = S.make_grad_fn(cfg)
    w = jnp.array([1.0, 1.0])
    l1, m1, g1 = grad_fn(params, batch, w)
    l2, m2, g2 = grad_fn(params, no_emb, w)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6, atol=1e-7)
    for k in m1:
        np.testing.assert_allclose(np.asarray(m1[k]), np.asarray(m2[k]), rtol=1e-6, atol=1e-7)
    for x, y in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_train_from_cache_with_resume(tmp_path, compile_cache):
    """The cache command, then training on it: interrupted after step 2 and resumed ==
    uninterrupted (steps 3 and 4); a trainable encoder is refused."""
    from samref_jax.training.cache_embeddings import main
    from samref_jax.training.trainer import train

    cfg = _config(tmp_path, views=3)
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        textwrap.dedent(
            f"""
            from samref_jax.training.testing import tiny_test_config

            def get_config():
                c = tiny_test_config("full", {FRAME}, rounds=2)
                c.train.trainable = {tuple(cfg.train.trainable)!r}
                c.data.cached_views = 3
                c.data.cache_dtype = "float32"
                return c
            """
        )
    )
    args = [
        f"--config={cfg_file}",
        f"--config.data.manual_dir={cfg.data.manual_dir}",
        f"--config.data.data_dir={cfg.data.data_dir}",
        "--records_per_shard=4",
        "--noprogress",
    ]
    assert main([*args, "--config.train.trainable=('sam',)"]) == 2
    assert main(args) == 0
    cfg.data.use_cached_embeddings = True
    cfg.train.num_steps = 4
    cfg.train.checkpoint_every_steps = 2
    train(cfg, tmp_path / "a", progress=False, export=False)
    train(cfg, tmp_path / "b", progress=False, export=False, stop_at_step=2)
    train(cfg, tmp_path / "b", progress=False, export=False)

    def rows(d):
        return [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]

    a, b = rows("a"), rows("b")
    assert [r["step"] for r in a] == [1, 2, 3, 4] and [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert np.isfinite(ra["loss"])
        np.testing.assert_allclose(ra["loss"], rb["loss"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(ra["iou"], rb["iou"], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_cache_keeps_the_detail_image(tmp_path):
    """With PatchDiff's image_scale k = 2 the cached views also hold the image at k x the frame
    (in the fingerprint), batches carry it, and the step on a cached batch equals the step
    running the encoder."""
    from samref_jax.training.embedding_cache import build_cache, cache_location, fingerprint
    from samref_jax.training.pipeline import make_train_dataset, prepare_source

    cfg = _config(tmp_path, views=1)
    plain = fingerprint(cfg)
    cfg.model.refiners.patch_diff.image_scale = 2
    assert fingerprint(cfg) != plain
    src = prepare_source(cfg, cfg.data.data_dir)
    params = S.init_params(cfg, jax.random.key(int(cfg.seed), impl="rbg"))
    build_cache(cfg, src, cache_location(cfg, cfg.data.data_dir), params)
    cfg.data.use_cached_embeddings = True
    batch = next(iter(make_train_dataset(cfg, src)))
    assert batch["detail_image"].shape == (2, 2 * FRAME, 2 * FRAME, 3)
    assert batch["detail_image"].dtype == np.uint8 and batch["detail_image"].any()
    no_emb = {k: v for k, v in batch.items() if k != "embedding"}
    grad_fn = S.make_grad_fn(cfg)
    w = jnp.array([1.0, 1.0])
    l1, _, _ = grad_fn(params, batch, w)
    l2, _, _ = grad_fn(params, no_emb, w)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6, atol=1e-7)
