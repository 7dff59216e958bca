"""Accuracy of a labelcast model against the hand labels in
calibration/manifest.toml, on the photos held out of training.

    python models/evaluate.py models/demo/labelcast-demo-fp32.onnx models/demo/labelcast-demo-int8.onnx

Prints per-label average precision and F1 (at the model's own thresholds)
for each model, and mAP over the labels that have a positive held-out photo.
Uses ONNX Runtime; no torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

import common
from export import labelcast_metadata
from quantize import model_preprocessing


def scores(model_path: Path, photos: list[common.Photo]) -> np.ndarray:
    model = onnx.load(str(model_path))
    size, mean, std = model_preprocessing(model)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rows = [common.sigmoid(session.run(None, {name: common.preprocess(Image.open(p.path), size, mean, std)})[0][0]) for p in photos]
    return np.stack(rows)


def report(fp32: Path, int8: Path, manifest: list[common.Photo] | None = None, split: str = "holdout") -> str:
    manifest = manifest if manifest is not None else common.load_manifest()
    photos = [p for p in manifest if p.split == split]
    meta = labelcast_metadata(onnx.load(str(fp32), load_external_data=False))
    labels = json.loads(meta["labelcast.labels"])
    thresholds_by_label = json.loads(meta.get("labelcast.thresholds", "{}"))
    thresholds = [thresholds_by_label.get(l, 0.5) for l in labels]
    truth = np.array([[l in p.labels for l in labels] for p in photos])
    runs = {"FP32": scores(fp32, photos), "INT8": scores(int8, photos)}
    shipped = sum(p.shipped for p in photos)
    title = (f"Accuracy on {len(photos)} {split} photos ({shipped} shipped in calibration/images, "
             f"{len(photos) - shipped} from calibration/extra), ONNX Runtime, thresholds from the model's metadata:\n\n")
    return title + common.accuracy_table(labels, thresholds, runs, truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fp32", type=Path)
    parser.add_argument("int8", type=Path)
    parser.add_argument("--split", default="holdout", choices=["holdout", "train"])
    args = parser.parse_args()
    print(report(args.fp32, args.int8, split=args.split))


if __name__ == "__main__":
    main()
