#!/usr/bin/env bash
# Wheels a GPU machine without network lacks, downloaded HERE (where the package registry is reachable)
# into .whl/ (git-ignored), plus timm's own train.py and benchmark.py into .timm/ (git-ignored) for
# `craft-gpu-measure timm-train`.
#
#   scripts/gpu_wheels.sh                 # Python 3.12, x86-64 manylinux; versions = those installed in .venv
#   scripts/gpu_wheels.sh --no-wandb      # leave W&B out (logger=none needs none of it; saves ~25 MB)
#   TIMM_SRC=/path/to/pytorch-image-models scripts/gpu_wheels.sh   # train.py from a local clone (or git dir)
#   TIMM_VERSION=1.0.28 scripts/gpu_wheels.sh                      # another timm (its train.py must exist)
#
# On the GPU machine (its python3 already holds torch, torchvision, timm, numpy, pyyaml, requests, ...),
# from the repository root, carrying .whl (and .timm):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# Then `python3 -m pytest -m cuda tests/test_cuda.py` and `python3 -m craft_runner.bench.gpu_measure ...` run there.
#
# The list below is the dependency closure of hydra-core, omegaconf, wandb, pytorch-optimizer, submitit and
# hydra-submitit-launcher (requirements for CPython 3.12 on Linux, extras left out) minus what the GPU
# image ships (its package list, 2026-11: torch, timm, numpy, pyyaml, requests, click, protobuf, httpx,
# anyio, typing-extensions, xxhash, cloudpickle, packaging ... are there). timm is carried as well, so
# that the runner and timm's train.py run on one known timm version. Torch is never downloaded.
# After the download, every wheel's requirements are checked against the wheels and the image's list.
set -euo pipefail
cd "$(dirname "$0")/.."

# The project's environment: its versions are the ones pinned (make install creates .venv).
PY=${PY:-.venv/bin/python}
[[ -x $PY ]] || { echo "gpu_wheels.sh: no $PY; run make install or set PY to the project's python" >&2; exit 1; }
DEST=${DEST:-.whl}
PYVER=${PYVER:-3.12}
WANDB=1
[[ ${1:-} == --no-wandb ]] && WANDB=0

NAMES=(hydra-core omegaconf antlr4-python3-runtime pytorch-optimizer submitit hydra-submitit-launcher timm)
# wandb 0.2x-0.3x and what the image lacks of its closure.
WANDB_NAMES=(wandb cwevals pydantic pydantic-core annotated-types typing-inspection platformdirs distro sniffio
  opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto
  opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common
  opentelemetry-exporter-http-transport opentelemetry-exporter-otlp-common googleapis-common-protos)
if ((WANDB)); then
  NAMES+=("${WANDB_NAMES[@]}")
else
  for n in "${WANDB_NAMES[@]}"; do find "${DEST:-.whl}" -maxdepth 1 -iname "$(echo "$n" | tr '-' '_')-[0-9]*.whl" -delete \
    2>/dev/null || true; done
fi
# What the image ships (only for the check below; a wheel's requirement met by neither is reported).
ON_DEVICE="anyio certifi charset-normalizer click cloudpickle filelock fsspec h11 httpcore httpx idna jinja2
markupsafe numpy packaging protobuf pyyaml requests safetensors huggingface-hub setuptools torch torchvision
typing-extensions urllib3 xxhash hf-xet tqdm pillow"

# Pin each name to the version installed here, so the GPU machine runs what the CPU tests ran.
version() {
  "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null || true
}
if [[ -n ${TIMM_VERSION:-} ]]; then TIMM=$TIMM_VERSION; else TIMM=$(version timm); fi
[[ -n $TIMM ]] || { echo "gpu_wheels.sh: no timm in $PY; set TIMM_VERSION" >&2; exit 1; }

