"""Tests for pruneflow.bench (torch-free latency benchmark). Models are built with onnx.helper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from pruneflow.bench import (
    BenchmarkOptions,
    ParityError,
    compare,
    format_comparison,
    format_result,
    measure,
    paired_speedup,
    speedup,
    summarize,
)
from pruneflow.bench.backends import LoadedModel
from pruneflow.bench.output_check import EXPORT_ATOL, EXPORT_RTOL  # spec.export's defaults
from pruneflow.bench.runner import (
    ARGMAX_TIE_RTOL,
    MIN_ARGMAX_AGREEMENT,
    REDUCED_PRECISION_RTOL,
    _parity_check,
    check_tolerance,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

FAST = {"warmup": 3, "rounds": 3, "iterations": 10}

RESULT_KEYS = {
    "model", "backend", "device", "settings", "input_shape", "latency_ms", "round_medians_ms",
    "round_median_cv", "round_order", "n_samples", "throughput_fps", "wall_mean_ms", "compile_s",
    "compiled_properties", "skipped_properties", "load_avg_before", "load_avg_after", "cpu_count",
    "cpu_model", "versions", "host", "started_at", "duration_s", "check_max_abs_diff", "check",
    "inference_precision", "latency_kind", "throughput",
}


# --------------------------------------------------------------------------- model builders


def make_cnn(path: Path, channels: int = 8, hw: int = 16, dynamic: bool = False, seed: int = 0) -> Path:
    """x[1,3,hw,hw] -> Conv3x3(3->C) -> Relu -> Conv3x3(C->C) -> Relu -> GAP -> Flatten -> Gemm(C->10)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((channels, 3, 3, 3)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((channels, channels, 3, 3)) * (1.0 / np.sqrt(9 * channels))).astype(np.float32)
    wf = (rng.standard_normal((10, channels)) * 0.1).astype(np.float32)
    bf = np.zeros(10, dtype=np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    batch = "N" if dynamic else 1
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (wf, "wf"), (bf, "bf"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def to_ir(onnx_path: Path) -> Path:
    import openvino as ov

    xml = onnx_path.with_suffix(".xml")
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    return xml


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bench_models")
    small = make_cnn(d / "small.onnx")
    return {
        "onnx": small,
        "xml": to_ir(small),
        "dynamic": make_cnn(d / "dynamic.onnx", dynamic=True),
        "c8": make_cnn(d / "c8.onnx", channels=8, hw=32),
        "c64": make_cnn(d / "c64.onnx", channels=64, hw=32),
    }


def ort_reference(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# --------------------------------------------------------------------------- stats


def test_stats_known_array():
    lat = np.arange(1, 101, dtype=np.float64)
    rounds = [lat[i * 25:(i + 1) * 25].tolist() for i in range(4)]
    s = summarize(rounds, batch=2)
    assert s["median"] == pytest.approx(np.median(lat)) == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(np.percentile(lat, 90))
    assert s["p99"] == pytest.approx(np.percentile(lat, 99))
    assert s["mean"] == pytest.approx(50.5)
    assert s["min"] == 1.0 and s["max"] == 100.0
    assert s["std"] == pytest.approx(np.std(lat))
    assert s["round_medians"] == [13.0, 38.0, 63.0, 88.0]
    rm = np.array([13.0, 38.0, 63.0, 88.0])
    assert s["round_median_cv"] == pytest.approx(rm.std(ddof=0) / rm.mean())
    assert s["throughput_fps"] == pytest.approx(2 * 1000.0 / 50.5)
    assert s["n_samples"] == 100
    json.dumps(s, allow_nan=False)
    assert all(type(s[k]) is float for k in ("median", "p90", "p99", "mean", "min", "max", "std"))


def test_stats_single_round_and_errors():
    s = summarize([[2.0, 2.0, 2.0]])
    assert s["round_median_cv"] == 0.0 and s["std"] == 0.0 and s["throughput_fps"] == pytest.approx(500.0)
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([[1.0], []])


def test_stats_pooled_median_and_percentiles_on_skewed_samples():
    # the median, p90 and p99 are over ALL samples pooled: not the mean, not a median of round medians
    rounds = [[1.0, 1.0, 1.0, 100.0], [2.0, 2.0, 2.0, 2.0, 2.0]]
    s = summarize(rounds)
    assert s["round_medians"] == [1.0, 2.0]  # median of round medians would be 1.5
    assert s["mean"] == pytest.approx(113.0 / 9)
    assert s["median"] == 2.0
    # sorted: 1 1 1 2 2 2 2 2 100; linear interpolation at rank 0.9*8 = 7.2 and 0.99*8 = 7.92
    assert s["p90"] == pytest.approx(2.0 + 0.2 * 98.0)
    assert s["p99"] == pytest.approx(2.0 + 0.92 * 98.0)
    assert s["n_samples"] == 9


def test_rounds_description_matches_the_statistics():
    text = BenchmarkOptions.model_fields["rounds"].description
    assert "pooled" in text and "median of round medians" not in text


def test_speedups():
    assert speedup(4.0, 2.0) == pytest.approx(2.0)
    # per-round ratios 2, 4, 1 -> median 2
    assert paired_speedup([4.0, 8.0, 3.0], [2.0, 2.0, 3.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        paired_speedup([1.0, 2.0], [1.0])


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"backend": "tensorflow"}, "backend"),
        ({"precision": "int8"}, "precision"),
        ({"threads": 0}, "threads"),
        ({"threads": 1000}, "threads"),
        ({"rounds": 0}, "rounds"),
        ({"iterations": 0}, "iterations"),
        ({"warmup": -1}, "warmup"),
        ({"bogus": 1}, "bogus"),
        ({"device": "cpu!!"}, "device"),
        ({"device": "cpu"}, "device"),
        ({"device": "GPU."}, "device"),
        ({"device": "AUTO:"}, "device"),
        ({"device": "AUTO:GPU,,CPU"}, "device"),
        ({"backend": "onnxruntime", "device": "GPU"}, "device"),
        ({"backend": "onnxruntime", "precision": "f16"}, "precision"),
        ({"backend": "onnxruntime", "hint": "throughput"}, "hint"),
    ],
)
def test_settings_validation(kwargs, field):
    with pytest.raises(ValidationError) as info:
        BenchmarkOptions(**kwargs)
    assert field in str(info.value)


@pytest.mark.parametrize(
    "device", ["CPU", "GPU", "GPU.0", "NPU", "AUTO", "AUTO:GPU,CPU", "AUTO:-CPU", "HETERO:GPU.1,CPU",
               "MULTI:GPU.0,GPU.1"],
)
def test_settings_valid_devices(device):
    assert BenchmarkOptions(device=device).device == device


def test_settings_defaults_roundtrip():
    o = BenchmarkOptions()
    assert o.model_dump() == {
        "backend": "openvino", "device": "CPU", "precision": "f32", "threads": 1, "hint": "latency",
        "warmup": 20, "rounds": 5, "iterations": 100, "seed": 0,
    }
    assert BenchmarkOptions.model_validate(o.model_dump()) == o


# --------------------------------------------------------------------------- measure


@pytest.mark.parametrize(
    ("backend", "kind", "threads"),
    [("openvino", "onnx", 1), ("openvino", "xml", 2), ("onnxruntime", "onnx", 2)],
)
def test_measure(models, backend, kind, threads):
    opts = BenchmarkOptions(backend=backend, threads=threads, **FAST)
    messages: list[str] = []
    r = measure(models[kind], opts, progress=messages.append)
    assert RESULT_KEYS <= set(r)
    json.dumps(r, allow_nan=False)
    lat = r["latency_ms"]
    assert set(lat) == {"median", "p90", "p99", "mean", "min", "max", "std"}
    assert 0 < lat["min"] <= lat["median"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert len(r["round_medians_ms"]) == opts.rounds
    assert r["n_samples"] == opts.rounds * opts.iterations
    assert r["input_shape"] == [1, 3, 16, 16]
    assert r["model"] == str(models[kind])
    assert r["backend"] == backend and r["device"] == "CPU"
    assert r["settings"] == opts.model_dump()
    assert r["wall_mean_ms"] > 0 and r["throughput_fps"] > 0 and r["round_median_cv"] >= 0
    props = r["compiled_properties"]
    assert props["INFERENCE_PRECISION_HINT"] == "f32"
    assert props["INFERENCE_NUM_THREADS"] == str(threads)
    if backend == "openvino":
        assert props["EXECUTION_DEVICES"] == "CPU"
        assert props["PERFORMANCE_HINT"] == "LATENCY"
        assert "NUM_STREAMS" in props
        assert r["skipped_properties"] == []
        # request.latency excludes the Python call overhead that the wall clock sees
        assert r["wall_mean_ms"] >= lat["min"]
    assert r["check_max_abs_diff"] is None
    assert r["cpu_count"] == os.cpu_count()
    assert len(r["load_avg_before"]) == 3 and len(r["load_avg_after"]) == 3
    assert set(r["versions"]) >= {"openvino", "onnxruntime", "numpy", "python"}
    assert any(m.startswith(f"round {opts.rounds}/{opts.rounds}: median") for m in messages)
    text = format_result(r)
    assert backend in text and "median" in text and "p99" in text


def test_measure_throughput_hint(models):
    r = measure(models["onnx"], BenchmarkOptions(hint="throughput", **FAST))
    assert r["compiled_properties"]["PERFORMANCE_HINT"] == "THROUGHPUT"
    assert r["throughput"]["method"] == "async_queue"


def test_throughput_comes_from_the_async_queue(models, monkeypatch):
    """hint=throughput: every timed inference goes through the AsyncInferQueue of
    OPTIMAL_NUMBER_OF_INFER_REQUESTS requests, and throughput_fps is completed inferences / wall time
    of those rounds, not 1000 / mean latency of one request."""
    from pruneflow.bench.backends import OpenVINOModel

    walls: list[tuple[int, float]] = []
    real_async = OpenVINOModel.timed_async

    def spy_async(self, x, n):
        lat, wall_ms = real_async(self, x, n)
        walls.append((n, wall_ms))
        assert len(lat) == n
        return lat, wall_ms

    def no_sync(self, x, n):
        raise AssertionError("throughput mode must not time synchronous calls")

    monkeypatch.setattr(OpenVINOModel, "timed_async", spy_async)
    monkeypatch.setattr(OpenVINOModel, "timed_calls", no_sync)
    opts = BenchmarkOptions(hint="throughput", threads=2, warmup=4, rounds=3, iterations=24)
    r = measure(models["c8"], opts)
    json.dumps(r, allow_nan=False)
    props = r["compiled_properties"]
    t = r["throughput"]
    assert t["method"] == "async_queue"
    assert t["requests"] == int(props["OPTIMAL_NUMBER_OF_INFER_REQUESTS"]) >= 1
    assert t["inferences_per_round"] == opts.iterations
    # one warm-up pass, then one queue run per round
    assert [n for n, _ in walls] == [max(opts.warmup, t["requests"])] + [opts.iterations] * opts.rounds
    round_fps = [n * 1000.0 / w for n, w in walls[1:]]
    assert t["round_fps"] == pytest.approx(round_fps)
    assert r["throughput_fps"] == t["fps"] == pytest.approx(float(np.median(round_fps)))
    assert r["wall_mean_ms"] == pytest.approx(sum(w for _, w in walls[1:]) / (opts.rounds * opts.iterations))
    # latencies are per request under that load, and are labelled so
    assert r["n_samples"] == opts.rounds * opts.iterations
    assert f"{t['requests']} request(s) in flight" in r["latency_kind"]
    assert "async queue" in format_result(r)


def test_latency_hint_throughput_is_labelled_sequential(models):
    r = measure(models["onnx"], BenchmarkOptions(**FAST))
    t = r["throughput"]
    assert t["method"] == "sequential" and t["requests"] == 1
    assert r["throughput_fps"] == pytest.approx(1000.0 / r["latency_ms"]["mean"])
    assert "one request at a time" in r["latency_kind"]
    assert "async" not in format_result(r)


def test_compare_throughput_ratios(models):
    opts = BenchmarkOptions(hint="throughput", threads=2, warmup=2, rounds=2, iterations=8)
    cmp = compare([models["c64"], models["c8"]], opts, labels=["big", "small"])
    json.dumps(cmp, allow_nan=False)
    big, small = cmp["models"]
    assert big["throughput"]["method"] == small["throughput"]["method"] == "async_queue"
    ratio = cmp["ratios"]["small"]
    assert ratio["throughput_ratio"] == pytest.approx(small["throughput_fps"] / big["throughput_fps"])
    assert ratio["throughput_ratio_paired"] == pytest.approx(
        paired_speedup(small["throughput"]["round_fps"], big["throughput"]["round_fps"]))
    assert cmp["ratios"]["big"]["throughput_ratio_paired"] == 1.0
    assert "fps ratio" in format_comparison(cmp)


@pytest.mark.parametrize("device", ["AUTO:CPU", "HETERO:CPU", "MULTI:CPU"])
def test_measure_virtual_device_forwards_settings(models, device):
    # the CPU behind AUTO/HETERO/MULTI must get our settings (via DEVICE_PROPERTIES), not its defaults
    r = measure(models["onnx"], BenchmarkOptions(device=device, warmup=1, rounds=1, iterations=3))
    props = r["compiled_properties"]
    assert props["EXECUTION_DEVICES"] == "CPU"
    assert props["CPU.INFERENCE_PRECISION_HINT"] == "f32"
    assert props["CPU.INFERENCE_NUM_THREADS"] == "1"
    assert props["CPU.PERFORMANCE_HINT"] == "LATENCY"
    assert ("PERFORMANCE_HINT" in r["skipped_properties"]) == device.startswith("HETERO")
    assert "f32" in format_result(r) and "ran" not in format_result(r)


def test_measure_unavailable_device(models):
    import openvino as ov

    if "NPU" in ov.Core().available_devices:
        pytest.skip("this machine has an NPU")
    with pytest.raises(RuntimeError, match="'NPU' is not available"):
        measure(models["onnx"], BenchmarkOptions(device="NPU", **FAST))


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_parity_check(models, backend):
    x = np.random.default_rng(123).standard_normal((1, 3, 16, 16), dtype=np.float32)
    expected = ort_reference(models["onnx"], x)
    opts = BenchmarkOptions(backend=backend, warmup=0, rounds=1, iterations=3)
    r = measure(models["onnx"], opts, check=(x, expected))
    assert r["check_max_abs_diff"] is not None and 0.0 <= r["check_max_abs_diff"] <= 1e-3

    with pytest.raises(ParityError, match="max abs diff") as info:
        measure(models["onnx"], opts, check=(x, expected + 0.5))
    assert isinstance(info.value, RuntimeError)
    assert info.value.max_abs_diff == pytest.approx(0.5, abs=1e-3)
    assert "0.5" in str(info.value)


def test_parity_check_ir(models):
    x = np.random.default_rng(5).standard_normal((1, 3, 16, 16), dtype=np.float32)
    r = measure(models["xml"], BenchmarkOptions(warmup=0, rounds=1, iterations=2),
                check=(x, ort_reference(models["onnx"], x)), check_atol=1e-4)
    assert r["check_max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_dynamic_shape_rejected(models, backend):
    with pytest.raises(ValueError, match="static input shape"):
        measure(models["dynamic"], BenchmarkOptions(backend=backend, **FAST))


def test_path_errors(models, tmp_path):
    opts = BenchmarkOptions(**FAST)
    weird = tmp_path / "model.pt"
    weird.write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.onnx") as info:
        measure(weird, opts)
    assert ".xml" in str(info.value)
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        measure(tmp_path / "nope.onnx", opts)
    with pytest.raises(FileNotFoundError, match="nope.xml"):
        measure(tmp_path / "nope.xml", opts)
    with pytest.raises(ValueError, match="onnxruntime"):
        measure(models["xml"], BenchmarkOptions(backend="onnxruntime", **FAST))


# --------------------------------------------------------------------------- compare


def test_compare_interleaved(models):
    opts = BenchmarkOptions(warmup=5, rounds=3, iterations=15)
    messages: list[str] = []
    cmp = compare([models["c64"], models["c8"]], opts, labels=["big", "small"], progress=messages.append)
    assert [m["label"] for m in cmp["models"]] == ["big", "small"]
    json.dumps(cmp, allow_nan=False)
    for m in cmp["models"]:
        assert RESULT_KEYS <= set(m)
        assert m["n_samples"] == opts.rounds * opts.iterations
        assert m["input_shape"] == [1, 3, 32, 32]
    big, small = cmp["models"]
    assert big["latency_ms"]["median"] > small["latency_ms"]["median"]
    assert cmp["ratios"]["big"] == {"speedup": 1.0, "speedup_paired": 1.0}
    assert cmp["ratios"]["small"]["speedup"] > 1.0
    assert cmp["ratios"]["small"]["speedup_paired"] > 1.0
    # interleaving: round r of every model runs in slots [r*n, (r+1)*n), the starting model rotates
    n = 2
    slots = sorted(s for m in cmp["models"] for s in m["round_order"])
    assert slots == list(range(opts.rounds * n))
    for m in cmp["models"]:
        assert [s // n for s in m["round_order"]] == list(range(opts.rounds))
    assert big["round_order"] == [0, 3, 4] and small["round_order"] == [1, 2, 5]
    assert sum(m.startswith("round ") for m in messages) == opts.rounds
    text = format_comparison(cmp)
    assert "big" in text and "small" in text and "speedup" in text


def test_compare_labels(models):
    opts = BenchmarkOptions(warmup=0, rounds=1, iterations=2)
    cmp = compare([models["onnx"], models["xml"]], opts)
    # same stem -> labels fall back to the full paths
    assert [m["label"] for m in cmp["models"]] == [str(models["onnx"]), str(models["xml"])]
    with pytest.raises(ValueError, match="labels"):
        compare([models["onnx"], models["xml"]], opts, labels=["a"])
    with pytest.raises(ValueError, match="unique"):
        compare([models["onnx"], models["xml"]], opts, labels=["a", "a"])
    with pytest.raises(ValueError):
        compare([], opts)


# --------------------------------------------------------------------------- torch-free


TORCH_FREE_CODE = textwrap.dedent(
    """
    import builtins, json, sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError

    attempts = []
    _orig_import = builtins.__import__

    def _spy(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and (name == "torch" or name.startswith("torch.")):
            attempts.append(name)
        return _orig_import(name, globals, locals, fromlist, level)

    builtins.__import__ = _spy
    try:
        import torch  # noqa: F401
        torch_import_fails = False
    except ImportError:
        torch_import_fails = True
    attempts.clear()  # forget the sanity check itself

    import pruneflow.bench as bench

    path = sys.argv[1]
    results = {}
    for backend in ("openvino", "onnxruntime"):
        opts = bench.BenchmarkOptions(backend=backend, warmup=2, rounds=2, iterations=5)
        r = bench.measure(path, opts)
        bench.format_result(r)  # the tables (pruneflow.table, tabulate) are torch-free too
        results[backend] = r["latency_ms"]["median"]
    print(json.dumps({
        "torch_import_fails": torch_import_fails,
        "torch_import_attempts": attempts,
        "torch_in_sys_modules": sys.modules.get("torch", "missing") is not None,
        "torch_submodules": sorted(k for k in sys.modules if k.startswith("torch.")),
        "medians": results,
    }))
    """
)


def test_bench_is_torch_free(models):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_CODE, str(models["onnx"])],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch_import_fails"] is True
    assert out["torch_import_attempts"] == []
    assert out["torch_in_sys_modules"] is False
    assert out["torch_submodules"] == []
    assert out["medians"]["openvino"] > 0 and out["medians"]["onnxruntime"] > 0


# --------------------------------------------------------------------------- reduced precision


@pytest.fixture(scope="module")
def torch_ir(tmp_path_factory):
    """A tiny torch CNN exported as the trial pipeline does (ONNX -> OpenVINO IR, batch 1), with a
    reference batch of 16 inputs and torch's logits (max |logit| about 5, like a trained classifier)."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from pruneflow.export import export_onnx, export_openvino

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
        model[-1].weight.mul_(60)
    model.eval()
    d = tmp_path_factory.mktemp("torch_ir")
    onnx_path = export_onnx(model, [1, 3, 16, 16], d / "tiny.onnx")
    xml = export_openvino(onnx_path, d / "tiny.xml", [1, 3, 16, 16])
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    return xml, x.numpy(), ref




@pytest.mark.parametrize("precision", ["f32", "f16", "bf16"])
def test_check_fits_the_precision(torch_ir, precision):
    xml, x, ref = torch_ir
    opts = BenchmarkOptions(precision=precision, warmup=0, rounds=1, iterations=2)
    r = measure(xml, opts, check=(x, ref), check_atol=EXPORT_ATOL)
    if r["inference_precision"] != precision:
        pytest.skip(f"this CPU runs {r['inference_precision']} when asked for {precision}")
    json.dumps(r, allow_nan=False)
    c = r["check"]
    assert c["passed"] and c["precision"] == precision and c["precision_source"] == "compiled model"
    assert c["samples"] == 16 and c["argmax_agreement"] >= MIN_ARGMAX_AGREEMENT
    assert r["check_max_abs_diff"] == c["max_abs_diff"] <= c["tolerance"]
    scale = float(np.abs(ref).max())
    assert c["output_scale"] == pytest.approx(scale)
    if precision == "f32":
        assert c["atol"] == EXPORT_ATOL and c["rtol"] == EXPORT_RTOL and c["min_argmax_agreement"] == 1.0
        assert c["tolerance"] == pytest.approx(EXPORT_ATOL + EXPORT_RTOL * scale) and c["decided_by"] == "rtol"
        assert c["max_abs_diff"] < 1e-5
    else:
        assert c["rtol"] == REDUCED_PRECISION_RTOL[precision]
        assert c["tolerance"] == pytest.approx(EXPORT_ATOL + REDUCED_PRECISION_RTOL[precision] * scale)
        assert c["min_argmax_agreement"] == MIN_ARGMAX_AGREEMENT
        # the reason for the wider rtol: at reduced precision the logits move by more than the f32 tolerance
        assert c["max_abs_diff"] > EXPORT_ATOL + EXPORT_RTOL * scale
    assert precision in format_result(r)


def test_reduced_precision_check_still_catches_a_wrong_model(torch_ir):
    xml, x, ref = torch_ir
    opts = BenchmarkOptions(precision="bf16", warmup=0, rounds=1, iterations=2)
    wrong = ref + 0.5 * float(np.abs(ref).max())  # far beyond bf16 rounding
    with pytest.raises(ParityError) as info:
        measure(xml, opts, check=(x, wrong), check_atol=EXPORT_ATOL)
    msg = str(info.value)
    ran = info.value.details["precision"]
    assert f"at precision {ran}" in msg and "max abs diff" in msg and "tolerance" in msg
    assert "argmax agreement" in msg
    assert info.value.details["passed"] is False and info.value.max_abs_diff > info.value.details["tolerance"]


class _FakeLoaded(LoadedModel):
    """Stands in for a compiled model: returns the given outputs, reports the given precision."""

    backend = "openvino"

    def __init__(self, outputs: np.ndarray, ran: str | None):
        self.path = Path("fake.xml")
        self.input_shape = (1, 4)
        self.input_dtype = np.dtype(np.float32)
        self.properties = {} if ran is None else {"EXECUTION_DEVICES": "CPU", "INFERENCE_PRECISION_HINT": ran}
        self.skipped_properties = []
        self.compile_s = 0.0
        self._rows = iter(outputs)

    def infer(self, x):
        return next(self._rows)[None]


def _flipped(n: int, flips: int, runner_up: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Reference logits [1.0, runner_up, 0, 0] per sample (output scale 1.0); the device swaps the top
    two on ``flips`` samples. With runner_up 0.9 the max abs diff is 0.1: within the bf16 tolerance
    (0.125), beyond check_atol, and torch's margin 0.1 is no near-tie (bf16 tie margin 0.0625)."""
    ref = np.tile(np.array([1.0, runner_up, 0.0, 0.0], dtype=np.float32), (n, 1))
    out = ref.copy()
    out[:flips, :2] = [runner_up, 1.0]
    return out, ref


def _check(out, ref, requested: str, ran: str | None):
    loaded = _FakeLoaded(out, ran)
    x = np.zeros((len(ref), 4), dtype=np.float32)
    return _parity_check(loaded, BenchmarkOptions(precision=requested), (x, ref), EXPORT_ATOL, EXPORT_RTOL, None)


def test_argmax_agreement_threshold():
    out, ref = _flipped(10, 1)  # 9 of 10 agree: enough
    rec = _check(out, ref, "bf16", "bf16")
    assert rec["passed"] and rec["argmax_agreement"] == pytest.approx(0.9)
    assert rec["tolerance"] == pytest.approx(0.125 + EXPORT_ATOL) and rec["decided_by"] == "rtol"
    assert rec["argmax_decisive_samples"] == 10 and rec["argmax_tie_margin"] == ARGMAX_TIE_RTOL["bf16"]
    out, ref = _flipped(10, 2)  # 8 of 10
    with pytest.raises(ParityError, match=r"argmax agreement 0\.800 of 10 decisive sample\(s\)") as info:
        _check(out, ref, "bf16", "bf16")
    assert "needs >= 0.9)" in str(info.value)
    assert info.value.details["argmax_agreement_decisive"] == pytest.approx(0.8)
    assert "bf16" in str(info.value) and "= 0.125" in str(info.value)
    out, ref = _flipped(1, 1)  # a small batch: every sample must agree
    with pytest.raises(ParityError, match="argmax agreement 0.000 of 1"):
        _check(out, ref, "bf16", "bf16")
    # the error survives pickling (Celery / process pools)
    import pickle

    err = pickle.loads(pickle.dumps(info.value))
    assert err.details == info.value.details and str(err) == str(info.value)


def test_argmax_flip_on_a_near_tie_is_not_held_against_the_model():
    # torch's top two are 0.03 apart (< bf16 tie margin 0.0625 x scale 1.0): rounding may swap them
    out, ref = _flipped(3, 1, runner_up=0.97)
    rec = _check(out, ref, "bf16", "bf16")
    assert rec["passed"] and rec["argmax_agreement"] == pytest.approx(2 / 3)
    assert rec["argmax_decisive_samples"] == 0 and rec["argmax_agreement_decisive"] == 1.0
    # at f16 the tie margin is 0.0078: the same swap is too large for f16 rounding and fails
    with pytest.raises(ParityError, match="f16"):
        _check(out, ref, "f16", "f16")


def test_tolerance_follows_the_precision_the_model_really_ran():
    out, ref = _flipped(10, 0)
    out[:, 2] += 0.05  # a bf16-sized error: 0.05 x scale 1.0
    # asked for f32, but the device silently ran bf16: judged as bf16, and recorded as such
    rec = _check(out, ref, "f32", "bf16")
    assert rec["precision"] == "bf16" and rec["precision_requested"] == "f32"
    assert rec["tolerance"] == pytest.approx(0.125 + EXPORT_ATOL)
    # asked for bf16, but it ran f32: the f32 tolerance applies
    with pytest.raises(ParityError, match=r"at precision f32 \(compiled model; requested bf16\).*> tolerance"):
        _check(out, ref, "bf16", "f32")
    # the device does not report its precision: the requested one is used, and so labelled
    rec = _check(out, ref, "bf16", None)
    assert rec["precision"] == "bf16" and rec["precision_source"].startswith("requested")
    assert check_tolerance("f32", 1e-6, 1e-4, 100.0) == (pytest.approx(1e-6 + 1e-2), 1e-4)
    assert check_tolerance("f16", 1e-6, 1e-4, 0.01) == (pytest.approx(1e-6 + 2.0**-6 * 0.01), 2.0**-6)
    assert check_tolerance("bf16", 1e-6, 0.5, 1.0) == (pytest.approx(0.5 + 1e-6), 0.5)  # never below check_rtol


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "f16"])
def test_trial_at_reduced_precision(spec_dict, precision):
    from pruneflow.spec import parse_spec
    from pruneflow.stages import run_trial

    bench = {**spec_dict["benchmark"], "precision": precision}
    spec = parse_spec({**spec_dict, "trial_id": f"rp-{precision}", "benchmark": bench})
    summary = run_trial(spec)
    assert summary["status"] == "succeeded"
    latency = json.loads((spec.trial_dir() / "latency.json").read_text())
    check = latency["check"]
    ran = latency["inference_precision"]
    assert check["precision"] == ran and check["passed"]
    assert check["check_atol"] == spec.export.parity_atol
    if ran == precision:
        assert check["rtol"] == REDUCED_PRECISION_RTOL[precision]
        assert check["min_argmax_agreement"] == MIN_ARGMAX_AGREEMENT and check["argmax_agreement"] == 1.0
    if ran == "bf16":  # measured 0.0076 here (f16: 0.0016, too close to call on other CPUs)
        f32_tolerance = spec.export.parity_atol + spec.export.parity_rtol * check["output_scale"]
        assert check["max_abs_diff"] > f32_tolerance  # the f32 tolerance would have failed it


# --------------------------------------------------------------------------- tables


def test_format_table_uses_tabulate():
    from tabulate import tabulate

    from pruneflow.table import format_table

    rows = [{"name": "a", "n": 1234, "x": 0.5, "s": None}, {"name": "longer", "n": 7, "x": 12345.6, "s": "z"}]
    text = format_table(rows, [("name", "trial"), ("n", "count"), ("x", "value"), ("s", "s")],
                        {"x": lambda v: f"{v:.1f}"})
    expected = tabulate([["a", "1,234", "0.5", "-"], ["longer", "7", "12345.6", "z"]],
                        headers=["trial", "count", "value", "s"], tablefmt="simple",
                        colalign=["left", "right", "right", "right"], disable_numparse=True)
    assert text == "\n".join(line.rstrip() for line in expected.splitlines())
    assert text == (
        "trial      count    value    s\n"
        "-------  -------  -------  ---\n"
        "a          1,234      0.5    -\n"
        "longer         7  12345.6    z"
    )
    left = format_table(rows, [("name", "trial"), ("s", "s")], align=["right", "left"])
    assert left.splitlines()[2:] == ["      a  -", " longer  z"]
    assert format_table([], [("name", "trial")]).splitlines()[0].strip() == "trial"


def test_bench_tables_go_through_pruneflow_table(models, monkeypatch):
    import pruneflow.bench.format as bench_format
    import pruneflow.table

    calls = []

    def spy(headers, rows, align=None):
        calls.append((list(headers), align))
        return pruneflow.table.format_cells(headers, rows, align)

    monkeypatch.setattr(bench_format, "format_cells", spy)
    r = measure(models["onnx"], BenchmarkOptions(warmup=0, rounds=1, iterations=2))
    text = format_result(r)
    assert calls and calls[0][0][:3] == ["backend", "device", "precision"]
    assert calls[0][1][:4] == ["left", "left", "left", "right"]
    assert text.splitlines()[2].split() == ["backend", "device", "precision", "threads", "median", "ms", "p90",
                                            "ms", "p99", "ms", "CV", "%", "fps"]
