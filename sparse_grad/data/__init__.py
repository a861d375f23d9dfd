"""Coordinated data selection: score candidate examples by the gradient they would send into the
currently selected parameter blocks, and train on the top share (:class:`InfluenceSelector`,
:class:`InfluenceSampler`); per-example block norms without per-example gradients
(:class:`PerExampleNorms`)."""
from .blocks import ParamBlocks, resolve_blocks
from .influence import DataSelection, InfluenceSampler, InfluenceSelector, top_indices
from .per_example import PerExampleNorms

__all__ = ["DataSelection", "InfluenceSampler", "InfluenceSelector", "ParamBlocks", "PerExampleNorms",
           "resolve_blocks", "top_indices"]
