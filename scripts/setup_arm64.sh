#!/usr/bin/env bash
# An arm64 (aarch64) Python 3.11 with the stock onnxruntime wheel, run by qemu user mode on x86-64,
# for tests/test_portable_arm64.py. Everything comes from Debian's packages and the package index:
#   build/arm64/sysroot/   Debian bookworm's python3.11:arm64 and its library closure (dpkg -x, ~14 MB)
#   build/arm64/site/      aarch64 wheels: onnxruntime<=1.27, onnx and the device half's other dependencies
#   build/arm64/READY      written last; the test skips unless it exists
# Needs root (apt-get) on Debian/Ubuntu. Idempotent: does nothing once READY exists.
# onnxruntime is kept <= 1.27: qemu 7.2 passes the host's x86 /proc/cpuinfo through, and
# onnxruntime >= 1.28 crashes at import reading it (1.16-1.27 import fine).
set -euo pipefail

OUT="${1:-build/arm64}"
PIP="${PIP:-python3 -m pip}"
[ -f "$OUT/READY" ] && { echo "arm64 emulation already set up in $OUT"; exit 0; }
if [ "$(uname -m)" != "x86_64" ] || ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
  echo "arm64 emulation not set up: needs root and apt-get on an x86-64 host"; exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if ! command -v qemu-aarch64-static >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq qemu-user-static >/dev/null
fi
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64
fi
apt-get update -qq

rm -rf "$OUT.partial" && mkdir -p "$OUT.partial/debs" "$OUT.partial/sysroot" "$OUT.partial/wheels"
ROOTS="python3.11:arm64 libstdc++6:arm64 libgcc-s1:arm64"
# the arm64 packages these depend on, recursively (virtual packages and x86 ones left out)
PACKAGES=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
             --no-replaces --no-enhances $ROOTS | grep -E '^[a-z0-9][^ <]*:arm64$' | sort -u)
(cd "$OUT.partial/debs" && apt-get download $PACKAGES >/dev/null)
for deb in "$OUT.partial"/debs/*.deb; do dpkg -x "$deb" "$OUT.partial/sysroot"; done

PLATFORMS="--platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_17_aarch64"
$PIP download --quiet --only-binary=:all: $PLATFORMS --python-version 3.11 --implementation cp --abi cp311 \
  --abi abi3 --abi none -d "$OUT.partial/wheels" \
  "onnxruntime<=1.27" onnx numpy tokenizers jinja2 safetensors tqdm click flatbuffers
$PIP install --quiet --no-deps --target "$OUT.partial/site" $PLATFORMS --implementation cp --abi cp311 \
  --abi abi3 --abi none --only-binary=:all: "$OUT.partial"/wheels/*.whl

rm -rf "$OUT" && mv "$OUT.partial" "$OUT"
rm -rf "$OUT/debs" "$OUT/wheels"
echo "qemu-aarch64-static -L $OUT/sysroot $OUT/sysroot/usr/bin/python3.11 (PYTHONPATH=$OUT/site)" > "$OUT/READY"
echo "arm64 emulation set up in $OUT"
