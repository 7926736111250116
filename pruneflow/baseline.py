"""Train and save a baseline: the dense, trained model that trials prune."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pruneflow.checkpoint import model_ref, save_checkpoint
from pruneflow.data import DatasetSpec, load_dataset_cached
from pruneflow.models import build_model
from pruneflow.prune import count_params_and_macs
from pruneflow.train import Progress, TrainOptions, evaluate, train


def train_baseline(
    model: str,
    dataset: DatasetSpec,
    epochs: int,
    out_dir: str | Path,
    model_kwargs: dict | None = None,
    lr: float = 0.05,
    batch_size: int = 64,
    optimizer: str = "sgd",
    seed: int = 0,
    progress: Progress | None = None,
) -> dict:
    """Train `model` on `dataset` and write baseline.pt and baseline.json into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    data = load_dataset_cached(dataset)
    ref = model_ref(model, data.in_channels, data.num_classes, model_kwargs)
    net = build_model(model, data.in_channels, data.num_classes, **(model_kwargs or {}))
    t0 = time.perf_counter()
    history, _ = train(net, data.train, data.val,
                       TrainOptions(epochs=epochs, optimizer=optimizer, lr=lr, batch_size=batch_size, seed=seed,
                                    **dataset.train_options()),
                       progress=progress)
    val_top1, val_loss = evaluate(net, *data.val)
    test_top1, test_loss = evaluate(net, *data.test)
    params, macs = count_params_and_macs(net, data.input_shape)
    metrics = {
        "model": ref,
        "dataset": dataset.model_dump(),
        "input_shape": list(data.input_shape),
        "epochs": epochs,
        "val_top1": val_top1,
        "val_loss": val_loss,
        "test_top1": test_top1,
        "test_loss": test_loss,
        "params": params,
        "macs": macs,
        "train_seconds": time.perf_counter() - t0,
        "history": history,
        "checkpoint": str(out / "baseline.pt"),
    }
    save_checkpoint(out / "baseline.pt", net, ref, list(data.input_shape),
                    meta={k: v for k, v in metrics.items() if k != "history"})
    (out / "baseline.json").write_text(json.dumps(metrics, indent=2))
    return metrics
