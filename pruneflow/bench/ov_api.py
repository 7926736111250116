"""The Python API of the installed OpenVINO, chosen by its version.

OpenVINO 2023.0 and later (the benchmark lock pins 2026.4): ``openvino.Core``, typed property values, per-device
settings of AUTO/HETERO/MULTI through ``DEVICE_PROPERTIES``, ``infer(..., share_inputs=True)``.

OpenVINO 2022.3 LTS, the last release with the MYRIAD (Neural Compute Stick 2) plugin, on Python 3.10 (the
legacy worker of ``docker/Dockerfile.ncs2``, queue ``bench_ncs2``): ``openvino.runtime.Core``; the CPU pins its
threads with ``AFFINITY`` (``ENABLE_CPU_PINNING`` came in 2023.0); virtual devices do not accept
``DEVICE_PROPERTIES`` (the process dies on a nested dict), so per-device settings are set on the Core before
compiling; ``infer`` takes no ``share_*`` arguments.

Everything but ``load_api``/``installed_version`` is pure and imports no OpenVINO, so both mappings are tested
on any interpreter. This module must parse and run on Python 3.10.
"""

from __future__ import annotations

import importlib
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Any

__all__ = [
    "LEGACY_RELEASE",
    "OpenVINOApi",
    "OpenVINOVersionError",
    "api_kind",
    "installed_version",
    "legacy_properties",
    "load_api",
    "release",
    "split_device_properties",
]

#: The one legacy release supported: 2022.3 LTS (MYRIAD plugin; removed in 2023.0).
LEGACY_RELEASE = (2022, 3)
#: The first release of the current API (``openvino.Core``, ENABLE_CPU_PINNING, share_inputs).
FIRST_CURRENT = (2023, 0)
# ENABLE_CPU_PINNING (2023.0+) as 2022.3 says it: AFFINITY CORE pins threads to cores, NONE does not.
_PINNING = {True: "CORE", False: "NONE"}


class OpenVINOVersionError(RuntimeError):
    """The installed OpenVINO is a release this package has no API adapter for."""


def release(version: str) -> tuple[int, int]:
    """(year, release) of an OpenVINO version string: "2022.3.2" and "2022.3.2-9279-e2c7e4d7b4d-releases/2022/3"
    give (2022, 3); "2026.4.1" gives (2026, 4)."""
    m = re.match(r"^\s*(\d{4})\.(\d+)", str(version))
    if not m:
        raise OpenVINOVersionError(f"cannot read an OpenVINO release from the version {version!r}")
    return int(m.group(1)), int(m.group(2))


def api_kind(version: str) -> str:
    """"current" for 2023.0 and later, "legacy" for 2022.3 LTS; any other release is refused."""
    rel = release(version)
    if rel >= FIRST_CURRENT:
        return "current"
    if rel == LEGACY_RELEASE:
        return "legacy"
    raise OpenVINOVersionError(
        f"OpenVINO {version} is not supported: install 2023.0 or later (requirements-bench.lock pins the "
        "release that is tested), or 2022.3 LTS for the Neural Compute Stick 2 (MYRIAD; docker/Dockerfile.ncs2)")


def legacy_properties(wanted: dict[str, Any]) -> dict[str, Any]:
    """Compile settings of the current API as OpenVINO 2022.3 names and values them.

    ENABLE_CPU_PINNING True/False -> AFFINITY CORE/NONE; PERFORMANCE_HINT, INFERENCE_NUM_THREADS and
    INFERENCE_PRECISION_HINT ("f32", "bf16", "f16") are the same in both. Values must be scalars: 2022.3
    kills the process on a nested dict rather than raising, so one is refused here (DEVICE_PROPERTIES goes
    through ``split_device_properties``)."""
    out: dict[str, Any] = {}
    for key, value in wanted.items():
        if isinstance(value, (dict, list, tuple, set)):
            raise ValueError(f"OpenVINO 2022.3 takes only scalar property values; {key}={value!r} is not one")
        if key == "ENABLE_CPU_PINNING":
            if not isinstance(value, bool):
                raise ValueError(f"ENABLE_CPU_PINNING must be True or False, not {value!r}")
            out["AFFINITY"] = _PINNING[value]
        elif isinstance(value, bool):
            out[key] = "YES" if value else "NO"
        else:
            out[key] = value
    return out


