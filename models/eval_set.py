"""The demo model's held-out evaluation sets, from packages the training
never touches, hand-labelled (package, version, path, SHA-256, labels):

* set 1, models/demo/eval_labels.toml: 84 photos (models/pool.py
  EVALUATION). It has informed choices about the model (the card lists
  them), so it is no longer blind.
* set 2, models/demo/eval2_labels.toml (models/pool.py EVALUATION_2):
  photos from other packages, labelled after version 4 of the model was
  built and used for no choice about it: the blind check of set 1's
  figures.

    python models/eval_set.py models/demo/labelcast-demo-fp32.onnx models/demo/labelcast-demo-int8.onnx

fetches the packages (Debian and PyPI, as pool.py does), checks every
photo's SHA-256, runs each model with ONNX Runtime and prints, per set and
for both together, per-label AP and F1 at the model's own thresholds, mAP,
the share of the labels present that were found, and false labels per
photo. No torch.
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

DEMO = Path(__file__).resolve().parent / "demo"


@dataclass(frozen=True)
class EvalSet:
    """One hand-labelled set: where its labels are and which packages hold its photos."""

    name: str
    labels_file: Path
    sources: tuple[pool.Source, ...]


SET_1 = EvalSet("set 1", DEMO / "eval_labels.toml", tuple(pool.EVALUATION))
SET_2 = EvalSet("set 2", DEMO / "eval2_labels.toml", tuple(pool.EVALUATION_2))
SETS = (SET_1, SET_2)
# The shipped demo files, by the name their figures go under.
DEMO_FILES = {"FP32": "labelcast-demo-fp32.onnx", "INT8": "labelcast-demo-int8.onnx",
              "INT8 (cpu)": "labelcast-demo-int8-cpu.onnx"}
# The name of the two sets' photos taken together.
BOTH = "both sets"
# Set 2 was labelled after the build with this recipe hash and is blind for
# that model only: a model built since may have been shaped by it.
SET_2_BLIND_FOR = "734db51d4a4773b8"


@dataclass(frozen=True)
class EvalPhoto:
    path: Path
    id: str
    labels: frozenset[str]


def photos(pool_dir: Path, which: EvalSet = SET_1) -> list[EvalPhoto]:
    """The set's photos, fetched into `pool_dir` and checked against the
    SHA-256 they were labelled with."""
    entries = tomllib.loads(which.labels_file.read_text())["photo"]
    pool.fetch(list(which.sources), pool_dir)
    names = {s.name for s in which.sources}
    out = []
    for e in entries:
        name = e["package"].removeprefix("pypi:").split("==")[0]
        if name not in names:
            raise SystemExit(f"{which.labels_file}: {e['path']} is from {name}, not one of {which.name}'s packages")
        path = pool_dir / name / e["path"]
        if not path.exists():
            raise SystemExit(f"{path} is missing: is {e['package']} {e['version']} fetched?")
        if pool.sha256(path) != e["sha256"]:
            raise SystemExit(f"{path} is not the photo that was labelled (SHA-256 differs)")
        out.append(EvalPhoto(path, f"{name}:{e['path']}", frozenset(e["labels"])))
    return out


def photos_by_set(pool_dir: Path) -> dict[str, list[EvalPhoto]]:
    """Each set's photos by its name, then [`BOTH`]: all of them, in `SETS`
    order (the order [`figures_by_set`] concatenates scores in)."""
    by_set = {s.name: photos(pool_dir, s) for s in SETS}
    by_set[BOTH] = [p for s in SETS for p in by_set[s.name]]
    return by_set


def figures_by_set(labels: list[str], thresholds: list[float], scores_by_set: dict[str, np.ndarray],
                   by_set: dict[str, list[EvalPhoto]]) -> dict[str, dict]:
    """[`figures`] for each set from its rows of scores, and for [`BOTH`]
    from all of them (`by_set` as [`photos_by_set`] gives it)."""
    rows = {s.name: scores_by_set[s.name] for s in SETS}
    rows[BOTH] = np.concatenate([rows[s.name] for s in SETS])
    return {name: figures(labels, thresholds, rows[name], items) for name, items in by_set.items()}


def as_accuracy(runs_by_set: dict[str, dict]) -> dict:
    """models/demo/accuracy.json's layout: the first set's runs at the top
    level (as before the second set was added), the others' under their
    set's name. [`runs_by_set`] reads it back."""
    first = SETS[0].name
    return {**runs_by_set[first], **{name: runs for name, runs in runs_by_set.items() if name != first}}


def runs_by_set(accuracy: dict) -> dict[str, dict]:
    """The runs per set (and [`BOTH`]) in an accuracy.json ([`as_accuracy`]);
    a set it lacks has none."""
    first = SETS[0].name
    return {name: accuracy if name == first else accuracy.get(name, {}) for name in [s.name for s in SETS] + [BOTH]}


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
    by_set = photos_by_set(args.pool)
    results: dict[str, dict] = {name: {} for name in by_set}
    labels = None
    for model in args.models:
        labels = json.loads(labelcast_metadata(onnx.load(str(model), load_external_data=False))["labelcast.labels"])
        per_set = {s.name: scores(model, by_set[s.name]) for s in SETS}
        for name, result in figures_by_set(labels, model_thresholds(model, labels), per_set, by_set).items():
            results[name][model.name] = result
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for name, runs in results.items():
            print(f"{name} ({len(by_set[name])} photos)\n\n{table(runs, labels)}")


if __name__ == "__main__":
    main()
