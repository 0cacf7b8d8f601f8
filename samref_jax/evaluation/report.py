"""Reports of an evaluation: markdown tables, mIoU-vs-clicks plots, overlays, run comparison.

Plots use Matplotlib's object API on the Agg canvas (no pyplot, no display needed); overlays are
drawn with Pillow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from samref_jax.paths import as_path

__all__ = [
    "TABLE_METRICS",
    "compare",
    "draw_overlay",
    "format_value",
    "markdown_table",
    "plot_miou",
    "write_metrics_markdown",
]

# Columns of the tables (docs/design.md, 'Evaluation protocol').
TABLE_METRICS = (
    "NoC@85",
    "NoC@90",
    "NoC@95",
    "NoF@85",
    "NoF@90",
    "NoF@95",
    "5-mIoU",
    "s/click",
)

COMPARE_METRICS = ("NoC@85", "NoC@90", "NoC@95", "NoF@90", "NoF@95", "5-mIoU", "s/click")


def _metric(metrics: Mapping, key: str) -> float | int | None:
    if key == "s/click":
        spc = metrics.get("seconds_per_click") or {}
        return spc.get("mean")
    return metrics.get(key)


def format_value(key: str, value: float | int | None) -> str:
    """Table text of one metric (NoC 2 decimals, mIoU in %, seconds 4 significant digits)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key.startswith("NoF"):
        return str(int(value))
    if key.startswith("NoC"):
        return f"{value:.2f}"
    if "mIoU" in key:
        return f"{100 * value:.2f}"
    if key == "s/click":
        return f"{value:.4g}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _label(metrics: Mapping) -> str:
    meta = metrics.get("metadata") or {}
    return str(meta.get("label") or meta.get("mode") or "run")


def _dataset(metrics: Mapping) -> str:
    meta = metrics.get("metadata") or {}
    return str(meta.get("dataset") or "dataset")


def write_metrics_markdown(metrics: Mapping, path: str | Path) -> str:
    """Write the one-run ``metrics.md`` (a row per run, mIoU in %, NoC in clicks); return it."""
    header = ["run", "dataset", *TABLE_METRICS, "samples"]
    row = [_label(metrics), _dataset(metrics)]
    row += [format_value(k, _metric(metrics, k)) for k in TABLE_METRICS]
    row.append(str(metrics.get("num_samples", "-")))
    text = f"# {_dataset(metrics)}: {_label(metrics)}\n\n" + markdown_table(header, [row])
    emb = metrics.get("seconds_per_image_embedding")
    if emb is not None:
        text += f"\nImage embedding: {emb:.4g} s per image. mIoU in %, NoC in clicks.\n"
    curve = metrics.get("mIoU@k") or []
    if curve:
        text += "\n" + markdown_table(
            ["clicks", *[str(i + 1) for i in range(len(curve))]],
            [["mIoU", *[format_value("mIoU", v) for v in curve]]],
        )
    as_path(path).write_text(text)
    return text


