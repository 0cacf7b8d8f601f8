"""Module-level parity with the official PyTorch SAM on small configs, every parameter random."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samref_jax.sam import Sam, sam_config
from samref_jax.sam.convert import convert_state_dict
from samref_jax.sam.mask_decoder import select_masks
from tests.sam_reference import random_torch_sam, state_dict_numpy, torch

TOL = 1e-5

# Two small configs: "tiny" (window 5 on an 8x8 grid: padded windows) and a wider one with
# more heads and a window that divides the grid.
CONFIGS = {
    "tiny": sam_config("tiny"),
    "small": sam_config(
        "tiny",
        name="small",
        img_size=192,
        encoder_embed_dim=96,
        encoder_depth=3,
        encoder_num_heads=3,
        encoder_global_attn_indexes=(1,),
        window_size=4,
        prompt_embed_dim=64,
        decoder_num_heads=4,
        decoder_mlp_dim=128,
        iou_head_hidden_dim=48,
        mask_in_chans=16,
    ),
}


# "small" (the wider config) runs in the full suite; the fast subset keeps "tiny".
@pytest.fixture(scope="module", params=[pytest.param("small", marks=pytest.mark.slow), "tiny"])
def pair(request):
    cfg = CONFIGS[request.param]
    ts = random_torch_sam(cfg, seed=1)
    _, params = convert_state_dict(state_dict_numpy(ts), config=cfg)
    return cfg, ts, jax.tree_util.tree_map(jnp.asarray, params)


def _assert_close(a, b, tol=TOL):
    """max |a - b| <= tol * max(1, max |b|): absolute for values up to 1, relative above (the
    float32 rounding of a 10-sized value differs between CPUs' SIMD paths, e.g. AVX2 and
    AVX-512, by more than 1e-5)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = float(np.abs(a - b).max())
    bound = tol * max(1.0, float(np.abs(b).max()))
    assert diff <= bound, f"max abs diff {diff} > {bound} (tol {tol} x max(1, max |b|))"


def test_every_parameter_is_randomised(pair):
    _, ts, _ = pair
    for name, p in ts.named_parameters():
        v = p.detach().numpy()
        assert not np.all(v == 0) and not np.all(v == 1), name


