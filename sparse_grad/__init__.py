"""sparse_grad: fast sparse fine-tuning for PyTorch.

Per-block gradient norms in one fused pass, top-block selection on device, and an AdamW step
whose cost is proportional to the density. ``SparseAdamW`` is a drop-in for
``torch.optim.AdamW``, ``SparseSGD`` for ``torch.optim.SGD``, ``SparseLion`` runs Lion; ``sparse_grad.param_groups`` picks what it trains (PEFT-style
targeting); ``sparse_grad.ops`` exposes the kernels as functions and
``torch.ops.sparse_grad`` custom ops.
"""
from . import ops
from .layout import BlockLayout
from . import nn
from .optim import SparseAdamW, SparseLion, SparseSGD, SparsifiedOptimizer, sparsify
from .targeting import param_groups

__version__ = "0.1.0"

__all__ = ["BlockLayout", "SparseAdamW", "SparseLion", "SparseSGD", "SparsifiedOptimizer", "nn", "ops", "param_groups",
           "sparsify", "__version__"]
