"""Results of the benchmarks of this run, for the closing table printed by conftest.py."""
from __future__ import annotations

import math

RESULTS: list[dict] = []


def record(benchmark, name: str, group: str, params: int, ideal_bytes: float, baseline: str = "copy",
           extras: dict | None = None):
    """Keep what the closing table needs from a finished pytest-benchmark run.

    ``baseline`` names the record of the same group whose rate is 100% bandwidth for this one:
    "copy" (read + write) for optimizer steps, "read" (a reduction) for the norm pass.
    ``extras``: a full step's pipelined and host times and Python calls (the ``step_extras``
    fixture), kept in the closing table and in pytest-benchmark's extra_info (NaN as None).
    """
    stats = benchmark.stats.stats if benchmark.stats else None
    if stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    extras = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in (extras or {}).items()}
    benchmark.extra_info.update(params=params, ideal_bytes=ideal_bytes,
                                **{f"{k}_seconds" if k != "python_calls" else k: v for k, v in extras.items()})
    RESULTS.append(dict(name=name, group=group, median=stats.median, params=params,
                        ideal_bytes=ideal_bytes, baseline=baseline, **extras))
