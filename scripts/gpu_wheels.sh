#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.py needs that the lent GPU machine lacks, to carry there.
#
# That machine (the device tool's nvidia-h200: KINDS.md lists its packages) runs Python 3.12 with
# torch, triton, transformers, peft, pytest, pytest-xdist, pytest-benchmark, matplotlib, numpy,
# safetensors, pyyaml and tqdm, and cannot download anything. fastseq travels as source (the
# working tree) and runs uninstalled. Missing there: bitsandbytes (the nf4 / int8 backbones).
# flwr is not needed: the check's federated round runs on the embedded engine.
#
#   scripts/gpu_wheels.sh [DEST]      # default .whl/ (ignored by git); the device call carries it
#
# It ends by printing the device call that installs them there (benchmarks/README.md, "One call on a
# lent GPU", explains it).
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
# the versions the test suite passes with here; bitsandbytes 0.50 ships its CUDA 13.0 library
# (the machine's torch is a cu130 build)
WHEELS=(bitsandbytes==0.50.2)
LIMIT=$((64 * 1024 * 1024))   # the device tool carries 64 MiB in all: working tree + carried paths

mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$dest" "${WHEELS[@]}"

# one version of each package: two stop the whole install there
dupes=$(ls "$dest"/*.whl | xargs -n1 basename | cut -d- -f1 | sort | uniq -d)
if [ -n "$dupes" ]; then
    echo "gpu_wheels: several versions of: $dupes in $dest; keep one of each" >&2
    exit 1
fi

wheels=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total=$((wheels + tree))
ls -l "$dest"/*.whl
awk -v w="$wheels" -v t="$tree" -v l="$LIMIT" 'BEGIN { m = 1048576;
    printf "wheels %.1f MiB + working tree %.1f MiB = %.1f MiB of the %d MiB the device tool carries\n", w/m, t/m, (w+t)/m, l/m }'
if [ "$total" -gt "$LIMIT" ]; then
    echo "gpu_wheels: over the carry limit; ignore or remove what the check does not need" >&2
    exit 1
fi

# the device call, with this checkout's commit (the machine gets a copy of the tree, no git history)
commit=$(git rev-parse --short HEAD)
git diff --quiet HEAD -- fastseq kernels benchmarks scripts || commit="$commit+dirty"
echo "device call: carry=[\"$dest\"], timeout_s=600, command:"
echo "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $dest/*.whl && export PYTHONPATH=/tmp/site || exit; FASTSEQ_GIT_COMMIT=$commit PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out \$OUT"
