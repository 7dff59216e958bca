"""The `person` teacher: where people are in each photo, from MediaPipe's
face detector (full-range model) and pose landmarker, both bundled in the
mediapipe 0.10.21 wheel (Apache-2.0; nothing is downloaded at run time).

ImageNet, which teaches every other label, has no person class. Run in its
own venv (models/requirements-person.txt: mediapipe needs numpy < 2):

    python models/person_teacher.py LIST.txt OUT.json

LIST.txt holds one image path per line; OUT.json maps each path to the
people found, as boxes in fractions of the picture: [x0, y0, x1, y1, score].
A face box is widened to the head and shoulders it implies (2x wide, 3x
tall, downwards), so a crop that keeps the face keeps the person. Measured by
the helper who chose it, on 26 photos with people and 81 without: face or
pose found 85 % of the people, on 5 % of the photos without.

    python models/person_teacher.py --cutouts LIST.txt OUT_DIR

cuts the people out of each listed photo (photos the boxes above found
people in) with MediaPipe's selfie segmentation model (the same wheel):
OUT_DIR/<n>.png is an RGBA picture of the people, cropped to them, and
OUT_DIR/index.json maps each photo to its picture. Pasted onto other photos
(models/demo_data.py), they put people at every size into rooms, streets and
landscapes, where the registry photos have few.
"""

from __future__ import annotations

import json
import sys

import mediapipe as mp
import numpy as np
from PIL import Image


def boxes(image: np.ndarray, faces, pose) -> list[list[float]]:
    found = []
    for detection in faces.process(image).detections or []:
        b = detection.location_data.relative_bounding_box
        cx, w, h = b.xmin + b.width / 2, b.width * 2.0, b.height * 3.0
        found.append([max(0.0, cx - w / 2), max(0.0, b.ymin - b.height * 0.3), min(1.0, cx + w / 2),
                      min(1.0, b.ymin - b.height * 0.3 + h), float(detection.score[0])])
    landmarks = pose.process(image).pose_landmarks
    if landmarks:
        seen = [l for l in landmarks.landmark if l.visibility > 0.5]
        if len(seen) >= 8:
            xs, ys = [l.x for l in seen], [l.y for l in seen]
            score = float(np.mean([l.visibility for l in seen]))
            found.append([max(0.0, min(xs)), max(0.0, min(ys)), min(1.0, max(xs)), min(1.0, max(ys)), score])
    return [[round(v, 4) for v in b] for b in found]


# A cut-out is kept when the people cover 3-85 % of the photo: less is
# mostly segmentation noise, more is a close-up with nothing to cut away.
CUTOUT_AREA = (0.03, 0.85)


def cutouts(listing: str, out_dir: str) -> None:
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index_file = out / "index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else {}
    segmenter = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
    paths = [line.strip() for line in open(listing) if line.strip()]
    for path in paths:
        image = Image.open(path).convert("RGB")
        if max(image.size) > 1280:
            image.thumbnail((1280, 1280))
        pixels = np.asarray(image)
        mask = segmenter.process(pixels).segmentation_mask
        solid = mask > 0.5
        if not CUTOUT_AREA[0] <= solid.mean() <= CUTOUT_AREA[1]:
            index[path] = None
            continue
        ys, xs = np.nonzero(solid)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        # Soft edges from the model's own probabilities; the faint fringe dropped.
        alpha = np.where(mask >= 0.3, mask * 255, 0).astype(np.uint8)
        rgba = np.dstack([pixels, alpha])[box[1]:box[3], box[0]:box[2]]
        name = f"{len(index)}.png"
        Image.fromarray(rgba, "RGBA").save(out / name)
        index[path] = name
    index_file.write_text(json.dumps(index, indent=0))
    print(f"  person cut-outs: {sum(1 for v in index.values() if v)} of {len(index)} photos with people", flush=True)


def main() -> None:
    if sys.argv[1] == "--cutouts":
        cutouts(sys.argv[2], sys.argv[3])
        return
    paths = [line.strip() for line in open(sys.argv[1]) if line.strip()]
    faces = mp.solutions.face_detection.FaceDetection(model_selection=1, min_detection_confidence=0.5)
    pose = mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1)
    out = {}
    for i, path in enumerate(paths):
        image = Image.open(path).convert("RGB")
        if max(image.size) > 1280:
            image.thumbnail((1280, 1280))
        out[path] = boxes(np.asarray(image), faces, pose)
        if (i + 1) % 100 == 0 or i + 1 == len(paths):
            print(f"  person teacher {i + 1}/{len(paths)}", flush=True)
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
