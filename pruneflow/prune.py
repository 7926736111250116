"""The pruning plan: which filters of which layers go, and a masked model that computes what the
thinned model will.

Layers are chosen by glob patterns over module names; filters are ranked per layer by the chosen
criterion and floor(n * sparsity) of a layer's n filters are removed, as Intel Distiller did.
Torch-Pruning's dependency graph finds the coupled layers (residual additions, concatenations,
depthwise and grouped convolutions, squeeze-and-excitation gates); a coupled set is pruned once.

The mask zeroes every parameter slice that removal will delete — in the pruned layer, its
BatchNorm and every consumer's input slice — so a masked channel contributes exactly nothing,
which is what removal does.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from pruneflow.distiller import filters_to_remove

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


class PlanError(ValueError):
    """A pruning request that cannot be planned; the message says which group or layer and why."""


@dataclass(frozen=True)
class GroupRequest:
    name: str
    patterns: list[str]
    sparsity: float
    criterion: str


def build_graph(model: nn.Module, input_shape: list[int] | tuple[int, ...]) -> tp.DependencyGraph:
    example = torch.zeros(*input_shape)
    was_training = model.training
    model.eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    model.train(was_training)
    return graph


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _forward_order(model: nn.Module, input_shape) -> list[str]:
    """Conv/Linear module names in the order the forward pass calls them."""
    order: list[str] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(lambda _m, _i, _o, n=name: order.append(n)))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(*input_shape))
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    seen: list[str] = []
    for n in order:
        if n not in seen:
            seen.append(n)
    return seen


def prunable_layers(model: nn.Module, input_shape) -> list[str]:
    """Layers whose filters can be removed: convolutions and linear layers in forward order,
    except depthwise convolutions (their channels follow their producer) and the classifier
    (the last layer called, whose outputs are the classes)."""
    order = _forward_order(model, input_shape)
    modules = dict(model.named_modules())
    return [n for n in order[:-1] if not _is_depthwise(modules[n])]


def classifier_layer(model: nn.Module, input_shape) -> str:
    return _forward_order(model, input_shape)[-1]


def resolve_groups(
    model: nn.Module, input_shape, groups: list[GroupRequest], ignored: list[str]
) -> list[tuple[GroupRequest, str]]:
    """Match each group's globs against the prunable layers; every glob must match something."""
    available = prunable_layers(model, input_shape)
    all_names = [n for n, _ in model.named_modules() if n]
    ignored_names: set[str] = set()
    for pat in ignored:
        hits = fnmatch.filter(all_names, pat)
        if not hits:
            raise PlanError(f"pruning.ignored_layers: pattern {pat!r} matches no module; modules: {', '.join(all_names)}")
        ignored_names.update(hits)
    owner: dict[str, str] = {}
    targets: list[tuple[GroupRequest, str]] = []
    for g in groups:
        for pat in g.patterns:
            hits = fnmatch.filter(available, pat)
            if not hits:
                raise PlanError(
                    f"pruning.groups[{g.name}]: pattern {pat!r} matches no prunable layer; "
                    f"prunable layers: {', '.join(available)}"
                )
            for layer in hits:
                if layer in ignored_names:
                    continue
                if layer in owner and owner[layer] != g.name:
                    raise PlanError(f"layer {layer} is matched by groups {owner[layer]!r} and {g.name!r}; a layer belongs to one group")
                if layer not in owner:
                    owner[layer] = g.name
                    targets.append((g, layer))
    return targets


def _out_fn(graph: tp.DependencyGraph, module: nn.Module):
    return graph.get_pruner_of_module(module).prune_out_channels


def _out_channels(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def _channel_groups(graph: tp.DependencyGraph, group) -> int:
    """Grouped (non-depthwise) convolutions in a coupled set force the same filters to go in every group."""
    g = 1
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.Conv2d) and m.groups > 1 and not _is_depthwise(m):
            g = max(g, m.groups)
    return g


