"""Benchmark settings (pydantic v2). Torch-free, openvino/onnxruntime-free."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["DEVICE_PATTERN", "LEGACY_DEVICE_QUEUES", "BenchmarkOptions", "device_names"]

# One device name: upper-case identifier with an optional ".N" index (CPU, GPU, GPU.0, NPU).
_NAME = r"[A-Z][A-Z0-9_]*(?:\.[0-9]+)?"
# Virtual devices that take a comma separated priority list: AUTO:GPU,CPU  HETERO:GPU.1,CPU  MULTI:...
# AUTO also accepts "-NAME" to exclude a device (AUTO:-CPU).
_VIRTUAL = r"(?:AUTO|HETERO|MULTI|BATCH)"
DEVICE_PATTERN = re.compile(rf"^(?:{_VIRTUAL}:-?{_NAME}(?:,-?{_NAME})*|{_NAME})$")
#: Devices only a legacy benchmark worker can drive, and that worker's Celery queue: MYRIAD (the Neural Compute
#: Stick 2) needs OpenVINO 2022.3 LTS on Python 3.10 (docker/Dockerfile.ncs2); pruneflow.bench_targets routes to it.
LEGACY_DEVICE_QUEUES = {"MYRIAD": "bench_ncs2"}
#: Devices that compute in f16 whatever is asked: the output check must use f16's tolerance.
F16_ONLY_DEVICES = ("MYRIAD",)


def device_names(device: str) -> list[str]:
    """The physical device names a device string uses, without indices: "AUTO:MYRIAD,CPU" -> ["MYRIAD", "CPU"],
    "GPU.1" -> ["GPU"], "AUTO:-CPU" -> [] (an exclusion is no use)."""
    base, sep, targets = device.partition(":")
    names = [t for t in targets.split(",") if t and not t.startswith("-")] if sep else [base]
    return [n.split(".", 1)[0] for n in names]


class BenchmarkOptions(BaseModel):
    """How to benchmark one model. Serialised verbatim into latency.json under "settings"."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["openvino", "onnxruntime"] = Field("openvino", description="inference runtime")
    device: str = Field("CPU", description="OpenVINO device: CPU, GPU, GPU.0, NPU, AUTO, AUTO:GPU,CPU, "
                        "HETERO:GPU,CPU, MULTI:GPU,CPU, MYRIAD (the NCS2: precision f16, only on the OpenVINO 2022.3 "
                        "worker of docker/Dockerfile.ncs2) (onnxruntime: CPU only)")
    precision: Literal["f32", "f16", "bf16"] = Field(
        "f32", description="fixed inference precision (OpenVINO INFERENCE_PRECISION_HINT; onnxruntime: f32 only)")
    threads: int = Field(1, ge=1, le=256, description="inference threads (OpenVINO INFERENCE_NUM_THREADS, "
                         "onnxruntime intra_op_num_threads)")
    hint: Literal["latency", "throughput"] = Field(
        "latency",
        description="OpenVINO PERFORMANCE_HINT. latency: one request at a time, each call timed. throughput: "
        "an asynchronous queue of OPTIMAL_NUMBER_OF_INFER_REQUESTS requests; throughput = completed "
        "inferences / wall time, latencies are per request with the others in flight (OpenVINO only).",
    )
    warmup: int = Field(20, ge=0, description="untimed calls before the first round")
    rounds: int = Field(
        5, ge=1,
        description="timed rounds of `iterations` calls; median, p90 and p99 are over the calls of all rounds "
        "pooled, and the spread (CV) is that of the per-round medians",
    )
    iterations: int = Field(100, ge=1, description="timed calls per round")
    seed: int = Field(0, ge=0, description="seed of the random benchmark input")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            hint = ""
            if DEVICE_PATTERN.match(value.upper()):
                hint = f" (device names are upper-case: did you mean {value.upper()!r}?)"
            raise ValueError(
                f"device {value!r} is not a valid OpenVINO device string{hint}; expected an upper-case "
                "device name with an optional .N index (CPU, GPU, GPU.0, NPU, AUTO) or a virtual device "
                "with a priority list (AUTO:GPU,CPU, HETERO:GPU,CPU, MULTI:GPU.0,GPU.1)"
            )
        return value

    @model_validator(mode="after")
    def _check_backend_combination(self) -> BenchmarkOptions:
        f16_only = [d for d in device_names(self.device) if d in F16_ONLY_DEVICES]
        if f16_only and self.precision != "f16":
            raise ValueError(
                f"device={self.device!r} computes in f16 only ({f16_only[0]}): set precision='f16', so the output "
                f"check uses f16's tolerance (precision={self.precision!r} would fail it or claim what did not run)"
            )
        if self.backend == "onnxruntime":
            if self.device != "CPU":
                raise ValueError(
                    f"device={self.device!r} is not supported with backend='onnxruntime' "
                    "(only the CPU execution provider is used): set device='CPU' or backend='openvino'"
                )
            if self.precision != "f32":
                raise ValueError(
                    f"precision={self.precision!r} is not supported with backend='onnxruntime' "
                    "(it runs the model in f32): set precision='f32' or backend='openvino'"
                )
            if self.hint != "latency":
                raise ValueError(
                    f"hint={self.hint!r} is not supported with backend='onnxruntime' (it runs one request at "
                    "a time, so it cannot measure throughput): set hint='latency' or backend='openvino'"
                )
        return self
