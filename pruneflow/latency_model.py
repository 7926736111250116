"""A latency model per device: a NetAdapt-style table of per-layer latencies, composed additively and
corrected on the trials already measured.

The table (``pruneflow latency-table SWEEP.yaml``, :func:`build_table`) holds, for one model, one sweep space
and one benchmark setting (device, backend, precision, threads, hint):

* ``layers``: every Conv2d and Linear layer's dense shape and which group changes its input or output
  channels at which grid sparsity (:func:`pruneflow.channel_map.channel_map`, the torch half);
* ``entries``: the latency (median, ms) of every layer shape those sparsities can produce, each measured as a
  one-layer OpenVINO model (convolution + bias + ReLU, or MatMul + bias) built here from its shape, all of
  them and the dense model in ONE interleaved benchmark run on the device (:func:`measure_entries`);
* ``dense``: the dense model's measured latency and its table sum.

A configuration's prediction (:class:`LatencyModel`) is ``a + b * x``: ``x`` is the sum of its layers'
entries (method ``table``, NetAdapt's composition) or its MACs computed from the same layer shapes (method
``macs``, a small regression). The correction (a, b) absorbs what the table leaves out (pooling,
additions, the per-call overhead of a one-layer model) and is fitted on the study's measured trials: with
none, from the table's dense measurement (``table``: ``b = 1``, ``a`` the measured minus the summed
latency; ``macs``: ``a = 0``, ``b`` = latency per MAC); then the median offset (``table``) or ratio
(``macs``); from :data:`AFFINE_MIN` trials on, least squares. ``benchmarks/latency_model.py`` measured both
on held-out configurations (RESULTS.md): with 10 trials fitted, ``macs`` was within 10 % for 90-100 % of
them, ``table`` for 60-85 % (one-layer models mismeasure what OpenVINO fuses in a whole network, MobileNetV2's
depthwise layers most), so ``macs`` is the default. A sparsity between grid points is taken at the nearest
grid point.

Torch-free, except :func:`build_table`, which imports torch inside (the channel map and the dense export).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AFFINE_MIN", "DEFAULT_STEP", "METHODS", "TABLE_VERSION", "LatencyModel", "LatencyModelSpec",
           "build_table", "check_table", "grid_key", "layer_macs", "layer_shapes", "load_table", "lut_ms", "macs",
           "measure_entries", "reachable_shapes", "signature_key", "table_groups"]

TABLE_VERSION = 1
#: the grid step of a range that has none (a continuous range is predicted at its nearest grid point)
DEFAULT_STEP = 0.05
#: measured trials from which the correction's slope is fitted too (before: offset only)
AFFINE_MIN = 6
#: benchmark settings a table is only valid for
BENCH_KEYS = ("backend", "device", "precision", "threads", "hint")
Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


class LatencyModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    table: str = Field(..., min_length=1, description="the latency table (table.json of `pruneflow latency-table "
                       "SWEEP.yaml`), built for this sweep's model, space and benchmark device")
    skip_infeasible: bool = Field(False, description="top1_under_latency, latency_over_top1: do not run a candidate "
                                  "whose predicted latency misses the budget (latency_over_top1: the best measured "
                                  "feasible latency) by more than the model's measured error; it is recorded "
                                  "`skipped` and told to the search as infeasible")
    method: Literal["table", "macs"] = Field("macs", description="what a prediction is linear in: macs (the "
                                             "configuration's MACs, from the table's layer shapes) or table (the "
                                             "summed layer latencies); macs predicted better on this CPU "
                                             "(benchmarks/RESULTS.md, latency_model)")
    min_measured: int = Field(5, ge=1, le=10_000, description="trials measured with a prediction before any is "
                              "skipped: the model's error is the largest relative error among them")


def grid_key(s: float) -> str:
    return f"{round(float(s), 4):g}"


def signature_key(sig: dict) -> str:
    if sig["kind"] == "linear":
        return f"linear {sig['in']}->{sig['out']}"
    k, st, p, d = (f"{a}x{b}" for a, b in (sig["k"], sig["stride"], sig["pad"], sig["dilation"]))
    return f"conv {sig['in']}x{sig['h']}x{sig['w']}->{sig['out']} k{k} s{st} p{p} d{d} g{sig['groups']}"


def _snap(s: float, grid: list[float]) -> float:
    return min(grid, key=lambda g: abs(g - s))


def _shape(layer: dict, params: dict[str, float], grids: dict[str, list[float]]) -> dict:
    sig = dict(layer["sig"])
    for side in ("in", "out"):
        for group, by_s in layer[side].items():
            sig[side] = by_s.get(grid_key(_snap(params.get(group, 0.0), grids[group])), sig[side])
    if sig.get("depthwise"):
        sig["groups"] = sig["in"]
    return sig


def layer_shapes(table: dict, params: dict[str, float]) -> dict[str, dict]:
    """Every layer's shape for a configuration (group name -> sparsity; a missing group is dense)."""
    grids = {g["name"]: g["grid"] for g in table["groups"]}
    return {name: _shape(layer, params, grids) for name, layer in table["layers"].items()}


