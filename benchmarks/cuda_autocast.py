"""CPU autocast with CUDA's float32 rule for layer_norm, so a CPU count sees a GPU run's dtypes.

The trainer runs the gradient pass under bf16 autocast on CUDA. CPU autocast casts the same
matmuls and convolutions to bf16, but its float32 list is not CUDA's: CUDA computes layer_norm in
float32 (its output is float32 whatever the input), CPU keeps it in the input's dtype. Through a
SANA block that changes what is saved for backward (the modulation multiplies the norm's output and
saves it). Tracing every op of the adapted SANA's forward and backward under CPU autocast, layer_norm
is the only op on CUDA's float32 list that meets a bf16 input in the forward (backward runs outside
autocast on either device), so this one rule makes the CPU dtypes the GPU's.
"""

from __future__ import annotations

import contextlib
import warnings

import torch


def _layer_norm_float32(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    # What CUDA's autocast does for layer_norm: cast floating inputs to float32, then run the op
    # with autocast out of the way.
    cast = lambda x: x.float() if x is not None and x.is_floating_point() else x  # noqa: E731
    with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
        return torch.ops.aten.layer_norm(cast(input), normalized_shape, cast(weight), cast(bias), eps, cudnn_enable)


@contextlib.contextmanager
def cuda_layer_norm_rule():
    """Inside: CPU autocast computes layer_norm in float32, as CUDA autocast does."""
    library = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")  # replacing the CPU fallthrough is the point
        library.impl("layer_norm", _layer_norm_float32, "AutocastCPU")
    try:
        yield
    finally:
        library._destroy()
