"""GPU kernels, each beside the torch reference it is tested against."""

from __future__ import annotations

import sys


def compiled_variants() -> dict[str, int]:
    """How many specializations of each of our Triton kernels this process has compiled, by
    `module.kernel`; {} where Triton was never imported (CPU runs). A benchmark compares two of
    these: a compile inside its timed window stalls every request in flight."""
    if "triton" not in sys.modules:
        return {}
    from triton.runtime.jit import JITFunction

    counts = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("dist_runtime.kernels."):
            for attr, fn in vars(module).items():
                if isinstance(fn, JITFunction) and fn.fn.__module__ == name:  # not an imported helper
                    # device_caches: device -> (compiled kernels by specialization key, ...)
                    counts[f"{name.rsplit('.', 1)[1]}.{attr}"] = sum(len(c[0]) for c in fn.device_caches.values())
    return counts
