"""Benchmarking sparse_grad: named shape sets, timing, one full run and its reports
(``python -m sparse_grad bench``; the pytest-benchmark suite in benchmarks/ uses the shape
sets, the timing and the ideal-bytes model from here)."""
from .shapes import SHAPE_SETS, shapes
from .suite import Result, ideal_bytes, make_params, run
from .timing import (HostTime, host_time, kernels_timed, median_time, pipelined_time, python_calls,
                     python_calls_per_step, synced_time)

__all__ = ["SHAPE_SETS", "HostTime", "Result", "host_time", "ideal_bytes", "kernels_timed", "make_params",
           "median_time", "pipelined_time", "python_calls", "python_calls_per_step", "run", "shapes", "synced_time"]
