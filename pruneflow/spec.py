"""The trial spec: one validated schema for everything a pruning trial needs.

Every field is checked before any expensive work starts; pydantic's messages name the field
(e.g. ``pruning.groups.0.sparsity``) and what is allowed. Checks that need the model (globs
that must match a layer) happen in :mod:`pruneflow.prune`, still before training or export.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from pruneflow.bench.output_check import EXPORT_ATOL, EXPORT_RTOL
from pruneflow.bench.settings import BenchmarkOptions
from pruneflow.constants import CRITERIA, ID_PATTERN, ID_RULE, MAX_SPARSITY
from pruneflow.data import DatasetSpec

Criterion = Literal[CRITERIA]  # type: ignore[valid-type]
#: A name or id (trial, study, group, baseline): safe as a folder name and in a URL.
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]


class SpecError(ValueError):
    """A trial spec that cannot run; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    name: str = Field("resnet20", description="registry name (resnet20, vgg11, ...) or 'package.module:factory'")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")
    input_shape: list[int] | None = Field(
        None, description="[1, C, H, W]; only for user models whose input the data set does not define"
    )

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 4 or v[0] != 1 or any(d < 1 for d in v)):
            raise ValueError("must be [1, C, H, W] with positive sizes (batch 1: latency is per image)")
        return v


class BaselineSpec(_Strict):
    checkpoint: str | None = Field(
        None, description="a baseline name (trained into the baselines folder on first use) or the path of a .pt "
        "checkpoint written by `pruneflow baseline`; empty: the name <model>-<dataset>-<image_size>")
    epochs: int = Field(15, ge=1, le=1000, description="training epochs of a named baseline that does not exist yet")
    lr: float = Field(0.05, gt=0, le=10, description="learning rate of a named baseline that does not exist yet")


class PruningGroup(_Strict):
    name: Id = Field(..., description="group name, e.g. layer3")
    patterns: list[Annotated[str, StringConstraints(min_length=1)]] = Field(
        ..., min_length=1, description="glob patterns over module names")
    sparsity: float = Field(..., ge=0.0, le=MAX_SPARSITY, description="fraction of filters to remove")
    criterion: Criterion | None = Field(None, description="overrides the trial's criterion for this group")


DEFAULT_RECALIBRATION_SAMPLES = 512  # 0.3 s for ResNet-20; see benchmarks/recovery_prediction.py


class BnRecalibration(_Strict):
    samples: int | None = Field(
        None, ge=0, description="training images the BatchNorm statistics of the pruned model are re-estimated on, "
        "no gradient step; 0 turns it off, at most the training split's size; empty: 512, or the whole training "
        "split when it is smaller")

    def images(self, n_train: int) -> int:
        """How many images to recalibrate on, for a training split of ``n_train``."""
        return min(DEFAULT_RECALIBRATION_SAMPLES, n_train) if self.samples is None else self.samples
    batch_size: int = Field(64, ge=1, le=65536, description="batch size of the recalibration")


class PruningSpec(_Strict):
    groups: list[PruningGroup] = Field(
        default_factory=list, description="JSON list of {name, patterns (globs over layer names), sparsity "
        f"(fraction of filters removed, 0..{MAX_SPARSITY}), criterion (optional)}}")
    criterion: Criterion = Field("l1", description="filter importance criterion")
    round_to: int | None = Field(None, ge=1, le=512, description="keep a multiple of this many channels in each "
                                 "pruned layer")
    ignored_layers: list[str] = Field(default_factory=list, description="glob patterns of layers never pruned")
    bn_recalibration: BnRecalibration = Field(default_factory=BnRecalibration)
    distiller_schedule: str | None = Field(
        None, description="path of an Intel Distiller compression schedule; its pruners become groups"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> PruningSpec:
        names = [g.name for g in self.groups]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"groups: duplicate group names {dupes}")
        return self


class FinetuneSpec(_Strict):
    epochs: int = Field(0, ge=0, le=1000, description="fine-tuning epochs; 0 = rapid trial (no fine-tuning)")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="fine-tuning optimizer")
    lr: float = Field(0.01, gt=0, le=10, description="fine-tuning learning rate")
    batch_size: int = Field(64, ge=1, le=65536, description="fine-tuning batch size")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, lt=1, description="weight decay")
    chance_patience: int = Field(
        1, ge=1, description="abandon the trial if validation Top-1 is still at chance after this many epochs"
    )
    chance_margin: float = Field(
        0.5, ge=0, le=100, description="Top-1 within this many points of 100/n counts as chance"
    )


class ExportSpec(_Strict):
    opset: int = Field(18, ge=13, le=23, description="ONNX opset")
    exporter: Literal["torchscript", "dynamo"] = Field(
        "torchscript", description="the torch.onnx exporter: torchscript is ~10x faster to run on small CNNs"
    )
    parity_rtol: float = Field(
        EXPORT_RTOL, gt=0, lt=1, description="export parity: max |ONNX Runtime/OpenVINO - torch| may be "
        "parity_atol + parity_rtol x max |torch output| (f32; the benchmark's reduced-precision check widens rtol)"
    )
    parity_atol: float = Field(
        EXPORT_ATOL, gt=0, description="export parity: the absolute floor of the tolerance, for outputs near zero"
    )
    parity_samples: int = Field(8, ge=1, le=1024, description="validation images of the parity check")
    compress_to_fp16: bool = Field(False, description="store IR weights as fp16 (storage only)")


