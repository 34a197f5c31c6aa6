#!/usr/bin/env bash
# The GPU figures issue #13 asks for, in one run on a lent accelerator (torch + pandas + pyarrow
# are enough: no Ray, no Optuna). Every step has its own time limit and writes its figures under
# $OUT (default runs/gpu_check) as it ends, so a step that runs out of time loses only itself.
#
#   OUT=/path bash scripts/gpu_check.sh            # at most 510 s: one device call (600 s)
#
# 1. the pack-size probe on baby (what `--pack-size auto` would choose on this GPU);
# 2. stage-3 seconds per member-epoch, a pack of 16 against the same 16 trials in sequence (and
#    one validation pass of the 16 stacked against a solo pass);
# 3. host time of one pack optimiser step (MemberAdam) against torch's adam per member;
# 4. trials per hour of 8-epoch baby trials: packs of 1, 4, 16, 64 against 1, 4, 16 processes;
# 5. the default baby run to early stopping, timed (the issue's "< 60 s").
set -u
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
python -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))" \
  | tee "$OUT/versions.txt"

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
import json
from adrec.config import TrialConfig
from adrec.pack_size import choose_pack_size
found = choose_pack_size(TrialConfig(dataset='baby', device='cuda'))
json.dump(found, open('$OUT/probe_baby.json', 'w'), indent=1)
print(found['pack_size'], found['why'])
for p in found['probes']:
    print(p)"
step pack16 90 python -m adrec bench --dataset baby --device cuda --pack 16 --epochs 2 --out "$OUT/pack16_baby.json"
step member_adam 20 python scripts/bench_member_adam.py --device cuda --members 1,16,64
step packs_vs_processes 180 python scripts/bench_packs.py --dataset baby --device cuda --sizes 1,4,16 \
  --epochs 8 --out "$OUT/packs_vs_processes_baby.json"
step pack64 60 python scripts/bench_packs.py --dataset baby --device cuda --sizes 64 --modes pack \
  --epochs 8 --out "$OUT/pack64_baby.json"
step default_baby 100 python -m adrec train --dataset baby --set device=cuda --quiet --out "$OUT/default_baby.json"
cat "$OUT/steps.txt"
