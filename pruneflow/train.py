"""Training, fine-tuning and evaluation on in-memory tensors (the data sets here are small)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Progress = Callable[[str], None]


@dataclass
class TrainOptions:
    epochs: int
    optimizer: str = "sgd"
    lr: float = 0.05
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    cosine: bool = True
    #: a fresh seeded sample of this many training images each epoch (None: all of them)
    images_per_epoch: int | None = None
    #: augmentation of training batches (pruneflow.data.Augment): random crop after padding, left-right flip
    crop_padding: int = 0
    hflip: bool = False


def augment_batch(x: torch.Tensor, crop_padding: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """A randomly cropped (after zero padding, i.e. padding with the normalised mean) and flipped copy."""
    if crop_padding:
        p = crop_padding
        n, _, h, w = x.shape
        padded = nn.functional.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
        x = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    if hflip:
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> tuple[float, float]:
    """(Top-1 in percent, mean cross-entropy loss)."""
    model.eval()
    correct = 0
    loss = 0.0
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        yb = y[i:i + batch_size]
        loss += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    n = max(1, len(x))
    return 100.0 * correct / n, loss / n


def chance_top1(num_classes: int) -> float:
    return 100.0 / num_classes


def train(
    model: nn.Module,
    train_xy: tuple[torch.Tensor, torch.Tensor],
    val_xy: tuple[torch.Tensor, torch.Tensor],
    opts: TrainOptions,
    on_epoch: Callable[[dict], str | None] | None = None,
    progress: Progress | None = None,
) -> tuple[list[dict], str | None]:
    """Train for opts.epochs; after each epoch evaluate on val and call on_epoch(metrics).

    on_epoch returns a reason string to stop early (the trial is then abandoned), or None.
    Returns (per-epoch metrics, stop reason or None)."""
    gen = torch.Generator().manual_seed(opts.seed)
    torch.manual_seed(opts.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if opts.optimizer == "adam":
        optim = torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)
    else:
        optim = torch.optim.SGD(params, lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay, nesterov=opts.momentum > 0)
    x, y = train_xy
    per_epoch = min(len(x), opts.images_per_epoch or len(x))
    steps_per_epoch = max(1, math.ceil(per_epoch / opts.batch_size))
    total = steps_per_epoch * max(1, opts.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)) if opts.cosine else 1.0
    )
    history: list[dict] = []
    for epoch in range(1, opts.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(x), generator=gen)[:per_epoch]
        seen = correct = 0
        loss_sum = 0.0
        for i in range(0, per_epoch, opts.batch_size):
            idx = perm[i:i + opts.batch_size]
            xb, yb = x[idx], y[idx]
            if opts.crop_padding or opts.hflip:
                xb = augment_batch(xb, opts.crop_padding, opts.hflip, gen)
            out = model(xb)
            loss = nn.functional.cross_entropy(out, yb)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            seen += len(idx)
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((out.argmax(1) == yb).sum())
        val_top1, val_loss = evaluate(model, *val_xy)
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_top1": 100.0 * correct / seen,
            "images": seen,
            "val_loss": val_loss,
            "val_top1": val_top1,
            "lr": optim.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
        }
        history.append(metrics)
        if progress:
            progress(f"epoch {epoch}/{opts.epochs}: train loss {metrics['train_loss']:.3f}, "
                     f"val Top-1 {val_top1:.2f}% ({metrics['seconds']:.1f} s)")
        reason = on_epoch(metrics) if on_epoch else None
        if reason:
            return history, reason
    return history, None


def chance_rule(num_classes: int, patience: int, margin: float) -> Callable[[dict], str | None]:
    """Stop a network whose validation Top-1 is still at chance (100/n) after `patience` epochs:
    the research pipeline never saw such a network recover."""
    chance = chance_top1(num_classes)

    def rule(metrics: dict) -> str | None:
        if metrics["epoch"] >= patience and metrics["val_top1"] <= chance + margin:
            return (f"validation Top-1 {metrics['val_top1']:.2f}% is at chance ({chance:.2f}% for "
                    f"{num_classes} classes) after {metrics['epoch']} epoch(s)")
        return None

    return rule