mkdir -p "$DEST"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do PLATFORMS+=(--platform "$p"); done
for name in "${NAMES[@]}"; do
  if [[ $name == timm ]]; then v=$TIMM; else v=$(version "$name"); fi
  [[ -n $v ]] || { echo "gpu_wheels.sh: $name is not installed in $PY (pip install -e '.[slurm]')" >&2; exit 1; }
  spec=$name==$v
  norm=$(echo "$name" | tr '-' '_')
  if ls "$DEST" | grep -qi "^${norm}-${v}-"; then continue; fi
  # One version of each: two would stop the install on the GPU machine.
  find "$DEST" -maxdepth 1 -iname "${norm}-[0-9]*.whl" -delete
  echo "== $spec"
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
       "${PLATFORMS[@]}" -d "$DEST" "$spec" 2>/dev/null; then
    # Some pure-Python packages are published as sources only (antlr4-python3-runtime 4.9.3): build the wheel.
    echo "   no wheel for Python $PYVER: building one from the sources"
    "$PY" -m pip wheel -q --no-deps --no-binary "$name" -w "$DEST" "$spec"
    ls "$DEST" | grep -i "^${norm}-" | grep -q "py3-none-any\|py2.py3-none-any" \
      || { echo "gpu_wheels.sh: $spec built a platform wheel; build it for Python $PYVER instead" >&2; exit 1; }
  fi
done

# Requirements of every wheel (for CPython 3.12 on Linux, no extras) met by a wheel here or by the image?
"$PY" - "$DEST" "$PYVER" "$ON_DEVICE" <<'EOF'
import pathlib, re, sys, zipfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as cn
dest, pyver, device = pathlib.Path(sys.argv[1]), sys.argv[2], {cn(n) for n in sys.argv[3].split()}
env = {"python_version": pyver, "python_full_version": pyver + ".0", "sys_platform": "linux", "os_name": "posix",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
wheels = {cn(w.name.split("-")[0]): w for w in dest.glob("*.whl")}
missing = set()
for name, w in sorted(wheels.items()):
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:"):
                req = Requirement(line.split(":", 1)[1].strip())
                if (req.marker is None or req.marker.evaluate(env)) and cn(req.name) not in set(wheels) | device:
                    missing.add(f"{req} (for {name})")
total = sum(w.stat().st_size for w in wheels.values()) / 2**20
print(f"{len(wheels)} wheels in {dest}/, {total:.1f} MiB")
if missing:
    print("not in the wheels nor in the GPU image's list:\n  " + "\n  ".join(sorted(missing)))
    sys.exit(1)
EOF

# timm's train.py and benchmark.py are in neither its wheel nor its sdist: take them from its repository, same tag.
mkdir -p .timm
if [[ ! -s .timm/train.py || ! -s .timm/benchmark.py || $(cat .timm/VERSION 2>/dev/null) != "$TIMM" ]]; then
  src=${TIMM_SRC:-}
  if [[ -z $src ]]; then
    src=$(mktemp -d)/pytorch-image-models
    git clone -q --depth 1 --branch "v$TIMM" https://github.com/huggingface/pytorch-image-models "$src" \
      || { echo "gpu_wheels.sh: no train.py (clone failed); set TIMM_SRC to a local clone" >&2; exit 1; }
  fi
  if git --git-dir="$src" rev-parse -q --verify "v$TIMM^{commit}" >/dev/null 2>&1; then
    for f in train.py benchmark.py; do git --git-dir="$src" show "v$TIMM:$f" > ".timm/$f"; done  # a bare git dir
  elif git -C "$src" rev-parse -q --verify "v$TIMM^{commit}" >/dev/null 2>&1; then
    for f in train.py benchmark.py; do git -C "$src" show "v$TIMM:$f" > ".timm/$f"; done        # a clone
  else
    echo "gpu_wheels.sh: $src has no tag v$TIMM; set TIMM_VERSION to a tag it has" >&2; exit 1
  fi
  echo "$TIMM" > .timm/VERSION
fi
echo "timm $TIMM: .timm/train.py, .timm/benchmark.py"
echo "on the GPU machine: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade" \
  "--target /tmp/site $DEST/*.whl && export PYTHONPATH=/tmp/site:\$PWD"
