# Sourced by the setup and test scripts (tests/, cross/, .ci/run): the steps
# that need root (apt-get, dpkg) run directly when the script is root, and
# through sudo otherwise.

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Installs the given Debian packages, quietly and without recommends.
apt_install() {
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# Installs those of the given Debian packages that are not installed yet.
apt_install_missing() {
  local missing=() package
  for package in "$@"; do dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package"); done
  if ((${#missing[@]})); then apt_install "${missing[@]}"; fi
}
