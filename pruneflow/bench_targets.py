"""Which benchmark worker measures a trial: the deployment's benchmark targets, and a trial's pick among them.

A *target* is one device host of the deployment: ``[pruneflow] devices`` names them (``cpu0, cpu1, ncs2``),
and each has a benchmark worker on queue ``bench_<name>`` with a pool ``bench_<name>`` of one slot, so two
targets measure at the same time while one target never measures twice at once. A deployment without
``devices`` (the embedded default) has one target: the configured benchmark queue and pool.

A trial picks its target with ``benchmark.target``; without one, a legacy device (MYRIAD: only the OpenVINO
2022.3 worker drives it) goes to the target that serves its queue (``bench_ncs2``), anything else to the
deployment's default (the target on ``[pruneflow] benchmark_queue``). Pure: no Airflow, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from pruneflow.bench.settings import LEGACY_DEVICE_QUEUES, device_names
from pruneflow.constants import ID_RE, ID_RULE
from pruneflow.spec import SpecError

__all__ = ["BenchTarget", "bench_targets", "route"]


@dataclass(frozen=True)
class BenchTarget:
    name: str  # "" for the single target of a deployment without [pruneflow] devices
    queue: str
    pool: str


def bench_targets(devices: str, default_queue: str, default_pool: str) -> tuple[BenchTarget, ...]:
    """The deployment's targets, the default first: one per name of ``devices`` (comma separated), or the
    single unnamed target (``default_queue``, ``default_pool``) when ``devices`` is empty."""
    names = [d.strip() for d in devices.split(",") if d.strip()]
    bad = [n for n in names if not ID_RE.match(n)]
    if bad:
        raise ValueError(f"[pruneflow] devices: {bad[0]!r} is not a device name ({ID_RULE})")
    if not names:
        return (BenchTarget("", default_queue, default_pool),)
    found = [BenchTarget(n, f"bench_{n}", f"bench_{n}") for n in dict.fromkeys(names)]
    found.sort(key=lambda t: t.queue != default_queue)  # stable: the default first, then as configured
    return tuple(found)


def _names(targets: tuple[BenchTarget, ...]) -> str:
    return ", ".join(t.name for t in targets if t.name) or "none (no [pruneflow] devices: one benchmark queue, " \
        f"{targets[0].queue})"


def route(device: str, target: str | None, targets: tuple[BenchTarget, ...]) -> BenchTarget:
    """The target that measures a benchmark on OpenVINO ``device`` that asked for ``target`` (None: the
    default). Raises SpecError naming the field and the allowed values."""
    legacy = next((LEGACY_DEVICE_QUEUES[n] for n in device_names(device) if n in LEGACY_DEVICE_QUEUES), None)
    if target:
        chosen = next((t for t in targets if t.name == target), None)
        if chosen is None:
            raise SpecError(f"benchmark.target: {target!r} is not a benchmark target of this deployment "
                            f"(allowed: {_names(targets)}; [pruneflow] devices)")
        if legacy and chosen.queue != legacy:
            raise SpecError(f"benchmark.device: {device!r} runs only on the legacy worker of queue {legacy}, and "
                            f"benchmark.target {target!r} is queue {chosen.queue}: set benchmark.target to the target "
                            f"on {legacy}, or leave it empty")
        return chosen
    if legacy:
        chosen = next((t for t in targets if t.queue == legacy), None)
        if chosen is None:
            raise SpecError(f"benchmark.device: {device!r} needs the legacy benchmark worker on queue {legacy} "
                            f"(docker/Dockerfile.ncs2), and this deployment has no such target (targets: "
                            f"{_names(targets)}): add {legacy.removeprefix('bench_')} to [pruneflow] devices")
        return chosen
    return targets[0]
