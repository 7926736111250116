"""Which shape every convolution and linear layer takes for each sparsity a sweep's space can give.

The torch half of the latency model (:mod:`pruneflow.latency_model`): for each group of the space and each
point of its grid, the model is pruned with that group alone and thinned (real Torch-Pruning, so residual
couplings and rounding are the pruner's), and every Conv2d and Linear layer's input and output channel
counts are read with forward hooks. A layer's output channels follow the group it belongs to; its input
channels follow the group of the layer that feeds it. The map says, per layer, its dense shape and which
group changes which side at which sparsity; :func:`pruneflow.latency_model.layer_shapes` composes a
configuration from it without torch. Weights do not matter for shapes, so the model is freshly built.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pruneflow.prune import GroupRequest, PlanError, make_plan, thin

__all__ = ["channel_map", "layer_signatures"]


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


@torch.no_grad()
def layer_signatures(model: nn.Module, input_shape: list[int]) -> dict[str, dict]:
    """Per Conv2d and Linear layer (by name, in forward order): what its latency depends on."""
    sigs: dict[str, dict] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if isinstance(m.padding, str):
                raise PlanError(f"latency table: {name} gives its padding as {m.padding!r}; give it in pixels")

            def conv_hook(mod, inp, _out, name=name):
                _, c, h, w = inp[0].shape
                sigs[name] = {"kind": "conv", "in": int(c), "out": mod.out_channels, "h": int(h), "w": int(w),
                              "k": _pair(mod.kernel_size), "stride": _pair(mod.stride), "pad": _pair(mod.padding),
                              "dilation": _pair(mod.dilation), "groups": mod.groups,
                              "depthwise": mod.groups > 1 and mod.groups == c == mod.out_channels}
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            def linear_hook(mod, inp, _out, name=name):
                sigs[name] = {"kind": "linear", "in": int(inp[0].shape[-1]), "out": mod.out_features}
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(*input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return sigs


def channel_map(build, input_shape: list[int], groups: list[dict], round_to: int | None = None,
                ignored: list[str] | None = None) -> dict[str, dict]:
    """``build()`` makes a fresh model; ``groups`` are ``{"name", "patterns", "grid"}``. Returns per layer
    ``{"sig": dense signature, "in": {group: {sparsity: channels}}, "out": {group: {sparsity: channels}}}``
    (sparsities as strings of :func:`pruneflow.latency_model.grid_key`); a side changed by no group is
    absent. PlanError when one side of a layer changes with two groups (a concatenation of pruned groups:
    the channel count is then not one group's)."""
    from pruneflow.latency_model import grid_key

    dense = layer_signatures(build(), input_shape)
    layers = {name: {"sig": sig, "in": {}, "out": {}} for name, sig in dense.items()}
    for g in groups:
        for s in g["grid"]:
            if s <= 0:
                continue
            model = build()
            plan = make_plan(model, input_shape, [GroupRequest(g["name"], list(g["patterns"]), float(s), "l1")],
                             round_to, ignored or [])
            thinned, _ = thin(model, plan)
            for name, sig in layer_signatures(thinned, input_shape).items():
                for side in ("in", "out"):
                    if sig[side] != dense[name][side]:
                        layers[name][side].setdefault(g["name"], {})[grid_key(s)] = sig[side]
    for name, layer in layers.items():
        for side in ("in", "out"):
            if len(layer[side]) > 1:
                raise PlanError(f"latency table: the {side}put channels of {name} change with groups "
                                f"{sorted(layer[side])}; a layer's channels must follow one group")
    return layers
