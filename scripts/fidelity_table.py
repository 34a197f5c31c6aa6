"""README's fidelity table: ml-100k per seed and padding mode, the paired query - key interval, baby's seeds.

Reads the records `python -m adrec train --seeds ... --out runs/fidelity/NAME.json` wrote
(ml100k-*.json, baby-*.json; README's "Accuracy and speed" gives the commands). The four solo runs
of the previous session are README rows whose records are not in this checkout; they are kept here
as recorded figures.

    python scripts/fidelity_table.py [runs/fidelity]
"""
import json
import statistics
import sys
from pathlib import Path

from scipy import stats

HERE = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/fidelity")
M = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")
# finished earlier with the same defaults (README rows, solo runs at commit 73c4dfd)
rows = {("key", 2025): dict(zip(M, (0.1205, 0.0564, 0.2132, 0.0798)), ep="150 / 5 / 75", val=0.0842, how="solo"),
        ("key", 2026): dict(zip(M, (0.1162, 0.0542, 0.2111, 0.0777)), ep="135 / 5 / 100", val=0.0924, how="solo"),
        ("key", 2027): dict(zip(M, (0.1429, 0.0691, 0.2207, 0.0888)), ep="75 / 5 / 130", val=0.0903, how="solo"),
        ("query", 2025): dict(zip(M, (0.1354, 0.0630, 0.2228, 0.0850)), ep="140 / 5 / 45", val=0.0876, how="solo")}
for f in sorted(HERE.glob("ml100k-*.json")):
    for r in json.loads(f.read_text()):
        c, e = r["config"], r["epochs"]
        rows[(c["padding_mask"], c["seed"])] = dict({m: r["test"][m] for m in M},
            ep=f"{e['stage1']} / {e['stage2']} / {e['stage3']}", val=r["val"]["NDCG@20"], how="pack")
print("| seed | padding_mask | run | stage-1 / 2 / 3 epochs | test HR@10 | test NDCG@10 | test HR@20 | test NDCG@20 | val NDCG@20 |")
print("|---|---|---|---|---|---|---|---|---|")
for mask in ("key", "query"):
    seeds = sorted(s for (m, s) in rows if m == mask)
    for s in seeds:
        r = rows[(mask, s)]
        print(f"| {s} | {mask} | {r['how']} | {r['ep']} | " + " | ".join(f"{r[m]:.4f}" for m in M) + f" | {r['val']:.4f} |")
    if len(seeds) > 1:
        print(f"| **mean, {mask}, {len(seeds)} seeds** | | | | " + " | ".join(
            f"{statistics.fmean(rows[(mask, s)][m] for s in seeds):.4f}" for m in M) + " | |")
        print(f"| sd, {mask} | | | | " + " | ".join(
            f"{statistics.stdev(rows[(mask, s)][m] for s in seeds):.4f}" for m in M) + " | |")
both = sorted(s for (m, s) in rows if m == "query" and ("key", s) in rows)
if len(both) > 1:
    for m in ("HR@20", "NDCG@20"):
        d = [rows[("query", s)][m] - rows[("key", s)][m] for s in both]
        mean, se = statistics.fmean(d), statistics.stdev(d) / len(d) ** 0.5
        t = stats.t.ppf(0.975, len(d) - 1)
        print(f"query - key {m}, {len(d)} paired seeds: {mean:+.4f} (95% CI {mean - t * se:+.4f} .. {mean + t * se:+.4f})")
for f in sorted(HERE.glob("baby-*.json")):
    recs = json.loads(f.read_text())
    for r in recs:
        e = r["epochs"]
        print(f"baby seed {r['config']['seed']}: {e['stage1']} / {e['stage2']} / {e['stage3']} " +
              " ".join(f"{m}={r['test'][m]:.4f}" for m in M) + f" val NDCG@20={r['val']['NDCG@20']:.4f}")
    for m in M:
        v = [r["test"][m] for r in recs]
        print(f"baby {m}: mean {statistics.fmean(v):.4f} sd {statistics.stdev(v):.4f}")
