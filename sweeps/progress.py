"""Live progress: a Tune callback that records each finished trial in the table and prints a line,
and the TensorBoard callback whose HParams view has the swept knobs and the logged metrics.

Ray's own CLI reporter is silenced (verbose=0); `SweepProgress` prints one line when a trial starts
and one when it finishes (status, value, how long it took, the per-dataset counts, the best value so
far, and the sweep's pace: finished / planned, trials per hour, an ETA from the plan's remaining
trials and the measured trial times), replaces `trials.parquet` atomically after every finished
trial, and keeps `progress.json` (counts per phase and dataset) for scripts and tests that watch a
running sweep. A pack trial (`--pack-size`) prints its members when it starts and one line per
member when it ends; counts are of member-trials, as the table's rows.

A storage failure while writing (full disk, read-only or vanished mount, a bucket that refuses)
does not crash the driver: the callback records it on the sweep folder and asks Ray Tune to stop
the way Ctrl-C does; the driver then prints the --resume line. The callbacks hold no path (Ray
pickles them): they write to the live sweep folder, `sweeps.storage.current()`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
from ray import tune
from ray.tune.logger import TBXLoggerCallback

from adrec.config import KNOBS
from adrec.record import (FIT_RESULT, PACK_KEY, PACK_PROGRESS, PACK_RESULTS, TABLE_FILE, RecordError, dataset_key, is_pack,
                          member_jobs, pack_rows, read_table, to_frame, trial_row, write_json, write_table)
from sweeps import storage
from sweeps.searchers import read_runtime
from sweeps.spaces import BASELINES
from sweeps.storage import storage_failure
from sweeps.table import read_checkpoint_json, read_error

log = logging.getLogger("sweeps.progress")
PROGRESS_FILE = "progress.json"
# What identifies a trial in TensorBoard's HParams table besides its knobs.
HPARAM_IDS = ("dataset", "phase", "config_id", "seed", "model")


class SweepProgress(tune.Callback):
    """Pickled into tuner.pkl with its phase; everything else is re-read when a run (re)starts."""

    def __init__(self, sweep: str, phase: str, env: dict[str, str]) -> None:
        self.sweep, self.phase, self.env = sweep, phase, dict(env)
        self._reset()

    def _reset(self) -> None:
        self._rows: dict[str, dict[str, Any]] | None = None
        self._running: dict[str, str] = {}  # trial_id -> dataset
        self._size: dict[str, int] = {}  # trial_id -> member-trials it runs (a pack's members, else 1)
        self._started: dict[str, float] = {}  # trial_id -> when it (re)started in this driver run
        self._seconds: list[float] = []  # wall seconds of the trials finished in this driver run
        self._peak = 1  # most trials seen running at once
        self._runtime: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.pop("sweep_dir", None)  # pickled by an older version: the folder may have moved since
        self.__dict__.update(state)
        self._reset()

    def rows(self) -> dict[str, dict[str, Any]]:
        if self._rows is None:
            store = storage.current()
            try:
                df = read_table(store.path(TABLE_FILE))
            except RecordError as exc:  # the driver rebuilds it from the experiments at phase end
                log.warning("%s; starting from an empty table", exc)
                df = to_frame([])
            self._rows = {r["trial_id"]: r for r in df.to_dict("records")}
            self._runtime = read_runtime()
        return self._rows

    @property
    def quiet(self) -> bool:
        self.rows()
        return bool(self._runtime.get("quiet"))

    # --- Tune callback hooks -------------------------------------------------------------------
    def setup(self, **info: Any) -> None:
        self.rows()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._running[trial.trial_id] = trial.config.get("dataset", "")
        self._size[trial.trial_id] = len(member_jobs(trial.config))
        self._started[trial.trial_id] = time.time()
        self._peak = max(self._peak, self.running())
        self._guard(self._write_progress)
        if not self.quiet:
            c = trial.config
            if is_pack(c):
                names = (f"{m['config'].get('config_id')}/s{m['config'].get('seed')}" for m in c[PACK_KEY])
                what = f"pack of {len(c[PACK_KEY])}: {' '.join(names)}"
            else:
                what = f"{c.get('config_id', '')} seed={c.get('seed', '')}"
            print(f"[{self.phase:>8} {dataset_key(str(c.get('dataset', ''))):>8}] {trial.trial_id} {what} started | "
                  f"running {self.running()} | elapsed {_duration(time.time() - self._t0())}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "ERROR")

    # --- internals -----------------------------------------------------------------------------
    def running(self) -> int:
        """Member-trials running now (a pack counts its members, as the table counts their rows)."""
        return sum(self._size.get(t, 1) for t in self._running)

    def _t0(self) -> float:
        self.rows()
        return float(self._runtime.get("started") or time.time())

    def _guard(self, write: Any) -> bool:
        """Run a write; on a storage failure mark the sweep folder failed and stop Tune gracefully."""
        try:
            write()
            return True
        except Exception as exc:  # noqa: BLE001 - only storage failures are handled here
            failure = storage_failure(exc)
            if failure is None:
                raise
            store = storage.current()
            if not store.failed:
                store.failed = failure
                log.error("the sweep folder stopped taking writes (%s); stopping the sweep", failure)
                os.kill(os.getpid(), signal.SIGUSR1)  # Ray Tune's graceful stop (as on Ctrl-C)
            return False

    def _finish(self, trial: Any, ray_status: str) -> None:
        self._running.pop(trial.trial_id, None)
        self._size.pop(trial.trial_id, None)
        took = time.time() - self._started.pop(trial.trial_id, time.time())
        error = read_error(trial.local_path) if ray_status == "ERROR" and trial.local_path else None
        try:
            if is_pack(trial.config):
                new = pack_rows(sweep=self.sweep, trial_id=trial.trial_id, config=trial.config, ray_status=ray_status,
                                results=_checkpoint_json(trial, PACK_RESULTS), error=error, env=self.env,
                                progress=_checkpoint_json(trial, PACK_PROGRESS))
            else:
                row = trial_row(sweep=self.sweep, trial_id=trial.trial_id, config=trial.config, ray_status=ray_status,
                                history=_history(trial), fit_result=_checkpoint_json(trial, FIT_RESULT), error=error,
                                env=self.env)
                new = [row] if row is not None else []
        except Exception:  # noqa: BLE001 - a bad row must not stop the sweep; build_rows redoes it at the end
            log.exception("could not build the table row of trial %s", trial.trial_id)
            return
        if not new:
            return
        if took > 0:
            self._seconds.extend([took] * len(new))  # a pack's members each took the pack's time
        rows = self.rows()
        for row in new:
            rows[row["trial_id"]] = row
        store = storage.current()

        def write() -> None:
            write_table(to_frame(rows.values()), store.path(TABLE_FILE))
            store.push(TABLE_FILE)
            self._write_progress()

        if store.failed or not self._guard(write):
            return
        if not self.quiet:
            for row in new:
                print(self._line(row, took), flush=True)

    def _counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter] = {}
        for row in self.rows().values():
            out.setdefault(str(row["dataset"]), Counter())[str(row["status"])] += 1
        for trial_id, ds in self._running.items():
            out.setdefault(str(ds), Counter())["running"] += self._size.get(trial_id, 1)
        return {ds: dict(c) for ds, c in out.items()}

    def _write_progress(self) -> None:
        rows = self.rows().values()
        by_phase = Counter(str(r["phase"]) for r in rows)
        state = {"phase": self.phase, "running": self.running(), "finished": len(self.rows()),
                 "total": self._runtime.get("total"), "by_phase": dict(by_phase), "by_dataset": self._counts()}
        store = storage.current()
        write_json(store.path(PROGRESS_FILE), state)
        store.push(PROGRESS_FILE)

    def pace(self) -> str:
        """finished/planned, trials per hour in this driver run, and an ETA for the rest."""
        finished, total = len(self.rows()), self._runtime.get("total")
        elapsed = max(time.time() - self._t0(), 1e-9)
        text = f"{finished}/{total} trials" if total else f"{finished} trials"
        text += f", elapsed {_duration(elapsed)}"
        if self._seconds:
            text += f", {len(self._seconds) / (elapsed / 3600):.1f} trials/h"
            if total:
                left = max(int(total) - finished, 0)
                eta = left * (sum(self._seconds) / len(self._seconds)) / max(self._peak, 1)
                text += f", ETA {_duration(eta)}" if left else ", none left"
        return text

    def _line(self, row: dict[str, Any], took: float) -> str:
        metric = f"val_{row.get('select_metric') or 'NDCG@20'}"
        ds = str(row["dataset"])
        done = [r for r in self.rows().values() if str(r["dataset"]) == ds and r["status"] == "completed"
                and isinstance(r.get(metric), float) and not math.isnan(r[metric])]
        best = max((r[metric] for r in done), default=math.nan)
        c = self._counts().get(ds, {})
        value = row.get(metric)
        shown = f"{value:.4f}" if isinstance(value, float) and not math.isnan(value) else "-"
        return (f"[{row['phase']:>8} {dataset_key(ds):>8}] {row['trial_id']} {row['config_id']} seed={row['seed']} "
                f"{row['status']:<9} {metric}={shown} in {_duration(took)} | best {best:.4f} | running "
                f"{c.get('running', 0)}, completed {c.get('completed', 0)}, pruned {c.get('pruned', 0)}, "
                f"diverged {c.get('diverged', 0)}, failed {c.get('failed', 0)} | {self.pace()}")


class SweepTensorBoard(TBXLoggerCallback):
    """Ray's TensorBoard callback with a usable HParams view: the hyperparameters are the swept knobs
    (`adrec.config.KNOBS`, inactive ones left out) and what identifies the trial; the metrics are
    the validation metrics and `objective` under the tag names they are logged with (tensorboardX
    writes `ray/tune/val_NDCG@20` as `ray/tune/val_NDCG_20`; declaring the raw name left the
    HParams columns empty). `swept` names the knobs the sweep's space searches: only those are
    shown (a trial's Ray config spells out every field), each where it is active in the trial."""

    def __init__(self, swept: tuple[str, ...] = tuple(KNOBS)) -> None:
        super().__init__()
        self.swept = tuple(k for k in swept if k in KNOBS)

    def _try_log_hparams(self, trial: Any, result: dict) -> None:
        from tensorboardX.summary import hparams

        config = trial.config or {}
        if is_pack(config):  # its members wrote their own runs and HParams (write_member_events)
            return
        try:
            for summary in hparams(hparam_dict=hparam_values(config, self.swept), metric_dict=hparam_metrics(result)):
                self._trial_writer[trial].file_writer.add_summary(summary)
        except Exception:  # noqa: BLE001 - TensorBoard must never stop a sweep
            log.exception("could not write the HParams of trial %s", trial.trial_id)


def hparam_values(config: Mapping[str, Any], swept: tuple[str, ...]) -> dict[str, Any]:
    """A trial's HParams: the swept knobs active in it and what identifies it (plain scalars only)."""
    params: dict[str, Any] = {k: config[k] for k in swept
                              if k in KNOBS and config.get(k) is not None and KNOBS[k].is_active(config)}
    for key in HPARAM_IDS:
        if config.get(key) is not None:
            params[key] = dataset_key(str(config[key])) if key == "dataset" else config[key]
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()
            if isinstance(v, (str, bool, int, float)) or hasattr(v, "item")}


