"""The trial spec: one validated schema for everything a pruning trial needs.

Every field is checked before any expensive work starts; pydantic's messages name the field
(e.g. ``pruning.groups.0.sparsity``) and what is allowed. Checks that need the model (globs
that must match a layer) happen in :mod:`pruneflow.prune`, still before training or export.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pruneflow.bench.settings import BenchmarkOptions
from pruneflow.data import DatasetSpec

CRITERIA = ("l1", "l2", "bn-scale", "taylor", "random")
Criterion = Literal["l1", "l2", "bn-scale", "taylor", "random"]
MAX_SPARSITY = 0.95
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@=-]{0,99}$")


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
    checkpoint: str = Field(..., description="path of a baseline checkpoint written by `pruneflow baseline`")


class PruningGroup(_Strict):
    name: str = Field(..., description="group name, e.g. layer3")
    patterns: list[str] = Field(..., min_length=1, description="glob patterns over module names")
    sparsity: float = Field(..., ge=0.0, le=MAX_SPARSITY, description="fraction of filters to remove")
    criterion: Criterion | None = Field(None, description="overrides the trial's criterion for this group")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("must be 1-100 characters of letters, digits, '_', '.', '-', '@', '=' ")
        return v


class PruningSpec(_Strict):
    groups: list[PruningGroup] = Field(default_factory=list)
    criterion: Criterion = "l1"
    round_to: int | None = Field(None, ge=1, le=512, description="keep a multiple of this many channels")
    ignored_layers: list[str] = Field(default_factory=list, description="glob patterns never pruned")
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
    epochs: int = Field(0, ge=0, le=1000, description="0 = rapid trial (no fine-tuning)")
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.01, gt=0, le=10)
    batch_size: int = Field(64, ge=1, le=65536)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, lt=1)
    chance_patience: int = Field(
        1, ge=1, description="abandon the trial if validation Top-1 is still at chance after this many epochs"
    )
    chance_margin: float = Field(
        0.5, ge=0, le=100, description="Top-1 within this many points of 100/n counts as chance"
    )


class ExportSpec(_Strict):
    opset: int = Field(18, ge=13, le=23)
    exporter: Literal["torchscript", "dynamo"] = Field(
        "torchscript", description="torch.onnx exporter: torchscript is ~10x faster to run on small CNNs"
    )
    parity_atol: float = Field(1e-3, gt=0, description="max |ONNX Runtime/OpenVINO - torch| on logits")
    parity_samples: int = Field(8, ge=1, le=1024)
    compress_to_fp16: bool = Field(False, description="store IR weights as fp16 (storage only)")


class EarlyStopping(_Strict):
    rule: Literal["median", "none"] = "median"
    n_startup_trials: int = Field(3, ge=1, description="finished fine-tuned trials of the study before the rule applies")
    n_warmup_steps: int = Field(1, ge=0, description="epochs before the rule applies")


class SweepLink(_Strict):
    """Set on trials a sweep asked for: which search trial this is, and how to stop it early."""

    optuna_trial_number: int = Field(..., ge=0)
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)


class TrialSpec(_Strict):
    name: str = "trial"
    trial_id: str | None = Field(None, description="stable id; generated when missing")
    study: str | None = None
    model: ModelSpec = Field(default_factory=ModelSpec)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    baseline: BaselineSpec | None = None
    pruning: PruningSpec = Field(default_factory=PruningSpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    benchmark: BenchmarkOptions = Field(default_factory=BenchmarkOptions)
    sweep: SweepLink | None = None
    seed: int = Field(0, ge=0)
    artifacts: str = Field("out/trials", description="artifact root: each trial gets a folder under it")
    db: str = Field("sqlite:///out/pruneflow.db", description="results database SQLAlchemy URL")

    @field_validator("name", "trial_id", "study")
    @classmethod
    def _ids(cls, v: str | None) -> str | None:
        if v is not None and not _NAME_RE.match(v):
            raise ValueError("must be 1-100 characters of letters, digits, '_', '.', '-', '@', '=' ")
        return v

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


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p not in ("function-after", "function-before"))
        field = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "spec"
        lines.append(f"{field}: {err['msg']}")
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
