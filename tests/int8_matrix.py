"""INT8 conformance matrix: models made by real quantiser settings, on every
engine and INT8 mode labelcast has, against ONNX Runtime from the venv.

    python tests/int8_matrix.py --labelcast target/debug/labelcast --work target/ci/matrix \\
        [--markdown target/ci/int8-matrix.md] [--quick]

For each FP32 body (the shipped demo, and the two bodies in
tests/fixtures/bodies/ exported by models/conformance_bodies.py) it makes the
INT8 variants below with ONNX Runtime's own quantiser, then:

1. labelcast (tract) preprocesses the shipped photos and writes the model
   inputs it made (`classify --dump-input`), so ONNX Runtime is fed the very
   same tensors and differences are the engines', not the JPEG decoders';
2. ONNX Runtime (Python, the reference) scores every variant on them;
3. `labelcast classify --json` scores every variant on each engine and INT8
   mode (tract native, tract weights-only with its load-time self-check, the
   onnxruntime engine on the venv's libonnxruntime), and the rows are
   compared with the reference.

A row passes when it runs and its largest score difference from ONNX Runtime
is within TOLERANCE and every label decision agrees (decisions whose
reference score lies within DECISION_BAND of the threshold are counted
apart: INT8 rounding alone can move those across it), or when labelcast
refuses the model at start (exit 78) with a message naming the engine that
can run it. Anything else fails the script: no row may be silently wrong.

Also one row with the rewrite broken on purpose
(LABELCAST_FAULT_DROP_SATURATION=1, the weights-only rewrite before it kept
folded activations): with the self-check off it must be far off, with it on
it must fall back to native and be right.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "models"))
import quantize as labelcast_quantize  # noqa: E402  (models/quantize.py)
from export import labelcast_metadata, set_metadata  # noqa: E402

#: Largest score difference (0..1, after the sigmoid) from ONNX Runtime INT8
#: that a row may show. ONNX Runtime runs integer kernels; tract native
#: emulates them in float and weights-only drops the activation rounding, so
#: scores move by INT8 rounding (README "Engines" has the measured figures).
TOLERANCE = 0.10
#: Decisions whose reference score is within the tolerance of the threshold
#: may flip with rounding alone (on the random 9,605-class head a few dozen
#: do); they are counted and shown, not failed. Outside it every decision
#: must agree.
DECISION_BAND = TOLERANCE

PHOTOS = sorted((REPO / "calibration/images").glob("*.jpg"))
BODIES = {
    "demo": REPO / "models/demo/labelcast-demo-fp32.onnx",
    "resnet-oi9605": REPO / "tests/fixtures/bodies/resnet-openimages-fp32.onnx",
    "tresnet-coco": REPO / "tests/fixtures/bodies/tresnet-coco-fp32.onnx",
}


class Reader(CalibrationDataReader):
    def __init__(self, name: str, tensors: list[np.ndarray]):
        self.name, self.tensors = name, iter(tensors)

    def get_next(self):
        t = next(self.tensors, None)
        return None if t is None else {self.name: t}


def attention_nodes(model: onnx.ModelProto) -> list[str]:
    return labelcast_quantize.attention_nodes(model)


@dataclass
class Variant:
    name: str
    what: str
    static: dict | None = None  # quantize_static keyword arguments
    dynamic: bool = False
    recipe: bool = False  # models/quantize.py (labelcast's own recipe)
    bodies: tuple[str, ...] = ("demo", "resnet-oi9605", "tresnet-coco")


VARIANTS = [
    Variant("ort-default", "quantize_static defaults: QDQ, uint8 activations, int8 per-tensor weights, MinMax", {}),
    Variant("ort-per-channel", "per_channel=True", {"per_channel": True}),
    Variant("ort-s8-symmetric", "QInt8 activations, ActivationSymmetric", {
        "activation_type": QuantType.QInt8, "extra_options": {"ActivationSymmetric": True}}),
    Variant("ort-reduce-range", "reduce_range=True (7-bit weights)", {"reduce_range": True}, bodies=("demo", "tresnet-coco")),
    Variant("ort-keep-activations", "QDQKeepRemovableActivations", {
        "extra_options": {"QDQKeepRemovableActivations": True}}, bodies=("demo", "resnet-oi9605")),
    Variant("ort-symmetric-u8", "ActivationSymmetric + WeightSymmetric (uint8, zero point 128)", {
        "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True}}, bodies=("demo", "tresnet-coco")),
    Variant("ort-attention-float", "defaults, attention Softmax and softmax x V kept in float", {"exclude_attention": True}),
    Variant("ort-percentile", "calibrate_method=Percentile", {"calibrate_method": CalibrationMethod.Percentile},
            bodies=("demo",)),
    Variant("ort-entropy", "calibrate_method=Entropy", {"calibrate_method": CalibrationMethod.Entropy}, bodies=("demo",)),
    Variant("labelcast-recipe", "models/quantize.py: s8s8 symmetric, per-channel, Percentile, attention float",
            recipe=True),
    Variant("ort-dynamic", "quantize_dynamic (DynamicQuantizeLinear + MatMulInteger/ConvInteger)", dynamic=True,
            bodies=("demo", "tresnet-coco")),
    Variant("ort-qoperator", "QuantFormat.QOperator (QLinearConv, QGemm, QLinearAdd...)", {
        "quant_format": QuantFormat.QOperator}, bodies=("demo", "resnet-oi9605")),
]

ENGINES = [("tract", "native"), ("tract", "weights-only"), ("onnxruntime", "native")]


# One window per photo, the centre crop: the matrix compares engines on the
# very input labelcast made, so the fitting must make one input per photo
# (labelcast's default, `tiles`, makes two on the non-square photos). And
# every label's score in the JSON, also for the bodies with more than 64
# labels (whose JSON otherwise carries the ON labels and the top 20).
CENTRE_CROP: list[str] = []


def run(cmd: list[str], env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def body_inputs(labelcast: Path, body: Path, work: Path) -> list[np.ndarray]:
    """The model inputs labelcast makes from the shipped photos for this body."""
    out = work / "inputs"
    out.mkdir(parents=True, exist_ok=True)
    result = run([str(labelcast), "classify", *CENTRE_CROP, "--model", str(body), "--dump-input", str(out),
                  "--json", *map(str, PHOTOS)])
    if result.returncode != 0:
        raise SystemExit(f"labelcast could not preprocess for {body}: {result.stderr}")
    model = onnx.load(str(body), load_external_data=False)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return [np.fromfile(out / f"{i}.f32", dtype="<f4").reshape(dims) for i in range(len(PHOTOS))]


def make_variant(variant: Variant, body_name: str, body: Path, inputs: list[np.ndarray], work: Path) -> Path:
    out = work / f"{body_name}-{variant.name}.onnx"
    if out.exists():
        return out
    fp32 = onnx.load(str(body))
    meta = labelcast_metadata(fp32)
    prepared = work / f"{body_name}-prepared.onnx"
    if not prepared.exists():
        quant_pre_process(str(body), str(prepared), skip_symbolic_shape=True)
    calibration = inputs[: max(4, len(inputs) * 2 // 3)]
    if variant.recipe and body_name == "demo":
        # The shipped INT8 demo model is exactly this recipe's output.
        return REPO / "models/demo/labelcast-demo-int8.onnx"
    if variant.recipe:
        labelcast_quantize.quantize(body, out, PHOTOS, holdout_fraction=0.34)
        return out
    if variant.dynamic:
        quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8)
    else:
        kwargs = dict(variant.static or {})
        if kwargs.pop("exclude_attention", False):
            kwargs["nodes_to_exclude"] = attention_nodes(onnx.load(str(prepared)))
        name = fp32.graph.input[0].name
        quantize_static(str(prepared), str(out), Reader(name, calibration), **kwargs)
    model = onnx.load(str(out))
    set_metadata(model, meta)
    onnx.save(model, str(out))
    return out


def reference_scores(model: Path, inputs: list[np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rows = [session.run(None, {name: x})[0].reshape(-1) for x in inputs]
    return 1.0 / (1.0 + np.exp(-np.array(rows, dtype=np.float64)))


@dataclass
class Row:
    body: str
    variant: str
    engine: str
    mode: str
    outcome: str  # "ok", "refused", "FAIL"
    max_diff: float = float("nan")
    decisions: int = 0
    disagree: int = 0
    in_band: int = 0
    p50_ms: float = float("nan")
    #: Largest score difference from ONNX Runtime on the FP32 body, for scale.
    fp32_diff: float = float("nan")
    note: str = ""
    fell_back: bool = False
    scores: np.ndarray | None = None


def weights_int8_symmetric(model: onnx.ModelProto) -> bool:
    """Whether every quantised weight (an int8 or uint8 initializer behind a
    DequantizeLinear) is int8 with zero points of 0: what tract folds into
    float weights on an int8 grid, which labelcast's 1x1 kernel keeps as int8
    (int32 biases are not weights; uint8 or offset weights may not fit)."""
    inits = {i.name: i for i in model.graph.initializer}
    eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].data_type in eight_bit]
    for node in weights:
        if inits[node.input[0]].data_type != onnx.TensorProto.INT8:
            return False
        if len(node.input) > 2 and node.input[2] in inits and onnx.numpy_helper.to_array(inits[node.input[2]]).any():
            return False
    return bool(weights)


def int8_1x1_convs(labelcast: Path, model: Path, env: dict) -> tuple[int, int] | None:
    """(1x1 convolutions on labelcast's kernel, how many of them keep int8
    weights) in the weights-only mode, from `model-info`'s engine line; None
    where tract's own product runs them (aarch64, a CPU without AVX2+FMA)."""
    result = run([str(labelcast), "model-info", "--int8", "weights-only", "--int8-check", "off", str(model)], env=env)
    found = re.search(r"1x1 convs: labelcast .*? on (\d+), int8 weights on (\d+)", result.stdout)
    return (int(found[1]), int(found[2])) if found else None


