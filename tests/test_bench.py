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

REPO_ROOT = Path(__file__).resolve().parents[1]

FAST = {"warmup": 3, "rounds": 3, "iterations": 10}

RESULT_KEYS = {
    "model", "backend", "device", "settings", "input_shape", "latency_ms", "round_medians_ms",
    "round_median_cv", "round_order", "n_samples", "throughput_fps", "wall_mean_ms", "compile_s",
    "compiled_properties", "skipped_properties", "load_avg_before", "load_avg_after", "cpu_count",
    "cpu_model", "versions", "host", "started_at", "duration_s", "check_max_abs_diff",
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
        results[backend] = bench.measure(path, opts)["latency_ms"]["median"]
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
