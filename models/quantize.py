"""FP32 ONNX -> INT8 QDQ ONNX that labelcast (tract) and TensorRT load.

No torch needed: onnx, onnxruntime, numpy and pillow only.

    python models/quantize.py models/demo/labelcast-demo-fp32.onnx out-int8.onnx \\
        --calibration calibration/images [--calibration calibration/extra]

Choices, and why:
  * QDQ format (QuantizeLinear/DequantizeLinear pairs): every engine runs it
    and TensorRT's explicit quantisation needs it. A QOperator file from
    ONNX Runtime holds its contrib ops (QGemm, QLinearAdd, QLinearMul,
    QLinearSoftmax) beside QLinearConv/QLinearMatMul: tract has the latter
    two, not the former, so only the onnxruntime engine runs such a file.
  * Symmetric int8 weights, per channel, and symmetric int8 activations
    (zero point 0): what TensorRT accepts (`--target tensorrt`, the default).
    `--target cpu` writes uint8 activations instead: ONNX Runtime's CPU
    provider runs those as integer kernels (U8S8), and symmetric int8 ones
    in float, so each engine gets the file it runs fastest.
  * Percentile calibration (99.999): max calibration lets one bright pixel set
    the scale of a whole tensor.
  * ``quant_pre_process(skip_symbolic_shape=True)``: ML-Decoder's attention
    reshapes break symbolic shape inference.
  * Attention Softmax and the MatMul that applies it stay in float: tract
    turns DequantizeLinear -> Softmax -> QuantizeLinear into a 256-entry lookup
    table as if Softmax were element-wise, which gives silently wrong scores.
  * Nodes named in the model's ``labelcast.float_nodes`` metadata stay in
    float too (the demo's label tail: quantised, 1 - p saturated and capped
    every grouped label's score near 0.97).

The calibration photos are split: a held-back part (``--holdout-fraction``)
is not used for calibration and measures FP32-vs-INT8 agreement.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image

import common
from export import labelcast_metadata, set_metadata

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


class PhotoReader(CalibrationDataReader):
    def __init__(self, input_name: str, tensors: list[np.ndarray]):
        self.input_name = input_name
        self.tensors = iter(tensors)

    def get_next(self):
        tensor = next(self.tensors, None)
        return None if tensor is None else {self.input_name: tensor}


def model_preprocessing(model: onnx.ModelProto) -> tuple[int, list[float], list[float]]:
    import json

    meta = labelcast_metadata(model)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    size = dims[2].dim_value or 224
    mean = json.loads(meta.get("labelcast.mean", "[0.485, 0.456, 0.406]"))
    std = json.loads(meta.get("labelcast.std", "[0.229, 0.224, 0.225]"))
    return size, mean, std


def attention_nodes(model: onnx.ModelProto) -> list[str]:
    """Every Softmax, and every MatMul that takes a Softmax's output."""
    softmax_outputs = {n.output[0]: n.name for n in model.graph.node if n.op_type == "Softmax"}
    names = list(softmax_outputs.values())
    names += [n.name for n in model.graph.node if n.op_type == "MatMul" and any(i in softmax_outputs for i in n.input)]
    return names


def float_nodes(model: onnx.ModelProto, graph: onnx.ModelProto) -> list[str]:
    """The nodes `model`'s metadata asks to keep in float
    (`labelcast.float_nodes`, a JSON list of node names; see
    models/build_demo.py's label tail) that `graph` (the model as prepared
    for quantisation) still has."""
    import json

    wanted = json.loads(labelcast_metadata(model).get("labelcast.float_nodes", "[]"))
    names = {n.name for n in graph.graph.node}
    missing = [n for n in wanted if n not in names]
    if missing:
        print(f"labelcast.float_nodes names nodes the prepared graph does not have: {', '.join(missing)}")
    return [n for n in wanted if n in names]


def list_photos(paths: list[Path]) -> list[Path]:
    photos = []
    for path in paths:
        if path.is_dir():
            photos += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            photos.append(path)
    return photos


