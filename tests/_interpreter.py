"""A faster Triton interpreter for the suite, same results.

Under ``TRITON_INTERPRET=1`` every launch patches ``triton.language`` with the interpreter's
functions (and restores it afterwards), and then every call of a ``@triton.jit`` helper inside
the kernel patches it again: ``inspect.getmembers`` over the language modules, about 1.3 ms a
call, a third of the time of an interpreted optimizer step. Inside a launch that has already
patched the same modules, the repeat changes nothing (every builtin is already replaced, and the
other attributes are set to equal functions again; the helper's patches are never restored
either), so it is skipped. A helper whose module sees other language modules than its kernel's
is patched as before, and nothing is changed if the interpreter's internals are not the ones
this was written against.
"""
from __future__ import annotations

import sys
import threading
import types


def skip_repatching_inside_launches() -> bool:
    """Install the shortcut; False where the interpreter does not look as expected."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        real_patch = interpreter._patch_lang
        real_launch = interpreter.GridExecutor.__call__
        empty_scope = interpreter._LangPatchScope
    except (ImportError, AttributeError):
        return False
    if getattr(real_patch, "_skips_repeats", False):
        return True
    active = threading.local()

    def langs_of(fn) -> frozenset[int]:
        return frozenset(id(v) for v in fn.__globals__.values()
                         if isinstance(v, types.ModuleType) and (v is tl or v is tl.core))

    def patch_lang(fn):
        outer = getattr(active, "langs", None)
        # The launch's own patch (called from GridExecutor.__call__) always runs.
        if outer is not None and sys._getframe(1).f_code is not real_launch.__code__ and langs_of(fn) <= outer:
            return empty_scope()
        return real_patch(fn)

    def launch(self, *args, **kwargs):
        outer = getattr(active, "langs", None)
        active.langs = langs_of(self.fn)
        try:
            return real_launch(self, *args, **kwargs)
        finally:
            active.langs = outer

    patch_lang._skips_repeats = True
    interpreter._patch_lang = patch_lang
    interpreter.GridExecutor.__call__ = launch
    return True
