"""Peak live tensor bytes of a piece of work, counted op by op (no allocator needed).

CPU PyTorch keeps no allocator peak, and RSS (benchmarks/measure.py) mixes in the process and
glibc's caching. ``LiveBytes`` is a TorchDispatchMode: every storage that an op inside it creates
is added to a live count when it appears and taken off when it is freed (a weakref finalizer on
the storage), and the maximum is kept. Views and in-place results share an input's storage and
are not counted again. Tensors made before the mode (weights, the batch) are not counted: the
figure is what the work adds on top of them, which is what an activation budget needs.

It counts storage bytes, so it is exact for the tensors PyTorch hands back; it does not see
kernel workspaces an op frees before returning (cuBLAS/oneDNN scratch) or allocator rounding and
fragmentation, which the plan covers with a margin. It works the same under FakeTensorMode (no
memory, no compute), which is how a full-size model can be counted on a small machine.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storages(values) -> list[torch.UntypedStorage]:
    found = []
    for value in tree_flatten(values)[0]:
        # A ZeroTensor (forward AD's zero tangent of a weight) reports bytes it never allocates.
        if isinstance(value, torch.Tensor) and not value._is_zerotensor():
            storage = value.untyped_storage()
            if storage.nbytes():
                found.append(storage)
    return found


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as meter: work()``; then ``meter.peak`` bytes, ``meter.peak_op`` the op that
    set it. ``reset_peak()`` starts a new peak from the current live count."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.peak_op = ""
        self._sizes: dict[int, int] = {}  # id(storage) -> bytes counted; storages stay one object while alive

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(s) for s in _storages((args, kwargs))}
        for storage in _storages(out):
            key, size = id(storage), storage.nbytes()
            if key in self._sizes:  # ours already; a resize_ may have changed its size
                self.live += size - self._sizes[key]
                self._sizes[key] = size
            elif key not in inputs:  # a new allocation (not a view or an in-place result)
                self._sizes[key] = size
                self.live += size
                weakref.finalize(storage, self._free, key)
        if self.live > self.peak:
            self.peak, self.peak_op = self.live, str(func)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def reset_peak(self) -> None:
        self.peak, self.peak_op = self.live, ""


def fake_cpu_weights(module: torch.nn.Module) -> torch.nn.Module:
    """In place: a module built on the meta device gets fake CPU parameters and buffers (same shapes,
    dtypes and requires_grad), so it runs under FakeTensorMode as a CPU module would, CPU autocast
    included. Call it inside the FakeTensorMode that will run the module."""
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                sub._parameters[name] = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                                           requires_grad=param.requires_grad)
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)
    return module
