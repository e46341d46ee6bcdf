#!/usr/bin/env bash
# The GPU checks of lungray in one run on a lent GPU machine (bare image: torch, no Ray).
#
#   here, once:  ../shared/device/make-wheels.sh    (Ray + pydicom kit into .whl/, ignored; with
#                the repo it must stay under the 64 MiB a device run carries: 58 + 8 MB today)
#   device run:  carry [".whl"], timeout_s 540, command: bash bench/device.sh
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
mkdir -p "$OUT"
if ! ls .whl/ray-*.whl > /dev/null 2>&1; then
  echo "no wheel kit in .whl/: run ../shared/device/make-wheels.sh here, then carry .whl" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled LUNGRAY_PATIENT_SALT=device-check

nvidia-smi -L > "$OUT/steps.txt" 2>&1
python3 -c "import torch, ray; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ray', ray.__version__)" >> "$OUT/steps.txt" 2>&1

# step NAME SECONDS COMMAND...: run with a time limit; record its exit status and seconds.
step() {
  local name=$1 limit=$2 started=$SECONDS
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.log"
  echo "$name rc=$? $((SECONDS - started))s" >> "$OUT/steps.txt"
}
step gpu-tests 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py
step screen 180 python3 bench/screen.py --files 1000 --scale 2 --batch-size 512 --stage-images 8192
step train 90 python3 bench/train.py --size 224 --batch-size 256 --steps 20 --threads 8

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
