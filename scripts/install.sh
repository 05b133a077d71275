#!/usr/bin/env bash
# Set up a fresh Debian machine (root) for nitrofusion: Fashion-MNIST, the CPU torch wheel FIRST (so no
# dependency pulls a multi-GB CUDA build), then the project with the mini world and test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e ".[mini,test]"
