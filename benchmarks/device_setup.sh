#!/usr/bin/env bash
# Prepare the GPU device machine (Python 3.12, its own torch/transformers, no network) for the
# benchmarks. Run from the repo root, with `.whl` carried:
#
#     bash benchmarks/device_setup.sh && python benchmarks/train_step.py --sizes small 1b
#
# What it does (idempotent, ~10-30 s; a second run only re-checks):
#   1. installs the wheels in .whl/ (deepspeed, megatron-core, mosaicml-streaming, omegaconf and
#      the small deps the device lacks) into the device python's own environment with
#      `pip install --no-deps --no-index`: nothing is fetched, nothing already there is upgraded
#      or downgraded as a side effect. A support wheel whose package the device already has (at
#      any version) is skipped; wheels in .whl/if-older/ are installed only where the device's
#      copy is older. torch, torchvision, transformers, numpy, triton, nvidia-* are never touched.
#   2. makes `import pargo_dist` work in every process (subprocesses too) with a .pth file that
#      points at this checkout, and writes a `pargo-dist` console script beside python.
#   3. prints the versions that matter and one nvidia-smi line.
#
# Building the wheels (on the dev machine, see the report in the task notes):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 ... -d .whl NAME==VERSION     (+ `pip wheel` for deepspeed)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"
PY="${PYTHON:-python3}"
export PIP_CONSTRAINT="" PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

[ -d .whl ] || { echo "device_setup: no .whl/ here; pass carry=[\".whl\"] to the run" >&2; exit 1; }

# Packages we pin for the project: always installed at the carried version.
CORE="deepspeed megatron-core mosaicml-streaming omegaconf"

# Decide per wheel: print the wheel paths pip should install (one a line), reasons to stderr.
todo="$("$PY" - "$CORE" <<'EOF'
import glob, re, sys
from importlib import metadata
from packaging.version import Version

core = set(sys.argv[1].split())
never = re.compile(r"^(torch|torchvision|torchaudio|transformers|numpy|triton|nvidia-.*|jax.*|cupy.*)$")
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()

def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None

def parse(path):
    base = path.rsplit("/", 1)[-1]
    name, ver = base.split("-")[:2]
    return norm(name), ver

for folder, only_if_older in ((".whl", False), (".whl/if-older", True)):
    for path in sorted(glob.glob(f"{folder}/*.whl")):
        name, ver = parse(path)
        have = installed(name)
        if never.match(name):
            print(f"  skip {name} {ver}: never replaced on the device", file=sys.stderr)
        elif have == ver or (have and Version(have) == Version(ver)):
            print(f"  have {name} {have}", file=sys.stderr)
        elif have and only_if_older and Version(have) >= Version(ver):
            print(f"  keep {name} {have} (carried {ver} is not newer)", file=sys.stderr)
        elif have and not only_if_older and name not in core:
            print(f"  keep {name} {have} (device's own; carried {ver} not installed)", file=sys.stderr)
        else:
            print(f"  install {name} {ver}" + (f" (replacing {have})" if have else ""), file=sys.stderr)
            print(path)
EOF
)"

if [ -n "$todo" ]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-warn-conflicts $todo
fi

# pargo_dist from this checkout, for every process using this python (torchrun / sys.executable
# subprocesses included), without a build step.
purelib="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$REPO" > "$purelib/pargo_dist_repo.pth"
bindir="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")"
if [ -w "$bindir" ]; then
    pyexe="$("$PY" -c 'import sys; print(sys.executable)')"
    printf '#!%s\nimport sys\nfrom pargo_dist.cli import main\nsys.exit(main())\n' "$pyexe" > "$bindir/pargo-dist"
    chmod +x "$bindir/pargo-dist"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: not available"

# Versions, from a fresh process (as the benchmarks will see them). `import pargo_dist` first:
# it applies the torchvision shim (a no-op where torchvision imports normally).
log="$(mktemp)"
rc=0
"$PY" - >"$log" 2>&1 <<'EOF' || rc=$?
import os, time
t0 = time.time()
import pargo_dist, pargo_dist.compat as compat
import torch, deepspeed, megatron.core, streaming, transformers, omegaconf, numpy
cuda = torch.version.cuda, torch.cuda.is_available()
print(f"imports ok in {time.time() - t0:.1f}s | torch {torch.__version__} (cuda {cuda[0]}, available={cuda[1]})"
      f" | deepspeed {deepspeed.__version__} | megatron-core {megatron.core.__version__}"
      f" | streaming {streaming.__version__} | transformers {transformers.__version__}"
      f" | omegaconf {omegaconf.__version__} | numpy {numpy.__version__}"
      f" | pargo_dist from {os.path.dirname(pargo_dist.__file__)} (torchvision shim applied: {compat.torchvision_patched})")
if not transformers.__version__.startswith("4.57"):
    print(f"note: transformers {transformers.__version__} here; the project pins 4.57.x")
EOF
grep -v -E '^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\] |^ *warnings\.warn\(' "$log" || true
rm -f "$log"
[ "$rc" -eq 0 ] || { echo "device_setup: import check FAILED (rc=$rc)" >&2; exit "$rc"; }
