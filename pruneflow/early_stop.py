"""Stop fine-tuning a sweep trial that will not recover: a median rule on per-epoch validation Top-1.

At epoch k (after the warm-up epochs) a trial whose validation Top-1 is below the median of the
study's finished trials at epoch k is stopped. The rule reads the results DB, so it works for every
objective (Optuna's own MedianPruner follows the study's direction, which for a latency study is
the wrong way round for Top-1) and from any process.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def median_rule(db_url: str, study: str, trial_id: str, n_startup_trials: int, n_warmup_steps: int
                ) -> Callable[[dict], str | None]:
    from pruneflow.store import ResultsStore

    history: dict[int, list[float]] | None = None

    def load() -> dict[int, list[float]]:
        store = ResultsStore(db_url)
        try:
            per_epoch: dict[int, list[float]] = {}
            finished = [r for r in store.list_trials(study=study)
                        if r["trial_id"] != trial_id and r["status"] in ("succeeded", "abandoned")]
            for r in finished:
                for e in store.epochs(r["trial_id"]):
                    if e.get("val_top1") is not None:
                        per_epoch.setdefault(e["epoch"], []).append(e["val_top1"])
            return per_epoch
        finally:
            store.close()

    def rule(metrics: dict) -> str | None:
        nonlocal history
        epoch = metrics["epoch"]
        if epoch <= n_warmup_steps:
            return None
        if history is None:
            history = load()
        others = history.get(epoch, [])
        if len(others) < n_startup_trials:
            return None
        median = float(np.median(others))
        if metrics["val_top1"] < median:
            return (f"median rule: validation Top-1 {metrics['val_top1']:.2f}% at epoch {epoch} is below the "
                    f"median {median:.2f}% of {len(others)} earlier trials of study {study}")
        return None

    return rule
