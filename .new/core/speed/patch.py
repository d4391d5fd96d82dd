"""How the speed code replaces a module's forward, and how other code can tell that it did.

    patch_forward(module, fast_forward)    # module.forward = fast_forward bound to module
    is_patched(module)                     # True once patched (a module is patched at most once)
    original_forward(module)(*args)        # the forward it had before, for what the patch skips

One attribute on the module holds the original forward; this file is the only one that names it.
"""

from __future__ import annotations

import types

_ORIGINAL = "_qlora_original_forward"


def patch_forward(module, forward) -> None:
    """Make `forward(module, ...)` the module's forward, keeping the original reachable."""
    setattr(module, _ORIGINAL, module.forward)
    module.forward = types.MethodType(forward, module)


def is_patched(module) -> bool:
    return hasattr(module, _ORIGINAL)


def original_forward(module):
    return getattr(module, _ORIGINAL)
