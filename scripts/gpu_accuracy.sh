#!/usr/bin/env bash
# Issue #12's GPU table in one device run: the default config on the six datasets, seeds 2025-2027
# as one pack per dataset (each member draws from its own generator on the GPU, so it depends on
# its seed alone), test HR@20 / NDCG@20 with the spread
# printed by `train --seeds`. Each dataset has its own time limit and writes $OUT/<dataset>.json as
# it ends; the smaller sets go first.
#
#   OUT=/path bash scripts/gpu_accuracy.sh [seconds per dataset, default 95]
set -u
OUT=${OUT:-runs/gpu_accuracy}
LIMIT=${1:-95}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
for ds in ml-100k baby beauty toys sports yelp; do
  start=$SECONDS
  timeout "$LIMIT" python -m adrec train --dataset "$ds" --seeds 2025-2027 --set device=cuda --quiet \
    --out "$OUT/$ds.json" > "$OUT/$ds.log" 2>&1
  echo "$ds exit=$? seconds=$((SECONDS - start))" | tee -a "$OUT/steps.txt"
  tail -n 4 "$OUT/$ds.log"
done
