"""The pruning plan: which filters of which layers go, and a masked model that computes what the
thinned model will.

Layers are chosen by glob patterns over module names; filters are ranked per layer by the chosen
criterion and, of a layer's n filters, as many are removed as Intel Distiller would remove:
``floor(sparsity * n)`` computed in floating point (:func:`pruneflow.distiller.filters_to_remove`).
Torch-Pruning's dependency graph finds the coupled layers (residual additions, concatenations,
depthwise and grouped convolutions, squeeze-and-excitation gates); a coupled set is pruned once.

``ignored_layers`` keep every filter. A layer cannot keep its filters while a layer it is coupled to
loses some, so ignoring a layer that is coupled to a targeted one is refused (:class:`PlanError`
naming both) rather than silently leaving the whole coupled set unpruned.

Channel shuffles (:class:`pruneflow.models.patterns.ChannelShuffle`, or a module type given to
:func:`register_channel_boundary`) are channel boundaries: Torch-Pruning cannot map channel indices
through them, so filters whose channels reach a shuffle are not prunable (they are left out of
:func:`prunable_layers`); the convolutions inside a ShuffleNet unit are.

The mask zeroes every parameter slice that removal will delete — in the pruned layer, its
BatchNorm and every consumer's input slice — so a masked channel contributes exactly nothing,
which is what removal does.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from pruneflow.distiller import filters_to_remove
from pruneflow.models.patterns import ChannelShuffle

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


class PlanError(ValueError):
    """A pruning request that cannot be planned; the message says which group or layer and why."""


class ThinningError(RuntimeError):
    """A thinned model that does not compute the masked model's function."""


class TraceError(PlanError):
    """Torch-Pruning could not build the dependency graph of a model; the message names the model, the
    operation and what to do."""


@dataclass(frozen=True)
class GroupRequest:
    name: str
    patterns: list[str]
    sparsity: float
    criterion: str


# --------------------------------------------------------------------------- channel boundaries

_CHANNEL_BOUNDARY_TYPES: list[type[nn.Module]] = [ChannelShuffle]


def register_channel_boundary(module_type: type[nn.Module]) -> type[nn.Module]:
    """Mark a module type (e.g. your own channel-shuffle module) as a channel boundary: the dependency
    graph does not look inside it, and filters whose channels reach it are not prunable. Usable as a
    class decorator."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_channel_boundary needs an nn.Module subclass, got {module_type!r}")
    if module_type not in _CHANNEL_BOUNDARY_TYPES:
        _CHANNEL_BOUNDARY_TYPES.append(module_type)
    return module_type


def _is_boundary(m) -> bool:
    return isinstance(m, tuple(_CHANNEL_BOUNDARY_TYPES))


class _BoundaryPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning handler for a channel boundary: its input and output channels are not coupled
    (so a pruning group stops at it), its channel counts are those seen while tracing, and it is never
    pruned (plans leave every group that reaches a boundary alone)."""

    def __init__(self, channels: dict[nn.Module, int]):
        super().__init__()
        self.channels = channels

    def prune_out_channels(self, layer: nn.Module, idxs):
        raise PlanError(f"cannot remove channels across the channel boundary {type(layer).__name__}")

    def prune_in_channels(self, layer: nn.Module, idxs):
        raise PlanError(f"cannot remove channels across the channel boundary {type(layer).__name__}")

    def get_out_channels(self, layer: nn.Module):
        return self.channels.get(layer)

    def get_in_channels(self, layer: nn.Module):
        return self.channels.get(layer)


# --------------------------------------------------------------------------- the dependency graph