def _importance(graph, group, n: int, criterion: str, seed: int, layer: str) -> torch.Tensor:
    """Per-filter score of the root layer (lower goes first), summed over the coupled layers."""
    if criterion == "random":
        gen = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, layer)))
        return torch.rand(n, generator=gen)
    score = torch.zeros(n, dtype=torch.float64)
    found = False
    for item in group.items:
        dep, idxs = item.dep, item.idxs
        m = dep.target.module
        if not graph.is_out_channel_pruning_fn(dep.handler):
            continue
        root = torch.as_tensor(item.root_idxs, dtype=torch.long)
        local = torch.as_tensor(idxs, dtype=torch.long)
        if criterion == "bn-scale":
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                score.index_add_(0, root, m.weight.detach().abs()[local].double())
                found = True
            continue
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or _is_depthwise(m):
            continue
        w = m.weight.detach()[local].flatten(1).double()
        if criterion == "l1":
            s = w.abs().sum(1)
        elif criterion == "l2":
            s = w.pow(2).sum(1).sqrt()
        elif criterion == "taylor":
            if m.weight.grad is None:
                raise PlanError(f"taylor criterion: no gradient for {layer}; a calibration batch is required")
            s = (w * m.weight.grad.detach()[local].flatten(1).double()).sum(1).abs()
        else:
            raise PlanError(f"pruning.criterion: unknown {criterion!r}")
        score.index_add_(0, root, s)
        found = True
    if not found:
        raise PlanError(f"criterion {criterion!r} cannot rank {layer}: no BatchNorm follows it" if criterion == "bn-scale"
                        else f"criterion {criterion!r} cannot rank {layer}")
    return score


def _n_remove(n: int, sparsity: float, round_to: int | None, ch_groups: int) -> int:
    k = filters_to_remove(n, sparsity)
    if round_to and round_to > 1 and k:
        kept = n - k
        kept = min(n, math.ceil(kept / round_to) * round_to)  # never remove more than asked
        k = n - kept
    if ch_groups > 1:
        k -= k % ch_groups
    return max(0, min(k, n - ch_groups))


def _taylor_gradients(model: nn.Module, calib: tuple[torch.Tensor, torch.Tensor]) -> None:
    model.zero_grad(set_to_none=True)
    model.eval()
    x, y = calib
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()