@pytest.mark.parametrize("query_rows", [0, 2], ids=["all_queries", "query_blocks"])
@pytest.mark.parametrize("jit", [False, True])
def test_image_encoder(pair, jit, query_rows):
    """Global attention all at once, and as a loop over blocks of 2 query rows."""
    cfg, ts, params = pair
    grid = cfg.image_embedding_size
    cfg = cfg.replace(global_attn_query_block=query_rows * grid)
    x = np.random.RandomState(0).randn(2, cfg.img_size, cfg.img_size, 3).astype(np.float32)
    with torch.no_grad():
        ref = ts.image_encoder(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    fn = lambda p, x: Sam(cfg).apply({"params": p}, x, method=Sam.embed_image)
    fn = jax.jit(fn) if jit else fn
    out = fn(params, jnp.asarray(x))
    _assert_close(out, ref.transpose(0, 2, 3, 1))


def _prompts(cfg, rng, n_points, with_box, n_slots):
    """Returns torch (points, box) and our padded (coords, labels) with slots [pts, box, pad]."""
    pts = rng.uniform(0, cfg.img_size, (1, n_points, 2)).astype(np.float32)
    lab = rng.randint(0, 2, (1, n_points)).astype(np.int32)
    box = None
    if with_box:
        xy = np.sort(rng.uniform(0, cfg.img_size, (2, 2)), axis=0).astype(np.float32)
        box = xy.reshape(1, 4)
    coords = rng.uniform(0, cfg.img_size, (1, n_slots, 2)).astype(np.float32)  # junk in pads
    labels = np.full((1, n_slots), -1, np.int32)
    coords[0, :n_points] = pts[0]
    labels[0, :n_points] = lab[0]
    if with_box:
        coords[0, n_points : n_points + 2] = box.reshape(2, 2)
        labels[0, n_points : n_points + 2] = [2, 3]
    t_points = (torch.from_numpy(pts), torch.from_numpy(lab)) if n_points else None
    t_box = torch.from_numpy(box) if with_box else None
    return t_points, t_box, coords, labels


CASES = [(1, False), (3, False), (0, True), (2, True)]


@pytest.mark.parametrize("n_points,with_box", CASES)
@pytest.mark.parametrize("with_mask", [False, True])
def test_prompt_encoder(pair, n_points, with_box, with_mask):
    cfg, ts, params = pair
    rng = np.random.RandomState(n_points * 10 + with_box)
    t_points, t_box, coords, labels = _prompts(cfg, rng, n_points, with_box, n_slots=8)
    low = cfg.low_res_mask_size
    mask = rng.randn(1, low, low).astype(np.float32) * 3
    with torch.no_grad():
        sparse, dense = ts.prompt_encoder(
            t_points, t_box, torch.from_numpy(mask[:, None]) if with_mask else None
        )
        dense_pe = ts.prompt_encoder.get_dense_pe().numpy()

    def fn(p):
        m = Sam(cfg)
        args = (jnp.asarray(coords), jnp.asarray(labels))
        if with_mask:
            args += (jnp.asarray(mask), jnp.ones((1,), bool))
        return m.apply(
            {"params": p}, *args, method=lambda mod, *a: mod.prompt_encoder(*a)
        ), m.apply({"params": p}, method=lambda mod: mod.prompt_encoder.get_dense_pe())

    for f in (fn, jax.jit(fn)):
        (j_sparse, j_mask, j_dense), j_pe = f(params)
        active = np.asarray(j_mask[0])
        _assert_close(np.asarray(j_sparse)[0][active], sparse.numpy()[0])
        _assert_close(j_dense, dense.numpy().transpose(0, 2, 3, 1))
        _assert_close(j_pe, dense_pe.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("n_points,with_box", CASES)
@pytest.mark.parametrize("multimask", [False, True])
def test_mask_decoder(pair, n_points, with_box, multimask):
    """Whole prompt path: our padded prompts (extra padding masked) vs the official call."""
    cfg, ts, params = pair
    rng = np.random.RandomState(100 + n_points * 10 + with_box)
    t_points, t_box, coords, labels = _prompts(cfg, rng, n_points, with_box, n_slots=16)
    s = cfg.image_embedding_size
    emb = rng.randn(1, s, s, cfg.prompt_embed_dim).astype(np.float32)
    low = cfg.low_res_mask_size
    mask = rng.randn(1, low, low).astype(np.float32) * 3
    for with_mask in (False, True):
        with torch.no_grad():
            sparse, dense = ts.prompt_encoder(
                t_points, t_box, torch.from_numpy(mask[:, None]) if with_mask else None
            )
            ref_masks, ref_iou = ts.mask_decoder(
                image_embeddings=torch.from_numpy(emb.transpose(0, 3, 1, 2)),
                image_pe=ts.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )

        def fn(p, emb, coords, labels, mask, has_mask, cached):
            m = Sam(cfg)
            # cached: the decoder's first layer with its per-image products computed once, as
            # the interactive predictor runs it (dense prompt in factored form).
            layer0 = m.apply({"params": p}, emb, method=Sam.layer0_projections) if cached else None
            masks, iou = m.apply(
                {"params": p},
                emb,
                coords,
                labels,
                mask,
                has_mask,
                None,
                layer0,
                method=Sam.predict_masks,
            )
            return select_masks(masks, iou, multimask)

        args = (
            params,
            jnp.asarray(emb),
            jnp.asarray(coords),
            jnp.asarray(labels),
            jnp.asarray(mask),
            jnp.asarray([with_mask]),
        )
        for cached in (False, True):
            for f in (fn, jax.jit(fn, static_argnums=6)):
                masks, iou = f(*args, cached)
                _assert_close(masks, ref_masks.numpy(), tol=5e-5 if cfg.name == "small" else TOL)
                _assert_close(iou, ref_iou.numpy())


def test_batched_prompts_match_one_by_one(pair):
    """Rows of a batch with different prompt counts equal their single-row results."""
    cfg, _, params = pair
    rng = np.random.RandomState(7)
    s = cfg.image_embedding_size
    emb = jnp.asarray(rng.randn(1, s, s, cfg.prompt_embed_dim).astype(np.float32))
    rows = [_prompts(cfg, rng, n, b, n_slots=8)[2:] for n, b in CASES]
    coords = jnp.asarray(np.concatenate([r[0] for r in rows]))
    labels = jnp.asarray(np.concatenate([r[1] for r in rows]))
    m = Sam(cfg)
    batched, _ = m.apply({"params": params}, emb, coords, labels, method=Sam.predict_masks)
    for i in range(len(rows)):
        single, _ = m.apply(
            {"params": params}, emb, coords[i : i + 1], labels[i : i + 1], method=Sam.predict_masks
        )
        _assert_close(batched[i : i + 1], single, tol=1e-5)


@pytest.mark.parametrize("order", ["project", "fold_keys", "fold_queries"])
@pytest.mark.parametrize("nq,nk", [(7, 96), (96, 7)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_orders(order, nq, nk, masked):
    """Each evaluation order of the decoder's `Attention` equals the official module (keys
    removed by the mask equal the official call without them), with and without jit."""
    from segment_anything.modeling.transformer import Attention as TorchAttention

    from samref_jax.sam.transformer import Attention, attention_order

    dim, heads, rate = 64, 4, 2
    torch.manual_seed(3)
    ref = TorchAttention(dim, heads, downsample_rate=rate)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    params = {
        name: {
            "kernel": jnp.asarray(getattr(ref, name).weight.detach().numpy().T),
            "bias": jnp.asarray(getattr(ref, name).bias.detach().numpy()),
        }
        for name in ("q_proj", "k_proj", "v_proj", "out_proj")
    }
    rng = np.random.RandomState(nq + nk)
    q, k, v = (rng.randn(1, n, dim).astype(np.float32) for n in (nq, nk, nk))
    keep = np.ones((1, nk), bool)
    if masked:
        keep[0, rng.choice(nk, 3, replace=False)] = False
    with torch.no_grad():
        want = ref(*(torch.from_numpy(x[:, keep[0]] if x is not q else x) for x in (q, k, v)))

    def fn(p, q, k, v, mask):
        return Attention(heads, rate, order=order).apply({"params": p}, q, k, v, mask)

    args = (params, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(keep))
    # The folded orders multiply the weights together first: a few float32 ulps of the output
    # (outputs here are ~10-15 in size), not a looser comparison.
    tol = 2e-6 * float(np.abs(want.numpy()).max())
    for f in (fn, jax.jit(fn)):
        _assert_close(f(*args), want.numpy(), tol=tol)
    assert attention_order(7, 4096, 256, 128, 8) == "fold_keys"
    assert attention_order(4096, 7, 256, 128, 8) == "fold_queries"
    assert attention_order(26, 4096, 256, 128, 8) == "project"
