"""What a study found: its trials as rows, the best ones for an objective, the Pareto front,
correlations and binned means. Pure functions over results-DB rows (no plotting here)."""

from __future__ import annotations

import math

import numpy as np


def study_rows(db_url: str, study: str) -> list[dict]:
    """The study's trials in trial-number order, each with `targets` {group: target sparsity} and `dense`."""
    from pruneflow.store import ResultsStore

    store = ResultsStore(db_url)
    try:
        rows = store.list_trials(study=study)
        for r in rows:
            sp = r.get("sparsities_json") or {}
            spec_groups = ((r.get("spec_json") or {}).get("pruning") or {}).get("groups") or []
            targets = {g["name"]: float(g["sparsity"]) for g in spec_groups}
            targets.update({k: float(v["target"]) for k, v in sp.items()})
            r["targets"] = targets
            r["dense"] = not any(v > 0 for v in targets.values())
            r["epochs"] = store.epochs(r["trial_id"])
            link = (r.get("spec_json") or {}).get("sweep") or {}
            r["number"] = link.get("optuna_trial_number")
            r["stage"], r["parent"] = link.get("stage", 0), link.get("parent")
    finally:
        store.close()
    # trial number order (trials of a round run at once, so creation order is not the search's order)
    return sorted(rows, key=lambda r: (r["number"] is None, r["number"] or 0))


def measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "succeeded" and r.get("latency_median_ms") is not None
            and r.get("top1_final") is not None]


def dense_row(rows: list[dict]) -> dict | None:
    return next((r for r in measured(rows) if r["dense"]), None)


def pareto_front(rows: list[dict]) -> list[dict]:
    """Non-dominated trials for (lower latency, higher Top-1), by latency."""
    pts = sorted(measured(rows), key=lambda r: (r["latency_median_ms"], -r["top1_final"]))
    front, best_top1 = [], -math.inf
    for r in pts:
        if r["top1_final"] > best_top1:
            front.append(r)
            best_top1 = r["top1_final"]
    return front


def budget_ms(sweep, dense_latency: float | None) -> float | None:
    """The sweep's latency budget in ms (a fraction budget needs the dense model's latency)."""
    b = sweep.latency_budget
    if b is None:
        return None
    if b.unit == "ms":
        return b.value
    return None if dense_latency is None else b.value * dense_latency


def feasible(sweep, rows: list[dict]) -> list[dict]:
    ok = measured(rows)
    if sweep.objective == "top1_under_latency":
        dense = dense_row(rows)
        budget = budget_ms(sweep, dense["latency_median_ms"] if dense else None)
        return [] if budget is None else [r for r in ok if r["latency_median_ms"] <= budget]
    if sweep.objective == "latency_over_top1":
        return [r for r in ok if r["top1_final"] >= sweep.top1_floor]
    return ok


def final_stage_rows(rows: list[dict]) -> list[dict]:
    """The trials a study's answer is made of: those of its last promotion stage with a measured trial (the
    fine-tuned ones), or all of them when nothing was promoted; the dense reference stays in."""
    stages = [r.get("stage") or 0 for r in measured(rows)]
    last = max(stages, default=0)
    return [r for r in rows if (r.get("stage") or 0) == last or r["dense"]]


def crowding_distance(points: list[tuple[float, float]]) -> list[float]:
    """NSGA-II's crowding distance of each point of one front (objectives: minimise both coordinates)."""
    n = len(points)
    dist = [0.0] * n
    for k in range(2):
        order = sorted(range(n), key=lambda i: points[i][k])
        lo, hi = points[order[0]][k], points[order[-1]][k]
        dist[order[0]] = dist[order[-1]] = math.inf
        if hi == lo:
            continue
        for j in range(1, n - 1):
            dist[order[j]] += (points[order[j + 1]][k] - points[order[j - 1]][k]) / (hi - lo)
    return dist


def promotion_order(sweep, rows: list[dict]) -> list[dict]:
    """The measured, pruned trials best first for promotion under the sweep's objective: Top-1 for top1;
    Top-1 among those within the latency budget for top1_under_latency (fine-tuning never changes latency);
    the fastest above the Top-1 floor, then the rest by Top-1 (fine-tuning raises Top-1) for
    latency_over_top1; for pareto the non-dominated fronts in turn, each by crowding distance."""
    ok = [r for r in measured(rows) if not r["dense"]]
    if sweep.objective == "top1":
        return sorted(ok, key=lambda r: -r["top1_final"])
    if sweep.objective == "top1_under_latency":
        within = {r["trial_id"] for r in feasible(sweep, rows)}
        return sorted((r for r in ok if r["trial_id"] in within), key=lambda r: -r["top1_final"])
    if sweep.objective == "latency_over_top1":
        above = sorted((r for r in ok if r["top1_final"] >= sweep.top1_floor), key=lambda r: r["latency_median_ms"])
        return above + sorted((r for r in ok if r["top1_final"] < sweep.top1_floor), key=lambda r: -r["top1_final"])
    if sweep.objective == "pareto":
        order, rest = [], list(ok)
        while rest:
            front = pareto_front(rest)
            dist = crowding_distance([(r["latency_median_ms"], -r["top1_final"]) for r in front])
            order += [r for _, r in sorted(zip(dist, front, strict=True), key=lambda p: -p[0])]
            ids = {r["trial_id"] for r in front}
            rest = [r for r in rest if r["trial_id"] not in ids]
        return order
    raise ValueError(f"objective {sweep.objective!r} has no promotion ranking")