class TrialBenchmark(BenchmarkOptions):
    """How a trial's model is measured, and where (``target``: :mod:`pruneflow.bench_targets`)."""

    target: Id | None = Field(
        None, description="the deployment's benchmark target that measures the trial: one of [pruneflow] devices "
        "(its worker takes queue bench_<target>); empty: the legacy worker's target for MYRIAD (bench_ncs2), else "
        "the deployment's benchmark queue. A trial run in-process (`pruneflow trial`) measures where it runs")


class EarlyStopping(_Strict):
    rule: Literal["median", "none"] = Field(
        "median", description="median: stop a fine-tuning trial whose validation Top-1 falls below the median of "
        "the study's earlier trials at the same epoch")
    n_startup_trials: int = Field(3, ge=1, description="finished fine-tuned trials of the study before the rule applies")
    n_warmup_steps: int = Field(1, ge=0, description="epochs before the rule applies")


class SweepLink(_Strict):
    """Set on trials a sweep asked for: which search trial this is, and how to stop it early."""

    optuna_trial_number: int = Field(..., ge=0, description="number of the trial in the Optuna study")
    stage: int = Field(0, ge=0, description="0: a rapid screen's trial; N: promoted by the sweep's promotion stage N")
    parent: Id | None = Field(None, description="the trial this one was promoted from")
    keep_at_chance: bool = Field(
        False, description="a screen trial of a sweep with promotion stages: a recalibrated Top-1 at chance does not "
        "abandon it, because fine-tuning recovers such configurations (benchmarks/RESULTS.md, recovery_prediction)")
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    predicted_latency_ms: float | None = Field(None, ge=0, description="the latency the sweep's latency model "
                                               "predicted before the trial ran (recorded beside the measured one)")


class TrialSpec(_Strict):
    name: Id = Field("trial", description="label of the trial in the results table")
    trial_id: Id | None = Field(None, description="stable id of the trial; generated when missing. Reusing an id "
                                "re-records that trial")
    study: Id | None = Field(None, description="group of trials (a sweep) this trial belongs to")
    model: ModelSpec = Field(default_factory=ModelSpec)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    baseline: BaselineSpec = Field(default_factory=BaselineSpec)
    pruning: PruningSpec = Field(default_factory=PruningSpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    benchmark: TrialBenchmark = Field(default_factory=TrialBenchmark)
    sweep: SweepLink | None = Field(None, description="set on the trials a sweep asks for")
    seed: int = Field(0, ge=0, description="random seed of pruning and fine-tuning")
    artifacts: str = Field("out/trials", description="artifact root folder: each trial gets a folder under it")
    db: str = Field("sqlite:///out/pruneflow.db", description="SQLAlchemy URL of the results DB")

    @field_validator("db")
    @classmethod
    def _db(cls, v: str) -> str:
        from sqlalchemy.engine import make_url

        try:
            make_url(v)
        except Exception as exc:  # sqlalchemy raises ArgumentError with a vague text
            raise ValueError(f"not a SQLAlchemy URL ({exc}); e.g. sqlite:///out/pruneflow.db") from exc
        return v

    def with_id(self) -> TrialSpec:
        """A copy with a trial id (generated once; stages of one trial share it)."""
        if self.trial_id:
            return self
        return self.model_copy(update={"trial_id": f"{self.name}-{uuid.uuid4().hex[:8]}"})

    def trial_dir(self) -> Path:
        if not self.trial_id:
            raise SpecError("trial_id: not set; call with_id() first")
        return Path(self.artifacts) / self.trial_id


def error_message(err: dict) -> str:
    """pydantic's message for one error, with the id rule in words instead of its regular expression."""
    if err.get("type") == "string_pattern_mismatch" and (err.get("ctx") or {}).get("pattern") == ID_PATTERN:
        return f"must be {ID_RULE} (got {err.get('input')!r})"
    return err["msg"]


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p not in ("function-after", "function-before"))
        msg = error_message(err)
        if not loc and msg.startswith("Value error, "):  # a model-level check: its message names the field
            lines.append(f"{prefix}{msg.removeprefix('Value error, ')}")
            continue
        field = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "spec"
        lines.append(f"{field}: {msg}")
    return "invalid trial spec:\n  " + "\n  ".join(lines)


def parse_spec(data: dict[str, Any]) -> TrialSpec:
    """Validate a dict into a TrialSpec, raising SpecError with every bad field named."""
    if not isinstance(data, dict):
        raise SpecError(f"spec: expected a mapping, got {type(data).__name__}")
    try:
        return TrialSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc)) from None


def load_spec(path: str | Path) -> TrialSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    return parse_spec(data)
