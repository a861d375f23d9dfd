"""Layers' backward passes that compute only what SparseAdamW's next step reads
(:func:`sparse_backward`, docs/design.md §10)."""
from .sparse_backward import SparseBackward, sparse_backward

__all__ = ["SparseBackward", "sparse_backward"]
