"""A faster Triton interpreter for the suite, same results.

Under ``TRITON_INTERPRET=1`` every launch patches ``triton.language`` with the interpreter's
functions (and restores it afterwards), and then every call of a ``@triton.jit`` function inside
the kernel (ours, and ``tl.sum``, ``tl.cumsum``... which are jit functions of
``triton.language.standard``) patches the language modules its module sees again:
``inspect.getmembers`` over them, about 1.3 ms a call, a third of the time of an interpreted
optimizer step. Those inner patches are never restored, so once a launch has patched a set of
modules, patching them again changes nothing (every builtin is already replaced, and the other
attributes are set to equal functions again): the repeats are skipped. Every first patch of a
launch still runs, and nothing is changed if the interpreter's internals are not the ones this
was written against.
"""
from __future__ import annotations

import contextlib
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
    if hasattr(real_patch, "real"):  # installed already
        return True
    active = threading.local()  # .langs: ids of the modules patched so far in this launch
    seen: dict[object, frozenset[int]] = {}

    def langs_of(fn) -> frozenset[int]:
        langs = seen.get(fn)
        if langs is None:
            langs = seen[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                             if isinstance(v, types.ModuleType) and (v is tl or v is tl.core))
        return langs

    def patch_lang(fn):
        patched, langs = getattr(active, "langs", None), langs_of(fn)
        if patched is None:  # outside a launch
            return real_patch(fn)
        if langs <= patched:
            return empty_scope()
        patched |= langs
        return real_patch(fn)

    def launch(self, *args, **kwargs):
        outer = getattr(active, "langs", None)
        active.langs = set()
        try:
            return real_launch(self, *args, **kwargs)
        finally:
            active.langs = outer

    patch_lang.real, launch.real = real_patch, real_launch
    interpreter._patch_lang = patch_lang
    interpreter.GridExecutor.__call__ = launch
    return True


@contextlib.contextmanager
def without_shortcut():
    """The interpreter as it ships, for the test that compares the two."""
    from triton.runtime import interpreter
    patch_lang, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    interpreter._patch_lang, interpreter.GridExecutor.__call__ = patch_lang.real, launch.real
    try:
        yield
    finally:
        interpreter._patch_lang, interpreter.GridExecutor.__call__ = patch_lang, launch
