"""torch.optim.Optimizer's step wrapper, without its profiler range when nothing would record it.

``Optimizer.__init__`` wraps a subclass's ``step`` in ``Optimizer.profile_hook_step``: the step
pre- and post-hooks (global and per optimizer) and a ``record_function`` range, entered on every
call. Entering and leaving that range are two dispatcher calls through Python, about 40 µs of a
117 µs steady-state step of 192 tensors on the 2-core CPU of benchmarks/RESULTS.md, whether or
not a profiler runs. :func:`hook_step` gives the same behaviour for less: a step with no hook
registered, no profiler running (``torch.autograd._profiler_enabled()``: torch.profiler, the
autograd profiler, ``emit_nvtx``) and no compilation under way calls the step directly; any
other goes through torch's own wrapper, unchanged. Marking the result ``hooked`` is what tells
``Optimizer.__init__`` not to wrap it again.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer


def _wrapper_needed(optimizer: Optimizer) -> bool:
    # is_compiling first: dynamo folds it to True and never traces the profiler query.
    return bool(torch.compiler.is_compiling() or torch.autograd._profiler_enabled()
                or optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
                or _torch_optimizer._global_optimizer_pre_hooks or _torch_optimizer._global_optimizer_post_hooks)


def hook_step(step: Callable) -> Callable:
    """``step`` with torch's hooks and profiler range where they do anything (see the module)."""
    wrapped = Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        if _wrapper_needed(self):
            return wrapped(self, *args, **kwargs)
        out = step(self, *args, **kwargs)
        self._optimizer_step_code()  # the profiler's entry point, as in torch's wrapper
        return out

    wrapper.hooked = True
    return wrapper
