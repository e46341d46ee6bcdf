#!/usr/bin/env bash
# The GPU checks of lungray on a lent GPU machine (bare image: torch, no Ray, no deltalake).
#
#   here, once:  python3 bench/device_kit.py    (two wheel kits, .whl and .whl2, ignored; each
#                fits the 64 MiB a device call carries with the repo, the two together do not)
#   device, two calls in a row on one warm machine (it goes back after 30 s idle):
#     1. carry [".whl"],  timeout_s 120, command: bash bench/device.sh install
#     2. carry [".whl2"], timeout_s 540, command: bash bench/device.sh
#   Call 1 installs Ray's kit into .devsite/ (ignored, so kept for the next call); call 2
#   adds lungray's packages, checks every import, then runs:
#
# 1. tests/test_gpu.py: DDP training over NCCL on every GPU, screening on GPU actors, folded
#    scoring on the GPU (CI has no GPU and skips them);
# 2. bench/screen.py: end to end vs the plain DataLoader script, the inference stage vs the
#    bare model on the GPU, peak memory;
# 3. bench/train.py: training images/s per model, lungray's loop vs a bare step.
# Each step's stdout goes to $OUT/STEP.out and its stderr to STEP.log (7 files in all, under
# the 8 that come back); a short summary is printed last.
set -uo pipefail
OUT=${OUT:-out/device}
SITE=$PWD/.devsite
mkdir -p "$OUT"
# install KIT: its wheels into .devsite (pip reads the kits' LZMA-packed wheels).
install() {
  if ! ls "$1"/*.whl > /dev/null 2>&1; then
    echo "no wheel kit in $1/: run python3 bench/device_kit.py here, then carry $1" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$1"/*.whl || exit 2
}
if [ "${1:-}" = install ]; then
  install .whl
  echo "Ray's kit is in .devsite; now, within 30 s: carry [\".whl2\"], command: bash bench/device.sh"
  exit 0
fi
if ! ls "$SITE"/ray/__init__.py > /dev/null 2>&1; then
  echo "no Ray in .devsite: this machine is fresh; call 'bash bench/device.sh install' with carry [\".whl\"] first" >&2
  exit 2
fi
install .whl2
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled LUNGRAY_PATIENT_SALT=device-check
python3 -c "import ray.data, ray.train.torch, deltalake, highdicom, pynetdicom, dicomweb_client, jpeg_ls, rle, pytest, matplotlib, safetensors, lungray.cli, lungray.screen.pipeline" || {
  echo "a package the checks import is missing: see the error above and bench/device_kit.py's LUNGRAY_EXTRAS" >&2
  exit 2
}

nvidia-smi -L > "$OUT/steps.txt" 2>&1
python3 -c "import torch, ray; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ray', ray.__version__)" >> "$OUT/steps.txt" 2>&1

# step NAME SECONDS COMMAND...: run with a time limit; record its exit status and seconds.
step() {
  local name=$1 limit=$2 started=$SECONDS
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.log"
  echo "$name rc=$? $((SECONDS - started))s" >> "$OUT/steps.txt"
}
step gpu-tests 210 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py
step screen 170 python3 bench/screen.py --files 1000 --scale 2 --batch-size 512 --stage-images 8192
step train 80 python3 bench/train.py --size 224 --batch-size 256 --steps 20 --threads 8

cat "$OUT/steps.txt"
tail -n 4 "$OUT/gpu-tests.out"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for name in ("screen", "train"):
    text = (out / f"{name}.out").read_text()
    try:
        result = json.loads(text[text.index("\n{") + 1 if not text.startswith("{") else 0 :])
    except ValueError:
        print(name, "printed no JSON; see", name + ".log")
        continue
    if name == "screen":
        for key in ("end_to_end", "inference_stage", "peak_memory_mb"):
            print("screen", key, json.dumps(result[key]))
    else:
        for row in result["results"]:
            print("train", json.dumps(row))
PY