def make_plan(
    model: nn.Module,
    input_shape,
    groups: list[GroupRequest],
    round_to: int | None = None,
    ignored: list[str] | None = None,
    calib: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
) -> dict:
    """Decide which filters go. Returns a JSON-able plan; the model is not changed."""
    targets = resolve_groups(model, input_shape, groups, ignored or [])
    classifier = classifier_layer(model, input_shape)
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    graph = build_graph(model, input_shape)
    if any(g.criterion == "taylor" for g, _ in targets):
        if calib is None:
            raise PlanError("taylor criterion needs a calibration batch")
        _taylor_gradients(model, calib)

    layers: list[dict] = []
    coupled_owner: dict[str, dict] = {}
    for g, layer in targets:
        if layer in coupled_owner:
            first = coupled_owner[layer]
            if not math.isclose(first["target_sparsity"], g.sparsity):
                raise PlanError(
                    f"{layer} (group {g.name}, sparsity {g.sparsity}) is coupled to {first['layer']} "
                    f"(group {first['group']}, sparsity {first['target_sparsity']}) through a residual "
                    "addition or concatenation: coupled layers lose the same filters, give them one sparsity"
                )
            first["coupled_targets"].append(layer)
            continue
        module = modules[layer]
        n = _out_channels(module)
        full = graph.get_pruning_group(module, _out_fn(graph, module), list(range(n)))
        coupled = sorted(
            {names[d.target.module] for d, _ in full
             if graph.is_out_channel_pruning_fn(d.handler) and isinstance(d.target.module, (nn.Conv2d, nn.Linear))}
            - {layer}
        )
        if classifier in coupled:
            raise PlanError(f"{layer} is coupled to the classifier {classifier}: its filters cannot be removed")
        for d, _ in full:
            if isinstance(d.target.module, _NORM_TYPES):
                raise PlanError(f"{layer} feeds a {type(d.target.module).__name__}, whose statistics change when "
                                "channels are removed; pruning it would not compute the masked function")
        ch_groups = _channel_groups(graph, full)
        if n % ch_groups:
            raise PlanError(f"{layer}: {n} filters cannot be split over {ch_groups} convolution groups")
        k = _n_remove(n, g.sparsity, round_to, ch_groups)
        imp = _importance(graph, full, n, g.criterion, seed, layer)
        if ch_groups > 1:
            per = n // ch_groups
            local = torch.argsort(imp.view(ch_groups, per).mean(0), stable=True)[: k // ch_groups]
            removed = sorted(int(o) + gi * per for gi in range(ch_groups) for o in local)
        else:
            removed = sorted(int(i) for i in torch.argsort(imp, stable=True)[:k])
        entry = {
            "layer": layer,
            "group": g.name,
            "criterion": g.criterion,
            "channels": n,
            "target_sparsity": g.sparsity,
            "removed": removed,
            "kept": n - len(removed),
            "achieved_sparsity": len(removed) / n if n else 0.0,
            "coupled": coupled,
            "coupled_targets": [],
            "channel_groups": ch_groups,
        }
        layers.append(entry)
        for c in coupled:
            coupled_owner[c] = entry
        coupled_owner[layer] = entry
    if calib is not None:
        model.zero_grad(set_to_none=True)
    return {
        "layers": layers,
        "groups": summarize_groups(groups, layers),
        "classifier": classifier,
        "round_to": round_to,
        "ignored_layers": list(ignored or []),
        "input_shape": list(input_shape),
    }


def summarize_groups(groups: list[GroupRequest], layers: list[dict]) -> list[dict]:
    out = []
    for g in groups:
        own = [entry for entry in layers if entry["group"] == g.name]
        channels = sum(e["channels"] for e in own)
        removed = sum(len(e["removed"]) for e in own)
        out.append({
            "name": g.name,
            "target_sparsity": g.sparsity,
            "criterion": g.criterion,
            "layers": [e["layer"] for e in own] + [t for e in own for t in e["coupled_targets"]],
            "channels": channels,
            "removed": removed,
            "achieved_sparsity": removed / channels if channels else 0.0,
        })
    return out


def _zero_slice(graph: tp.DependencyGraph, dep, idxs: list[int]) -> None:
    m = dep.target.module
    fn = dep.handler
    out = graph.is_out_channel_pruning_fn(fn)
    ix = torch.as_tensor(idxs, dtype=torch.long)
    with torch.no_grad():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.affine:
                m.weight[ix] = 0
                m.bias[ix] = 0
            else:
                raise PlanError("a BatchNorm without affine parameters cannot be masked exactly")
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            if out or _is_depthwise(m):
                m.weight[ix] = 0
                if m.bias is not None:
                    m.bias[ix] = 0
            elif isinstance(m, nn.Conv2d) and m.groups > 1:
                per_in = m.in_channels // m.groups
                per_out = m.out_channels // m.groups
                for c in idxs:
                    gi, local = divmod(c, per_in)
                    m.weight[gi * per_out:(gi + 1) * per_out, local] = 0
            else:
                m.weight[:, ix] = 0
        elif isinstance(m, nn.Parameter):
            m.data.index_fill_(-1, ix, 0)
        elif isinstance(m, nn.PReLU) or not list(m.parameters(recurse=False)):
            pass  # PReLU(0) == 0; graph ops (add, concat, flatten) carry no weights
        else:
            raise PlanError(f"cannot mask a {type(m).__name__} exactly")


def _groups_of_plan(graph: tp.DependencyGraph, model: nn.Module, plan: dict):
    modules = dict(model.named_modules())
    for entry in plan["layers"]:
        if entry["removed"]:
            module = modules[entry["layer"]]
            yield entry, graph.get_pruning_group(module, _out_fn(graph, module), list(entry["removed"]))


def masked_copy(model: nn.Module, plan: dict) -> nn.Module:
    """A copy of the model with every slice that thinning will remove set to zero."""
    masked = copy.deepcopy(model)
    graph = build_graph(masked, plan["input_shape"])
    for _entry, group in _groups_of_plan(graph, masked, plan):
        for dep, idxs in group:
            _zero_slice(graph, dep, idxs)
    return masked.eval()


def thin(model: nn.Module, plan: dict) -> tuple[nn.Module, list]:
    """A physically smaller copy: the planned filters removed with Torch-Pruning.

    Returns the thinned model and the pruning history that rebuilds its shape."""
    thinned = copy.deepcopy(model)
    graph = build_graph(thinned, plan["input_shape"])
    for entry, group in _groups_of_plan(graph, thinned, plan):
        if not graph.check_pruning_group(group):
            raise PlanError(f"{entry['layer']}: removing {len(entry['removed'])} filters would empty a coupled layer")
        group.prune()
    return thinned.eval(), [list(h) for h in graph.pruning_history()]


def count_params_and_macs(model: nn.Module, input_shape) -> tuple[int, int]:
    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(*input_shape))
    model.train(was_training)
    return int(params), int(macs)


@torch.no_grad()
def max_output_difference(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    a.eval()
    b.eval()
    return float((a(x) - b(x)).abs().max())


def coupled_sets(model: nn.Module, input_shape) -> list[list[str]]:
    """The prunable layers grouped by coupling: layers in one set must lose the same filters."""
    layers = prunable_layers(model, input_shape)
    modules = dict(model.named_modules())
    graph = build_graph(model, input_shape)
    seen: set[str] = set()
    sets = []
    for layer in layers:
        if layer in seen:
            continue
        m = modules[layer]
        full = graph.get_pruning_group(m, _out_fn(graph, m), list(range(_out_channels(m))))
        members = [n for n in layers
                   if any(d.target.module is modules[n] and graph.is_out_channel_pruning_fn(d.handler) for d, _ in full)]
        members = members or [layer]
        seen.update(members)
        sets.append(members)
    return sets
