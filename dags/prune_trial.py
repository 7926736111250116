"""prune_trial: one DAG run = one pruning trial.

    validate >> ensure_baseline >> prune >> thinnify >> retrain >> export >> benchmark >> record

* **validate** turns the run's conf (the Params below) into a trial spec and checks it — data set,
  model, pruning globs — before anything is trained; the spec travels to the other tasks through XCom.
* **ensure_baseline** trains the named baseline the first time it is asked for (``baseline`` empty:
  ``<model>-<dataset>-<image_size>`` in ``PRUNEFLOW_BASELINES``), so a fresh install can run a trial.
* **prune .. record** are the stages of ``pruneflow.stages``; their files go to the trial folder
  (``PRUNEFLOW_ARTIFACTS/<trial_id>``), their results to the results DB (``PRUNEFLOW_DB``).
  A trial abandoned in retrain skips export and benchmark, and is recorded ``abandoned``.
  A failed task marks the trial ``failed`` in the results DB with the stage and the reason.
* The trial id is the conf's ``trial_id`` or, when empty, derived from the run id: the tasks of one
  run, and any of them re-run, work on the same trial.

The defaults run a rapid trial (no fine-tuning) of ResNet-20 on digits 32x32 at sparsity 0.5 in
layer1..layer3. Torch is imported inside the tasks only: this file parses in well under a second.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.configuration import conf as airflow_conf
from airflow.sdk import DAG, Param

from pruneflow_airflow.conf import CRITERIA, DEFAULTS, MAX_SPARSITY
from pruneflow_airflow.operators import (
    BenchmarkOperator,
    EnsureBaselineOperator,
    ExportOperator,
    PruneOperator,
    RecordOperator,
    RetrainOperator,
    ThinnifyOperator,
    ValidateTrialOperator,
)

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@=-]{0,99}$"
OPTIONAL_ID_PATTERN = r"^$|^[A-Za-z0-9][A-Za-z0-9_.@=-]{0,99}$"  # "" (a cleared form field) = not set
MODELS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg11", "vgg16", "mobilenetv2",
          "smallcnn", "densenet_tiny", "resnext_tiny", "se_resnet_tiny", "mobilenet_tiny"]

TRIAL, DATA, PRUNING, FINETUNE, BENCH, STORAGE = (
    "Trial", "Model and data", "Pruning", "Fine-tuning and export", "Benchmark", "Storage and advanced")

GROUP_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": ID_PATTERN},
        "patterns": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
        "sparsity": {"type": "number", "minimum": 0, "maximum": MAX_SPARSITY},
        "criterion": {"type": ["string", "null"], "enum": [*CRITERIA, None]},
    },
    "required": ["name", "patterns", "sparsity"],
    "additionalProperties": False,
}


def _p(key: str, type_, title: str, section: str, description: str, **schema) -> Param:
    return Param(DEFAULTS[key], type=type_, title=title, section=section, description=description, **schema)


PARAMS = {
    # --- trial
    "name": _p("name", "string", "Trial name", TRIAL, "Label of the trial in the results table.",
               pattern=ID_PATTERN),
    "trial_id": _p("trial_id", ["null", "string"], "Trial id", TRIAL,
                   "Stable id of the trial; empty: derived from the DAG run id. Reusing an id re-records that "
                   "trial.", pattern=OPTIONAL_ID_PATTERN),
    "study": _p("study", ["null", "string"], "Study", TRIAL, "Group of trials (a sweep) this trial belongs to.",
                pattern=OPTIONAL_ID_PATTERN),
    "seed": _p("seed", "integer", "Seed", TRIAL, "Random seed of pruning and fine-tuning.", minimum=0),
    # --- model and data
    "model": _p("model", "string", "Model", DATA,
                "Registry name (resnet20, vgg11, ...) or 'package.module:factory' for your own model.",
                examples=MODELS, minLength=1),
    "model_kwargs": _p("model_kwargs", "object", "Model keyword arguments", DATA,
                       "Keyword arguments of the model factory, as a JSON object."),
    "dataset": _p("dataset", "string", "Data set", DATA,
                  "digits is built in; cifar10 and imagefolder read the folder given as data path.",
                  enum=["digits", "cifar10", "imagefolder"]),
    "data_path": _p("data_path", ["null", "string"], "Data path", DATA,
                    "Folder of a cifar10 or imagefolder data set (on the workers)."),
    "image_size": _p("image_size", ["null", "integer"], "Image size", DATA,
                     "Images are resized to this many pixels square; empty keeps the native size.",
                     minimum=8, maximum=512),
    "baseline": _p("baseline", ["null", "string"], "Baseline", DATA,
                   "A baseline name (trained into PRUNEFLOW_BASELINES/<name> on first use) or the path of a "
                   "baseline .pt checkpoint; empty: the name <model>-<dataset>-<image_size>."),
    "baseline_epochs": _p("baseline_epochs", "integer", "Baseline epochs", DATA,
                          "Training epochs of a named baseline that does not exist yet (ignored otherwise).",
                          minimum=1, maximum=1000),
    # --- pruning
    "groups": _p("groups", "array", "Pruning groups", PRUNING,
                 "JSON list of {name, patterns (globs over layer names), sparsity (fraction of filters "
                 f"removed, 0..{MAX_SPARSITY}), criterion (optional)}}.", items=GROUP_SCHEMA),
    "sparsities": _p("sparsities", "object", "Per-group sparsities", PRUNING,
                     'Override the sparsity of groups by name, e.g. {"layer3": 0.75}.',
                     additionalProperties={"type": "number", "minimum": 0, "maximum": MAX_SPARSITY}),
    "criterion": _p("criterion", "string", "Criterion", PRUNING, "Filter importance criterion.",
                    enum=list(CRITERIA)),
    "round_to": _p("round_to", ["null", "integer"], "Round to", PRUNING,
                   "Keep a multiple of this many channels in each pruned layer.", minimum=1, maximum=512),
    "ignored_layers": _p("ignored_layers", "array", "Ignored layers", PRUNING,
                         "Glob patterns of layers never pruned.", items={"type": "string"}),
    # --- fine-tuning and export
    "epochs": _p("epochs", "integer", "Fine-tuning epochs", FINETUNE,
                 "0 = rapid trial (no fine-tuning). A network stuck at chance is abandoned.",
                 minimum=0, maximum=1000),
    "lr": _p("lr", "number", "Learning rate", FINETUNE, "Fine-tuning learning rate.",
             exclusiveMinimum=0, maximum=10),
    "optimizer": _p("optimizer", "string", "Optimizer", FINETUNE, "Fine-tuning optimizer.",
                    enum=["sgd", "adam"]),
    "parity_atol": _p("parity_atol", "number", "Export parity tolerance", FINETUNE,
                      "Largest |ONNX Runtime / OpenVINO - torch| difference on the logits.", exclusiveMinimum=0),
    # --- benchmark
    "backend": _p("backend", "string", "Backend", BENCH, "Inference runtime.", enum=["openvino", "onnxruntime"]),
    "device": _p("device", "string", "Device", BENCH,
                 "OpenVINO device: CPU, GPU, GPU.0, NPU, AUTO:GPU,CPU, ... (onnxruntime: CPU only).",
                 examples=["CPU", "GPU", "NPU", "AUTO"], minLength=1),
    "precision": _p("precision", "string", "Inference precision", BENCH,
                    "Fixed inference precision (onnxruntime: f32 only).", enum=["f32", "f16", "bf16"]),
    "threads": _p("threads", "integer", "Threads", BENCH, "Inference threads.", minimum=1, maximum=256),
    "hint": _p("hint", "string", "Performance hint", BENCH, "OpenVINO performance hint.",
               enum=["latency", "throughput"]),
    "warmup": _p("warmup", "integer", "Warm-up calls", BENCH, "Untimed calls before measuring.", minimum=0),
    "rounds": _p("rounds", "integer", "Rounds", BENCH, "Measurement rounds (median of round medians).",
                 minimum=1, maximum=1000),
    "iterations": _p("iterations", "integer", "Iterations per round", BENCH, "Timed calls per round.",
                     minimum=1, maximum=100000),
    # --- storage and advanced
    "artifacts": _p("artifacts", ["null", "string"], "Artifact root", STORAGE,
                    "Folder or fsspec URL holding the trial folders; empty: PRUNEFLOW_ARTIFACTS."),
    "db": _p("db", ["null", "string"], "Results DB", STORAGE,
             "SQLAlchemy URL of the results DB; empty: PRUNEFLOW_DB."),
    "spec_overrides": _p("spec_overrides", "object", "Spec overrides", STORAGE,
                         'Any other trial-spec field as nested JSON, merged last, e.g. '
                         '{"finetune": {"batch_size": 32}, "export": {"opset": 17}}.'),
}

BENCHMARK_QUEUE = airflow_conf.get("pruneflow", "benchmark_queue", fallback="default")
BENCHMARK_POOL = airflow_conf.get("pruneflow", "benchmark_pool", fallback="benchmark_cpu")

with DAG(
    dag_id="prune_trial",
    description="One pruning trial: prune, thin, fine-tune, export, benchmark, record",
    schedule=None,
    catchup=False,
    params=PARAMS,
    doc_md=__doc__,
    tags=["pruneflow"],
    default_args={"owner": "pruneflow", "retries": 0},
) as dag:
    validate = ValidateTrialOperator(task_id="validate", execution_timeout=timedelta(minutes=10))
    ensure_baseline = EnsureBaselineOperator(
        task_id="ensure_baseline", epochs="{{ params.baseline_epochs }}", execution_timeout=timedelta(hours=6))
    prune = PruneOperator(task_id="prune", execution_timeout=timedelta(hours=1))
    thinnify = ThinnifyOperator(task_id="thinnify", execution_timeout=timedelta(hours=1))
    retrain = RetrainOperator(task_id="retrain", execution_timeout=timedelta(hours=24))
    export = ExportOperator(task_id="export", execution_timeout=timedelta(hours=1))
    benchmark = BenchmarkOperator(
        task_id="benchmark", queue=BENCHMARK_QUEUE, pool=BENCHMARK_POOL, retries=2,
        retry_delay=timedelta(seconds=15), execution_timeout=timedelta(hours=1))
    record = RecordOperator(
        task_id="record", retries=2, retry_delay=timedelta(seconds=10), execution_timeout=timedelta(minutes=10))

    validate >> ensure_baseline >> prune >> thinnify >> retrain >> export >> benchmark >> record