def hparam_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The HParams metrics of a trial's last logged result, under the tags tensorboardX wrote them with."""
    from tensorboardX.summary import _clean_tag

    return {_clean_tag(k): v for k, v in result.items()
            if k.startswith(("ray/tune/val_", "ray/tune/objective")) and isinstance(v, (int, float))}


def write_member_events(folder: Path, config: Mapping[str, Any], swept: tuple[str, ...],
                        results: list[Mapping[str, Any]]) -> None:
    """A pack member's TensorBoard run, as Ray's callback writes a solo trial's: every numeric value
    of each result as `ray/tune/<key>` at step 1, 2, ... (a solo trial's training_iteration), then
    the HParams with the last result's metrics."""
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams

    writer = SummaryWriter(str(folder))
    try:
        logged: dict[str, Any] = {}
        for step, result in enumerate(results, 1):
            for key, value in result.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    writer.add_scalar(f"ray/tune/{key}", value, global_step=step)
                    logged[f"ray/tune/{key}"] = value
        for summary in hparams(hparam_dict=hparam_values(config, swept), metric_dict=hparam_metrics(logged)):
            writer.file_writer.add_summary(summary)
    finally:
        writer.close()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _history(trial: Any) -> pd.DataFrame:
    """The trial's reported results (its result.json in the experiment storage, local or a URI)."""
    rows = []
    try:
        fs, folder = trial.storage.storage_filesystem, trial.storage.trial_fs_path
        with fs.open_input_stream(f"{folder}/result.json") as src:
            text = src.read().decode()
    except Exception:  # noqa: BLE001 - not written yet, or storage unreachable: use the last result
        text = ""
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not rows and trial.last_result:
        rows = [trial.last_result]
    return pd.DataFrame(rows)


