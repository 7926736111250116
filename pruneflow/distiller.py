"""Import Intel Distiller compression schedules (YAML) as pruneflow filter-pruning groups.

Distiller (archived) describes pruning in a YAML "compression schedule"::

    version: 1
    pruners:
      filter_pruner_60:
        class: L1RankedStructureParameterPruner
        group_type: Filters
        desired_sparsity: 0.6
        weights: [module.layer1.0.conv1.weight, module.layer1.1.conv1.weight]
    policies:
      - pruner: {instance_name: filter_pruner_60}
        epochs: [0]

:func:`load_schedule` turns the *filter* pruners that the policies apply into :class:`DistillerGroup`\\ s
(layer names, fraction of filters to remove, ranking criterion). Everything pruneflow cannot reproduce
faithfully is either an error (:class:`ScheduleError`: non-filter structures, element-wise pruners,
activation-statistics ranking, ...) or a warning in :attr:`DistillerSchedule.warnings` (collapsed AGP
schedules, ignored quantizers/regularizers, pruners no policy applies, ...).

Sparsity semantics follow Distiller: a layer with ``n`` filters and sparsity ``s`` loses
``floor(s * n)`` filters computed in floating point, as Distiller does, so 100 filters at 0.29 lose 28
(:func:`filters_to_remove`). pruneflow counts every group's filters this way, imported or not.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "AGP_PRUNER_CLASSES",
    "MAX_SPARSITY",
    "PRUNER_CLASSES",
    "DistillerGroup",
    "DistillerSchedule",
    "ScheduleError",
    "filters_to_remove",
    "load_schedule",
]

#: pruneflow never removes more than this fraction of a layer's filters.
MAX_SPARSITY = 0.95

#: One-shot ranked filter pruners -> pruneflow criterion.
PRUNER_CLASSES: dict[str, str] = {
    "L1RankedStructureParameterPruner": "l1",
    "L2RankedStructureParameterPruner": "l2",
    "RandomRankedFilterPruner": "random",
    "BernoulliFilterPruner": "random",
    "GradientRankedFilterPruner": "taylor",
    # Distiller ranks by mean L1 norm and draws the *level* at random from sparsity_range.
    "RandomLevelStructureParameterPruner": "l1",
}

#: Gradual (AGP) structured pruners -> pruneflow criterion; final_sparsity is applied in one step.
AGP_PRUNER_CLASSES: dict[str, str] = {
    "L1RankedStructureParameterPruner_AGP": "l1",
    "L2RankedStructureParameterPruner_AGP": "l2",
    "RandomRankedFilterPruner_AGP": "random",
    "BernoulliFilterPruner_AGP": "random",
    "GradientRankedFilterPruner_AGP": "taylor",
}

_ACTIVATION_CLASSES = {
    "ActivationAPoZRankedFilterPruner",
    "ActivationMeanRankedFilterPruner",
    "ActivationAPoZRankedFilterPruner_AGP",
    "ActivationMeanRankedFilterPruner_AGP",
}
_ELEMENTWISE_CLASSES = {
    "SparsityLevelParameterPruner",
    "AutomatedGradualPruner",
    "MagnitudeParameterPruner",
    "SensitivityPruner",
    "SplicingPruner",
    "BaiduRNNPruner",
}
_CHANNEL_CLASSES = {"FMReconstructionChannelPruner"}

_FILTER_GROUPS = {"filters", "3d"}  # Distiller treats '3D' exactly like 'Filters'
_OTHER_GROUPS = {"channels", "rows", "cols", "columns", "blocks", "2d", "kernels", "fine", "element"}
_THINNING_EXTENSIONS = {"FilterRemover", "ChannelRemover"}
_POLICY_KINDS = ("pruner", "regularizer", "quantizer", "lr_scheduler", "extension")
_KNOWN_PRUNER_KEYS = {
    "class",
    "group_type",
    "desired_sparsity",
    "weights",
    "reg_regims",
    "initial_sparsity",
    "final_sparsity",
    "sparsity_range",
    "group_dependency",
    "group_size",
    "noise",
    "kwargs",
}

_NON_FILTER_HINT = (
    "pruneflow only supports filter pruning (removing a conv layer's output channels; pruning a layer's "
    "input channels is the same as pruning the filters of the layer that produces them)"
)


class ScheduleError(ValueError):
    """A Distiller schedule cannot be imported."""


@dataclass
class DistillerGroup:
    """Layers pruned together with one sparsity and one ranking criterion."""

    name: str  # pruner instance name, or f"{pruner}@{sparsity}" when a reg_regims mixes sparsities
    layers: list[str]  # module names, e.g. "layer1.0.conv1"
    sparsity: float  # fraction of filters (output channels) to remove from each layer
    criterion: str  # "l1" | "l2" | "random" | "taylor" | "bn-scale"
    pruner_class: str


@dataclass
class DistillerSchedule:
    groups: list[DistillerGroup]
    warnings: list[str] = field(default_factory=list)
    source: str = "<text>"

    def layer_sparsity(self) -> dict[str, float]:
        """``{layer: sparsity}`` over all groups."""
        return {layer: g.sparsity for g in self.groups for layer in g.layers}


def filters_to_remove(n_filters: int, sparsity: float) -> int:
    """How many of ``n_filters`` filters a ``sparsity`` removes, exactly as Distiller counts them.

    Distiller's ``num_structs_to_prune`` (``distiller/norms.py``, with ``group_size`` 1) computes
    ``math.floor(fraction_to_prune * n_elems)`` in the fraction's own arithmetic — binary floating point
    for the floats that schedules, specs and sweeps give — and, when that equals ``n`` although the
    fraction is not 1, removes ``n - group_size`` (here ``n - 1``) instead of every filter.

    So 100 filters at 0.29, 0.57, 0.58 lose 28, 56, 57 (``0.29 * 100 == 28.999999999999996``), not the
    29, 57, 58 of exact decimal arithmetic; 10 filters at 0.3 or 0.7 lose 3 and 7. A float below 1 never
    rounds up to ``n`` (for any ``n`` below 2**53), so the ``n - 1`` rule matters only for number types
    whose product can round up (e.g. a 28-digit :class:`~decimal.Decimal`); a sparsity of exactly 1
    removes every filter. pruneflow's specs cap sparsity at :data:`MAX_SPARSITY`.
    """
    if isinstance(n_filters, bool) or not isinstance(n_filters, numbers.Integral) or n_filters < 0:
        raise ValueError(f"n_filters must be a non-negative int, got {n_filters!r}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real | Decimal):
        raise ValueError(f"sparsity must be a number, got {sparsity!r}")
    finite = sparsity.is_finite() if isinstance(sparsity, Decimal) else math.isfinite(float(sparsity))
    if not finite:
        raise ValueError(f"sparsity must be finite, got {sparsity!r}")
    if not 0 <= sparsity <= 1:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    n = int(n_filters)  # Distiller's n_elems is a Python int (param.size(0))
    k = math.floor(sparsity * n)  # Distiller: rounding_fn(fraction_to_prune * n_elems), rounding_fn=math.floor
    if n and k == n and sparsity != 1:  # Distiller: "We can't allow removing all of the structs in a layer!"
        k = n - 1
    return int(k)


# --------------------------------------------------------------------------------------------------
# YAML loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(
    loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable key: let the default constructor report it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen[key] = True
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_source(path_or_text: str | Path) -> tuple[str, str]:
    if isinstance(path_or_text, str) and "\n" in path_or_text:
        return path_or_text, "<text>"
    path = Path(path_or_text).expanduser()
    if not path.exists():
        raise ScheduleError(f"schedule file {path} does not exist")
    if not path.is_file():
        raise ScheduleError(f"schedule path {path} is not a file")
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as e:
        raise ScheduleError(f"{path}: cannot read the schedule ({e})") from None


# --------------------------------------------------------------------------------------------------
# parsing


class _Parser:
    def __init__(self, doc: dict[str, Any], source: str) -> None:
        self.doc = doc
        self.source = source
        self.warnings: list[str] = []

    def error(self, msg: str) -> ScheduleError:
        return ScheduleError(f"{self.source}: {msg}")

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    # ---- top level

    def parse(self) -> DistillerSchedule:
        doc = self.doc
        version = doc.get("version", 1)
        if version != 1:
            self.warn(f"schedule version {version!r} is not 1; parsed as version 1")

        pruners = doc.get("pruners")
        if pruners is None:
            raise self.error(
                "no 'pruners' section: the schedule must define at least one filter pruner "
                "(e.g. class: L1RankedStructureParameterPruner, group_type: Filters)"
            )
        if not isinstance(pruners, dict) or not pruners:
            raise self.error(f"'pruners' must be a mapping of pruner names to definitions, got {pruners!r}")
        for name in pruners:
            if not isinstance(name, str):
                raise self.error(f"pruner names must be strings, got {name!r}")

        self._check_other_sections()
        referenced, args = self._parse_policies(pruners)

        groups: list[DistillerGroup] = []
        owner: dict[str, str] = {}
        for name, definition in pruners.items():
            if name not in referenced:
                cls = definition.get("class") if isinstance(definition, dict) else None
                self.warn(
                    f"pruner '{name}'{f' ({cls})' if cls else ''} is not applied by any policy, so Distiller "
                    "would never run it; it is ignored"
                )
                continue
            new = self._parse_pruner(name, definition, args.get(name, {}))
            for g in new:
                for layer in g.layers:
                    if layer in owner:
                        raise self.error(
                            f"layer '{layer}' is pruned by both pruner '{owner[layer]}' and pruner '{name}'; "
                            "each layer may be pruned by only one pruner"
                        )
                    owner[layer] = name
            groups.extend(new)
        if not groups:
            raise self.error(
                "no pruner is applied: none of the pruners "
                f"({', '.join(map(str, pruners))}) is named by a 'policies' entry (- pruner: {{instance_name: ...}})"
            )
        return DistillerSchedule(groups=groups, warnings=self.warnings, source=self.source)

    def _check_other_sections(self) -> None:
        for key, value in self.doc.items():
            if key in ("version", "pruners", "policies", "lr_schedulers"):
                continue
            if key == "extensions":
                if not isinstance(value, dict):
                    self.warn("'extensions' is not a mapping; ignored")
                    continue
                for ext_name, ext in value.items():
                    cls = ext.get("class") if isinstance(ext, dict) else None
                    if cls not in _THINNING_EXTENSIONS:
                        self.warn(f"extension '{ext_name}' ({cls}) is not supported and is ignored")
                # thinning extensions: pruneflow always removes pruned filters physically.
            elif key == "quantizers":
                self.warn(
                    "'quantizers' section ignored: pruneflow imports only filter pruning from Distiller"
                )
            elif key == "regularizers":
                self.warn(
                    "'regularizers' section ignored: pruneflow does not replicate Distiller's training-time "
                    "regularization (e.g. group lasso); only the pruners are imported"
                )
            else:
                self.warn(f"unknown top-level section '{key}' ignored")

    def _parse_policies(self, pruners: dict[str, Any]) -> tuple[list[str], dict[str, dict[str, Any]]]:
        policies = self.doc.get("policies")
        if policies is None:
            return [], {}
        if not isinstance(policies, list):
            raise self.error(f"'policies' must be a list, got {type(policies).__name__}")
        referenced: list[str] = []
        args: dict[str, dict[str, Any]] = {}
        for i, policy in enumerate(policies, start=1):
            if not isinstance(policy, dict):
                raise self.error(f"policy #{i} must be a mapping, got {policy!r}")
            kinds = [k for k in _POLICY_KINDS if k in policy]
            if not kinds:
                raise self.error(
                    f"policy #{i} names none of {', '.join(_POLICY_KINDS)} (keys: {', '.join(map(str, policy))})"
                )
            if "pruner" not in policy:
                continue
            ref = policy["pruner"]
            name = ref.get("instance_name") if isinstance(ref, dict) else None
            if not isinstance(name, str) or not name:
                raise self.error(
                    f"policy #{i}: 'pruner' must be a mapping with an 'instance_name', got {ref!r}"
                )
            if name not in pruners:
                raise self.error(
                    f"policy #{i} names pruner '{name}', which is not defined under 'pruners' "
                    f"(defined: {', '.join(map(str, pruners))})"
                )
            if name not in referenced:
                referenced.append(name)
            policy_args = ref.get("args") or {}
            if isinstance(policy_args, dict):
                args.setdefault(name, {}).update(policy_args)
        return referenced, args

    # ---- pruners

    def _parse_pruner(self, name: str, d: Any, policy_args: dict[str, Any]) -> list[DistillerGroup]:
        if not isinstance(d, dict):
            raise self.error(f"pruner '{name}' must be a mapping with a 'class', got {d!r}")
        cls = d.get("class")
        if not isinstance(cls, str) or not cls.strip():
            raise self.error(f"pruner '{name}' has no 'class'")
        cls = cls.strip()
        criterion = self._criterion(name, cls)
        is_agp = cls in AGP_PRUNER_CLASSES

        for key in d:
            if key not in _KNOWN_PRUNER_KEYS:
                self.warn(f"pruner '{name}': unknown argument '{key}' ignored")
        if d.get("group_dependency") is not None:
            self.warn(
                f"pruner '{name}': group_dependency {d['group_dependency']!r} ignored; the leader's filter selection "
                "is not shared, every listed layer is ranked on its own"
            )
        if d.get("group_size", 1) not in (1, None):
            self.warn(
                f"pruner '{name}': group_size {d['group_size']!r} ignored (filters are removed one at a time)"
            )
        if d.get("noise"):
            self.warn(f"pruner '{name}': noise {d['noise']!r} ignored")
        if policy_args.get("discard_masks_at_minibatch_end"):
            self.warn(
                f"pruner '{name}': its policy discards the masks after every mini-batch (a DropFilter-style "
                "regularizer in Distiller, which leaves the final model unpruned); pruneflow prunes permanently"
            )

        if "reg_regims" in d and d["reg_regims"] is not None:
            clashing = [
                k for k in ("weights", "desired_sparsity", "final_sparsity", "sparsity_range") if k in d
            ]
            if clashing:
                raise self.error(
                    f"pruner '{name}' has both 'reg_regims' and {', '.join(map(repr, clashing))}; use either "
                    "reg_regims ({weight: [sparsity, Filters]}) or group_type + desired_sparsity + weights"
                )
            return self._from_reg_regims(name, cls, criterion, d["reg_regims"])

        group_type = d.get("group_type")
        if group_type is None:
            raise self.error(
                f"pruner '{name}' ({cls}) has no 'group_type'; pruneflow needs group_type: Filters (or '3D')"
            )
        self._check_structure(name, group_type)
        sparsity = self._sparsity_of(name, cls, d, is_agp)
        layers = self._layers(name, d.get("weights"))
        return [
            DistillerGroup(name=name, layers=layers, sparsity=sparsity, criterion=criterion, pruner_class=cls)
        ]

    def _criterion(self, name: str, cls: str) -> str:
        if cls in PRUNER_CLASSES:
            return PRUNER_CLASSES[cls]
        if cls in AGP_PRUNER_CLASSES:
            return AGP_PRUNER_CLASSES[cls]
        supported = ", ".join([*PRUNER_CLASSES, *AGP_PRUNER_CLASSES])
        if cls in _ELEMENTWISE_CLASSES:
            raise self.error(
                f"pruner '{name}' uses class {cls}, an element-wise (fine-grained) pruner; {_NON_FILTER_HINT}. "
                f"Supported classes: {supported}"
            )
        if cls in _CHANNEL_CLASSES:
            raise self.error(
                f"pruner '{name}' uses class {cls}, which prunes input channels; {_NON_FILTER_HINT}. "
                f"Supported classes: {supported}"
            )
        if cls in _ACTIVATION_CLASSES:
            raise self.error(
                f"pruner '{name}' uses class {cls}, which ranks filters by activation statistics collected during "
                f"training; pruneflow cannot reproduce that ranking. Supported classes: {supported}"
            )
        raise self.error(f"pruner '{name}' uses unsupported class {cls!r}. Supported classes: {supported}")

    def _check_structure(self, name: str, structure: Any, weight: str | None = None) -> None:
        where = f"pruner '{name}'" + (f", weight '{weight}'" if weight else "")
        if not isinstance(structure, str):
            raise self.error(f"{where}: group type must be a string such as 'Filters', got {structure!r}")
        s = structure.strip().lower()
        if s in _FILTER_GROUPS:
            return
        if s in _OTHER_GROUPS:
            raise self.error(f"{where} prunes '{structure}'; {_NON_FILTER_HINT}. Use 'Filters' (or '3D')")
        raise self.error(f"{where}: unknown group type {structure!r}; expected 'Filters' (or '3D')")

    def _check_sparsity(self, name: str, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(f"pruner '{name}': {key} must be a number, got {value!r}")
        v = float(value)
        if not (math.isfinite(v) and 0 <= v <= MAX_SPARSITY):
            raise self.error(
                f"pruner '{name}': {key} {value!r} is outside [0, {MAX_SPARSITY}] "
                f"(pruneflow never removes more than {MAX_SPARSITY:.0%} of a layer's filters)"
            )
        return v

    def _sparsity_of(self, name: str, cls: str, d: dict[str, Any], is_agp: bool) -> float:
        if is_agp:
            if "final_sparsity" not in d:
                raise self.error(f"pruner '{name}' ({cls}) has no 'final_sparsity'")
            final = self._check_sparsity(name, "final_sparsity", d["final_sparsity"])
            initial = d.get("initial_sparsity")
            if initial is not None:
                init = self._check_sparsity(name, "initial_sparsity", initial)
                if init > final:
                    raise self.error(
                        f"pruner '{name}': initial_sparsity {initial} is larger than final_sparsity {d['final_sparsity']}"
                    )
            start = f"initial_sparsity {initial} -> " if initial is not None else ""
            self.warn(
                f"pruner '{name}' ({cls}) is a gradual (AGP) pruner ({start}final_sparsity {final} over several "
                f"epochs); its schedule is collapsed into one step that prunes to final_sparsity {final}"
            )
            return final
        if cls == "RandomLevelStructureParameterPruner":
            rng = d.get("sparsity_range")
            if not (isinstance(rng, list | tuple) and len(rng) == 2):
                raise self.error(f"pruner '{name}' ({cls}) needs sparsity_range: [low, high], got {rng!r}")
            low = self._check_sparsity(name, "sparsity_range[0]", rng[0])
            high = self._check_sparsity(name, "sparsity_range[1]", rng[1])
            if low > high:
                raise self.error(f"pruner '{name}': sparsity_range {rng!r} has low > high")
            mid = round((low + high) / 2, 10)
            self.warn(
                f"pruner '{name}' ({cls}) draws a random sparsity in {list(rng)} at every step (L1 ranking); "
                f"pruneflow uses the fixed mid-point {mid}"
            )
            return mid
        if "desired_sparsity" not in d:
            raise self.error(f"pruner '{name}' ({cls}) has no 'desired_sparsity'")
        return self._check_sparsity(name, "desired_sparsity", d["desired_sparsity"])

    def _layer(self, name: str, weight: Any) -> str:
        if not isinstance(weight, str) or not weight.strip():
            raise self.error(f"pruner '{name}': weight names must be strings, got {weight!r}")
        w = weight.strip()
        parts = w.split(".")
        if len(parts) < 2 or parts[-1] != "weight" or not all(parts[:-1]):
            raise self.error(
                f"pruner '{name}': '{w}' is not a module's weight tensor; expected '<module>.weight', "
                "e.g. module.layer1.0.conv1.weight (only whole filters of weight tensors can be pruned)"
            )
        modules = parts[:-1]
        if "module" in modules and len(modules) > 1:
            # Distiller's normalize_module_name: drop the (first) DataParallel 'module' component,
            # e.g. module.layer1.0.conv1 -> layer1.0.conv1 and features.module.0 -> features.0
            modules.remove("module")
        return ".".join(modules)

    def _layers(self, name: str, weights: Any) -> list[str]:
        if isinstance(weights, str):
            weights = [weights]
        if not isinstance(weights, list) or not weights:
            raise self.error(
                f"pruner '{name}': 'weights' must be a non-empty list of weight names, got {weights!r}"
            )
        layers: list[str] = []
        for w in weights:
            layer = self._layer(name, w)
            if layer in layers:
                raise self.error(f"pruner '{name}': layer '{layer}' is listed twice (as '{w}')")
            layers.append(layer)
        return layers

    def _from_reg_regims(self, name: str, cls: str, criterion: str, regims: Any) -> list[DistillerGroup]:
        if not isinstance(regims, dict) or not regims:
            raise self.error(
                f"pruner '{name}': 'reg_regims' must be a non-empty mapping {{weight: [sparsity, Filters]}}, got {regims!r}"
            )
        if cls in AGP_PRUNER_CLASSES or cls == "RandomLevelStructureParameterPruner":
            raise self.error(
                f"pruner '{name}' ({cls}) takes group_type and weights (and its own sparsity keys), not reg_regims"
            )
        by_sparsity: dict[float, list[str]] = {}
        seen: set[str] = set()
        for weight, value in regims.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                raise self.error(
                    f"pruner '{name}', weight '{weight}': a bare sparsity ({value}) means element-wise pruning "
                    f"in Distiller; {_NON_FILTER_HINT}. Write [{value}, Filters]"
                )
            if not (isinstance(value, list | tuple) and len(value) == 2):
                raise self.error(
                    f"pruner '{name}', weight '{weight}': expected [sparsity, Filters], got {value!r}"
                )
            self._check_structure(name, value[1], str(weight))
            sparsity = self._check_sparsity(name, f"sparsity of '{weight}'", value[0])
            layer = self._layer(name, weight)
            if layer in seen:
                raise self.error(f"pruner '{name}': layer '{layer}' is listed twice (as '{weight}')")
            seen.add(layer)
            by_sparsity.setdefault(sparsity, []).append(layer)
        single = len(by_sparsity) == 1
        return [
            DistillerGroup(
                name=name if single else f"{name}@{s}",
                layers=layers,
                sparsity=s,
                criterion=criterion,
                pruner_class=cls,
            )
            for s, layers in by_sparsity.items()
        ]


def load_schedule(path_or_text: str | Path) -> DistillerSchedule:
    """Parse a Distiller compression schedule (a YAML file path, or YAML text if it contains a newline)."""
    text, source = _read_source(path_or_text)
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as e:
        raise ScheduleError(f"{source}: not valid YAML: {e}") from None
    if doc is None:
        raise ScheduleError(f"{source}: the schedule is empty")
    if not isinstance(doc, dict):
        raise ScheduleError(
            f"{source}: expected a YAML mapping with 'pruners' and 'policies', got {type(doc).__name__}"
        )
    return _Parser(doc, source).parse()
