"""Frame logits -> image size: the tiled `frame_to_original` against one program per size.

    python benchmarks/postprocess_resize.py [--runs 40] [--frame 1024] [--maps 3]

For a few image sizes: wall time of `transforms.frame_to_original` (bounded programs, result
copied into one NumPy array) and of the per-size jitted crop + `resize_bilinear` it replaces
(result read back as NumPy), interleaved call by call so that both see the same machine
conditions; the per-size program's compile time; whether the results are bit-identical.
Prints a markdown table (min and median over the runs).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import host_setup, machine_line, table

from samref_jax.sam.common import resize_bilinear
from samref_jax.sam.transforms import frame_to_original, get_preprocess_shape

SIZES = [(96, 128), (480, 640), (520, 520), (1200, 1600), (3000, 4000)]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _per_size(frame, input_hw, original_hw):
    return resize_bilinear(frame[:, : input_hw[0], : input_hw[1]], original_hw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--frame", type=int, default=1024)
    ap.add_argument("--maps", type=int, default=3, help="maps per call (3: SAM-REF 'full')")
    args = ap.parse_args()
    host_setup()
    f = args.frame
    x = jnp.asarray(np.random.default_rng(0).normal(0, 8, (args.maps, f, f)).astype(np.float32))
    rows = []
    for h, w in SIZES:
        input_hw = get_preprocess_shape(h, w, f)
        t = time.perf_counter()
        want = np.asarray(_per_size(x, input_hw, (h, w)))
        compile_s = time.perf_counter() - t
        got = frame_to_original(x, input_hw, (h, w))
        fns = {
            "tiled": lambda ih=input_hw, hw=(h, w): frame_to_original(x, ih, hw),
            "per size": lambda ih=input_hw, hw=(h, w): np.asarray(_per_size(x, ih, hw)),
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.runs):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        ms = {k: (1e3 * min(v), 1e3 * statistics.median(v)) for k, v in times.items()}
        rows.append(
            [
                f"{h}x{w}",
                f"{ms['tiled'][0]:.1f} / {ms['tiled'][1]:.1f} ms",
                f"{ms['per size'][0]:.1f} / {ms['per size'][1]:.1f} ms",
                f"{1e3 * compile_s:.0f} ms",
                "yes" if np.array_equal(got.view(np.uint32), want.view(np.uint32)) else "NO",
            ]
        )
    print(machine_line())
    print(f"frame {f}, {args.maps} maps, {args.runs} runs (min / median)\n")
    headers = ["H x W", "tiled", "per-size program", "per-size compile (first call)", "equal"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
