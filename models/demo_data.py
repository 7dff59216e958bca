"""The demo model's training samples: what the head sees and what it is
taught, made from the registry photo pool (models/pool.py).

Every sample is a 224x224 picture the frozen EfficientNet-Lite0 turns into
the [1280, 7, 7] feature map the ML-Decoder head reads, with a target per
label from three teachers:

* **ImageNet** (every label but `person`): EfficientNet-Lite0's own
  classifier on the same picture, its 1000 softmax probabilities summed over
  each label's classes (models/labels.py).
* **MediaPipe** (`person`): the people models/person_teacher.py found in the
  source photo, kept where the crop keeps most of one (at least 60 % of its
  box, and at least 1 % of the crop). A crop that cuts a person in two
  (keeps 20-60 % of the box) or keeps one too small to judge (0.2-1 % of
  the crop) has an unknown `person` target (NaN), which carries no loss:
  taught as absent, such crops taught the head to doubt every person who
  is not whole and large in the frame.
* **The package's own taxonomy** (cut-outs): a Tux Paint stamp filed under
  `birds` is a bird wherever it is pasted, when it covers at least 3 % of
  the picture.

Kinds of sample, each with strong augmentation (random resized crops from
8 % to 100 % of the photo, flips, colour and brightness jitter, blur, JPEG
re-compression, dim light):

* a crop of a photo;
* a composite: a photo crop as background with one to three cut-outs pasted
  at random sizes and places (what a camera sees: several things at once);
* a 2x2 mosaic of four such samples, whose target is the union of theirs,
  1 - prod(1 - p) (ML-Decoder's queries must find things anywhere).
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

import common
import pool
from labels import GROUPS, LABELS

INPUT = 224
PERSON = LABELS.index("person")


@dataclass
class Photo:
    image: Image.Image  # RGB, at most 640 px on its longer side
    id: str
    path: Path
    people: list[list[float]]  # boxes in fractions: x0, y0, x1, y1, score
    known: tuple[str, ...]


@dataclass
class Cutout:
    image: Image.Image  # RGBA
    id: str
    known: tuple[str, ...]


def load(pool_dir: Path, person_boxes: dict[str, list[list[float]]],
         person_cutouts: dict[str, Path] | None = None) -> tuple[list[Photo], list[Cutout]]:
    """The training pool's photos and cut-outs. `person_cutouts` (from
    `person_cutouts`) adds the people cut out of a photo as a `person`
    cut-out with the photo's id, so `split` keeps it on its photo's side."""
    photos, cutouts = [], []
    person_cutouts = person_cutouts or {}
    for item in pool.images(pool.TRAINING, pool_dir):
        image = Image.open(item.path)
        if item.source.cutouts:
            image = image.convert("RGBA")
            # Some stamps are drawn, not photographed: few colours give them away.
            colours = len(set(image.convert("RGB").resize((64, 64)).getdata()))
            if colours < 600 or image.getextrema()[3][0] == 255:
                continue
            image.thumbnail((400, 400))
            cutouts.append(Cutout(image, item.id, item.known))
        else:
            image = image.convert("RGB")
            image.thumbnail((640, 640))
            photos.append(Photo(image, item.id, item.path, person_boxes.get(str(item.path), []), item.known))
            if str(item.path) in person_cutouts:
                people = Image.open(person_cutouts[str(item.path)]).convert("RGBA")
                people.thumbnail((400, 400))
                cutouts.append(Cutout(people, item.id, ("person",)))
    return photos, cutouts


def split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(validation, training), by a hash of each item's id: stable when the
    pool grows."""
    import hashlib

    key = lambda x: hashlib.sha256(f"{seed}:{x.id}".encode()).digest()[0] / 256  # noqa: E731
    return [x for x in items if key(x) < fraction], [x for x in items if key(x) >= fraction]


def random_box(w: int, h: int, rng: random.Random, area=(0.08, 1.0)) -> tuple[float, float, float, float]:
    for _ in range(10):
        a = rng.uniform(*area) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = np.sqrt(a * aspect), np.sqrt(a / aspect)
        if cw <= w and ch <= h:
            x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            return x0, y0, x0 + cw, y0 + ch
    side = min(w, h)
    return (w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2


def people_in(box: tuple[float, float, float, float], size: tuple[int, int], people: list[list[float]]) -> float:
    """The best score of a person the crop `box` keeps, or NaN (unknown)
    where it keeps none whole but cuts one or keeps one too small to judge
    (see the module doc)."""
    w, h = size
    x0, y0, x1, y1 = box[0] / w, box[1] / h, box[2] / w, box[3] / h
    best, unknown = 0.0, False
    for px0, py0, px1, py1, score in people:
        ix = max(0.0, min(x1, px1) - max(x0, px0))
        iy = max(0.0, min(y1, py1) - max(y0, py0))
        inter, own = ix * iy, max(1e-9, (px1 - px0) * (py1 - py0))
        of_crop = inter / ((x1 - x0) * (y1 - y0))
        if inter / own >= 0.6 and of_crop >= 0.01:
            best = max(best, score)
        elif inter / own >= 0.2 and of_crop >= 0.002:
            unknown = True
    return float("nan") if unknown and best < 0.5 else best


def person_union(values) -> float:
    """A picture's `person` target from its parts' (cut-outs, mosaic tiles):
    the best, unless no part is sure (>= 0.5) and one is unknown (NaN)."""
    known = [v for v in values if not np.isnan(v)]
    best = max(known, default=0.0)
    return float("nan") if best < 0.5 and len(known) < len(values) else best


def augment(image: Image.Image, rng: random.Random) -> Image.Image:
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.6, 1.35))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.7, 1.3))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
    if rng.random() < 0.15:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.8)))
    if rng.random() < 0.05:
        image = image.convert("L").convert("RGB")
    if rng.random() < 0.1:  # dim light: a gamma above 1 darkens the shadows
        gamma = rng.uniform(1.3, 2.0)
        image = image.point(lambda v: int(255 * (v / 255) ** gamma))
    if rng.random() < 0.35:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=rng.randint(25, 90))
        image = Image.open(buffer).convert("RGB")
    return image


