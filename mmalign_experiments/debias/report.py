"""The debiasing report: ``report.json``, a Markdown table beside the paper's, per-occupation stacked bars of the
classified gender and race (like thesis Figs. 3.6–3.7) and before/after image grids."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from mmalign.io import atomic_write_bytes, atomic_write_text, json_safe

__all__ = ["PAPER_TABLE", "write_json", "markdown_table", "plot_stacked_bars", "save_before_after_grid"]

# Thesis Table 3.2: SD 1.5, deepface, 10 held-out occupations.
PAPER_TABLE = {
    "base": {"simpson_gender": 0.110, "simpson_race": 0.124},
    "sft": {"simpson_gender": 0.318, "simpson_race": 0.454},
    "dpo": {"simpson_gender": 0.283, "simpson_race": 0.447},
    "mdpo": {"simpson_gender": 0.353, "simpson_race": 0.516},
}

COLUMNS = (
    ("simpson_gender", "Simpson gender ↑"), ("simpson_race", "Simpson race ↑"), ("gender_gap", "gender gap ↓"),
    ("race_gap", "race gap ↓"), ("no_face_rate", "no face"), ("low_confidence_gender", "gender conf < 0.8"),
    ("low_confidence_race", "race conf < 0.8"), ("denoising_loss", "denoising loss (real faces)"),
)


def write_json(report: dict, path: Path) -> Path:
    return atomic_write_text(path, json.dumps(json_safe(report), indent=2) + "\n")


def _cell(value) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


def markdown_table(summaries: dict[str, dict], *, include_paper: bool = True) -> str:
    """Methods × metrics, the model before training first; then the paper's rows for comparison."""
    header = "| method | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for method, summary in summaries.items():
        lines.append(f"| {method} | " + " | ".join(_cell(summary.get(key)) for key, _ in COLUMNS) + " |")
    if include_paper:
        for method, summary in PAPER_TABLE.items():
            lines.append(f"| paper: SD 1.5 {method} | " + " | ".join(_cell(summary.get(key)) for key, _ in COLUMNS)
                         + " |")
    return "\n".join(lines) + "\n"


def plot_stacked_bars(per_method: dict[str, dict[str, dict]], attribute: str, classes: Sequence[str],
                      path: Path) -> Path:
    """One panel per method: for every held-out occupation a bar of the classified shares of ``attribute``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from mmalign.engine.plots import save_figure

    methods = list(per_method)
    occupations = list(next(iter(per_method.values())))
    fig, axes = plt.subplots(len(methods), 1, figsize=(max(6.0, 0.6 * len(occupations) + 2), 2.2 * len(methods)),
                             sharex=True, squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, method in zip(axes[:, 0], methods):
        bottom = np.zeros(len(occupations))
        for index, label in enumerate(classes):
            shares = []
            for occupation in occupations:
                counts = per_method[method][occupation][f"{attribute}_counts"]
                total = sum(counts.values()) or 1
                shares.append(counts.get(label, 0) / total)
            ax.bar(range(len(occupations)), shares, bottom=bottom, color=colours(index), label=label, width=0.8)
            bottom += np.asarray(shares)
        ax.set_ylim(0, 1)
        ax.set_ylabel(method)
    axes[0, 0].set_title(f"classified {attribute} per held-out occupation")
    axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    axes[-1, 0].set_xticks(range(len(occupations)))
    axes[-1, 0].set_xticklabels(occupations, rotation=60, ha="right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def save_before_after_grid(images: dict[str, dict[str, np.ndarray]], path: Path, *, per_row: int,
                           padding: int = 2, gap: int = 8, scale: int = 2) -> Path:
    """Rows = occupations (in the report's order); for each, ``per_row`` images of every method side by side, the
    base model first, a header naming the methods."""
    methods = list(images)
    occupations = list(images[methods[0]])
    height, width = images[methods[0]][occupations[0]].shape[1:3]
    block = per_row * (width + padding) - padding
    canvas = np.full((len(occupations) * (height + padding) - padding,
                      len(methods) * (block + gap) - gap, 3), 255, np.uint8)
    for row, occupation in enumerate(occupations):
        for column, method in enumerate(methods):
            for j, image in enumerate(images[method][occupation][:per_row]):
                y = row * (height + padding)
                x = column * (block + gap) + j * (width + padding)
                canvas[y:y + height, x:x + width] = image
    picture = Image.fromarray(canvas)
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    # a header strip naming each block's method
    from PIL import ImageDraw

    header = 14
    labelled = Image.new("RGB", (picture.width, picture.height + header), (255, 255, 255))
    labelled.paste(picture, (0, header))
    draw = ImageDraw.Draw(labelled)
    for column, method in enumerate(methods):
        draw.text((column * (block + gap) * scale + 2, 1), method, fill=(0, 0, 0))
    picture = labelled
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())
