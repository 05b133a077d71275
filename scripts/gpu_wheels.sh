#!/usr/bin/env bash
# Fetch (here, with network) the wheels a lent GPU machine lacks for `nitrofusion bench`: its image has
# torch, transformers, accelerate, peft, safetensors, PyYAML, tqdm, torchmetrics, but not diffusers.
# They land in .whl/ (git-ignored via .git/info/exclude); carry it with the device tool.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for pkg in diffusers==0.42.1 importlib_metadata bitsandbytes==0.50.2; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl "$pkg"
done
ls -la .whl
