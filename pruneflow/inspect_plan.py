"""What a pruning plan does to a model, layer by layer, without any training."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from pruneflow.prune import GroupRequest, make_plan, prunable_layers, thin


def _layer_counts(model: nn.Module, input_shape) -> dict[str, tuple[int, int]]:
    model.eval()
    _macs, _params, layer_macs, layer_params = tp.utils.count_ops_and_params(
        model, torch.zeros(*input_shape), layer_wise=True)
    names = {m: n for n, m in model.named_modules()}
    return {names[m]: (int(layer_params.get(m) or 0), int(layer_macs.get(m) or 0)) for m in names}


def inspect_plan(model: nn.Module, input_shape, groups: list[GroupRequest], round_to: int | None = None,
                 ignored: list[str] | None = None, seed: int = 0) -> dict:
    """Per prunable layer: channels, parameters and MACs before and after thinning."""
    plan = make_plan(model, input_shape, groups, round_to, ignored, calib=None, seed=seed)
    thinned, _ = thin(model, plan)
    before = _layer_counts(model, input_shape)
    after = _layer_counts(thinned, input_shape)
    mods_before = dict(model.named_modules())
    mods_after = dict(thinned.named_modules())
    by_layer = {e["layer"]: e for e in plan["layers"]}
    coupled_to = {c: e["layer"] for e in plan["layers"] for c in e["coupled"]}
    rows = []
    for name in prunable_layers(model, input_shape) + [plan["classifier"]]:
        mb, ma = mods_before[name], mods_after[name]
        out_b = mb.out_channels if isinstance(mb, nn.Conv2d) else mb.out_features
        out_a = ma.out_channels if isinstance(ma, nn.Conv2d) else ma.out_features
        in_b = mb.in_channels if isinstance(mb, nn.Conv2d) else mb.in_features
        in_a = ma.in_channels if isinstance(ma, nn.Conv2d) else ma.in_features
        entry = by_layer.get(name)
        rows.append({
            "layer": name,
            "group": entry["group"] if entry else None,
            "target_sparsity": entry["target_sparsity"] if entry else None,
            "coupled_to": coupled_to.get(name),
            "in_before": in_b, "in_after": in_a,
            "out_before": out_b, "out_after": out_a,
            "params_before": before[name][0], "params_after": after[name][0],
            "macs_before": before[name][1], "macs_after": after[name][1],
        })
    total_b = tp.utils.count_ops_and_params(model, torch.zeros(*input_shape))
    total_a = tp.utils.count_ops_and_params(thinned, torch.zeros(*input_shape))
    return {
        "layers": rows,
        "groups": plan["groups"],
        "total": {"macs_before": int(total_b[0]), "params_before": int(total_b[1]),
                  "macs_after": int(total_a[0]), "params_after": int(total_a[1])},
    }