def reachable_shapes(table_like: dict) -> dict[str, dict]:
    """Every layer shape the space can produce, by :func:`signature_key`: per layer, each input channel count
    with each output channel count (a depthwise layer's two sides move together)."""
    out: dict[str, dict] = {}
    for layer in table_like["layers"].values():
        sig = layer["sig"]
        ins = {sig["in"], *(c for by_s in layer["in"].values() for c in by_s.values())}
        outs = {sig["out"], *(c for by_s in layer["out"].values() for c in by_s.values())}
        pairs = [(c, c) for c in ins] if sig.get("depthwise") else [(i, o) for i in ins for o in outs]
        for i, o in pairs:
            s = {**sig, "in": i, "out": o, **({"groups": i} if sig.get("depthwise") else {})}
            out[signature_key(s)] = s
    return out


# ------------------------------------------------------------------ measuring (torch-free, on the device)


def _layer_model(sig: dict, seed: int = 0):
    """A one-layer OpenVINO model of this shape (random weights: latency does not depend on them)."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(seed)
    f32 = np.float32
    if sig["kind"] == "linear":
        x = ops.parameter([1, sig["in"]], f32, name="input")
        w = ops.constant(rng.standard_normal((sig["in"], sig["out"])).astype(f32) * 0.1)
        y = ops.add(ops.matmul(x, w, False, False), ops.constant(np.zeros((1, sig["out"]), f32)))
        return ov.Model([y], [x], "layer")
    cin, cout, g = sig["in"], sig["out"], sig["groups"]
    x = ops.parameter([1, cin, sig["h"], sig["w"]], f32, name="input")
    kh, kw = sig["k"]
    args = (sig["stride"], sig["pad"], sig["pad"], sig["dilation"])
    if g == 1:
        y = ops.convolution(x, ops.constant(rng.standard_normal((cout, cin, kh, kw)).astype(f32) * 0.1), *args)
    else:
        w = rng.standard_normal((g, cout // g, cin // g, kh, kw)).astype(f32) * 0.1
        y = ops.group_convolution(x, ops.constant(w), *args)
    y = ops.relu(ops.add(y, ops.constant(np.zeros((1, cout, 1, 1), f32))))
    return ov.Model([y], [x], "layer")


def measure_entries(shapes: dict[str, dict], options, dense_model: str | Path | None = None,
                    progress: Progress = _quiet) -> dict:
    """Median latency (ms) of every one-layer model of ``shapes`` (and of ``dense_model``, labelled
    ``dense``) in ONE interleaved :func:`pruneflow.bench.compare` run. Returns ``{"entries": {key: ms},
    "dense_ms": ..., "round_median_cv": worst CV, "duration_s"}``."""
    import openvino as ov

    from pruneflow.bench import compare

    if options.backend != "openvino":
        raise ValueError(f"benchmark.backend: {options.backend!r}; the latency table's layer models are OpenVINO "
                         "models (allowed: openvino)")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pf-latency-table-") as tmp:
        keys = sorted(shapes)
        paths, labels = [], []
        if dense_model is not None:
            paths.append(Path(dense_model))
            labels.append("dense")
        for i, key in enumerate(keys):
            path = Path(tmp) / f"layer{i:04d}.xml"
            ov.save_model(_layer_model(shapes[key], seed=i), str(path), compress_to_fp16=False)
            paths.append(path)
            labels.append(key)
        progress(f"latency table: {len(keys)} layer shapes{' and the dense model' if dense_model else ''}, "
                 f"{options.rounds} rounds interleaved in one run")
        # "round r/N" only: the round lines of compare() list every model, hundreds of them here
        cmp = compare(paths, options, labels=labels,
                      progress=lambda m: progress(f"latency table: {m.split(':', 1)[0]}") if m.startswith("round")
                      else None)
    ms = {m["label"]: m["latency_ms"]["median"] for m in cmp["models"]}
    return {"entries": {k: round(ms[k], 6) for k in keys}, "dense_ms": ms.get("dense"),
            "round_median_cv": max((m.get("round_median_cv") or 0.0) for m in cmp["models"]),
            "duration_s": round(time.perf_counter() - t0, 2)}


# ------------------------------------------------------------------ building (torch for the shapes)


def table_groups(sweep) -> list[dict]:
    """Each group of the sweep's space with the grid the table measures (its step, or DEFAULT_STEP)."""
    out = []
    for r in sweep.space:
        steps = r.model_copy(update={"step": r.step or DEFAULT_STEP}).grid()
        out.append({"name": r.name, "patterns": list(r.patterns),
                    "grid": sorted({0.0, *steps, round(r.high, 6)})})
    return out