def plot_miou(
    curves: Mapping[str, Sequence[float]],
    path: str | Path,
    title: str = "",
    panels: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
) -> None:
    """Plot mIoU against the number of clicks, one line per entry of ``curves``.

    With ``panels`` (``{panel title: {line label: curve}}``) draw one subplot per panel instead.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    groups = dict(panels) if panels else {title: curves}
    fig = Figure(figsize=(5.5 * len(groups), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (panel, lines) in zip(axes, groups.items(), strict=True):
        for label, curve in lines.items():
            ks = np.arange(1, len(curve) + 1)
            ax.plot(ks, 100 * np.asarray(curve, dtype=float), marker="o", markersize=3, label=label)
        for t in (85, 90):
            ax.axhline(t, color="grey", linewidth=0.6, linestyle="--")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("number of clicks")
        ax.set_ylabel("mIoU (%)")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        if len(lines) > 1 or panels:
            ax.legend(loc="lower right")
    fig.tight_layout()
    path = as_path(path)  # epath: gs://... kept verbatim
    with path.open("wb") as fh:
        fig.savefig(fh, format=path.suffix.lstrip(".") or "png")


def draw_overlay(
    image: np.ndarray,
    gt: np.ndarray,
    mask: np.ndarray,
    clicks: Sequence[Sequence[int]],
    title: str = "",
) -> Image.Image:
    """Image with the prediction overlaid and the clicks drawn.

    Colours: true positive green, false positive red, false negative blue, ignore pixels grey;
    positive clicks green dots, negative clicks red dots, numbered in order.

    Args:
      image: ``uint8[H, W, 3]``.
      gt: ``int8[H, W]`` (1 object, 0 background, -1 ignore).
      mask: ``bool[H, W]`` prediction.
      clicks: ``(y, x, is_positive)`` triples.
    """
    base = image.astype(np.float32)
    obj, ign, pred = gt == 1, gt == -1, np.asarray(mask, dtype=bool)
    colour = np.zeros_like(base)
    alpha = np.zeros(gt.shape, dtype=np.float32)
    for region, rgb in (
        (pred & obj & ~ign, (0, 200, 0)),
        (pred & ~obj & ~ign, (230, 0, 0)),
        (~pred & obj & ~ign, (0, 90, 255)),
        (ign, (160, 160, 160)),
    ):
        colour[region] = rgb
        alpha[region] = 0.5
    out = base * (1 - alpha[..., None]) + colour * alpha[..., None]
    im = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    r = max(3, round(min(gt.shape) / 90))
    for n, (y, x, positive) in enumerate(clicks, start=1):
        fill = (40, 255, 40) if positive else (255, 40, 40)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=(255, 255, 255))
        draw.text((x + r + 1, y - r - 1), str(n), fill=(255, 255, 255))
    if title:
        draw.rectangle((0, 0, 8 + 6 * len(title), 14), fill=(0, 0, 0))
        draw.text((4, 2), title, fill=(255, 255, 255))
    return im


def compare(
    metrics_paths: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    output: str | Path = "comparison",
    metrics: Sequence[str] = COMPARE_METRICS,
) -> str:
    """Merge several ``metrics.json`` into one markdown table and one mIoU-vs-clicks plot.

    Rows are runs (``labels``, default: each run's label/mode metadata), columns are
    dataset x metric; runs sharing a label fill one row. Writes ``OUTPUT/comparison.md`` and
    ``OUTPUT/comparison_miou.png`` (one panel per dataset, one line per run), or, if
    ``output`` ends with ``.md``, that file and a ``.png`` beside it.

    Returns:
      The markdown text.
    """
    if labels is not None and len(labels) != len(metrics_paths):
        raise ValueError(f"{len(labels)} labels for {len(metrics_paths)} metrics files")
    loaded = []
    for i, p in enumerate(metrics_paths):
        p = as_path(p)
        if p.is_dir():
            p = p / "metrics.json"
        m = json.loads(p.read_text())
        loaded.append((labels[i] if labels is not None else _label(m), _dataset(m), m))
    rows_order = list(dict.fromkeys(label for label, _, _ in loaded))
    datasets = list(dict.fromkeys(ds for _, ds, _ in loaded))
    table: dict[tuple[str, str], Mapping] = {}
    for label, ds, m in loaded:
        if (label, ds) in table:
            raise ValueError(f"two runs labelled {label!r} on {ds}")
        table[(label, ds)] = m

    header = ["run"] + [f"{ds} {k}" for ds in datasets for k in metrics]
    rows = []
    for label in rows_order:
        row = [label]
        for ds in datasets:
            m = table.get((label, ds))
            row += [format_value(k, _metric(m, k)) if m else "-" for k in metrics]
        rows.append(row)
    text = markdown_table(header, rows) + "\nNoC in clicks (lower is better), 5-mIoU in %.\n"

    output = as_path(output)
    if output.suffix == ".md":
        md_path, png_path = output, output.with_suffix(".png")
    else:
        md_path, png_path = output / "comparison.md", output / "comparison_miou.png"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    panels = {
        ds: {label: table[(label, ds)]["mIoU@k"] for label in rows_order if (label, ds) in table}
        for ds in datasets
    }
    plot_miou({}, png_path, panels=panels)
    return text
