"""`pruneflow report STUDY`: a self-contained HTML report (plots inline, also PNG files) and a CSV.

The Pareto plot is inline SVG whose points link to the trial's row in the report's table.
"""

from __future__ import annotations

import csv
import html
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import yaml

from pruneflow import analysis
from pruneflow.store import STATUSES


def load_sweep_of_study(db_url: str, study: str):
    import optuna

    from pruneflow.sweep import SweepSpec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        s = optuna.load_study(study_name=study, storage=db_url)
    except KeyError:
        names = optuna.get_all_study_names(storage=db_url)
        raise ValueError(f"study {study!r} not found in {db_url}; studies: {', '.join(names) or 'none'}") from None
    return SweepSpec.model_validate(s.user_attrs["sweep_spec"])


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.grid(alpha=0.3)
    return plt, fig, ax


def _save(plt, fig, out: Path, name: str, svg: bool = False) -> str:
    fig.tight_layout()
    fig.savefig(out / f"{name}.png")
    buf = io.StringIO() if svg else io.BytesIO()
    if svg:
        fig.savefig(buf, format="svg")
        text = buf.getvalue()
        text = text[text.index("<svg"):]
    else:
        import base64

        fig.savefig(buf, format="png")
        text = f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'
    plt.close(fig)
    return text


def _anchor(trial_id: str) -> str:
    return f"trial-{trial_id}"


def plot_pareto(rows, front, out: Path) -> str:
    plt, fig, ax = _figure()
    pts = analysis.measured(rows)
    sc = ax.scatter([r["latency_median_ms"] for r in pts], [r["top1_final"] for r in pts], s=22, alpha=0.6,
                    label="trials")
    sc.set_urls([f"#{_anchor(r['trial_id'])}" for r in pts])
    if front:
        ax.plot([r["latency_median_ms"] for r in front], [r["top1_final"] for r in front], "-o", color="C3",
                label="Pareto front")
    dense = analysis.dense_row(rows)
    if dense:
        ax.scatter([dense["latency_median_ms"]], [dense["top1_final"]], marker="*", s=220, color="k", label="dense")
    ax.set_xlabel("median latency (ms)")
    ax.set_ylabel("Top-1 (%)")
    ax.set_title("Measured latency against Top-1")
    ax.legend(loc="lower right")
    return _save(plt, fig, out, "pareto", svg=True)


def plot_binned(rows, groups, out: Path) -> str:
    plt, fig, ax = _figure()
    for g in groups:
        b = analysis.binned_latency(rows, g)
        if b:
            ax.plot([x for x, _, _ in b], [y for _, y, _ in b], "-o", ms=3, label=g)
    ax.set_xlabel("group target sparsity (0.02-wide bins)")
    ax.set_ylabel("mean latency (ms)")
    ax.set_title("Latency by each group's sparsity")
    ax.legend()
    return _save(plt, fig, out, "latency_by_sparsity")


def plot_best_so_far(series, label, out: Path) -> str:
    plt, fig, ax = _figure()
    xs = [i for i, v in series if v is not None]
    ax.step(xs, [v for _, v in series if v is not None], where="post")
    ax.set_xlabel("trial number")
    ax.set_ylabel(label)
    ax.set_title("Best so far")
    return _save(plt, fig, out, "best_so_far")


def plot_macs(rows, out: Path) -> str:
    plt, fig, ax = _figure()
    pts = [r for r in analysis.measured(rows) if r.get("macs_after")]
    ax.scatter([r["macs_after"] / 1e6 for r in pts], [r["latency_median_ms"] for r in pts], s=22, alpha=0.7)
    ax.set_xlabel("MMACs")
    ax.set_ylabel("median latency (ms)")
    ax.set_title("MACs against measured latency")
    return _save(plt, fig, out, "macs_vs_latency")


def plot_recovery(rows, out: Path) -> str | None:
    tuned = [r for r in rows if r["epochs"]]
    if not tuned:
        return None
    plt, fig, ax = _figure()
    for r in tuned:
        xs = [0] + [e["epoch"] for e in r["epochs"]]
        ys = [r.get("top1_masked")] + [e["val_top1"] for e in r["epochs"]]
        ax.plot(xs, ys, "-", alpha=0.6, color="C2" if r["status"] == "succeeded" else "C3")
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel("validation Top-1 (%)")
    ax.set_title("Recovery during fine-tuning (red: stopped early)")
    return _save(plt, fig, out, "recovery")


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def best_trial_spec(best: dict) -> dict:
    spec = dict(best.get("spec_json") or {})
    for k in ("trial_id", "sweep"):
        spec.pop(k, None)
    spec["name"] = f"{best['trial_id']}-rerun"
    return spec


CSV_COLUMNS = ["trial_id", "status", "reason", "stage", "parent", "latency_median_ms", "latency_p90_ms", "latency_cv",
               "latency_predicted_ms",
               "top1_masked", "top1_recalibrated", "top1_final", "top1_source", "params_after", "macs_after",
               "epochs_run", "artifact_dir"]


