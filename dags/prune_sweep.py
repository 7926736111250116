"""prune_sweep: search per-group sparsities; one DAG run = one round of trials.

    ask >> run_trials (prune_trial DAG runs, mapped) >> tell >> continue? >> next_round

* **ask** opens (or resumes) the Optuna study kept in the results DB and asks it for ``parallel``
  trials; a study's first round also measures the dense model.
* **run_trials** triggers one ``prune_trial`` run per asked trial and waits for them; they run at
  once, their benchmarks one at a time through the benchmark pool.
* **tell** tells the search what the results DB recorded: succeeded trials their objective values,
  abandoned ones pruned, failed ones failed — a failed trial never stops the sweep.
* **next_round** triggers the next round while trials remain; the last round writes the report to
  ``out/reports/<study>/``.

A run of an existing study continues it with ``n_trials`` more trials.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, Param, task

from pruneflow_airflow.sweep_conf import SWEEP_DEFAULTS

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@=-]{0,99}$"
RANGE_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": ID_PATTERN},
        "patterns": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
        "low": {"type": "number", "minimum": 0, "maximum": 0.95},
        "high": {"type": "number", "minimum": 0, "maximum": 0.95},
        "step": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 0.95},
    },
    "required": ["name", "patterns", "high"],
    "additionalProperties": False,
}
SEARCH, BUDGET, TRIAL = "Search", "Objective and budget", "Trials"


def _p(key: str, type_, title: str, section: str, description: str, **schema) -> Param:
    return Param(SWEEP_DEFAULTS[key], type=type_, title=title, section=section, description=description, **schema)


PARAMS = {
    "study": _p("study", "string", "Study", SEARCH, "Name of the study; an existing study is continued.",
                pattern=ID_PATTERN),
    "objective": _p("objective", "string", "Objective", BUDGET,
                    "latency (minimise), top1 (maximise), top1_under_latency (needs a latency budget), "
                    "latency_over_top1 (needs a Top-1 floor) or pareto (both).",
                    enum=["latency", "top1", "top1_under_latency", "latency_over_top1", "pareto"]),
    "latency_budget": _p("latency_budget", ["object", "null"], "Latency budget", BUDGET,
                         'For top1_under_latency: {"value": 2.5, "unit": "ms"} or {"value": 0.5, "unit": '
                         '"fraction"} of the dense model\'s latency.',
                         properties={"value": {"type": "number", "exclusiveMinimum": 0},
                                     "unit": {"type": "string", "enum": ["ms", "fraction"]}},
                         required=["value", "unit"], additionalProperties=False),
    "top1_floor": _p("top1_floor", ["number", "null"], "Top-1 floor", BUDGET,
                     "For latency_over_top1: the lowest acceptable Top-1 (percent).", minimum=0, maximum=100),
    "sampler": _p("sampler", "string", "Sampler", SEARCH,
                  "tpe (multi-objective TPE for pareto), random, grid (needs a step on every range) or nsga2.",
                  enum=["tpe", "random", "grid", "nsga2"]),
    "space": _p("space", "array", "Search space", SEARCH,
                "JSON list of {name, patterns (globs over layer names), low, high (sparsity 0..0.95), step}.",
                items=RANGE_SCHEMA, minItems=1),
    "n_trials": _p("n_trials", "integer", "Trials", SEARCH, "Trials to run in this sweep (or this night).",
                   minimum=1, maximum=100000),
    "parallel": _p("parallel", "integer", "Trials at once", SEARCH, "Trials per round, run at once.",
                   minimum=1, maximum=64),
    "seed": _p("seed", "integer", "Seed", SEARCH, "Sampler seed.", minimum=0),
    "include_dense": _p("include_dense", "boolean", "Measure the dense model", SEARCH,
                        "First trial of a study: the unpruned model, the reference of fraction budgets."),
    "early_stopping": _p("early_stopping", "object", "Early stopping", TRIAL,
                         '{"rule": "median" | "none", "n_startup_trials": 3, "n_warmup_steps": 1}: stop a '
                         "fine-tuning trial whose validation Top-1 falls below the median of earlier trials.",
                         properties={"rule": {"enum": ["median", "none"]},
                                     "n_startup_trials": {"type": "integer", "minimum": 1},
                                     "n_warmup_steps": {"type": "integer", "minimum": 0}},
                         additionalProperties=False),
    "trial": _p("trial", "object", "Base trial", TRIAL,
                'prune_trial conf keys every trial starts from, e.g. {"epochs": 2, "model": "resnet56"}.'),
    "remaining": _p("remaining", ["integer", "null"], "Remaining trials", TRIAL,
                    "Set by the sweep itself between rounds; leave empty.", minimum=0),
    "round": _p("round", "integer", "Round", TRIAL, "Set by the sweep itself; leave at 1.", minimum=1),
    "report": _p("report", "boolean", "Write the report", TRIAL, "Write out/reports/<study>/ after the last round."),
}

with DAG(
    dag_id="prune_sweep",
    description="Search per-group sparsities: one round of prune_trial runs per DAG run",
    schedule=None,
    catchup=False,
    params=PARAMS,
    doc_md=__doc__,
    tags=["pruneflow"],
    render_template_as_native_obj=True,
    default_args={"owner": "pruneflow", "retries": 0},
) as dag:

    @task(execution_timeout=timedelta(minutes=10))
    def ask(params: dict | None = None) -> list[dict]:
        from pruneflow.sweep import ask_round
        from pruneflow_airflow.sweep_conf import remaining_trials, sweep_from_conf, trial_conf

        sweep = sweep_from_conf({k: params[k] for k in PARAMS})
        k = min(sweep.parallel, remaining_trials(params, sweep))
        if k <= 0:
            return []
        epochs = (params.get("trial") or {}).get("baseline_epochs")
        return [trial_conf(spec, epochs) for spec in ask_round(sweep, k)]

    asked = ask()
    run_trials = TriggerDagRunOperator.partial(
        task_id="run_trials", trigger_dag_id="prune_trial", wait_for_completion=True, poke_interval=3,
        allowed_states=["success", "failed"], failed_states=[], logical_date=None,
        execution_timeout=timedelta(hours=48),
    ).expand(conf=asked)

    @task(trigger_rule="all_done", execution_timeout=timedelta(minutes=30))
    def tell(confs: list[dict], params: dict | None = None) -> dict:
        from pruneflow.report import write_report
        from pruneflow.sweep import tell_round
        from pruneflow_airflow.sweep_conf import (
            next_round_conf,
            remaining_trials,
            reports_root,
            sweep_from_conf,
        )

        sweep = sweep_from_conf({k: params[k] for k in PARAMS})
        told = tell_round(sweep, [c["spec_overrides"] for c in confs], print)
        remaining = max(0, remaining_trials(params, sweep) - len(confs))
        report = None
        if remaining == 0 and params.get("report", True):
            report = write_report(sweep.trial_spec().db, sweep.study, reports_root() / sweep.study)["report"]
            print(f"report: {report}")
        return {"told": told, "remaining": remaining, "report": report,
                "next_conf": next_round_conf({k: params[k] for k in PARAMS}, remaining)}

    told = tell(asked)

    @task.short_circuit
    def more_trials(result: dict) -> bool:
        return result["remaining"] > 0

    next_round = TriggerDagRunOperator(
        task_id="next_round", trigger_dag_id="prune_sweep", logical_date=None,
        conf="{{ ti.xcom_pull(task_ids='tell')['next_conf'] }}",
    )

    run_trials >> told
    more_trials(told) >> next_round
