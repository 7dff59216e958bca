"""Pieces the model tools share without needing torch: the photo manifest,
preprocessing that matches labelcast's (centre-crop, bilinear, mean/std), and
the accuracy figures (average precision, F1)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parent.parent
CALIBRATION = REPO / "calibration"

# EfficientNet-Lite0's training preprocessing (the TF reference uses 127/128).
LITE0_MEAN = (0.498, 0.498, 0.498)
LITE0_STD = (0.502, 0.502, 0.502)


@dataclass(frozen=True)
class Photo:
    path: Path
    labels: frozenset[str]


def load_manifest() -> list[Photo]:
    """The shipped photos in calibration/images with their hand labels
    (calibration/manifest.toml)."""
    manifest = tomllib.loads((CALIBRATION / "manifest.toml").read_text())
    return [Photo(CALIBRATION / entry["folder"] / entry["file"], frozenset(entry["labels"])) for entry in manifest["photo"]]


def preprocess(image: Image.Image, size: int, mean=LITE0_MEAN, std=LITE0_STD) -> np.ndarray:
    """RGB image -> [1, 3, size, size] float32, as labelcast does it: the
    largest centred square, resized bilinearly, then (x/255 - mean) / std."""
    # labelcast turns a photo the way its EXIF orientation says; so does this.
    image = ImageOps.exif_transpose(image).convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return x.transpose(2, 0, 1)[None].copy()


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """AP for one label (area under the precision/recall steps); None when the
    label has no positive photo, where AP is undefined."""
    positives = int(truth.sum())
    if positives == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    hits = truth[order].astype(np.float64)
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at * hits).sum() / positives)


def f1(decisions: np.ndarray, truth: np.ndarray) -> float | None:
    tp = int((decisions & truth).sum())
    fp = int((decisions & ~truth).sum())
    fn = int((~decisions & truth).sum())
    if tp + fp + fn == 0:
        return None
    return 2 * tp / (2 * tp + fp + fn)


def accuracy_table(labels: list[str], thresholds: list[float], runs: dict[str, np.ndarray], truth: np.ndarray) -> str:
    """A Markdown table of per-label AP and F1 for each named run of scores
    [photos, labels], with mAP (over labels with a positive photo) below."""
    names = list(runs)
    header = "| label | positives | " + " | ".join(f"{n} AP | {n} F1" for n in names) + " |"
    lines = [header, "|" + "---|" * (2 + 2 * len(names))]
    aps: dict[str, list[float]] = {n: [] for n in names}
    for j, label in enumerate(labels):
        cells = [label, str(int(truth[:, j].sum()))]
        for n in names:
            ap = average_precision(runs[n][:, j], truth[:, j])
            score = f1(runs[n][:, j] >= thresholds[j], truth[:, j])
            if ap is not None:
                aps[n].append(ap)
            cells += ["n/a" if ap is None else f"{ap:.2f}", "n/a" if score is None else f"{score:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| **mAP** | | " + " | ".join(f"**{np.mean(aps[n]):.3f}** | " for n in names) + "|")
    return "\n".join(lines)