def write_report(db_url: str, study: str, out_dir: str | Path) -> dict:
    sweep = load_sweep_of_study(db_url, study)
    rows = analysis.study_rows(db_url, study)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = [r.name for r in sweep.space]
    best = analysis.best_rows(sweep, rows)
    front = analysis.pareto_front(rows)
    corr = analysis.correlations(rows, groups)
    series = analysis.best_so_far(sweep, rows)
    to_best = analysis.trials_to_best(series)
    saved = analysis.compute_saved(rows)
    quality = analysis.prediction_quality(rows)
    series_label = {"latency": "best latency (ms)", "latency_over_top1": "best feasible latency (ms)",
                    "top1": "best Top-1 (%)", "top1_under_latency": "best feasible Top-1 (%)",
                    "pareto": "hypervolume of the Pareto front"}[sweep.objective]

    with open(out / "trials.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS + [f"sparsity_{g}" for g in groups])
        for r in rows:
            w.writerow([r.get(c) for c in CSV_COLUMNS] + [r["targets"].get(g, 0.0) for g in groups])
    best_spec = best_trial_spec(best[0]) if best else None
    if best_spec:
        (out / "best_spec.yaml").write_text(yaml.safe_dump(best_spec, sort_keys=False))

    figs = {
        "pareto": plot_pareto(rows, front, out),
        "binned": plot_binned(rows, groups, out),
        "best": plot_best_so_far(series, series_label, out),
        "macs": plot_macs(rows, out),
        "recovery": plot_recovery(rows, out),
    }
    summary = {
        "study": study, "objective": sweep.objective, "trials": len(rows),
        "by_status": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
        "best": [{"trial_id": r["trial_id"], "latency_median_ms": r["latency_median_ms"], "top1_final": r["top1_final"],
                  "targets": r["targets"]} for r in best],
        "trials_to_best": to_best, "correlations": corr, "compute_saved": saved, "prediction": quality,
        "report": str(out / "report.html"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.html").write_text(_html(sweep, rows, best, corr, figs, to_best, saved, best_spec, groups, quality))
    return summary


def report_source(db_url: str, study: str) -> dict:
    """What a study's report is built from, in brief: its number of trials, the latest change to any of them
    and its number of epoch rows. A report built from the same source is current; a new or changed trial
    changes it. JSON-safe, to be stored beside the report."""
    from sqlalchemy import func, select

    from pruneflow.store import Epoch, ResultsStore, Trial

    store = ResultsStore(db_url)
    try:
        with store.engine.connect() as conn:
            n, latest = conn.execute(select(func.count(), func.max(Trial.updated_at))
                                     .where(Trial.study == study)).one()
            epochs = conn.execute(select(func.count()).select_from(Epoch).join(Trial, Epoch.trial_id == Trial.trial_id)
                                  .where(Trial.study == study)).scalar_one()
    finally:
        store.close()
    return {"study": study, "trials": int(n), "updated_at": str(latest) if latest is not None else None,
            "epochs": int(epochs)}


def _prediction_html(q: dict) -> str:
    if not q["pairs"]:
        return "<p>Nothing was promoted: every Top-1 here is the screen's estimate.</p>"
    e = html.escape
    stats = "".join(f"<tr><td>{name} Top-1 of the screen</td><td>{e(analysis.describe_rank_correlation(q[k]))}</td></tr>"
                    for k, name in (("recalibrated", "recalibrated"), ("pruned", "pruned (as is)")))
    pairs = "".join(f"<tr><td><a href='#{_anchor(p['trial_id'])}'>{e(p['trial_id'])}</a></td><td>{e(p['parent'])}</td>"
                    f"<td>{_fmt(p['pruned'], '.2f')}</td><td>{_fmt(p['recalibrated'], '.2f')}</td>"
                    f"<td>{_fmt(p['achieved'], '.2f')}</td></tr>" for p in q["pairs"])
    c = q["compute"]
    share = f"{100 * c['share']:.0f}%" if c["share"] is not None else "-"
    return (f"<p>The first promotion stage fine-tuned {len(q['pairs'])} of {c['screened']} screened trials. How well "
            "the screen's Top-1 predicted the fine-tuned Top-1 (rank correlations):</p>"
            "<table><tr><th>predictor</th><th>rank correlation with the fine-tuned Top-1</th></tr>"
            f"{stats}</table><p>Fine-tuning spent {c['epochs_spent']} epochs over {c['promoted']} promoted trials, "
            f"against {c['epochs_to_fine_tune_all']} to fine-tune every screened trial for the last stage's epochs "
            f"({share}).</p><table><tr><th>promoted trial</th><th>screened as</th><th>Top-1 pruned</th>"
            f"<th>Top-1 recalibrated</th><th>Top-1 fine-tuned</th></tr>{pairs}</table>")


def _html(sweep, rows, best, corr, figs, to_best, saved, best_spec, groups, quality) -> str:
    e = html.escape
    best_ids = {r["trial_id"] for r in best}
    dense = analysis.dense_row(rows)
    constraint = ""
    if sweep.objective == "top1_under_latency":
        constraint = f" — latency budget {sweep.latency_budget.value:g} {sweep.latency_budget.unit}"
    elif sweep.objective == "latency_over_top1":
        constraint = f" — Top-1 floor {sweep.top1_floor:g}%"
    corr_rows = "".join(
        f"<tr><td>{e(c['group'])}</td><td>{_fmt(c['latency'])}</td><td>{_fmt(c['top1_before'])}</td>"
        f"<td>{_fmt(c['top1_after'])}</td><td>{c['n']}</td></tr>" for c in corr)
    trial_rows = "".join(
        f"<tr id='{_anchor(r['trial_id'])}'{' class=best' if r['trial_id'] in best_ids else ''}>"
        f"<td>{e(r['trial_id'])}{' (dense)' if r['dense'] else ''}</td><td>{e(r['status'])}</td>"
        + "".join(f"<td>{r['targets'].get(g, 0.0):.2f}</td>" for g in groups)
        + f"<td>{r.get('stage') or 0}</td><td>{_fmt(r.get('latency_median_ms'))}</td>"
        f"<td>{_fmt(r.get('latency_predicted_ms'))}</td>"
        f"<td>{_fmt(r.get('top1_masked'), '.2f')}</td><td>{_fmt(r.get('top1_recalibrated'), '.2f')}</td>"
        f"<td>{_fmt(r.get('top1_final'), '.2f')}</td><td>{r.get('macs_after') or '-'}</td>"
        f"<td>{e(r.get('reason') or '')}</td><td><code>{e(r.get('artifact_dir') or '')}</code></td></tr>"
        for r in rows)
    best_list = "".join(
        f"<li><a href='#{_anchor(r['trial_id'])}'>{e(r['trial_id'])}</a>: latency {r['latency_median_ms']:.3f} ms, "
        f"Top-1 {r['top1_final']:.2f}%"
        + (f", {dense['latency_median_ms'] / r['latency_median_ms']:.2f}x the dense model's speed" if dense else "")
        + "</li>" for r in best) or "<li>no feasible trial yet</li>"
    recovery = figs["recovery"] or "<p>No fine-tuned trials in this study.</p>"
    spec_text = e(yaml.safe_dump(best_spec, sort_keys=False)) if best_spec else "no feasible trial yet"
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    n_skipped = sum(r["status"] == "skipped" for r in rows)
    skipped_text = f", {n_skipped} skipped: predicted infeasible, never measured" if n_skipped else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>pruneflow report: {e(sweep.study)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}}
table{{border-collapse:collapse;margin:1em 0;font-size:0.9em}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}} tr.best{{background:#fff4c2}} tr:target{{outline:2px solid #c33}}
svg{{max-width:100%;height:auto}} img{{max-width:100%}} pre{{background:#f6f6f6;padding:1em}}
</style></head><body>
<h1>Study {e(sweep.study)}</h1>
<p>Objective <b>{e(sweep.objective)}</b>{e(constraint)}; sampler {e(sweep.sampler)}; {len(rows)} trials
({sum(r['status'] == 'succeeded' for r in rows)} succeeded, {sum(r['status'] == 'failed' for r in rows)} failed,
{sum(r['status'] == 'abandoned' for r in rows)} stopped early{skipped_text}). Generated {generated}.</p>
<h2>Best for the objective</h2><ul>{best_list}</ul>
<p>Trials needed to reach the final best: {to_best if to_best is not None else '-'}.
Early stopping saved {saved['epochs_saved']} fine-tuning epochs (about {saved['seconds_saved']:.0f} s)
over {saved['stopped_trials']} trials.</p>
<h2 id="pareto">Pareto front: latency against Top-1</h2>
<p>Every point links to its trial below; the star is the dense model.</p>
<div class="pareto-plot">{figs['pareto']}</div>
<h2>Correlation of each group's target sparsity</h2>
<table><tr><th>group</th><th>r with latency</th><th>r with Top-1 before fine-tuning</th>
<th>r with Top-1 after fine-tuning</th><th>trials</th></tr>{corr_rows}</table>
<h2>Mean latency by target sparsity</h2>{figs['binned']}
<h2>Best so far</h2>{figs['best']}
<h2>MACs against measured latency</h2><p>Where FLOPs mislead: equal MACs, different latency.</p>{figs['macs']}
<h2>Screen against fine-tuning</h2>{_prediction_html(quality)}
<h2>Recovery during fine-tuning</h2>{recovery}
<h2>Best configuration as a trial spec</h2><p>Saved as <code>best_spec.yaml</code>; run it with
<code>pruneflow trial best_spec.yaml</code>.</p><pre>{spec_text}</pre>
<h2>All trials</h2>
<table><tr><th>trial</th><th>status</th>{''.join(f'<th>{e(g)}</th>' for g in groups)}<th>stage</th><th>latency ms</th>
<th>predicted ms</th><th>Top-1 pruned</th><th>Top-1 recalibrated</th><th>Top-1 final</th><th>MACs</th><th>reason</th><th>artifacts</th></tr>
{trial_rows}</table>
<p>Data: <a href="trials.csv">trials.csv</a>.</p>
</body></html>
"""
