"""Make DeepSpeed ZeRO-3 modules usable under forward-mode AD (the MeanFlow JVP pass).

ZeRO-3 wraps every submodule's inputs and outputs in two autograd Functions,
``PreBackwardFunctionForModule`` and ``PostBackwardFunctionModule``
(deepspeed/runtime/zero/parameter_offload.py), that exist only to trigger parameter
gathering and gradient reduction in the *backward* pass. They have no ``jvp``, so a
forward-mode pass through a ZeRO-3 model raises ``NotImplementedError`` (docs/findings.md §4).

Their forward is ``x.detach()`` - the identity on values - so the exact tangent rule is the
identity as well: ``jvp(ctx, dx) = dx``. DeepSpeed creates these classes per module inside
``deepspeed.initialize`` (stored as ``module.pre_bwd_fn`` / ``module.post_bwd_fn``), so the
rule is attached to each class after initialisation. ZeRO-3's memory-efficient linear has
the same gap and is turned off in the engine config (``memory_efficient_linear: false``).

Tested against the DeepSpeed release pinned in pyproject.toml (tests/test_train_distributed.py,
test_zero3_meanflow_step_matches_zero0, compares ZeRO-3 with ZeRO-0 on the MeanFlow step). A different release that changed these
internals is refused with a clear error rather than silently trained without the JVP.
"""
from __future__ import annotations

import torch.nn as nn

HOOK_ATTRIBUTES = ("pre_bwd_fn", "post_bwd_fn")
TESTED_DEEPSPEED = ("0.19.8",)


def _identity_tangent(ctx, *tangents):
    return tangents[0] if len(tangents) == 1 else tangents


def enable_forward_ad(module: nn.Module) -> int:
    """Give every ZeRO-3 hook Function under ``module`` an identity ``jvp``; returns how many."""
    patched = 0
    for sub in module.modules():
        for attr in HOOK_ATTRIBUTES:
            fn = sub.__dict__.get(attr)
            if fn is not None and "jvp" not in fn.__dict__:
                fn.jvp = staticmethod(_identity_tangent)
                patched += 1
    if patched == 0:
        import deepspeed
        raise RuntimeError(
            f"ZeRO-3 forward-AD patch found no DeepSpeed hook Functions ({', '.join(HOOK_ATTRIBUTES)}) on the "
            f"model; DeepSpeed {deepspeed.__version__} may have changed its internals (tested: "
            f"{', '.join(TESTED_DEEPSPEED)}). Use zero.stage <= 2 or the tested DeepSpeed release.")
    return patched
