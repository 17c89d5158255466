# scripts/lib.sh - shared by scripts/demo and scripts/test (sourced, not run).
#
# Test hooks (for checking the error path without breaking a real machine):
#   QPKV_EXTRA_PACKAGES="pkg ..."  also require these Debian packages
#   QPKV_FAKE_NONROOT=1            act as if not root (print the sudo line instead of installing)
# e.g.  QPKV_FAKE_NONROOT=1 QPKV_EXTRA_PACKAGES=qpkv-no-such-package scripts/test  -> exits 1

QPKV_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$QPKV_ROOT"  # the scripts work from any directory

# Everything the build, tests, examples and benchmarks need. g++ brings libgomp (OpenMP).
QPKV_PACKAGES=(cmake ninja-build g++ libeigen3-dev doctest-dev libbenchmark-dev
               libcli11-dev nlohmann-json3-dev libfmt-dev libxxhash-dev gnuplot-nox)

qpkv_log() { printf '[qpkv] %s\n' "$*" >&2; }
qpkv_die() { qpkv_log "error: $*"; exit 1; }

qpkv_missing_packages() {
  local pkg
  for pkg in "${QPKV_PACKAGES[@]}" "$@" ${QPKV_EXTRA_PACKAGES:-}; do
    if [[ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" != installed ]]; then
      printf '%s\n' "$pkg"
    fi
  done
}

# qpkv_require_packages [extra packages...]: installs what is missing when root; otherwise prints
# the exact command and fails.
qpkv_require_packages() {
  if ! command -v dpkg-query >/dev/null; then
    qpkv_log "not a Debian-like system: skipping the package check (need: ${QPKV_PACKAGES[*]})"
    return 0
  fi
  local missing
  mapfile -t missing < <(qpkv_missing_packages "$@")
  ((${#missing[@]} == 0)) && return 0

  if [[ "$(id -u)" != 0 || "${QPKV_FAKE_NONROOT:-0}" == 1 ]]; then
    qpkv_log "missing Debian packages: ${missing[*]}"
    qpkv_log "install them with:"
    printf 'sudo apt-get install -y %s\n' "${missing[*]}"
    exit 1
  fi
  qpkv_log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends "${missing[@]}"; then
    qpkv_log "install failed; refreshing the package lists and retrying"
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
  fi
}