@dataclass
class Sample:
    image: Image.Image  # 224x224 RGB
    known: np.ndarray  # per label: 1 where a teacher other than ImageNet says so, else 0
    person: float


def photo_crop(photo: Photo, rng: random.Random) -> Sample:
    box = random_box(*photo.image.size, rng)
    crop = photo.image.resize((INPUT, INPUT), Image.Resampling.BILINEAR, box=box)
    known = np.zeros(len(LABELS), dtype=np.float32)
    for label in photo.known:
        known[LABELS.index(label)] = 1.0
    return Sample(augment(crop, rng), known, people_in(box, photo.image.size, photo.people))


def composite(photo: Photo, cutouts: list[Cutout], rng: random.Random) -> Sample:
    base = photo_crop(photo, rng)
    canvas = base.image.copy()
    known = base.known.copy()
    for cutout in rng.sample(cutouts, rng.randint(1, 3)):
        scale = rng.uniform(0.2, 0.75) * INPUT / max(cutout.image.size)
        w, h = max(8, int(cutout.image.width * scale)), max(8, int(cutout.image.height * scale))
        piece = cutout.image.resize((w, h), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            piece = piece.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        piece = ImageEnhance.Brightness(piece).enhance(rng.uniform(0.7, 1.2))
        x, y = rng.randint(-w // 4, INPUT - 3 * w // 4), rng.randint(-h // 4, INPUT - 3 * h // 4)
        canvas.paste(piece, (x, y), piece)
        visible = np.asarray(piece.getchannel("A")).astype(np.float32).sum() / 255 / (INPUT * INPUT)
        if visible >= 0.03:
            for label in cutout.known:
                known[LABELS.index(label)] = 1.0
    return Sample(canvas, known, person_union([base.person, float(known[PERSON])]))


def mosaic(samples: list[Sample]) -> Sample:
    canvas = Image.new("RGB", (INPUT, INPUT))
    for k, s in enumerate(samples):
        canvas.paste(s.image.resize((INPUT // 2, INPUT // 2), Image.Resampling.BILINEAR),
                     ((k % 2) * INPUT // 2, (k // 2) * INPUT // 2))
    return Sample(canvas, np.max([s.known for s in samples], axis=0), person_union([s.person for s in samples]))


def to_tensor(image: Image.Image) -> torch.Tensor:
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.float32(common.LITE0_MEAN[0])) / np.float32(common.LITE0_STD[0])
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def group_matrix() -> torch.Tensor:
    m = torch.zeros(1000, len(LABELS))
    for j, label in enumerate(LABELS):
        m[GROUPS[label], j] = 1.0
    return m


@torch.no_grad()
def encode(teacher, samples: list[Sample], batch: int = 64, progress: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (float16) and targets: per label the larger of the
    ImageNet teacher's grouped probability and the other teachers' word;
    for mosaics, the union over tiles is taken before (see `make`)."""
    groups = group_matrix()
    features = torch.empty(len(samples), 1280, INPUT // 32, INPUT // 32, dtype=torch.float16)
    targets = torch.empty(len(samples), len(LABELS))
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        x = torch.stack([to_tensor(s.image) for s in chunk])
        f = teacher.extract_features(x)
        probs = torch.softmax(teacher._fc(f.mean(dim=(2, 3))), dim=1) @ groups
        known = torch.from_numpy(np.stack([s.known for s in chunk]))
        person = torch.tensor([s.person for s in chunk])
        target = torch.maximum(probs.clamp(0, 1), known)
        # NaN (unknown) stays unknown unless ImageNet's person classes
        # (uniforms, divers, ...) are sure on their own.
        sure = torch.fmax(target[:, PERSON], person)
        target[:, PERSON] = torch.where(person.isnan() & (sure < 0.5), person, sure)
        features[start:start + len(chunk)] = f.half()
        targets[start:start + len(chunk)] = target
        if (start // batch) % 10 == 0:
            print(f"  {progress} {start + len(chunk)}/{len(samples)}", flush=True)
    return features, targets


def make(teacher, photos: list[Photo], cutouts: list[Cutout], n: int, rng: random.Random, progress: str):
    """`n` samples: 45 % photo crops, 30 % composites, 25 % mosaics of four
    crops or composites. A mosaic's target is the union of its tiles'
    targets, each tile's computed on the tile at full size."""
    singles = [photo_crop(rng.choice(photos), rng) if rng.random() < 0.6 else composite(rng.choice(photos), cutouts, rng)
               for _ in range(int(n * 0.75))]
    features, targets = encode(teacher, singles, progress=progress + " crops and composites")
    groups_of_four = [rng.sample(range(len(singles)), 4) for _ in range(n - len(singles))]
    mosaics = [mosaic([singles[i] for i in g]) for g in groups_of_four]
    mosaic_features, _ = encode(teacher, mosaics, progress=progress + " mosaics")
    mosaic_targets = torch.stack([1 - torch.prod(1 - targets[g].nan_to_num(0.0), dim=0) for g in groups_of_four])
    mosaic_targets[:, PERSON] = torch.tensor([person_union(targets[g, PERSON].tolist()) for g in groups_of_four])
    return torch.cat([features, mosaic_features]), torch.cat([targets, mosaic_targets])


def person_cutouts(pool_dir: Path, venv_python: str, boxes: dict[str, list[list[float]]]) -> dict[str, Path]:
    """The people of each training photo the person teacher found people in,
    cut out (person_teacher.py --cutouts); cached beside the pool. Maps the
    photo's path to its RGBA picture."""
    out = pool_dir / "person-cutouts"
    index_file = out / "index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else {}
    missing = [p for p, people in boxes.items() if people and p not in index and Path(p).exists()]
    if missing:
        import subprocess

        listing = pool_dir / "person-cutouts.txt"
        listing.write_text("\n".join(missing) + "\n")
        subprocess.run([venv_python, str(Path(__file__).parent / "person_teacher.py"), "--cutouts", str(listing), str(out)],
                       check=True)
        index = json.loads(index_file.read_text())
    return {p: out / name for p, name in index.items() if name}


PERSON_CLASSES_MIN = 0.04


@torch.no_grad()
def vet_person_cutouts(teacher, cutouts: list[Cutout]) -> list[Cutout]:
    """Drops the people cut out of photos where the person teacher was
    fooled: pasted on grey, a cut-out the ImageNet teacher calls an animal
    (its classes 0-397) or one of the other labels (grouped probability
    >= 0.5), or gives less than `PERSON_CLASSES_MIN` to the clothes,
    uniforms and roles `models/labels.py` lists for person, is not a person.
    The person teacher finds "faces" on puppies, dolphins, sunflowers,
    pliers and a gamepad; taught as certain people, every one of them would
    be pasted into many samples. (The bound: of the 93 cut-outs of the pool
    at the time, looked at one by one, the fooled ones all scored below
    0.025 there, a group photo of two at a table 0.047.)"""
    groups = group_matrix()
    person_classes = torch.tensor(GROUPS["person"])
    kept, dropped = [], []
    for c in cutouts:
        if c.known != ("person",):
            kept.append(c)
            continue
        canvas = Image.new("RGB", (INPUT, INPUT), (128, 128, 128))
        piece = c.image.copy()
        piece.thumbnail((INPUT, INPUT))
        canvas.paste(piece, ((INPUT - piece.width) // 2, (INPUT - piece.height) // 2), piece)
        probs = torch.softmax(teacher._fc(teacher.extract_features(to_tensor(canvas)[None]).mean(dim=(2, 3))), dim=1)[0]
        grouped = (probs @ groups).clamp(0, 1)
        grouped[PERSON] = 0.0
        fooled = int(probs.argmax()) <= 397 or float(grouped.max()) >= 0.5 \
            or float(probs[person_classes].sum()) < PERSON_CLASSES_MIN
        (dropped if fooled else kept).append(c)
    print(f"  person cut-outs: kept {sum(1 for c in kept if c.known == ('person',))}, dropped {len(dropped)} "
          f"that the ImageNet teacher calls something else", flush=True)
    return kept


def person_boxes(pool_dir: Path, venv_python: str) -> dict[str, list[list[float]]]:
    """Runs the person teacher in its own venv on the photos it has not seen;
    its boxes are cached beside the pool, so a grown pool costs only the new
    photos."""
    out = pool_dir / "person-boxes.json"
    cached = json.loads(out.read_text()) if out.exists() else {}
    photos = [str(i.path) for i in pool.images(pool.TRAINING, pool_dir) if not i.source.cutouts]
    missing = [p for p in photos if p not in cached]
    if missing:
        import subprocess

        listing, fresh = pool_dir / "photos.txt", pool_dir / "person-boxes-new.json"
        listing.write_text("\n".join(missing) + "\n")
        subprocess.run([venv_python, str(Path(__file__).parent / "person_teacher.py"), str(listing), str(fresh)], check=True)
        cached.update(json.loads(fresh.read_text()))
        out.write_text(json.dumps(cached))
        fresh.unlink()
    return cached