def _checkpoint_json(trial: Any, name: str) -> Any:
    """`name` (FIT_RESULT, PACK_RESULTS, PACK_PROGRESS) from the trial's last checkpoint, or None."""
    ckpt = trial.checkpoint
    if ckpt is None:
        return None
    try:
        with ckpt.as_directory() as d:
            path = os.path.join(d, name)
            return json.loads(open(path).read()) if os.path.exists(path) else None
    except Exception:  # noqa: BLE001 - fall back to the storage copy
        if not trial.path:
            return None
        return read_checkpoint_json(trial.path, name)


def best_table(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Best configuration per dataset: confirm rows when there are any (mean over seeds), else the best
    completed ADRec row; with the baselines' value beside it."""
    rows = []
    col = f"val_{metric}"
    test_col = f"test_{metric}"
    for ds, part in df.groupby("dataset", sort=True):
        done = part[part["status"] == "completed"]
        adrec = done[done["model"] == "adrec"]
        confirm = adrec[adrec["phase"] == "confirm"]
        pool = confirm if len(confirm) else adrec
        entry: dict[str, Any] = {"dataset": dataset_key(str(ds))}
        means = pool.groupby("config_id")[[col, test_col]].mean().dropna(subset=[col])
        if len(means):
            best_id = means[col].idxmax()
            entry.update(config_id=best_id, seeds=int((pool["config_id"] == best_id).sum()),
                         val=float(means.loc[best_id, col]), test=float(means.loc[best_id, test_col]),
                         source="confirm" if len(confirm) else "best single run")
        for b in BASELINES:
            base = done[done["model"] == b]
            if len(base):
                entry[f"{b}_test"] = float(base[test_col].mean())
        rows.append(entry)
    return pd.DataFrame(rows)
