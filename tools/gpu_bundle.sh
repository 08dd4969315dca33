#!/usr/bin/env bash
# Makes what tools/gpu_check.sh carries to a lent GPU machine (docs/gpu/RUNBOOK.md), on this
# machine, skipping what is already there: .whl/ (the wheels the device image lacks, ~12 MB),
# .testdata/ (the test images) and .dali/ (DALI with its dependencies as an xz tar in parts of
# at most 50 MiB: one call may carry 64 MiB). All three are git-ignored (.git/info/exclude).
# Usage, from the repository root, with the venv of scripts/setup.sh:
#   bash tools/gpu_bundle.sh            # ~4 minutes the first time on 2 cores (the xz), then 0
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}
if [ ! -x "$PY" ]; then
  echo "error: no Python at $PY: run 'bash scripts/setup.sh' first, or set PY" >&2
  exit 2
fi
for d in /.whl/ /.testdata/ /.dali/; do
  grep -qxF "$d" .git/info/exclude 2> /dev/null || echo "$d" >> .git/info/exclude
done
# The device's Python is 3.12 (docs/gpu/RUNBOOK.md lists what its image holds).
DOWNLOAD=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12
          --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 --platform any)
if ! ls .whl/megatron_core-*.whl > /dev/null 2>&1; then
  echo "[bundle] wheels -> .whl/"
  "${DOWNLOAD[@]}" -d .whl megatron-core==0.19.2 zarr==3.1.6 numcodecs==0.16.6 \
    donfig==0.8.1.post1 crc32c==2.9.post0 google-crc32c==1.9.0
fi
if [ ! -d .testdata/images ]; then
  echo "[bundle] test images -> .testdata/"
  rm -rf .testdata && cp -r ../shared/testdata .testdata
fi
if ! ls .dali/dali.tar.xz.part_a? > /dev/null 2>&1; then
  echo "[bundle] DALI and its dependencies -> .dali/ (xz, a few minutes)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # DALI's Requires-Dist with nvImageCodec's [all] extra, minus what the image has (numpy,
  # packaging, typing-extensions)
  "${DOWNLOAD[@]}" -d "$tmp/whl" nvidia-dali-cuda130==2.4.0 astunparse==1.6.3 gast==0.7.0 \
    six==1.17.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0 pyyaml \
    nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16 \
    nvidia-nvjpeg==13.3.2.43 nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82 \
    nvidia-nvtx==13.0.85
  mkdir -p "$tmp/site" .dali
  for w in "$tmp"/whl/*.whl; do "$PY" -m zipfile -e "$w" "$tmp/site"; done
  tar -C "$tmp/site" -cf - . | xz -T2 -6 > "$tmp/dali_bundle.tar.xz"
  split -b 50m "$tmp/dali_bundle.tar.xz" .dali/dali.tar.xz.part_
fi
ls -l .whl .dali | grep -v "^total"
echo "[bundle] ready: carry .whl and .testdata with the check, .dali's parts as the RUNBOOK says"
