"""Results of the benchmarks of this run, for the closing table printed by conftest.py."""
from __future__ import annotations

RESULTS: list[dict] = []


def record(benchmark, name: str, group: str, params: int, ideal_bytes: float):
    """Keep what the closing table needs from a finished pytest-benchmark run."""
    stats = benchmark.stats.stats if benchmark.stats else None
    if stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    benchmark.extra_info.update(params=params, ideal_bytes=ideal_bytes)
    RESULTS.append(dict(name=name, group=group, median=stats.median, params=params, ideal_bytes=ideal_bytes))