def split_photos(photos: list[Path], holdout_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(held back, calibration): the same split for the same photos and seed."""
    photos = list(photos)
    random.Random(seed).shuffle(photos)
    n_hold = max(1, int(len(photos) * holdout_fraction))
    return photos[:n_hold], photos[n_hold:]


def quantize(fp32: Path, out: Path, photos: list[Path], holdout_fraction: float = 0.25, seed: int = 0,
             quantize_attention: bool = False, ort_defaults: bool = False, target: str = "tensorrt") -> dict:
    model = onnx.load(str(fp32))
    size, mean, std = model_preprocessing(model)
    input_name = model.graph.input[0].name
    photos = list(photos)
    if len(photos) < 4:
        raise SystemExit(f"need at least 4 calibration photos, got {len(photos)}")
    held, calib = split_photos(photos, holdout_fraction, seed)
    tensors = [common.preprocess(Image.open(p), size, mean, std) for p in calib]

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared))
        # Kept in float: attention, and the nodes the model's own metadata
        # names (the demo's label tail: a quantised range there caps the
        # scores it computes). --quantize-attention and --ort-defaults
        # quantise every Softmax and what follows as ONNX Runtime does (test
        # fixtures for tract's Softmax repair).
        excluded = []
        if not (quantize_attention or ort_defaults):
            excluded = attention_nodes(graph)
            excluded += [n for n in float_nodes(model, graph) if n not in excluded]
        if ort_defaults:
            # What most people run: QDQ, uint8 activations (Relu/Clip folded
            # into the pairs), int8 per-tensor weights, MinMax calibration.
            quantize_static(str(prepared), str(out), PhotoReader(input_name, tensors))
        else:
            # The targets differ only in the activations. TensorRT needs
            # symmetric int8 ones. ONNX Runtime's CPU provider runs QDQ
            # convolutions and matrix products as integer kernels when
            # activations are uint8 and weights int8 (U8S8; VNNI on x86,
            # dot-product instructions on ARM), with Relu/Clip folded into the
            # uint8 range; symmetric int8 activations fall back to float there.
            cpu = target == "cpu"
            quantize_static(
                str(prepared), str(out), PhotoReader(input_name, tensors),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8 if cpu else QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.Percentile,
                nodes_to_exclude=excluded,
                extra_options={"ActivationSymmetric": not cpu, "WeightSymmetric": True, "CalibPercentile": 99.999},
            )
    quantized = onnx.load(str(out))
    set_metadata(quantized, labelcast_metadata(model))
    quantized.producer_name = "labelcast models/quantize.py"
    onnx.save(quantized, str(out))

    counts = {op: sum(n.op_type == op for n in quantized.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    agreement = compare(fp32, out, held, size, mean, std, labelcast_metadata(model))
    result = {
        "fp32_mb": fp32.stat().st_size / 1e6,
        "int8_mb": out.stat().st_size / 1e6,
        "calibration_photos": len(calib),
        "held_back_photos": len(held),
        "excluded_nodes": excluded,
        **counts,
        **agreement,
    }
    print(f"wrote {out}: {result['int8_mb']:.1f} MB (FP32 {result['fp32_mb']:.1f} MB); "
          f"{counts['QuantizeLinear']} QuantizeLinear, {counts['DequantizeLinear']} DequantizeLinear; "
          f"kept in float: {', '.join(excluded) or 'nothing'}")
    print(f"FP32 vs INT8 on {len(held)} held-back photos: label decisions agree {agreement['decision_agreement']:.1%}, "
          f"max |score diff| {agreement['max_score_diff']:.3f}, mean {agreement['mean_score_diff']:.4f}")
    return result


def compare(fp32: Path, int8: Path, photos: list[Path], size: int, mean, std, meta: dict) -> dict:
    import json

    labels = json.loads(meta.get("labelcast.labels", "[]"))
    thresholds = json.loads(meta.get("labelcast.thresholds", "{}"))
    cut = np.array([thresholds.get(l, 0.5) for l in labels]) if labels else 0.5
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32, int8)]
    name = sessions[0].get_inputs()[0].name
    diffs, agree, total = [], 0, 0
    for path in photos:
        x = common.preprocess(Image.open(path), size, mean, std)
        a, b = (common.sigmoid(s.run(None, {name: x})[0][0]) for s in sessions)
        diffs.append(np.abs(a - b))
        agree += int(((a >= cut) == (b >= cut)).sum())
        total += a.size
    diffs = np.concatenate(diffs)
    return {"decision_agreement": agree / total, "max_score_diff": float(diffs.max()), "mean_score_diff": float(diffs.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fp32", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--calibration", type=Path, action="append", required=True, help="a folder of photos (repeatable)")
    parser.add_argument("--holdout-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quantize-attention", action="store_true",
                        help="also quantise every Softmax, softmax x V and the nodes labelcast.float_nodes names (ONNX Runtime's default; labelcast repairs the Softmax for tract)")
    parser.add_argument("--target", choices=["tensorrt", "cpu"], default="tensorrt",
                        help="tensorrt: symmetric int8 activations (TensorRT's explicit quantisation; tract runs it too); "
                             "cpu: uint8 activations, what ONNX Runtime's CPU provider runs as integer kernels")
    parser.add_argument("--ort-defaults", action="store_true",
                        help="quantize_static at ONNX Runtime's defaults (uint8 activations, per-tensor weights, MinMax) "
                             "instead of labelcast's recipe: what most users bring")
    args = parser.parse_args()
    photos = list_photos(args.calibration)
    quantize(args.fp32, args.out, photos, args.holdout_fraction, args.seed, args.quantize_attention, args.ort_defaults,
             args.target)


if __name__ == "__main__":
    main()
