"""Test-only shim: make Triton 3.6's CPU interpreter work with NumPy >= 2.4.

NumPy 2.4 raises on ``int()`` of a 1-element 1-D array; the interpreter stores scalars that way
and converts them with ``int()`` in ``range(...)`` bounds inside kernels (triton-lang/triton#9171).
:func:`patch_interpreter` re-registers ``tensor.__index__`` to take the single element explicitly.
It is called by the interpreter tests and the benchmark's ``--interpret-smoke``, never on import.
"""

from __future__ import annotations


def patch_interpreter() -> None:
    """Idempotently wrap ``triton.runtime.interpreter._patch_lang_tensor`` (no effect on GPU runs)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_stflow_numpy24", False):
        return

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._stflow_numpy24 = True
    interpreter._patch_lang_tensor = patched
