"""What the DAG files read from ``[pruneflow]`` when they are parsed: the benchmark queue and pools.

Read at each call, not at import: the dag-processor and the tests parse DAG files again under other
settings, and this module stays imported.
"""

from __future__ import annotations

from typing import NamedTuple


class Deployment(NamedTuple):
    benchmark_queue: str
    benchmark_pool: str
    #: the machine-wide pool of CPU-heavy tasks ("default_pool" when there is none)
    cpu_pool: str
    cpu_slots: int
    devices: str

    def benchmark_slots(self, pool: str) -> int:
        """Slots a benchmark takes: in the CPU pool, all of them (nothing else runs while it measures)."""
        return self.cpu_slots if pool == self.cpu_pool else 1


def deployment() -> Deployment:
    from airflow.configuration import conf

    return Deployment(
        benchmark_queue=conf.get("pruneflow", "benchmark_queue", fallback="default"),
        benchmark_pool=conf.get("pruneflow", "benchmark_pool", fallback="benchmark_cpu"),
        cpu_pool=conf.get("pruneflow", "cpu_pool", fallback="") or "default_pool",
        cpu_slots=conf.getint("pruneflow", "cpu_pool_slots", fallback=1),
        devices=conf.get("pruneflow", "devices", fallback=""),
    )
