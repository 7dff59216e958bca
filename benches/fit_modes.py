"""How a frame whose aspect ratio differs from the model's should be fitted:
centre-crop, letterbox, stretch or tiles, measured with labelcast itself on
the demo model's held-out evaluation set (models/demo/eval_labels.toml).

    python benches/fit_modes.py --binary target/release/labelcast --pool models/.pool

Runs `labelcast classify --json` once per mode on two sets made from the
same 84 photos: the photos as shot (mostly 4:3 and 3:4), and each photo cut
to a 16:9 band around its centre, turned upright first (what a wide camera
frames). Prints, per mode and set, mAP (threshold-free), labels found of
those present and false labels per photo at the model's shipped
thresholds, person found, and inferences per photo. The thresholds were
chosen on a validation split with centre-crop, which favours centre-crop in
the found/false columns; mAP does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import eval_set  # noqa: E402

MODES = ["center-crop", "letterbox", "tiles", "stretch"]


def wide_copy(src: Path, dst: Path) -> None:
    image = ImageOps.exif_transpose(Image.open(src)).convert("RGB")
    w, h = image.size
    if w * 9 > h * 16:
        cw, ch = h * 16 // 9, h
    else:
        cw, ch = w, w * 9 // 16
    left, top = (w - cw) // 2, (h - ch) // 2
    image.crop((left, top, left + cw, top + ch)).save(dst, quality=95)


def tiles_for(path: Path) -> int:
    w, h = ImageOps.exif_transpose(Image.open(path)).size
    long, short = max(w, h), min(w, h)
    aspect = long / short
    return 1 if abs(aspect - 1.0) <= 0.02 else int(np.ceil(aspect - 0.02))


def classify(binary: Path, model: Path, mode: str, files: list[Path], work: Path) -> dict[str, dict[str, float]]:
    config = work / f"{mode}.toml"
    config.write_text(f'[model]\nresize = "{mode}"\n')
    out = subprocess.run(
        [str(binary), "classify", "--json", "--log-level", "error", "-c", str(config), "--model", str(model)]
        + [str(f) for f in files],
        check=True, capture_output=True, text=True)
    rows = {}
    for line in out.stdout.splitlines():
        payload = json.loads(line)
        rows[payload["origin"]] = {k: v["score"] for k, v in payload["labels"].items()}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", type=Path, required=True)
    parser.add_argument("--pool", type=Path, default=Path(__file__).resolve().parents[1] / "models" / ".pool")
    parser.add_argument("--model", type=Path,
                        default=Path(__file__).resolve().parents[1] / "models" / "demo" / "labelcast-demo-int8.onnx")
    args = parser.parse_args()
    items = eval_set.photos(args.pool)
    import onnx
    from export import labelcast_metadata
    labels = json.loads(labelcast_metadata(onnx.load(str(args.model), load_external_data=False))["labelcast.labels"])
    thresholds = eval_set.model_thresholds(args.model, labels)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wide = []
        for i, item in enumerate(items):
            dst = work / f"wide-{i:03d}.jpg"
            wide_copy(item.path, dst)
            wide.append(dst)
        sets = {"as shot": [p.path for p in items], "16:9": wide}
        print("| set | mode | mAP | found / present | false per photo | person found | inferences per photo |")
        print("|---|---|---|---|---|---|---|")
        for name, files in sets.items():
            windows = np.mean([tiles_for(f) for f in files])
            for mode in MODES:
                rows = classify(args.binary, args.model, mode, files, work)
                scores = np.array([[rows[str(f)][l] for l in labels] for f in files])
                r = eval_set.figures(labels, thresholds, scores, items)
                per_photo = f"{windows:.2f}" if mode == "tiles" else "1"
                print(f"| {name} | {mode} | {r['map']:.3f} | {r['found']} / {r['present']} | "
                      f"{r['false_per_photo']:.2f} | {r['person_found']} / {r['person_present']} | {per_photo} |")


if __name__ == "__main__":
    main()
