#!/usr/bin/env bash
# One-time set-up of a fresh machine: Debian packages, a virtual environment at .venv/, pip packages,
# and fastcd itself in editable mode. Quick when already done (a stamp file records the inputs).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="libturbojpeg0-dev libopencv-dev pkg-config dataset-fashion-mnist"
STAMP=.venv/.fastcd-setup
INPUTS_HASH=$( (cat tools/setup.sh requirements.txt setup.py) | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$INPUTS_HASH" ]; then
  exit 0
fi

missing=""
for p in $APT_PACKAGES; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "[setup] apt-get install:$missing"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  python3 -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip setuptools wheel
echo "[setup] pip install torch, torchvision (large; taken from local files where present)"
$PIP install torch==2.14.1 torchvision==0.29.1
echo "[setup] pip install requirements.txt"
$PIP install -r requirements.txt
echo "[setup] pip install ffcv (compiled against libturbojpeg and OpenCV)"
$PIP install --no-build-isolation ffcv==1.0.2
$PIP install --no-build-isolation -e .
echo "$INPUTS_HASH" > "$STAMP"
echo "[setup] done"
