"""PyTorch -> ONNX for labelcast: opset 17, batch 1, static input shape, and
the metadata labelcast reads from ``metadata_props`` (labels, input size,
mean/std, output kind, default thresholds, name, version, backbone, recipe).

Before writing, the ONNX model is run with ONNX Runtime on real images and
compared with PyTorch; a mismatch above 1e-3 is an error.

Your own ML-Decoder checkpoint (official Alibaba-MIIL/ML_Decoder layout, needs
``timm`` for the backbone):

    python models/export.py --config coco-tresnet-l --checkpoint tresnet_l_COCO.pth \\
        --labels coco_labels.txt --input-size 448 --out coco-fp32.onnx \\
        --check-images calibration/images

then ``python models/quantize.py coco-fp32.onnx coco-int8.onnx --calibration your/photos``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

METADATA_PREFIX = "labelcast."


@dataclass
class Metadata:
    labels: list[str]
    input_size: int
    mean: list[float]
    std: list[float]
    thresholds: dict[str, float] = field(default_factory=dict)
    output: str = "logits"
    resize: str = "center-crop"
    model_name: str = "model"
    model_version: str = "1"
    backbone: str = ""
    recipe_hash: str = ""

    def props(self) -> dict[str, str]:
        return {
            "labels": json.dumps(self.labels),
            "input_size": f"{self.input_size}x{self.input_size}",
            "mean": json.dumps(self.mean),
            "std": json.dumps(self.std),
            "thresholds": json.dumps(self.thresholds),
            "output": self.output,
            "resize": self.resize,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "backbone": self.backbone,
            "recipe_hash": self.recipe_hash,
        }


def set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Replaces labelcast's keys in ``metadata_props``, keeping any others."""
    keep = [p for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key = key if key.startswith(METADATA_PREFIX) else METADATA_PREFIX + key
        entry.value = value


def labelcast_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}


def export_onnx(model, out: Path, metadata: Metadata, check_images: list[Path], tolerance: float = 1e-3) -> None:
    import onnxruntime as ort
    import torch
    from PIL import Image

    import common

    model = model.eval()
    dummy = torch.zeros(1, 3, metadata.input_size, metadata.input_size)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        kwargs = dict(input_names=["image"], output_names=["logits"], opset_version=17, do_constant_folding=True)
        try:
            torch.onnx.export(model, (dummy,), str(raw), dynamo=False, **kwargs)
        except TypeError:  # older torch without the dynamo switch
            torch.onnx.export(model, (dummy,), str(raw), **kwargs)
        proto = onnx.load(str(raw))
    onnx.checker.check_model(proto)
    set_metadata(proto, metadata.props())
    proto.producer_name = "labelcast models/export.py"

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    worst = 0.0
    for path in check_images:
        x = common.preprocess(Image.open(path), metadata.input_size, metadata.mean, metadata.std)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        got = session.run(None, {"image": x})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > tolerance:
        raise SystemExit(f"ONNX output differs from PyTorch by {worst:.2e} (> {tolerance}) on {len(check_images)} images")
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); ONNX vs PyTorch max |diff| {worst:.2e} on {len(check_images)} images")


def main() -> None:
    import torch

    from mldecoder import PAPER_CONFIGS, Classifier, MLDecoder, load_official_state_dict, timm_features

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(PAPER_CONFIGS), required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True, help="one label per line, in output order")
    parser.add_argument("--input-size", type=int, default=448)
    parser.add_argument("--mean", type=float, nargs=3, default=[0.0, 0.0, 0.0])
    parser.add_argument("--std", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--name", default=None)
    parser.add_argument("--check-images", type=Path, required=True, help="a folder of photos to compare ONNX with PyTorch on")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    backbone_name, head_cfg = PAPER_CONFIGS[args.config]
    labels = [l.strip() for l in args.labels.read_text().splitlines() if l.strip()]
    if len(labels) != head_cfg.num_classes:
        raise SystemExit(f"{args.labels} has {len(labels)} labels; {args.config} outputs {head_cfg.num_classes}")
    backbone = timm_features(backbone_name)
    model = Classifier(backbone, MLDecoder(head_cfg))
    missing = load_official_state_dict(model, torch.load(args.checkpoint, map_location="cpu", weights_only=False))
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise SystemExit(f"{args.checkpoint} does not provide {len(missing)} weights, e.g. {missing[:5]}")
    images = sorted(p for p in args.check_images.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    metadata = Metadata(labels=labels, input_size=args.input_size, mean=args.mean, std=args.std,
                        thresholds={l: args.threshold for l in labels}, model_name=args.name or args.config,
                        backbone=backbone_name)
    export_onnx(model, args.out, metadata, images)


if __name__ == "__main__":
    main()