def best_rows(sweep, rows: list[dict]) -> list[dict]:
    """The best trial(s) for the sweep's objective among the study's final stage (its fine-tuned trials when
    it promoted any); never an infeasible one (empty if none is feasible)."""
    rows = final_stage_rows(rows)
    ok = feasible(sweep, rows)
    if not ok:
        return []
    if sweep.objective == "pareto":
        return pareto_front(ok)
    if sweep.objective in ("latency", "latency_over_top1"):
        return [min(ok, key=lambda r: (r["latency_median_ms"], -r["top1_final"]))]
    return [max(ok, key=lambda r: (r["top1_final"], -r["latency_median_ms"]))]


def _pearson(x: list[float], y: list[float]) -> float | None:
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if a is not None and b is not None]
    if len(pairs) < 3:
        return None
    a, b = np.array(pairs, dtype=float).T
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def correlations(rows: list[dict], groups: list[str]) -> list[dict]:
    """Pearson r of each group's target sparsity with latency and Top-1 before/after fine-tuning."""
    ok = measured(rows)
    out = []
    for g in groups:
        s = [r["targets"].get(g, 0.0) for r in ok]
        out.append({
            "group": g, "n": len(ok),
            "latency": _pearson(s, [r["latency_median_ms"] for r in ok]),
            "top1_before": _pearson(s, [r.get("top1_masked") for r in ok]),
            "top1_after": _pearson(s, [r.get("top1_final") for r in ok]),
        })
    return out


def binned_latency(rows: list[dict], group: str, width: float = 0.02) -> list[tuple[float, float, int]]:
    """(bin centre, mean latency, count) of measured trials by the group's target sparsity."""
    bins: dict[int, list[float]] = {}
    for r in measured(rows):
        k = int(math.floor(r["targets"].get(group, 0.0) / width + 1e-9))
        bins.setdefault(k, []).append(r["latency_median_ms"])
    return [((k + 0.5) * width, float(np.mean(v)), len(v)) for k, v in sorted(bins.items())]


def best_so_far(sweep, rows: list[dict]) -> list[tuple[int, float | None]]:
    """Per trial (in order), the best objective value among feasible trials so far (pareto: hypervolume)."""
    out, seen = [], []
    for i, r in enumerate(rows, 1):
        seen.append(r)
        if sweep.objective == "pareto":
            out.append((i, hypervolume(seen, reference(rows))))
            continue
        best = best_rows(sweep, seen)
        if not best:
            out.append((i, None))
        elif sweep.objective in ("latency", "latency_over_top1"):
            out.append((i, best[0]["latency_median_ms"]))
        else:
            out.append((i, best[0]["top1_final"]))
    return out


def trials_to_best(series: list[tuple[int, float | None]]) -> int | None:
    vals = [v for _, v in series if v is not None]
    if not vals:
        return None
    final = series[-1][1]
    return next(i for i, v in series if v is not None and math.isclose(v, final, rel_tol=1e-12, abs_tol=1e-12))


def reference(rows: list[dict]) -> tuple[float, float]:
    """Hypervolume reference point: the slowest latency seen (x 1.1) and 0 % Top-1."""
    lat = [r["latency_median_ms"] for r in measured(rows)]
    return (1.1 * max(lat) if lat else 1.0, 0.0)


def hypervolume(rows: list[dict], ref: tuple[float, float]) -> float:
    """Area dominated by the front in (latency to minimise, Top-1 to maximise) up to `ref`."""
    front = [r for r in pareto_front(rows) if r["latency_median_ms"] < ref[0] and r["top1_final"] > ref[1]]
    # the front is sorted by latency with Top-1 rising: each point owns the strip up to the next one's latency
    lats = [r["latency_median_ms"] for r in front] + [ref[0]]
    return sum((lats[i + 1] - lats[i]) * (r["top1_final"] - ref[1]) for i, r in enumerate(front))


def compute_saved(rows: list[dict]) -> dict:
    """Fine-tuning epochs not spent on trials stopped early, and their estimated seconds."""
    epoch_secs = [e["seconds"] for r in rows for e in r["epochs"] if e.get("seconds")]
    mean_epoch = float(np.mean(epoch_secs)) if epoch_secs else 0.0
    saved_epochs = 0
    stopped = 0
    for r in rows:
        if r["status"] != "abandoned":
            continue
        requested = ((r.get("spec_json") or {}).get("finetune") or {}).get("epochs", 0)
        run = r.get("epochs_run") or 0
        if requested > run:
            stopped += 1
            saved_epochs += requested - run
    return {"stopped_trials": stopped, "epochs_saved": saved_epochs, "seconds_saved": saved_epochs * mean_epoch,
            "mean_epoch_seconds": mean_epoch}


