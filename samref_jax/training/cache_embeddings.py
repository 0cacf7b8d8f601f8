"""``samref cache-embeddings --config configs/X.py [--workdir DIR] [--config.a.b=v ...]`` (also
``python -m samref_jax.training.cache_embeddings`` and ``python -m train.cache_embeddings``).

Runs the frozen image encoder of the config's model once over ``data.cached_views`` augmented
views of every training instance and writes them, examples and embeddings, as ArrayRecord files
beside the prepared records (``samref_jax.training.embedding_cache``). Train on them with
``--config.data.use_cached_embeddings=True`` and the same config otherwise.

The flags are the trainer's (``train/main.py``): the same ``--config`` file and overrides find
the same dataset, model weights (``train.init_checkpoint``) and cache folder; ``--workdir`` only
supplies the trainer's default ``data_dir`` (``WORKDIR/tfds``) when ``data.data_dir`` is empty.
Multi-process: ``--coordinator HOST:PORT --num_processes N --process_id I`` (or the
``JAX_*`` variables, or ``--distributed``) shard the work over processes; each process batches
its views over its local devices (``--batch_per_device`` x local devices per ``jit`` call).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

USAGE = "--config configs/X.py [--workdir DIR | --config.data.data_dir=DIR] [--config.a.b=v]"
DESCRIPTION = (
    "Run the frozen image encoder once over data.cached_views augmented views of every\n"
    "training instance and write the embeddings beside the prepared records; then train with\n"
    "--config.data.use_cached_embeddings=True and otherwise the same config and overrides."
)
EXAMPLE = "samref cache-embeddings --config configs/tiny_refine.py --workdir runs/tiny_refine"


def main(argv: Sequence[str] | None = None, prog: str = "samref-cache-embeddings") -> int:
    from absl import flags
    from ml_collections import config_flags

    from samref_jax.training import distributed
    from samref_jax.training.flag_args import parse_flags

    argv = list(sys.argv[1:] if argv is None else argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "training config file", flag_values=fv, lock_config=False
    )
    flags.DEFINE_string(
        "workdir",
        None,
        "run directory (only for the default data_dir WORKDIR/tfds)",
        flag_values=fv,
    )
    flags.DEFINE_integer("records_per_shard", 256, "records per ArrayRecord file", flag_values=fv)
    flags.DEFINE_integer(
        "batch_per_device",
        None,
        "views per device per encoder call (default: the config's data.per_device_batch_size)",
        flag_values=fv,
    )
    distributed.define_flags(fv)
    flags.DEFINE_bool("progress", True, "print a line per written shard", flag_values=fv)
    status = parse_flags(fv, argv, prog, USAGE, DESCRIPTION, EXAMPLE)
    if status is not None:
        return status
    if fv.config is None or not (
        fv.workdir or fv.config.data.data_dir or fv.config.data.get("cache_dir")
    ):
        print(f"usage: {prog} {USAGE} (see --help)", file=sys.stderr)
        return 2
    config = fv.config
    from samref_jax.training.embedding_cache import check_frozen_encoder

    try:
        check_frozen_encoder(config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    status = distributed.start_from_flags(fv)
    if status:
        return status

    with distributed.exit_alone_on_error():  # one process failing ends the run at once
        _build(config, fv)
    return 0


def _build(config: Any, fv: Any) -> None:
    """Prepares the records (process 0), then every process builds its shards of the cache."""
    import jax

    from samref_jax.paths import as_path
    from samref_jax.training import distributed
    from samref_jax.training import step as S
    from samref_jax.training.embedding_cache import build_cache, cache_location
    from samref_jax.training.pipeline import prepare_source

    data_dir = (
        as_path(config.data.data_dir) if config.data.data_dir else as_path(fv.workdir) / "tfds"
    )
    if jax.process_index() == 0:
        prepare_source(config, data_dir)
    distributed.barrier("samref_cache_prepare_data")
    source = prepare_source(config, data_dir)
    where = cache_location(config, data_dir)
    # The trainer's initial parameters: the same seed and init_checkpoint give the same encoder.
    params = S.init_params(config, jax.random.key(int(config.seed), impl="rbg"))
    meta = build_cache(
        config,
        source,
        where,
        params,
        records_per_shard=fv.records_per_shard,
        batch_per_device=fv.batch_per_device,
        progress=fv.progress,
    )
    if jax.process_index() == 0:
        print(
            f"{where}: {meta['num_instances']} instances x {meta['views']} views, "
            f"{meta['embedding_dtype']} embeddings {tuple(meta['embedding_shape'])}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
