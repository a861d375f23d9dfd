"""The optimizer: :class:`SparseAdamW` and its parts (docs/design.md §1, §3, §4, §9).

Modules, each named for what it holds: ``sparse_adamw`` (the thin ``torch.optim.Optimizer``
class), ``options`` (group options and their checks), ``binding`` (a group checked once and
bound), ``functional`` (one step of one group), ``group_view`` / ``sharding`` (plain and
FSDP2-sharded groups behind one interface), ``group_state`` (selection, compact slabs),
``selection`` and ``random_draws`` (what a reselection ranks and takes), ``gradients``
(AMP scaling, clipping, error feedback), ``dense_state`` / ``compact_state`` (the two state
layouts), ``checkpoint`` (what a load checks), ``rules`` (the update of each optimizer),
``sparse_sgd`` (SparseSGD, SparseLion), and ``sparsify`` / ``torch_rules`` (any elementwise
torch.optim optimizer on the selected blocks). Public API: ``SparseAdamW``, ``SparseSGD``,
``SparseLion``, ``sparsify``.
"""
from .sparse_adamw import SparseAdamW
from .sparse_sgd import SparseLion, SparseSGD
from .sparsify import SparsifiedOptimizer, sparsify

__all__ = ["SparseAdamW", "SparseLion", "SparseSGD", "SparsifiedOptimizer", "sparsify"]
