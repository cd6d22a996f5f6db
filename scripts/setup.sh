#!/usr/bin/env bash
# Set up divla-eval on a fresh Debian/Ubuntu machine with Python 3.10+ and pip.
#   bash scripts/setup.sh          # runtime: EGL packages, .venv, the project with its models (CPU torch)
#   bash scripts/setup.sh test     # the same plus what the tests need (pytest, ruff, nox, pytest-benchmark,
#                                  # and Chromium, which renders the HTML report in its browser test)
# Offscreen rendering uses MUJOCO_GL=egl on Mesa's llvmpipe, which needs these Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs="libegl1 libegl-mesa0 libgl1-mesa-dri"
[ "${1:-}" = "test" ] && pkgs="$pkgs chromium"
if ! dpkg -s $pkgs >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq $pkgs >/dev/null
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned (==2.13.0, a CPU wheel) inside the extras: an unpinned torch would pull CUDA builds.
extra="[models]"; [ "${1:-}" = "test" ] && extra="[test]"
.venv/bin/python -m pip install -q -e ".${extra}"