def build_table(sweep, out: Path, progress: Progress = _quiet) -> dict:
    """The latency table of a sweep (its model, space and the base trial's benchmark settings), measured in
    this process, written to ``out/table.json``. Raises SpecError / PlanError before any measurement."""
    from pruneflow import stages
    from pruneflow.bench import BenchmarkOptions
    from pruneflow.channel_map import channel_map
    from pruneflow.export import export_onnx, export_openvino
    from pruneflow.models import build_model
    from pruneflow.spec import SpecError

    spec = sweep.trial_spec()
    bench = BenchmarkOptions.model_validate(spec.benchmark.model_dump(exclude={"target"}))
    if bench.backend != "openvino":
        raise SpecError(f"base.benchmark.backend: {bench.backend!r}; a latency table is measured with OpenVINO "
                        "(allowed: openvino)")
    probe = spec.model_dump(mode="json")
    probe["pruning"]["groups"] = [{"name": r.name, "patterns": r.patterns, "sparsity": 0.0} for r in sweep.space]
    plan = stages.check_plan(type(spec).model_validate(probe))  # the data set loads, the globs match: before work
    data = stages._dataset(spec)
    shape = plan["input_shape"]

    def build():
        import torch

        torch.manual_seed(0)
        return build_model(spec.model.name, data.in_channels, data.num_classes, **spec.model.kwargs)

    t0 = time.perf_counter()
    groups = table_groups(sweep)
    progress(f"latency table: channel map of {spec.model.name} over {len(groups)} groups "
             f"({sum(len(g['grid']) - 1 for g in groups)} pruned shapes)")
    layers = channel_map(build, shape, groups, spec.pruning.round_to, spec.pruning.ignored_layers)
    shapes = reachable_shapes({"layers": layers})
    out.mkdir(parents=True, exist_ok=True)
    dense_xml = export_openvino(export_onnx(build(), shape, out / "dense.onnx", spec.export.opset,
                                            spec.export.exporter), out / "dense.xml", shape)
    map_s = time.perf_counter() - t0
    measured = measure_entries(shapes, bench, dense_xml, progress)
    table = {"version": TABLE_VERSION, "model": spec.model.name, "model_kwargs": spec.model.kwargs,
             "input_shape": shape, "dataset": spec.dataset.model_dump(mode="json"),
             **{k: getattr(bench, k) for k in BENCH_KEYS},
             "benchmark": {"rounds": bench.rounds, "iterations": bench.iterations, "warmup": bench.warmup,
                           "round_median_cv_max": measured["round_median_cv"]},
             "groups": groups, "layers": layers, "entries": measured["entries"]}
    lut_dense = lut_ms(table, {})
    table["dense"] = {"measured_ms": round(measured["dense_ms"], 6), "lut_ms": round(lut_dense, 6)}
    table["build_s"] = {"channel_map": round(map_s, 1), "measure": measured["duration_s"],
                        "total": round(time.perf_counter() - t0, 1)}
    (out / "table.json").write_text(json.dumps(table, indent=1))
    progress(f"latency table: {len(shapes)} layer shapes in {table['build_s']['total']} s; dense model "
             f"{table['dense']['measured_ms']:.4f} ms measured, {lut_dense:.4f} ms summed from the table")
    return table


# ------------------------------------------------------------------ checking and predicting (torch-free)


def load_table(path: str | Path) -> dict:
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"latency_model.table: {path}: cannot read a latency table ({exc}); make one with "
                         "`pruneflow latency-table SWEEP.yaml`") from None
    if not isinstance(table, dict) or table.get("version") != TABLE_VERSION or not isinstance(table.get("entries"), dict):
        raise ValueError(f"latency_model.table: {path} is not a latency table of version {TABLE_VERSION}")
    return table


