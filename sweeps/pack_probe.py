"""`--pack-size auto`: measure the pack size on a node of the kind the trials run on, before the sweep.

One Ray task per dataset, with the resources one trial reserves (so it lands on a node where
trials run, on the GPU share a trial gets), runs `adrec.pack_size.choose_pack_size` on the
dataset's base config. The sweep takes the smallest choice over its datasets: a pack holds one
dataset's trials, and the largest dataset's step fills the device first. The figures are kept in
the sweep folder (`pack_size.json`) and the size in `runtime.json`, which `--resume` reuses.
"""
from __future__ import annotations

from typing import Any, Callable

from adrec.config import TrialConfig
from adrec.record import write_json

PROBE_FILE = "pack_size.json"


def auto_pack_size(plan: Any, store: Any, *, cpus: float, gpus: float, say: Callable[[str], None],
                   measure_cpu: bool = True) -> int:
    """Measure and return the sweep's pack size (`plan`: sweeps.plan.Plan, `store`: SweepStore).
    `measure_cpu=False` (auto as the default of GPU trials): a task that sees no CUDA device
    measures nothing and votes 1."""
    import ray

    from adrec.pack_size import choose_pack_size

    probe = ray.remote(num_cpus=cpus, num_gpus=gpus)(choose_pack_size)
    say(f"choosing the pack size: timing packs of 1, 2, 4, ... on each dataset ({len(plan.datasets)} Ray task(s))")
    refs = {ds: probe.remote(TrialConfig.from_dict(plan.base_config(ds)), gpu_share=gpus or 1.0,
                             measure_cpu=measure_cpu) for ds in plan.datasets}
    found = {ds: ray.get(ref) for ds, ref in refs.items()}
    for ds, result in found.items():
        steps = ", ".join(f"{p['pack_size']}: {p['s_per_member_step'] * 1e3:.1f} ms" for p in result["probes"])
        measured = f"per member step {steps}; stopped: " if steps else ""
        say(f"  {ds} on {result['device']}: {result['pack_size']} ({measured}{result['why']})")
    size = min(r["pack_size"] for r in found.values())
    write_json(store.path(PROBE_FILE), {"pack_size": size, "datasets": found})
    store.push(PROBE_FILE)
    say(f"pack size {size}" + (" (no packs)" if size == 1 else ""))
    return size
