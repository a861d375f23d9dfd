"""Benchmarking sparse_grad: named shape sets, timing, one full run and its reports
(``python -m sparse_grad bench``; the pytest-benchmark suite in benchmarks/ uses the shape
sets and the ideal-bytes model from here)."""
from .shapes import SHAPE_SETS, shapes
from .suite import Result, ideal_bytes, make_params, run
from .timing import median_time

__all__ = ["SHAPE_SETS", "Result", "ideal_bytes", "make_params", "median_time", "run", "shapes"]