def classify(labelcast: Path, model: Path, engine: str, mode: str, env: dict, extra: list[str] = ()) -> tuple[
        subprocess.CompletedProcess, list[dict]]:
    result = run([str(labelcast), "classify", *CENTRE_CROP, "--json", "--model", str(model), "--engine", engine,
                  "--int8", mode, *extra, *map(str, PHOTOS)], env=env)
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result, events


def compare(events: list[dict], labels: list[str], thresholds: np.ndarray, reference: np.ndarray) -> tuple[
        float, int, int, int]:
    got = np.array([[e["labels"][l]["score"] for l in labels] for e in events], dtype=np.float64)
    diff = float(np.abs(got - reference).max())
    ours, theirs = got >= thresholds, reference >= thresholds
    # Scores are printed to 4 decimals: a reference within 5e-5 of the threshold is a tie.
    band = np.abs(reference - thresholds) < DECISION_BAND
    disagree = int(((ours != theirs) & ~band).sum())
    in_band = int(((ours != theirs) & band).sum())
    return diff, got.size, disagree, in_band


def check_row(labelcast: Path, body: str, variant: str, model: Path, engine: str, mode: str,
              reference: np.ndarray, fp32: np.ndarray, env: dict) -> Row:
    meta = labelcast_metadata(onnx.load(str(model), load_external_data=False))
    labels = json.loads(meta["labelcast.labels"])
    defaults = json.loads(meta.get("labelcast.thresholds", "{}"))
    thresholds = np.array([defaults.get(l, 0.5) for l in labels])
    result, events = classify(labelcast, model, engine, mode, env)
    row = Row(body, variant, engine, mode, "FAIL")
    if result.returncode == 78:
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        row.note = message[:160]
        # A refusal must say which engine can run the model.
        row.outcome = "refused" if "onnxruntime" in message else "FAIL"
        return row
    if result.returncode != 0 or len(events) != len(PHOTOS):
        row.note = (result.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return row
    row.fell_back = "running native instead" in result.stderr
    row.max_diff, row.decisions, row.disagree, row.in_band = compare(events, labels, thresholds, reference)
    row.fp32_diff = compare(events, labels, thresholds, fp32)[0]
    row.scores = np.array([[e["labels"][l]["score"] for l in labels] for e in events], dtype=np.float64)
    row.p50_ms = statistics.median(e["inference_ms"] for e in events)
    ok = row.max_diff <= TOLERANCE and row.disagree == 0
    notes = ["self-check fell back to native"] if row.fell_back else []
    if engine == "tract" and mode == "weights-only":
        convs = int8_1x1_convs(labelcast, model, env)
        if convs is not None:
            notes.append(f"1x1 weights int8 on {convs[1]} of {convs[0]}")
            # Any quantiser's symmetric int8 weights are found on their
            # grid: all of them stay int8 (the scores above are theirs).
            if weights_int8_symmetric(onnx.load(str(model), load_external_data=False)) and convs[1] != convs[0]:
                ok = False
                notes.append("int8 weights not kept as int8")
    row.outcome = "ok" if ok else "FAIL"
    row.note = "; ".join(notes)
    return row


def broken_rewrite_rows(labelcast: Path, model: Path, reference: np.ndarray, env: dict) -> list[Row]:
    """The old weights-only rewrite (saturation dropped), with the check off
    and on: off must be far from ONNX Runtime, on must fall back and agree."""
    rows = []
    broken = dict(env, LABELCAST_FAULT_DROP_SATURATION="1")
    meta = labelcast_metadata(onnx.load(str(model)))
    labels = json.loads(meta["labelcast.labels"])
    defaults = json.loads(meta.get("labelcast.thresholds", "{}"))
    thresholds = np.array([defaults.get(l, 0.5) for l in labels])
    for check in ("off", "fallback"):
        result, events = classify(labelcast, model, "tract", "weights-only", broken, ["--int8-check", check])
        row = Row("demo", "ort-default", "tract", f"weights-only, rewrite broken, check {check}", "FAIL")
        if result.returncode == 0 and len(events) == len(PHOTOS):
            row.max_diff, row.decisions, row.disagree, row.in_band = compare(events, labels, thresholds, reference)
            row.fell_back = "running native instead" in result.stderr
            row.p50_ms = statistics.median(e["inference_ms"] for e in events)
        if check == "off":
            # Expected to be wrong: that is what the check exists for.
            row.outcome = "ok" if row.max_diff > TOLERANCE else "FAIL"
            row.note = "expected far off: shows what the self-check guards against"
        else:
            row.outcome = "ok" if row.fell_back and row.max_diff <= TOLERANCE and row.disagree == 0 else "FAIL"
            row.note = "self-check fell back to native" if row.fell_back else "self-check did not fall back"
        rows.append(row)
    return rows


def markdown(rows: list[Row], seconds: float) -> str:
    lines = [
        f"INT8 conformance matrix ({len(rows)} rows, {seconds:.0f} s; reference: ONNX Runtime {ort.__version__} "
        f"from the venv on the same input tensors; tolerance {TOLERANCE}, decision band {DECISION_BAND})",
        "",
        "| body | quantiser setting | engine | mode | result | max \\|Δscore\\| | decisions differing (in band) | vs FP32 | p50 ms | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = "" if np.isnan(r.max_diff) else f"{r.max_diff:.4f}"
        agree = f"{r.disagree} of {r.decisions} ({r.in_band})" if r.decisions else ""
        ms = "" if np.isnan(r.p50_ms) else f"{r.p50_ms:.1f}"
        fp32 = "" if np.isnan(r.fp32_diff) else f"{r.fp32_diff:.4f}"
        lines.append(f"| {r.body} | {r.variant} | {r.engine} | {r.mode} | {r.outcome} | {diff} | {agree} | {fp32} | {ms} | "
                     f"{r.note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def condensed(rows: list[Row], seconds: float, gap: float | None) -> str:
    """One line per model: each engine's largest difference from ONNX
    Runtime, the decisions that differ (all within the tolerance band of the
    threshold), and the median time per photo, for README "Engines"."""
    lines = [
        "| body | quantiser setting | tract native: max \\|Δ\\| / ms | tract weights-only: max \\|Δ\\| / ms | onnxruntime: max \\|Δ\\| / ms | decisions differing (all in band) | ONNX Runtime INT8 vs FP32 |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], dict[str, Row]] = {}
    for r in rows:
        if r.mode in ("native", "weights-only"):
            groups.setdefault((r.body, r.variant), {})[f"{r.engine} {r.mode}"] = r
    for (body, variant), by in groups.items():
        def cell(key: str) -> str:
            r = by.get(key)
            if r is None:
                return ""
            if r.outcome == "refused":
                return "refused (exit 78, names onnxruntime)"
            if r.outcome == "FAIL":
                return "**FAIL**"
            return f"{r.max_diff:.3f} / {r.p50_ms:.0f}"
        differing = sum(r.in_band + r.disagree for r in by.values())
        decisions = sum(r.decisions for r in by.values())
        ort_row = by.get("onnxruntime native")
        ort_vs_fp32 = "" if ort_row is None or np.isnan(ort_row.fp32_diff) else f"{ort_row.fp32_diff:.3f}"
        lines.append(f"| {body} | {variant} | {cell('tract native')} | {cell('tract weights-only')} | "
                     f"{cell('onnxruntime native')} | {differing} of {decisions} | {ort_vs_fp32} |")
    lines.append("")
    lines.append(f"{len(rows)} rows in {seconds:.0f} s (`tests/int8_matrix.py`); tolerance {TOLERANCE}. "
                 + (f"Largest weights-only vs native difference on the same file: {gap:.3f}." if gap is not None else ""))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labelcast", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--readme-table", type=Path, help="also write the one-line-per-model table README shows")
    parser.add_argument("--quick", action="store_true", help="the demo body only")
    args = parser.parse_args()
    started = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    centre = args.work / "centre-crop.toml"
    centre.write_text('[model]\nresize = "center-crop"\n[labels]\ntop_k = 100000\nfloor = 0.0\n')
    CENTRE_CROP.extend(["-c", str(centre)])
    env = dict(os.environ)
    env.setdefault("ORT_DYLIB_PATH", str(sorted(Path(ort.__file__).parent.glob("capi/libonnxruntime.so*"))[0]))
    env["RUST_LOG"] = "warn"
    rows: list[Row] = []
    for body_name, body in BODIES.items():
        if args.quick and body_name != "demo":
            continue
        work = args.work / body_name
        work.mkdir(parents=True, exist_ok=True)
        inputs = body_inputs(args.labelcast, body, work)
        fp32 = reference_scores(body, inputs)
        for variant in VARIANTS:
            if body_name not in variant.bodies:
                continue
            t0 = time.time()
            model = make_variant(variant, body_name, body, inputs, work)
            reference = reference_scores(model, inputs)
            for engine, mode in ENGINES:
                row = check_row(args.labelcast, body_name, variant.name, model, engine, mode, reference, fp32, env)
                rows.append(row)
                print(f"{row.outcome:8} {body_name:14} {variant.name:22} {engine:12} {mode:13} "
                      f"max|d| {row.max_diff:.4f} disagree {row.disagree}/{row.decisions} (band {row.in_band}) "
                      f"p50 {row.p50_ms:.1f} ms; vs FP32 {row.fp32_diff:.4f} {row.note}", flush=True)
            print(f"{'':8} {body_name:14} {variant.name:22} ONNX Runtime INT8 vs FP32 "
                  f"{float(np.abs(reference - fp32).max()):.4f}", flush=True)
            if body_name == "demo" and variant.name == "ort-default":
                for row in broken_rewrite_rows(args.labelcast, model, reference, env):
                    rows.append(row)
                    print(f"{row.outcome:8} {row.body:14} {row.variant:22} {row.engine:12} {row.mode} "
                          f"max|d| {row.max_diff:.4f} {row.note}", flush=True)
            print(f"   ({body_name} {variant.name}: {time.time() - t0:.0f} s)", flush=True)
    seconds = time.time() - started
    # What the load-time self-check's tolerance must stay above: weights-only
    # against native on the same file, where neither fell back.
    pairs = {}
    for r in rows:
        if r.engine == "tract" and r.mode in ("native", "weights-only") and r.scores is not None and not r.fell_back:
            pairs.setdefault((r.body, r.variant), {})[r.mode] = r.scores
    gaps = [float(np.abs(p["native"] - p["weights-only"]).max()) for p in pairs.values() if len(p) == 2]
    if gaps:
        print(f"weights-only vs native (what the self-check compares): largest difference {max(gaps):.4f} "
              f"over {len(gaps)} models")
    table = markdown(rows, seconds)
    if args.readme_table:
        args.readme_table.write_text(condensed(rows, seconds, max(gaps) if gaps else None))
    if gaps:
        table += (f"\nLargest score difference between tract weights-only and tract native on the same file "
                  f"(what the load-time self-check compares): {max(gaps):.4f} over {len(gaps)} models.\n")
    if args.markdown:
        args.markdown.write_text(table)
    failed = [r for r in rows if r.outcome == "FAIL"]
    print(f"\n{len(rows)} rows in {seconds:.0f} s: {sum(r.outcome == 'ok' for r in rows)} ok, "
          f"{sum(r.outcome == 'refused' for r in rows)} refused with a reason, {len(failed)} failed")
    if failed:
        for r in failed:
            print(f"FAILED: {r.body} {r.variant} {r.engine} {r.mode}: max|d| {r.max_diff:.4f}, "
                  f"{r.disagree} decisions differ; {r.note}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
