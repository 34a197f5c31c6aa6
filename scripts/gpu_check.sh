#!/usr/bin/env bash
# The GPU figures issue #13 asks for, in one run on a lent accelerator (torch + pandas + pyarrow
# are enough: no Ray, no Optuna). Every step has its own time limit and writes its figures under
# $OUT (default runs/gpu_check) as it ends, so a step that runs out of time loses only itself.
#
#   OUT=/path bash scripts/gpu_check.sh            # at most 510 s: one device call (600 s)
#
# DEVICE, DATASET and SETS (space-separated FIELD=VALUE overrides for every run) change what it
# runs; a check of the script itself before a GPU session spends its minutes on it, on CPU:
#   DEVICE=cpu DATASET=ml-100k SETS="max_users=60" OUT=/tmp/gc bash scripts/gpu_check.sh
#
# 1. the pack-size probe on baby (what `--pack-size auto` would choose on this GPU);
# 2. stage-3 seconds per member-epoch, a pack of 16 against the same 16 trials in sequence (and
#    one validation pass of the 16 stacked against a solo pass);
# 3. host time of one pack optimiser step (MemberAdam) against torch's adam per member;
# 4. trials per hour of 8-epoch baby trials: packs of 1, 4, 16, 64 against 1, 4, 16 processes;
# 5. the default baby run to early stopping, timed (the issue's "< 60 s").
set -u
OUT=${OUT:-runs/gpu_check}
DEVICE=${DEVICE:-cuda}
DATASET=${DATASET:-baby}
SET_ARGS=()
for item in ${SETS:-}; do SET_ARGS+=(--set "$item"); done
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
python -c "import torch, sys; print(sys.version.split()[0], torch.__version__,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/versions.txt"

step() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name exit=$? seconds=$((SECONDS - start))" | tee -a "$OUT/steps.txt"
  tail -n 5 "$OUT/$name.log"
}

step probe 60 python -c "
import json, sys
from adrec.config import TrialConfig
from adrec.cli import parse_assignment
from adrec.pack_size import choose_pack_size
sets = dict(parse_assignment(item) for item in sys.argv[1:])
cfg = TrialConfig.from_dict({'dataset': '$DATASET', 'device': '$DEVICE', **sets})
found = choose_pack_size(cfg)
json.dump(found, open('$OUT/probe_$DATASET.json', 'w'), indent=1)
print(found['pack_size'], found['why'])
for p in found['probes']:
    print(p)" ${SETS:-}
step pack16 90 python -m adrec bench --dataset "$DATASET" --device "$DEVICE" --pack 16 --epochs 2 "${SET_ARGS[@]}" \
  --out "$OUT/pack16_$DATASET.json"
step member_adam 20 python scripts/bench_member_adam.py --device "$DEVICE" --members 1,16,64
step packs_vs_processes 180 python scripts/bench_packs.py --dataset "$DATASET" --device "$DEVICE" --sizes 1,4,16 \
  --epochs 8 "${SET_ARGS[@]}" --out "$OUT/packs_vs_processes_$DATASET.json"
step pack64 60 python scripts/bench_packs.py --dataset "$DATASET" --device "$DEVICE" --sizes 64 --modes pack \
  --epochs 8 "${SET_ARGS[@]}" --out "$OUT/pack64_$DATASET.json"
step default_run 100 python -m adrec train --dataset "$DATASET" --set device="$DEVICE" "${SET_ARGS[@]}" --quiet \
  --out "$OUT/default_$DATASET.json"
cat "$OUT/steps.txt"