def split_device_properties(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(compile config without DEVICE_PROPERTIES, {device: its settings}) for 2022.3, where AUTO/HETERO/MULTI
    refuse DEVICE_PROPERTIES: each device's settings are set on the Core instead, and the virtual device
    compiles its part of the model with them."""
    rest = {k: v for k, v in config.items() if k != "DEVICE_PROPERTIES"}
    per_device = config.get("DEVICE_PROPERTIES") or {}
    if not isinstance(per_device, dict) or not all(isinstance(v, dict) for v in per_device.values()):
        raise ValueError(f"DEVICE_PROPERTIES must map device names to settings, not {per_device!r}")
    return legacy_properties(rest), {dev: legacy_properties(props) for dev, props in per_device.items()}


@dataclass(frozen=True)
class OpenVINOApi:
    """What the benchmark needs of one OpenVINO API. ``module`` is ``openvino`` (current) or
    ``openvino.runtime`` (2022.3); both provide Core and AsyncInferQueue."""

    kind: str  # "current" | "legacy"
    version: str
    module: Any

    def core(self) -> Any:
        return self.module.Core()

    def async_queue(self, compiled: Any, jobs: int) -> Any:
        return self.module.AsyncInferQueue(compiled, jobs)

    def translate(self, wanted: dict[str, Any]) -> dict[str, Any]:
        """One device's wanted settings under this API's property names (filtered afterwards by what the
        device reports as writable)."""
        return legacy_properties(wanted) if self.kind == "legacy" else dict(wanted)

    def compile(self, core: Any, model: Any, device: str, config: dict[str, Any]) -> Any:
        if self.kind == "legacy":
            config, per_device = split_device_properties(config)
            for target, props in per_device.items():
                if props:
                    core.set_property(target, props)
        return core.compile_model(model, device, config)

    def infer_shared(self, request: Any, inputs: dict) -> None:
        """One synchronous inference without copying inputs or outputs where the API allows it (2022.3
        copies the outputs into the dict it returns; the timed latency is OpenVINO's own either way)."""
        if self.kind == "legacy":
            request.infer(inputs)
        else:
            request.infer(inputs, share_inputs=True, share_outputs=True)

    def missing_device_help(self, device: str) -> str:
        """Why a device may be missing, for the error that names the available ones."""
        if device.split(".", 1)[0] != "MYRIAD":
            return ""
        if self.kind == "current":
            return (f"; OpenVINO {self.version} has no MYRIAD plugin (removed in 2023.0): a MYRIAD benchmark runs on the "
                    "legacy worker (docker/Dockerfile.ncs2, OpenVINO 2022.3, queue bench_ncs2)")
        return ("; is the Neural Compute Stick 2 plugged in, /dev/bus/usb passed to the container (with the device "
                "cgroup rule 'c 189:* rmw') and the host's udev rules (97-myriad-usbboot.rules) installed?")


def installed_version() -> str | None:
    """The installed OpenVINO's version: from its distribution (pip), else from the runtime itself (the
    2022.3 archive install has no distribution metadata); None when OpenVINO is not installed."""
    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:
        pass
    for name in ("openvino", "openvino.runtime"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            return None
        get_version = getattr(mod, "get_version", None)
        if callable(get_version):
            return str(get_version())
    return None


def runtime_version_if_loaded() -> str | None:
    """The OpenVINO version where OpenVINO is already imported (cheap), else None; for the environment record."""
    if "openvino" not in sys.modules:
        return None
    return installed_version()


_API: OpenVINOApi | None = None


def load_api() -> OpenVINOApi:
    """The adapter of the installed OpenVINO (imported once)."""
    global _API
    if _API is None:
        version = installed_version()
        if version is None:
            raise OpenVINOVersionError("OpenVINO is not installed in this environment")
        kind = api_kind(version)
        module = importlib.import_module("openvino" if kind == "current" else "openvino.runtime")
        _API = OpenVINOApi(kind, version, module)
    return _API
