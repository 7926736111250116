"""Checkpoints as state dicts plus what rebuilds the model's shape — never pickled modules.

A checkpoint holds the model's registry reference (name, in/out sizes, kwargs), the input
shape, and Torch-Pruning's pruning history (layer name, out/in, channel indices). Loading
rebuilds the dense model, replays the history to reach the thinned shape, then loads the
weights with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pruneflow.models import build_model

FORMAT = "pruneflow.checkpoint/1"


class CheckpointError(ValueError):
    pass


def model_ref(name: str, in_channels: int, num_classes: int, kwargs: dict[str, Any] | None = None) -> dict:
    return {"name": name, "in_channels": in_channels, "num_classes": num_classes, "kwargs": dict(kwargs or {})}


def build_from_ref(ref: dict) -> torch.nn.Module:
    return build_model(ref["name"], ref["in_channels"], ref["num_classes"], **ref.get("kwargs", {}))


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    ref: dict,
    input_shape: list[int],
    pruning_history: list | None = None,
    meta: dict | None = None,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "model": ref,
        "input_shape": list(input_shape),
        "pruning_history": [[str(n), bool(o), [int(i) for i in idxs]] for n, o, idxs in (pruning_history or [])],
        "meta": meta or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a loadable pruneflow checkpoint ({exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a pruneflow checkpoint (expected format {FORMAT})")
    return payload


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the (possibly thinned) model and load its weights. Returns (model, payload without weights)."""
    payload = read_checkpoint(path)
    model = build_from_ref(payload["model"])
    history = payload["pruning_history"]
    if history:
        from pruneflow.prune import build_graph

        graph = build_graph(model, payload["input_shape"])
        graph.load_pruning_history([(n, o, list(idxs)) for n, o, idxs in history])
    state = payload.pop("state_dict")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the rebuilt model (missing {missing}, unexpected {unexpected})")
    model.eval()
    return model, payload
