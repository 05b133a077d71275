#!/usr/bin/env bash
# Set up a fresh Debian machine (root) for nitrofusion: Fashion-MNIST, the CPU torch wheel FIRST (so no
# dependency pulls a multi-GB CUDA build), then the project with the mini world and test extras
# (Chromium: the app's browser test).
set -euo pipefail
cd "$(dirname "$0")/.."
# Fashion-MNIST (the mini world), and headless Chromium with its driver (the app's browser test)
apt_packages=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || apt_packages+=(dataset-fashion-mnist)
command -v chromium >/dev/null && command -v chromedriver >/dev/null || apt_packages+=(chromium chromium-driver)
if [ ${#apt_packages[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e ".[mini,test]"
