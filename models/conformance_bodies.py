"""The FP32 models the INT8 conformance matrix (tests/int8_matrix.py)
quantises besides the demo, exported by ``export.py``: ML-Decoder heads on
bodies other than EfficientNet-Lite0, in the paper's two large settings.

* ``resnet-openimages``: a ResNet-style body (timm's ``ResNet`` with basic
  blocks, one per stage, 16-128 channels) and the OpenImages head layout:
  9,605 classes decoded by 200 group queries (group fully-connected layer,
  ``duplicate_pooling`` [200, D, 49]).
* ``tresnet-coco``: the official repository's TResNet-M layout (timm's
  ``TResNet``, stages [3, 4, 11, 3]: SpaceToDepth stem, anti-aliased
  downsampling, squeeze-excitation, leaky ReLU) at 1/8 width, and the MS-COCO
  head (80 classes, one query each).

Weights are random (seeded): the point is the graph a quantiser sees, not the
answers. The widths are cut down so the files stay small enough to ship
(the decoder width D is 64 instead of 768). Batch-norm statistics are set
from the shipped photos (a forward pass in training mode), so activations
have the spread a trained network's have rather than exploding or vanishing
through 40 random layers, and the head's biases are drawn so that scores
spread over 0..1 as a trained head's do.

    python models/conformance_bodies.py --out tests/fixtures/bodies   # needs torch and timm

The matrix only needs the ``.onnx`` files this writes (``SHA256SUMS`` beside
them; tests/run.sh checks it). Measured here (torch 2.15, timm 1.0.31): 4.2 and
2.0 MB, ONNX vs PyTorch within 4e-6 on the shipped photos, 1.5 minutes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

import common
from export import Metadata, export_onnx
from mldecoder import Classifier, HeadConfig, MLDecoder, TimmFeatures

SIZE = 224
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def resnet_openimages() -> tuple[Classifier, list[str], str]:
    from timm.models.resnet import BasicBlock, ResNet

    body = ResNet(BasicBlock, [1, 1, 1, 1], channels=(16, 32, 64, 128), stem_width=16, num_classes=0, global_pool="")
    head = MLDecoder(HeadConfig(num_classes=9605, num_of_groups=200, decoder_embedding=64,
                                initial_num_features=body.num_features, dim_feedforward=128, num_heads=4))
    labels = [f"oi_{i:04d}" for i in range(9605)]
    return Classifier(TimmFeatures(body), head), labels, "resnet-style (timm ResNet, BasicBlock [1,1,1,1], 16-128 ch)"


def tresnet_coco() -> tuple[Classifier, list[str], str]:
    from timm.models.tresnet import TResNet

    body = TResNet(layers=[3, 4, 11, 3], num_classes=0, width_factor=0.125, global_pool="")
    head = MLDecoder(HeadConfig(num_classes=80, num_of_groups=80, decoder_embedding=64,
                                initial_num_features=body.num_features, dim_feedforward=128, num_heads=4))
    labels = [f"coco_{i:02d}" for i in range(80)]
    return Classifier(TimmFeatures(body), head), labels, "tresnet_m layout (timm TResNet [3,4,11,3], width 1/8)"


BODIES = {"resnet-openimages": resnet_openimages, "tresnet-coco": tresnet_coco}


def settle_batch_norm(model: torch.nn.Module, photos: list[Path]) -> None:
    """Running mean/variance of every batch norm from the photos (cumulative
    average over one pass), as a trained network would have."""
    batch = torch.cat([torch.from_numpy(common.preprocess(Image.open(p), SIZE, MEAN, STD)) for p in photos])
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(batch)
    model.eval()


def spread_head(model: Classifier, photos: list[Path]) -> None:
    """Scales the group FC so logits have a standard deviation of 3 and
    shifts each class by a random bias around -2: most classes score low,
    some high, few near 0.5, as a trained multi-label head."""
    batch = torch.cat([torch.from_numpy(common.preprocess(Image.open(p), SIZE, MEAN, STD)) for p in photos])
    decoder = model.head.decoder
    with torch.no_grad():
        decoder.duplicate_pooling_bias.zero_()
        logits = model(batch)
        decoder.duplicate_pooling.mul_(3.0 / float(logits.std()))
        decoder.duplicate_pooling_bias.copy_(torch.randn_like(decoder.duplicate_pooling_bias) * 1.5 - 2.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--photos", type=Path, default=Path(__file__).resolve().parent.parent / "calibration/images")
    parser.add_argument("--seed", type=int, default=2021)
    args = parser.parse_args()
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    for name, build in BODIES.items():
        torch.manual_seed(args.seed)
        model, labels, backbone = build()
        settle_batch_norm(model, photos)
        spread_head(model, photos)
        metadata = Metadata(labels=labels, input_size=SIZE, mean=MEAN, std=STD, thresholds={},
                            model_name=f"conformance-{name}", model_version="1", backbone=backbone,
                            recipe_hash=f"random-seed-{args.seed}")
        export_onnx(model, args.out / f"{name}-fp32.onnx", metadata, photos)


if __name__ == "__main__":
    main()