def build_graph(model: nn.Module, input_shape: list[int] | tuple[int, ...]) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of the model, traced on zeros of ``input_shape``.

    Channel boundaries (:func:`register_channel_boundary`) are registered as customized layers. When
    the graph cannot be built, raises :class:`TraceError` naming the model class, the operation that
    failed and what to do (a channel shuffle written with view/transpose is the usual cause)."""
    was_training = model.training
    model.eval()
    try:
        return _build_graph(model, input_shape)
    except Exception as exc:
        raise _trace_error(model, input_shape, exc) from exc
    finally:
        model.train(was_training)


def _build_graph(model: nn.Module, input_shape, anomaly: bool = False) -> tp.DependencyGraph:
    channels: dict[nn.Module, int] = {}
    boundaries = [m for m in model.modules() if _is_boundary(m)]
    hooks = [m.register_forward_hook(lambda mod, inp, _out: channels.__setitem__(mod, int(inp[0].shape[1])))
             for m in boundaries]
    pruner = _BoundaryPruner(channels)
    try:
        graph = tp.DependencyGraph()
        kwargs = {"example_inputs": torch.zeros(*input_shape), "verbose": False,
                  "customized_pruners": {t: pruner for t in _CHANNEL_BOUNDARY_TYPES}}
        if not anomaly:
            return graph.build_dependency(model, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autograd.detect_anomaly(check_nan=False):  # records where each op was called
                return graph.build_dependency(model, **kwargs)
    finally:
        for h in hooks:
            h.remove()


_TP_DIR = os.path.dirname(tp.__file__)
_TP_STEPS = {
    "update_reshape_index_mapping": "mapping channel indices through a view/reshape",
    "update_flatten_index_mapping": "mapping channel indices through a flatten",
    "update_concat_index_mapping": "mapping channel indices through a concatenation",
    "update_split_index_mapping": "mapping channel indices through a split/chunk",
    "update_unbind_index_mapping": "mapping channel indices through an unbind",
    "update_expand_index_mapping": "mapping channel indices through an expand",
    "update_slice_index_mapping": "mapping channel indices through a slice",
    "init_shape_information": "inferring channel counts",
}
_SHUFFLE_OPS = ("TransposeBackward", "PermuteBackward")


def _tp_frames(exc: BaseException) -> list:
    frames, tb = [], exc.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_TP_DIR):
            frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _forward_error(model: nn.Module, input_shape) -> Exception | None:
    try:
        with torch.no_grad():
            model(torch.zeros(*input_shape))
    except Exception as exc:
        return exc
    return None


def _failing_node(frames: list):
    """The Torch-Pruning node being processed in the innermost frame that has one, and the graph."""
    node = graph = None
    for frame in reversed(frames):
        for key, value in frame.f_locals.items():
            if graph is None and isinstance(value, tp.DependencyGraph):
                graph = value
            if node is None and isinstance(value, tp.dependency.Node) and key in (
                    "reshape_node", "cat_node", "split_node", "unbind_node", "fc_node", "node", "slice_node"):
                node = value
    return node, graph


def _near_modules(node, names: dict[int, str], attr: str, limit: int = 50) -> list[str]:
    """The nearest named modules upstream (attr='inputs') or downstream (attr='outputs') of a node."""
    seen, frontier, found = set(), [node], []
    while frontier and len(seen) < limit and not found:
        nxt = []
        for n in frontier:
            for m in getattr(n, attr):
                if id(m) in seen:
                    continue
                seen.add(id(m))
                if id(m.module) in names:
                    found.append(names[id(m.module)])
                else:
                    nxt.append(m)
        frontier = nxt
    return sorted(set(found))


def _op_source(node) -> str | None:
    """Where the failing operation was called (from autograd's anomaly-mode metadata), if recorded."""
    meta = getattr(node.grad_fn, "metadata", None) if node is not None and node.grad_fn is not None else None
    lines = (meta or {}).get("traceback_") if meta is not None else None
    if not lines:
        return None
    frames = [ln for ln in "".join(lines).splitlines() if ln.strip()]
    # the innermost user frame (File "...", line N, in f) and the code line after it
    for i in range(len(frames) - 1, -1, -1):
        line = frames[i].strip()
        if line.startswith("File ") and "torch/" not in line and "torch_pruning" not in line:
            try:
                path = line.split('"')[1]
                lineno = line.split("line ")[1].split(",")[0]
            except IndexError:
                return line
            code = frames[i + 1].strip() if i + 1 < len(frames) and not frames[i + 1].strip().startswith("File ") else ""
            where = f"{os.path.basename(path)}:{lineno}"
            return f"{where}: `{code}`" if code else where
    return None


def _trace_error(model: nn.Module, input_shape, exc: BaseException) -> PlanError:
    cls = type(model).__name__
    if isinstance(exc, PlanError):
        return exc
    forward = _forward_error(model, input_shape)
    if forward is not None:
        return TraceError(
            f"model {cls} cannot be traced for pruning: its forward pass on an input of shape {list(input_shape)} "
            f"raised {type(forward).__name__}: {forward}")
    frames = _tp_frames(exc)
    step = next((_TP_STEPS[f.f_code.co_name] for f in reversed(frames) if f.f_code.co_name in _TP_STEPS),
                f"in {frames[-1].f_code.co_name}" if frames else "building the graph")
    node, graph = _failing_node(frames)
    # Trace again with autograd's anomaly mode, which records where every operation was called: the same
    # failure then names the line of the model's code.
    try:
        _build_graph(model, input_shape, anomaly=True)
    except Exception as again:  # the expected path
        node2, graph2 = _failing_node(_tp_frames(again))
        if node2 is not None:
            node, graph = node2, graph2
    names = {id(m): n for n, m in model.named_modules() if n}
    op = "an operation"
    where = ""
    if node is not None and node.grad_fn is not None:
        op = f"the operation {node.grad_fn.name()}"
        after = _near_modules(node, names, "inputs")
        before = _near_modules(node, names, "outputs")
        ctx = []
        if after:
            ctx.append(f"after {', '.join(after)}")
        if before:
            ctx.append(f"before {', '.join(before)}")
        src = _op_source(node)
        if src:
            ctx.append(f"at {src}")
        where = f" ({'; '.join(ctx)})" if ctx else ""
    shuffle = graph is not None and any(
        n.grad_fn is not None and n.grad_fn.name().startswith(_SHUFFLE_OPS) for n in graph.module2node.values())
    msg = (f"Torch-Pruning cannot trace model {cls} for pruning: {type(exc).__name__} ({exc}) while {step}, "
           f"at {op}{where}.")
    if shuffle or (node is not None and node.type == tp.ops.OPTYPE.RESHAPE):
        msg += (" The usual cause is a channel shuffle written as view/reshape -> transpose -> view/reshape, whose "
                "channel order Torch-Pruning cannot follow. Write the shuffle as the module "
                "pruneflow.models.patterns.ChannelShuffle, or put it in a module of your own and mark that type "
                "with pruneflow.prune.register_channel_boundary: pruneflow then prunes the convolutions inside "
                "each unit and leaves the shuffled channels alone. (pruning.ignored_layers cannot help here: the "
                "graph is built for the whole model before any layer is chosen.)")
    else:
        msg += (" Wrap the operation in a module and mark that type with pruneflow.prune.register_channel_boundary "
                "to keep pruning away from it, or choose another model.")
    return TraceError(msg)


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


def _layer_status(model: nn.Module, input_shape, graph: tp.DependencyGraph | None = None
                  ) -> tuple[list[str], dict[str, str]]:
    """(prunable layers in forward order, {excluded conv/linear layer: why})."""
    order = _forward_order(model, input_shape)
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    excluded: dict[str, str] = {}
    if order:
        excluded[order[-1]] = "it is the classifier, whose outputs are the classes"
    for n in order[:-1]:
        if _is_depthwise(modules[n]):
            excluded[n] = "a depthwise convolution's channels follow the layer that feeds it"
    if any(_is_boundary(m) for m in model.modules()):
        graph = graph if graph is not None else build_graph(model, input_shape)
        for n in order[:-1]:
            if n in excluded:
                continue
            m = modules[n]
            full = graph.get_pruning_group(m, _out_fn(graph, m), list(range(_out_channels(m))))
            hit = next((d.target.module for d, _ in full if _is_boundary(d.target.module)), None)
            if hit is not None:
                excluded[n] = (f"its channels reach the channel shuffle {names.get(hit, type(hit).__name__)}, "
                               "which channel removal cannot cross")
    return [n for n in order if n not in excluded], excluded


def prunable_layers(model: nn.Module, input_shape, graph: tp.DependencyGraph | None = None) -> list[str]:
    """Layers whose filters can be removed: convolutions and linear layers in forward order,
    except depthwise convolutions (their channels follow their producer), the classifier
    (the last layer called, whose outputs are the classes) and layers whose channels reach a channel
    shuffle (:func:`register_channel_boundary`; in a ShuffleNet unit, the convolutions before the
    concatenation)."""
    return _layer_status(model, input_shape, graph)[0]


def classifier_layer(model: nn.Module, input_shape) -> str:
    return _forward_order(model, input_shape)[-1]


def resolve_groups(
    model: nn.Module, input_shape, groups: list[GroupRequest], ignored: list[str],
    graph: tp.DependencyGraph | None = None,
) -> list[tuple[GroupRequest, str]]:
    """Match each group's globs against the prunable layers; every glob must match something.

    Layers matched by ``ignored`` (globs over module names) are never targets and keep every filter.
    An ignored layer coupled to a targeted one (a residual addition, concatenation or depthwise
    convolution makes them lose the same filters) cannot keep its filters, so that is a
    :class:`PlanError` naming the ignored layer, the target and its group — whatever the sparsity,
    so that a sweep does not fail only on some of its trials. Remove the coupled layers from the
    group's patterns, or the layer from ``ignored_layers``.
    """
    graph = graph if graph is not None else build_graph(model, input_shape)
    available, excluded = _layer_status(model, input_shape, graph)
    all_names = [n for n, _ in model.named_modules() if n]
    ignored_by: dict[str, str] = {}
    for pat in ignored:
        hits = fnmatch.filter(all_names, pat)
        if not hits:
            raise PlanError(f"pruning.ignored_layers: pattern {pat!r} matches no module; modules: {', '.join(all_names)}")
        for h in hits:
            ignored_by.setdefault(h, pat)
    owner: dict[str, str] = {}
    matched_by: dict[str, str] = {}
    targets: list[tuple[GroupRequest, str]] = []
    for g in groups:
        for pat in g.patterns:
            hits = fnmatch.filter(available, pat)
            if not hits:
                why = [f"{n} ({excluded[n]})" for n in fnmatch.filter(list(excluded), pat)]
                if why:
                    raise PlanError(
                        f"pruning.groups[{g.name}]: pattern {pat!r} matches no prunable layer, only layers whose "
                        f"filters cannot be removed: {'; '.join(why)}; prunable layers: {', '.join(available)}"
                    )
                raise PlanError(
                    f"pruning.groups[{g.name}]: pattern {pat!r} matches no prunable layer; "
                    f"prunable layers: {', '.join(available)}"
                )
            for layer in hits:
                if layer in ignored_by:
                    continue
                if layer in owner and owner[layer] != g.name:
                    raise PlanError(f"layer {layer} is matched by groups {owner[layer]!r} and {g.name!r}; a layer belongs to one group")
                if layer not in owner:
                    owner[layer] = g.name
                    matched_by[layer] = pat
                    targets.append((g, layer))
    if ignored_by:
        _check_ignored_coupling(model, graph, targets, ignored_by, matched_by)
    return targets


def _check_ignored_coupling(model, graph, targets, ignored_by: dict[str, str], matched_by: dict[str, str]) -> None:
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    done: set[str] = set()
    for g, layer in targets:
        if layer in done:
            continue
        m = modules[layer]
        full = graph.get_pruning_group(m, _out_fn(graph, m), list(range(_out_channels(m))))
        members = [names[d.target.module] for d, _ in full
                   if graph.is_out_channel_pruning_fn(d.handler) and isinstance(d.target.module, nn.Module)
                   and d.target.module in names and list(d.target.module.parameters(recurse=False))]
        members = list(dict.fromkeys(members))
        done.update(members)
        hit = [n for n in members if n in ignored_by and n != layer]
        if not hit:
            continue
        # name the ignored layers that have filters first (conv/linear), then their norms
        hit.sort(key=lambda n: (not isinstance(modules[n], (nn.Conv2d, nn.Linear)), members.index(n)))
        ign = hit[0]
        position = {n: i for i, n in enumerate(modules)}
        convs = sorted((n for n in members if isinstance(modules[n], (nn.Conv2d, nn.Linear))), key=position.get)
        raise PlanError(
            f"pruning.ignored_layers: {ign} (ignored by pattern {ignored_by[ign]!r}) is coupled to {layer}, which "
            f"group {g.name!r} prunes (pattern {matched_by[layer]!r}): coupled layers lose the same filters "
            f"(a residual addition, concatenation or depthwise convolution joins their channels: "
            f"{', '.join(convs)}), so {ign} cannot keep all its filters while {layer} loses some. Either leave "
            f"these coupled layers out of the patterns of group {g.name!r}, or remove {ign} from "
            f"pruning.ignored_layers (pattern {ignored_by[ign]!r})."
        )


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
    graph = build_graph(model, input_shape)
    targets = resolve_groups(model, input_shape, groups, ignored or [], graph=graph)
    classifier = classifier_layer(model, input_shape)
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
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
            first["coupled_target_groups"][layer] = g.name
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
            op = d.target.grad_fn.name() if d.target.grad_fn is not None else ""
            if op.startswith(_SHUFFLE_OPS) and d.target.module not in names:
                after = _near_modules(d.target, {id(m): n for m, n in names.items() if n}, "inputs")
                raise PlanError(
                    f"{layer}: its channels pass through a {op} (after {', '.join(after) or 'the input'}) in model "
                    f"{type(model).__name__}, and Torch-Pruning cannot map channel indices through a transpose or "
                    "permute (a channel shuffle written as view/reshape -> transpose -> view/reshape, most likely). "
                    "Write the shuffle as the module pruneflow.models.patterns.ChannelShuffle (or mark your own "
                    "shuffle module with pruneflow.prune.register_channel_boundary), or leave this layer out of "
                    "the group's patterns (or list it in pruning.ignored_layers)."
                )
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
            "coupled_targets": [],  # other targeted layers in the coupled set: they lose the same filters
            "coupled_target_groups": {},  # coupled target -> the group that targeted it
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
    """Per group: its layers, their filters (``channels``), how many go and the achieved sparsity.

    A group's layers include those planned through another layer's coupled set (residual additions
    make them lose the same filters): they are counted with the filters they actually lose, and
    ``merged_with`` / ``note`` say which other group's layer decided them."""
    out = []
    for g in groups:
        names: list[str] = []
        channels = removed = 0
        merged: list[str] = []
        notes: list[str] = []
        for e in layers:
            mine = [e["layer"]] if e["group"] == g.name else []
            targeted = e.get("coupled_target_groups") or {}
            mine += [t for t in e["coupled_targets"] if targeted.get(t, e["group"]) == g.name]
            names += mine
            channels += e["channels"] * len(mine)
            removed += len(e["removed"]) * len(mine)
            if mine and e["group"] != g.name:
                if e["group"] not in merged:
                    merged.append(e["group"])
                notes.append(f"{', '.join(mine)} coupled to {e['layer']} of group {e['group']!r}: "
                             f"the same {len(e['removed'])} of {e['channels']} filters removed, "
                             f"ranked by {e['criterion']}")
        summary = {
            "name": g.name,
            "target_sparsity": g.sparsity,
            "criterion": g.criterion,
            "layers": names,
            "channels": channels,
            "removed": removed,
            "achieved_sparsity": removed / channels if channels else 0.0,
        }
        if merged:
            summary["merged_with"] = merged
            summary["note"] = "; ".join(notes)
        out.append(summary)
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
    graph = build_graph(model, input_shape)
    layers = prunable_layers(model, input_shape, graph)
    modules = dict(model.named_modules())
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
