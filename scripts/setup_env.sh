#!/usr/bin/env bash
# Create .venv and install vitzoo with every extra (torch, mmcv with compiled ops, mm*, diffusers, ...).
# Idempotent: a stamp file keyed on the inputs makes a repeat run take well under a second.
# mmcv 2.1.0 must be built from a C++20-patched sdist (torch 2.14 headers need C++20); the built wheel is cached in
# $VITZOO_WHEELHOUSE (default: ~/.cache/vitzoo/wheels) and any matching wheel found there is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
WHEELHOUSE=${VITZOO_WHEELHOUSE:-$HOME/.cache/vitzoo/wheels}
CACHE=${VITZOO_CACHE:-$HOME/.cache/vitzoo/wheels}
STAMP="$VENV/.vitzoo-installed"
KEY=$(cat setup.cfg pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" ]]; then
  exit 0
fi
echo "[setup] creating/updating $VENV (key $KEY)"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
P="$VENV/bin/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# 1. torch + torchvision (local wheels on these machines)
"$P" install -q torch==2.14.1 torchvision==0.29.1
# 2. build tooling: setuptools<82 keeps pkg_resources (mmcv setup.py, mmengine, imagecorruptions import it)
"$P" install -q "setuptools>=77.0.3,<82" wheel ninja
# 3. mmcv 2.1.0 with compiled CPU ops: reuse a cached wheel, else build the C++20-patched sdist once and cache it
if ! "$VENV/bin/python" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
  TAG=$("$VENV/bin/python" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
  WHL=""
  for d in "$WHEELHOUSE" "$CACHE"; do
    for f in "$d"/mmcv-2.1.0-"$TAG"-"$TAG"-linux_$(uname -m).whl; do [[ -f "$f" ]] && WHL="$f" && break 2; done
  done
  if [[ -z "$WHL" ]]; then
    echo "[setup] no cached mmcv wheel for $TAG: building mmcv 2.1.0 from source (~15 min on 2 cores)"
    BUILD=$(mktemp -d)
    "$P" download -q --no-deps --no-binary :all: --no-build-isolation -d "$BUILD" mmcv==2.1.0
    tar xzf "$BUILD"/mmcv-2.1.0.tar.gz -C "$BUILD"
    sed -i 's/-std=c++17/-std=c++20/g' "$BUILD"/mmcv-2.1.0/setup.py
    mkdir -p "$CACHE"
    MMCV_WITH_OPS=1 MAX_JOBS=2 "$P" wheel -q --no-deps --no-build-isolation -w "$CACHE" "$BUILD"/mmcv-2.1.0
    rm -rf "$BUILD"
    WHL=$(ls "$CACHE"/mmcv-2.1.0-"$TAG"-*.whl | head -1)
  fi
  echo "[setup] installing $WHL"
  "$P" install -q --no-deps "$WHL"
fi
# 4. vitzoo itself with every extra (mmcv is already satisfied, so pip never tries the unpatched sdist)
"$P" install -q -e ".[all]"
"$VENV/bin/python" -c "import vitzoo, timm, mmcv.ops, mmdet, mmseg, diffusers" >/dev/null
echo "$KEY" > "$STAMP"
echo "[setup] done"
