"""Results of the benchmarks of this run, for the closing table printed by conftest.py."""
from __future__ import annotations

RESULTS: list[dict] = []


def record(benchmark, name: str, group: str, params: int, ideal_bytes: float, baseline: str = "copy"):
    """Keep what the closing table needs from a finished pytest-benchmark run.

    ``baseline`` names the record of the same group whose rate is 100% bandwidth for this one:
    "copy" (read + write) for optimizer steps, "read" (a reduction) for the norm pass.
    """
    stats = benchmark.stats.stats if benchmark.stats else None
    if stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    benchmark.extra_info.update(params=params, ideal_bytes=ideal_bytes)
    RESULTS.append(dict(name=name, group=group, median=stats.median, params=params,
                        ideal_bytes=ideal_bytes, baseline=baseline))