def check_table(table: dict, sweep, path: str) -> None:
    """ValueError naming ``latency_model.table`` when the table was not built for this sweep's model, space
    or benchmark device."""
    spec = sweep.trial_spec()
    if (table["model"], table.get("model_kwargs") or {}) != (spec.model.name, spec.model.kwargs):
        raise ValueError(f"latency_model.table: {path} is a table of model {table['model']!r} "
                         f"{table.get('model_kwargs') or ''}; the sweep prunes {spec.model.name!r} {spec.model.kwargs or ''}")
    have = {k: table[k] for k in BENCH_KEYS}
    want = {k: getattr(spec.benchmark, k) for k in BENCH_KEYS}
    if have != want:
        raise ValueError(f"latency_model.table: {path} was measured on {have}; the sweep's trials are measured on "
                         f"{want}: no table for that device and setting (allowed: a table built with "
                         "`pruneflow latency-table` for the sweep's base.benchmark)")
    groups = {g["name"]: g for g in table["groups"]}
    for r in sweep.space:
        g = groups.get(r.name)
        if g is None or list(g["patterns"]) != list(r.patterns):
            raise ValueError(f"latency_model.table: {path} has no group {r.name!r} with patterns {r.patterns} "
                             f"(its groups: {sorted(groups)}); build the table from this sweep's space")
        if r.low < min(g["grid"]) - 1e-9 or r.high > max(g["grid"]) + 1e-9:
            raise ValueError(f"latency_model.table: {path} covers {r.name} over [{min(g['grid'])}, "
                             f"{max(g['grid'])}], the space asks [{r.low}, {r.high}]")


def layer_macs(sig: dict) -> int:
    """Multiply-accumulates of one layer shape."""
    if sig["kind"] == "linear":
        return sig["in"] * sig["out"]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = sig["k"], sig["stride"], sig["pad"], sig["dilation"]
    ho = (sig["h"] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (sig["w"] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return sig["out"] * (sig["in"] // sig["groups"]) * kh * kw * ho * wo


def lut_ms(table: dict, params: dict[str, float]) -> float:
    """The sum of the table entries of the configuration's layer shapes."""
    return sum(table["entries"][signature_key(s)] for s in layer_shapes(table, params).values())


def macs(table: dict, params: dict[str, float]) -> int:
    return sum(layer_macs(s) for s in layer_shapes(table, params).values())


#: what a prediction is linear in: the table's summed layer latencies, or the layers' summed MACs
METHODS = ("table", "macs")


class LatencyModel:
    """Predicted latency of configurations: ``a + b * feature``, the feature being the table's sum of layer
    latencies (``table``) or the configuration's MACs (``macs``, from the same layer shapes), with (a, b)
    fitted on ``measured`` (configuration, measured latency in ms) pairs of the study."""

    def __init__(self, table: dict, measured: list[tuple[dict[str, float], float]] = (), method: str = "macs"):
        if method not in METHODS:
            raise ValueError(f"latency_model.method: {method!r} (allowed: {', '.join(METHODS)})")
        self.table, self.method = table, method
        self.correction = self._fit([(self.feature(p), m) for p, m in measured])

    def feature(self, params: dict[str, float]) -> float:
        return lut_ms(self.table, params) if self.method == "table" else float(macs(self.table, params))

    def _fit(self, pairs: list[tuple[float, float]]) -> dict[str, Any]:
        if not pairs:  # the table's own dense measurement
            dense = self.table["dense"]
            x = self.feature({})
            if self.method == "table":
                return {"kind": "dense", "a": dense["measured_ms"] - x, "b": 1.0, "n": 0}
            return {"kind": "dense", "a": 0.0, "b": dense["measured_ms"] / x, "n": 0}
        if self.method == "table":
            few = {"kind": "offset", "a": statistics.median(m - x for x, m in pairs), "b": 1.0, "n": len(pairs)}
        else:
            few = {"kind": "scale", "a": 0.0, "b": statistics.median(m / x for x, m in pairs), "n": len(pairs)}
        xs = [x for x, _ in pairs]
        if len(pairs) < AFFINE_MIN or max(xs) - min(xs) <= 1e-12 * max(xs):
            return few
        mx, my = statistics.fmean(xs), statistics.fmean(m for _, m in pairs)
        b = sum((x - mx) * (m - my) for x, m in pairs) / sum((x - mx) ** 2 for x in xs)
        if b <= 0:  # latency that falls as the feature grows is noise on a narrow range: keep the simple fit
            return few
        return {"kind": "affine", "a": my - b * mx, "b": b, "n": len(pairs)}

    def predict(self, params: dict[str, float]) -> float:
        """Never below 0 (an offset fitted on few trials can extrapolate there)."""
        c = self.correction
        return max(0.0, c["a"] + c["b"] * self.feature(params))