def _ranks(x: list[float]) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank."""
    a = np.asarray(x, dtype=float)
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(1, len(a) + 1)
    for v in np.unique(a):
        tied = a == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho: Pearson's r of the ranks (None with fewer than 3 pairs or a constant side)."""
    return _pearson(list(_ranks(x)), list(_ranks(y))) if len(x) >= 3 else None


def kendall(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b (ties counted as in scipy's default); None with fewer than 3 pairs."""
    n = len(x)
    if n < 3:
        return None
    conc = disc = tx = ty = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif dx == dy:
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return None if denom == 0 else (conc - disc) / denom


#: below this many pairs a rank correlation is not shown as a figure: of the 24 orderings of 4 pairs, 8 give
#: |rho| >= 0.8, so such a figure says nothing; at 8 pairs a random ordering reaches |rho| >= 0.74 one time
#: in twenty
MIN_RANK_PAIRS = 8
_BOOTSTRAP_RESAMPLES = 2000


def rank_correlation(x: list[float], y: list[float], seed: int = 0) -> dict:
    """Spearman's rho and Kendall's tau of the pairs with their count ``n`` and a 95% percentile bootstrap
    interval of rho (``rho_interval``, resampling the pairs; None below :data:`MIN_RANK_PAIRS`);
    ``meaningful`` is False below that size, where the figures are kept but not presented as a finding."""
    n = len(x)
    out = {"n": n, "spearman": spearman(x, y), "kendall": kendall(x, y), "rho_interval": None,
           "meaningful": n >= MIN_RANK_PAIRS}
    if out["meaningful"] and out["spearman"] is not None:
        rng = np.random.default_rng(seed)
        xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        rhos = [r for idx in rng.integers(0, n, size=(_BOOTSTRAP_RESAMPLES, n))
                if (r := spearman(list(xa[idx]), list(ya[idx]))) is not None]
        if rhos:
            out["rho_interval"] = [float(np.percentile(rhos, 2.5)), float(np.percentile(rhos, 97.5))]
    return out


def describe_rank_correlation(stat: dict) -> str:
    """The correlation as a reader should take it: with its n and interval, or why there is no figure."""
    n = stat.get("n", 0)
    if not stat.get("meaningful") or stat.get("spearman") is None:
        why = (f"too few pairs for a rank correlation to mean anything (it needs at least {MIN_RANK_PAIRS})"
               if n < MIN_RANK_PAIRS else "one side is constant")
        return f"n = {n}: {why}"
    lo_hi = stat.get("rho_interval")
    interval = f", 95% bootstrap interval {lo_hi[0]:.2f} to {lo_hi[1]:.2f}" if lo_hi else ""
    return f"Spearman rho {stat['spearman']:.2f}{interval}, Kendall tau {stat['kendall']:.2f} (n = {n})"


def prediction_quality(rows: list[dict]) -> dict:
    """How well the screen predicted fine-tuning: for the trials of the first promotion stage, their screen
    parent's recalibrated and pruned Top-1 against the Top-1 they reached fine-tuned
    (:func:`rank_correlation`), and the fine-tuning compute spent against fine-tuning every screened trial."""
    by_id = {r["trial_id"]: r for r in rows}
    pairs = []
    for r in measured(rows):
        parent = by_id.get(r.get("parent") or "")
        if (r.get("stage") or 0) == 1 and parent is not None:
            pairs.append({"trial_id": r["trial_id"], "parent": parent["trial_id"], "achieved": r["top1_final"],
                          "recalibrated": parent.get("top1_recalibrated"), "pruned": parent.get("top1_masked")})
    out: dict = {"pairs": pairs}
    for key in ("recalibrated", "pruned"):
        ok = [p for p in pairs if p[key] is not None]
        x, y = [p[key] for p in ok], [p["achieved"] for p in ok]
        out[key] = rank_correlation(x, y)
    screened = [r for r in rows if (r.get("stage") or 0) == 0 and not r["dense"] and r["status"] != "failed"]
    promoted = [r for r in rows if (r.get("stage") or 0) >= 1]
    final_epochs = max((((r.get("spec_json") or {}).get("finetune") or {}).get("epochs", 0) for r in promoted),
                       default=0)
    spent = sum(r.get("epochs_run") or 0 for r in promoted)
    out["compute"] = {"screened": len(screened), "promoted": len(promoted), "epochs_spent": spent,
                      "epochs_to_fine_tune_all": len(screened) * final_epochs,
                      "share": spent / (len(screened) * final_epochs) if screened and final_epochs else None}
    return out
