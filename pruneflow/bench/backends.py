"""Inference backends used by the benchmark: OpenVINO and onnxruntime.

Both runtimes are imported lazily (inside the loader functions) so that importing
``pruneflow.bench`` needs neither of them, and nothing here ever imports torch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .ov_api import OpenVINOApi, load_api
from .settings import BenchmarkOptions

__all__ = [
    "ALLOWED_SUFFIXES",
    "LoadedModel",
    "OpenVINOModel",
    "OnnxRuntimeModel",
    "check_model_path",
    "effective_property",
    "load_model",
]

ALLOWED_SUFFIXES: dict[str, tuple[str, ...]] = {
    "openvino": (".xml", ".onnx"),
    "onnxruntime": (".onnx",),
}

_STATIC_SHAPE_HELP = (
    "models must be exported with a static input shape (e.g. [1, 3, 224, 224]) so that the "
    "benchmark times exactly the shape that will be deployed; re-export the model with fixed "
    "dimensions (no dynamic axes) - the benchmark does not reshape models"
)


def check_model_path(model_path: str | Path, backend: str) -> Path:
    """Validate suffix, backend compatibility and existence; return the Path."""
    path = Path(model_path)
    suffix = path.suffix.lower()
    every = sorted({s for suffixes in ALLOWED_SUFFIXES.values() for s in suffixes})
    if suffix not in every:
        raise ValueError(
            f"unsupported model file {str(path)!r}: expected one of {', '.join(every)} "
            "(.xml = OpenVINO IR with its .bin beside it, .onnx = ONNX)"
        )
    if suffix not in ALLOWED_SUFFIXES[backend]:
        raise ValueError(
            f"backend {backend!r} cannot read {str(path)!r}: it accepts only "
            f"{', '.join(ALLOWED_SUFFIXES[backend])} files (use backend='openvino' for OpenVINO IR .xml, "
            "or benchmark the .onnx export)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {str(path)!r}")
    if suffix == ".xml":
        weights = path.with_suffix(".bin")
        if not weights.is_file():
            raise FileNotFoundError(
                f"OpenVINO IR weights not found: {str(weights)!r} (expected beside {str(path)!r})"
            )
    return path


def _static_shape(dims: list[Any], what: str) -> tuple[int, ...]:
    """Return dims as ints, or raise ValueError if any is dynamic/unknown."""
    out = []
    for d in dims:
        if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and int(d) > 0:
            out.append(int(d))
        else:
            raise ValueError(f"{what} has a dynamic input shape {list(dims)}: {_STATIC_SHAPE_HELP}")
    if not out:
        raise ValueError(f"{what} has a scalar input; expected an image batch such as [1, 3, H, W]")
    return tuple(out)


def effective_property(props: dict[str, str], key: str) -> str | None:
    """A compiled property as it applies: top level (CPU, GPU) or, behind AUTO/HETERO/MULTI, that of the
    first executing device ("CPU.INFERENCE_PRECISION_HINT"); None when the model does not report it."""
    if key in props:
        return props[key]
    device = str(props.get("EXECUTION_DEVICES", "")).split(",")[0]
    return props.get(f"{device}.{key}")


class LoadedModel:
    """A compiled model ready for timing. Subclasses implement ``infer`` and ``timed_calls``.

    ``async_requests`` is the number of parallel requests of the asynchronous queue that
    ``timed_async`` runs (OpenVINO with the THROUGHPUT hint), None where there is no queue.
    """

    backend: str
    path: Path
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: np.dtype
    properties: dict[str, str]
    skipped_properties: list[str]
    compile_s: float
    async_requests: int | None = None

    def make_input(self, seed: int) -> np.ndarray:
        """Deterministic random input of the model's (static) shape and dtype."""
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(self.input_shape, dtype=np.float32)
        return np.ascontiguousarray(x.astype(self.input_dtype, copy=False))

    def infer(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """Run once and return (a copy of) the first output."""
        raise NotImplementedError

    def timed_calls(self, x: np.ndarray, n: int) -> tuple[list[float], list[float]]:  # pragma: no cover
        """Run ``n`` calls; return (per-call latency ms, per-call wall ms)."""
        raise NotImplementedError

    def timed_async(self, x: np.ndarray, n: int) -> tuple[list[float], float]:  # pragma: no cover
        """Complete ``n`` inferences through the asynchronous queue (``async_requests`` in flight);
        return (per-request latency ms, wall ms from the first start to the last completion)."""
        raise NotImplementedError(f"{self.backend} has no asynchronous request queue")


def _prop_str(value: Any) -> str:
    """Readable string for an OpenVINO property value (Type -> 'f32', lists -> 'A,B', enums -> name)."""
    get_type_name = getattr(value, "get_type_name", None)
    if callable(get_type_name):  # openvino.Type
        try:
            return str(get_type_name())
        except Exception:  # noqa: BLE001 - fall back to str()
            return str(value)
    if isinstance(value, (list, tuple)):
        return ",".join(_prop_str(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return ",".join(sorted(_prop_str(v) for v in value))
    if isinstance(value, dict):
        return ",".join(f"{k}={_prop_str(v)}" for k, v in value.items())
    if isinstance(value, (str, bool, int, float)):
        return str(value)
    name = getattr(value, "name", None)  # pybind11 enums (ExecutionMode.PERFORMANCE -> PERFORMANCE)
    if isinstance(name, str) and type(value).__module__.startswith("openvino"):
        return name
    return str(value)


def _writable(supported: Any) -> set[str]:
    """Names of writable properties from a SUPPORTED_PROPERTIES answer (dict name->RO/RW/WO, or list)."""
    if isinstance(supported, dict):
        return {str(k) for k, mode in supported.items() if str(mode).upper() != "RO"}
    return {str(k) for k in supported}


VIRTUAL_DEVICES = ("AUTO", "HETERO", "MULTI", "BATCH")


def _device_settings(options: BenchmarkOptions, device: str) -> dict[str, Any]:
    wanted: dict[str, Any] = {
        "PERFORMANCE_HINT": options.hint.upper(),
        "INFERENCE_NUM_THREADS": options.threads,
        "INFERENCE_PRECISION_HINT": options.precision,
    }
    if device.split(".", 1)[0] == "CPU":
        wanted["ENABLE_CPU_PINNING"] = True
    return wanted


def _supported_writable(core: Any, device: str) -> set[str]:
    try:
        return _writable(core.get_property(device, "SUPPORTED_PROPERTIES"))
    except RuntimeError as exc:
        raise RuntimeError(
            f"OpenVINO device {device!r} is not usable on this machine "
            f"(available devices: {core.available_devices}): {exc}"
        ) from exc


def _build_config(core: Any, options: BenchmarkOptions, api: OpenVINOApi | None = None) -> tuple[dict[str, Any], list[str]]:
    """Compile config holding only keys the device supports; also the list of skipped keys.

    Physical devices (CPU, GPU.0, NPU) get the settings directly. Virtual devices (AUTO:GPU,CPU,
    HETERO:..., MULTI:...) get PERFORMANCE_HINT if they accept it, and the per-device settings
    through DEVICE_PROPERTIES (otherwise e.g. the CPU behind AUTO would run with its defaults, which
    on bf16-capable CPUs means bf16). Skipped per-device keys are recorded as "GPU.INFERENCE_NUM_THREADS".
    ``api`` names the settings as the installed OpenVINO does (2022.3: AFFINITY for ENABLE_CPU_PINNING).
    """
    translate = api.translate if api is not None else dict
    device = options.device
    base, _, targets_spec = device.partition(":")
    if base not in VIRTUAL_DEVICES:
        available = list(core.available_devices)
        if device.split(".", 1)[0] not in {d.split(".", 1)[0] for d in available}:
            raise RuntimeError(
                f"OpenVINO device {device!r} is not available on this machine (available devices: {available})"
                + (api.missing_device_help(device) if api is not None else "")
            )
        writable = _supported_writable(core, device)
        wanted = translate(_device_settings(options, device))
        config = {k: v for k, v in wanted.items() if k in writable}
        return config, [k for k in wanted if k not in writable]

    writable = _supported_writable(core, base)
    config: dict[str, Any] = {}
    skipped: list[str] = []
    if "PERFORMANCE_HINT" in writable:
        config["PERFORMANCE_HINT"] = options.hint.upper()
    else:
        skipped.append("PERFORMANCE_HINT")
    names = [t for t in targets_spec.split(",") if t]
    excluded = {t[1:] for t in names if t.startswith("-")}
    targets = [t for t in names if not t.startswith("-")]
    if not targets:
        targets = [d for d in core.available_devices if d not in excluded and d.split(".")[0] not in excluded]
    per_device: dict[str, dict[str, Any]] = {}
    for target in targets:
        wanted = translate(_device_settings(options, target))
        try:
            target_writable = _writable(core.get_property(target, "SUPPORTED_PROPERTIES"))
        except RuntimeError:  # a candidate of AUTO that this machine lacks: AUTO will not pick it
            skipped.extend(f"{target}.{k}" for k in wanted)
            continue
        per_device[target] = {k: v for k, v in wanted.items() if k in target_writable}
        skipped.extend(f"{target}.{k}" for k in wanted if k not in target_writable)
    if per_device:
        config["DEVICE_PROPERTIES"] = per_device
    return config, skipped


class OpenVINOModel(LoadedModel):
    backend = "openvino"

    def __init__(self, path: Path, options: BenchmarkOptions):
        api = load_api()
        self.api = api
        self.path = path
        core = api.core()
        model = core.read_model(str(path))
        inputs = list(model.inputs)
        if len(inputs) != 1:
            raise ValueError(f"{str(path)!r} has {len(inputs)} inputs; the benchmark expects exactly one")
        port = inputs[0]
        try:
            self.input_name = port.get_any_name()
        except RuntimeError:
            self.input_name = "0"
        pshape = port.get_partial_shape()
        if pshape.rank.is_dynamic or not pshape.is_static:
            raise ValueError(f"{str(path)!r} has a dynamic input shape {pshape}: {_STATIC_SHAPE_HELP}")
        self.input_shape = _static_shape([int(d) for d in pshape.to_shape()], repr(str(path)))
        self.input_dtype = np.dtype(port.get_element_type().to_dtype())
        if self.input_dtype.kind != "f":
            raise ValueError(f"{str(path)!r} has a {self.input_dtype} input; expected a floating point input")

        config, self.skipped_properties = _build_config(core, options, api)

        t0 = time.perf_counter()
        try:
            self.compiled = api.compile(core, model, options.device, config)
        except RuntimeError as exc:
            raise RuntimeError(
                f"OpenVINO could not compile {str(path)!r} for device {options.device!r} "
                f"(available devices: {core.available_devices}): {exc}"
            ) from exc
        self.compile_s = time.perf_counter() - t0
        self.request = self.compiled.create_infer_request()
        self.properties = self._read_properties()
        self._queue: Any = None
        self._queue_input: np.ndarray | None = None
        if options.hint == "throughput":
            # as benchmark_app does: as many requests in flight as the compiled model says it needs to
            # keep all its streams busy
            self.async_requests = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
            self._queue = api.async_queue(self.compiled, self.async_requests)

    def _read_properties(self) -> dict[str, str]:
        props: dict[str, str] = {}
        try:
            supported = self.compiled.get_property("SUPPORTED_PROPERTIES")
        except RuntimeError:
            return props
        modes = supported if isinstance(supported, dict) else dict.fromkeys(supported, "RO")
        for name, mode in modes.items():
            if name == "SUPPORTED_PROPERTIES" or str(mode).upper() == "WO":
                continue
            try:
                value = self.compiled.get_property(name)
            except Exception:  # noqa: BLE001 - some properties are listed but not readable
                continue
            if name == "DEVICE_PROPERTIES" and isinstance(value, dict):
                # virtual devices (AUTO/HETERO/MULTI): flatten to "CPU.INFERENCE_PRECISION_HINT" etc.
                for dev, dev_props in value.items():
                    if not isinstance(dev_props, dict):
                        props[f"{dev}"] = _prop_str(dev_props)
                        continue
                    for key, val in dev_props.items():
                        if key != "SUPPORTED_PROPERTIES":
                            props[f"{dev}.{key}"] = _prop_str(val)
                continue
            props[str(name)] = _prop_str(value)
        return dict(sorted(props.items()))

    def infer(self, x: np.ndarray) -> np.ndarray:
        self.request.infer({0: x})
        return np.array(self.request.get_output_tensor(0).data, copy=True)

    def timed_calls(self, x: np.ndarray, n: int) -> tuple[list[float], list[float]]:
        request = self.request
        inputs = {0: x}
        infer = self.api.infer_shared
        perf = time.perf_counter_ns
        latency: list[float] = []
        wall: list[float] = []
        for _ in range(n):
            t0 = perf()
            infer(request, inputs)
            t1 = perf()
            wall.append((t1 - t0) / 1e6)
            latency.append(float(request.latency))  # ms, measured by OpenVINO around the inference
        return latency, wall

    def timed_async(self, x: np.ndarray, n: int) -> tuple[list[float], float]:
        queue = self._queue
        if queue is None:
            raise RuntimeError("timed_async needs a model compiled with hint='throughput'")
        if self._queue_input is not x:
            # fill every request's input tensor once (benchmark_app does the same): start_async() then
            # copies nothing, so the wall clock sees inference, not Python data handling
            for req in queue:
                req.get_input_tensor(0).data[...] = x
            self._queue_input = x
        latency: list[float] = []
        # request.latency: ms from start_async to completion of that request
        queue.set_callback(lambda req, _userdata: latency.append(float(req.latency)))
        perf = time.perf_counter_ns
        t0 = perf()
        for _ in range(n):
            queue.start_async()
        queue.wait_all()
        wall_ms = (perf() - t0) / 1e6
        if len(latency) != n:
            raise RuntimeError(f"asynchronous queue completed {len(latency)} of {n} inferences")
        return latency, wall_ms


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class OnnxRuntimeModel(LoadedModel):
    backend = "onnxruntime"

    def __init__(self, path: Path, options: BenchmarkOptions):
        import onnxruntime as ort

        self.path = path
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        t0 = time.perf_counter()
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        self.compile_s = time.perf_counter() - t0
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{str(path)!r} has {len(inputs)} inputs; the benchmark expects exactly one")
        inp = inputs[0]
        self.input_name = inp.name
        self.input_shape = _static_shape(list(inp.shape), repr(str(path)))
        if inp.type not in _ORT_DTYPES:
            raise ValueError(f"{str(path)!r} has a {inp.type} input; expected a floating point input")
        self.input_dtype = np.dtype(_ORT_DTYPES[inp.type])
        self.skipped_properties = []
        used = self.session.get_session_options()
        self.properties = {
            "EXECUTION_DEVICES": "CPU",
            "EXECUTION_PROVIDERS": ",".join(self.session.get_providers()),
            "INFERENCE_PRECISION_HINT": "f32",
            "INFERENCE_NUM_THREADS": str(used.intra_op_num_threads),
            "INTER_OP_NUM_THREADS": str(used.inter_op_num_threads),
            "GRAPH_OPTIMIZATION_LEVEL": str(used.graph_optimization_level).rsplit(".", 1)[-1],
            "EXECUTION_MODE": str(used.execution_mode).rsplit(".", 1)[-1],
        }

    def infer(self, x: np.ndarray) -> np.ndarray:
        return np.array(self.session.run(None, {self.input_name: x})[0], copy=True)

    def timed_calls(self, x: np.ndarray, n: int) -> tuple[list[float], list[float]]:
        run = self.session.run
        feed = {self.input_name: x}
        perf = time.perf_counter_ns
        wall: list[float] = []
        for _ in range(n):
            t0 = perf()
            run(None, feed)
            t1 = perf()
            wall.append((t1 - t0) / 1e6)
        return list(wall), wall


def load_model(model_path: str | Path, options: BenchmarkOptions) -> LoadedModel:
    """Check the path, read and compile the model with the backend chosen in ``options``."""
    path = check_model_path(model_path, options.backend)
    if options.backend == "openvino":
        return OpenVINOModel(path, options)
    return OnnxRuntimeModel(path, options)
