#!/usr/bin/env bash
# Build .whl/: the wheels benchmarks/device_setup.sh installs on the GPU device machine (Python
# 3.12, its own torch and transformers, no network). Run here, on a machine with PyPI, from the
# repo root; then carry it: run(carry=[".whl"], command="bash benchmarks/gpu_run.sh").
#
#     bash benchmarks/build_wheels.sh          # about a minute; the carry limit is 64 MiB
#
# What goes in: the packages we pin that the device lacks (deepspeed, megatron-core,
# mosaicml-streaming, omegaconf) and what importing them, TensorBoard, peft and safetensors
# needs, at the versions constraints.txt pins, as CPython 3.12 manylinux wheels (a support
# package whose pinned version has no such wheel: its newest that has one, said in a note).
# DeepSpeed ships no wheel on PyPI: its sdist is built here into a pure-Python wheel
# (DS_BUILD_OPS=0: its CUDA ops build just in time where used, and we use none). torch,
# torchvision, transformers, numpy, triton and nvidia-* are never packed: the device keeps its
# own. Support wheels whose package the device already has are skipped by device_setup.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT=.whl
CORE=" megatron-core mosaicml-streaming omegaconf "
SUPPORT="antlr4-python3-runtime hjson ninja msgpack py-cpuinfo pydantic pydantic-core annotated-types
typing-inspection einops zstd xxhash python-snappy cramjam brotli boto3 botocore s3transfer jmespath tensorboard
tensorboard-data-server absl-py grpcio markdown werkzeug protobuf peft accelerate safetensors tqdm psutil"
export PIP_CONSTRAINT="" PIP_NO_INPUT=1

pinned() {  # NAME -> NAME==VERSION from constraints.txt (case- and -/_-insensitive)
    local want norm line
    want="$(echo "$1" | tr 'A-Z_' 'a-z-')"
    while IFS= read -r line; do
        norm="$(echo "${line%%==*}" | tr 'A-Z_' 'a-z-')"
        if [ "$norm" = "$want" ]; then echo "$line"; return; fi
    done < <(grep -E '^[A-Za-z0-9_.-]+==' constraints.txt)
    echo "build_wheels: $1 is not pinned in constraints.txt" >&2
    return 1
}

get() {  # one CPython 3.12 wheel of a requirement into $OUT, quietly
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$OUT" "$1" >/dev/null 2>&1
}

rm -rf "$OUT"
mkdir -p "$OUT"
for p in $CORE; do
    get "$(pinned "$p")" || { echo "build_wheels: no cp312 wheel of $(pinned "$p")" >&2; exit 1; }
done
for p in $SUPPORT; do
    spec="$(pinned "$p")"
    get "$spec" && continue
    get "$p" || { echo "build_wheels: no cp312 wheel of $p at all" >&2; exit 1; }
    echo "  note: $spec has no cp312 wheel; packed the newest that has one"
done
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$(pinned deepspeed)" >/dev/null 2>&1 \
    || { echo "build_wheels: could not build a wheel of $(pinned deepspeed)" >&2; exit 1; }
ls "$OUT" | sed 's/^/  /'
du -sh "$OUT"
