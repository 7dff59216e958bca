"""Copies the redistributable sample photos out of the PyPI wheels that carry
them into calibration/images/, shrunk to at most 640 px on the long side and
re-encoded as JPEG (quality 90) to keep the repo small.

Run from the repo root with scikit-image, scikit-learn and matplotlib
installed:  python calibration/collect.py
Provenance and licences: calibration/ATTRIBUTION.md.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import Image

# name in the repo -> (python package, path inside it)
PHOTOS = {
    "astronaut.jpg": ("skimage", "data/astronaut.png"),
    "camera.jpg": ("skimage", "data/camera.png"),
    "chelsea.jpg": ("skimage", "data/chelsea.png"),
    "coffee.jpg": ("skimage", "data/coffee.png"),
    "rocket.jpg": ("skimage", "data/rocket.jpg"),
    "hubble_deep_field.jpg": ("skimage", "data/hubble_deep_field.jpg"),
    "china.jpg": ("sklearn", "datasets/images/china.jpg"),
    "flower.jpg": ("sklearn", "datasets/images/flower.jpg"),
    "grace_hopper.jpg": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}

MAX_SIDE = 640


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"package {name} is not installed: pip install scikit-image scikit-learn matplotlib")
    return Path(spec.origin).parent


def main() -> None:
    out = Path(__file__).resolve().parent / "images"
    out.mkdir(exist_ok=True)
    for name, (package, inner) in PHOTOS.items():
        image = Image.open(package_dir(package) / inner).convert("RGB")
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        image.save(out / name, "JPEG", quality=90)
        print(f"{name}: {image.size[0]}x{image.size[1]} from {package}/{inner}")


if __name__ == "__main__":
    main()
