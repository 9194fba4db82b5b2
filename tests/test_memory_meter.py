"""LiveBytes (benchmarks/memory_meter.py) against bytes known in advance, against the kernel's RSS,
and its fake-tensor count against the real one on the adapted SANA."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.cuda_autocast import cuda_layer_norm_rule
from benchmarks.memory_meter import LiveBytes
from benchmarks.sana_passes import peak_bytes, sana_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LAYERS, ROWS, WIDTH = 4, 8, 64
ACTIVATION = ROWS * WIDTH * 4  # one float32 [ROWS, WIDTH] tensor


def linear_stack():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)]), torch.randn(ROWS, WIDTH)


def test_no_grad_forward_holds_two_activations_at_once():
    net, x = linear_stack()
    with torch.no_grad(), LiveBytes() as meter:
        net(x)
    assert meter.peak == 2 * ACTIVATION  # a layer's input and its output; x itself predates the meter


def test_gradient_pass_keeps_each_layers_input_and_backward_leaves_only_the_weight_gradients():
    net, x = linear_stack()
    with LiveBytes() as meter:
        out = net(x)
        # the inputs saved for the weight gradients of layers 2..LAYERS (layer 1's is x) and the output
        assert meter.live == LAYERS * ACTIVATION
        out.sum().backward()
        del out
    assert meter.live == LAYERS * WIDTH * WIDTH * 4  # the .grad of every weight, nothing else


def test_forward_ad_counts_primals_and_tangents():
    net, x = linear_stack()
    dx = torch.randn_like(x)
    with torch.no_grad(), LiveBytes() as meter, fwAD.dual_level():
        tangent = fwAD.unpack_dual(net(fwAD.make_dual(x, dx))).tangent
    # At layers 2..: the input's primal and tangent, the output's primal, and two tangent products,
    # dx W^T and x 0^T, before their sum: forward AD multiplies by the weight's zero tangent (a
    # ZeroTensor, which reports bytes it never allocates and is not counted, then expanded zeros).
    assert meter.peak == 6 * ACTIVATION
    assert meter.live == ACTIVATION and tangent.shape == x.shape  # only the returned tangent is left


RSS_CHECK = """
import json, torch, torch.nn as nn
from benchmarks.measure import time_and_peak
from benchmarks.memory_meter import LiveBytes
torch.set_num_threads(1)
torch.manual_seed(0)
net, x = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)]), torch.randn(131072, 64)  # 32 MiB
def work():
    with LiveBytes() as meter:
        net(x).pow(2).mean().backward()
    net.zero_grad(set_to_none=True)
    return meter.peak
counted = work()
print(json.dumps({"rss": time_and_peak(lambda: work, repeats=2)["peak_mib"], "counted": counted / 2**20}))
"""


def test_count_agrees_with_the_kernels_resident_memory():
    """An independent reading: RSS growth with glibc's mmap threshold pinned (benchmarks/measure.py),
    on a gradient pass whose tensors are large enough (32 MiB each) to dwarf allocator noise."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-c", RSS_CHECK], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["counted"] >= 128  # three saved inputs of 32 MiB and the output
    assert 0.95 * result["counted"] <= result["rss"] <= 1.1 * result["counted"], result


def test_cuda_layer_norm_rule_makes_cpu_autocast_keep_layer_norm_in_float32():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.layer_norm(x, (8,)).dtype == torch.bfloat16  # CPU autocast's own rule
        with cuda_layer_norm_rule():
            assert F.layer_norm(x, (8,)).dtype == torch.float32  # CUDA's
        assert F.layer_norm(x, (8,)).dtype == torch.bfloat16  # and gone again


def test_fake_tensor_count_equals_the_real_count_on_the_adapted_sana():
    config = sana_config(width=224, layers=1, side=8)
    passes = {"grad": [2], "jvp": [2], "forward": [2]}
    real = peak_bytes(config, passes, fake=False, text_length=8)
    assert set(real) == {"grad_forward", "grad_backward", "jvp", "forward"}
    assert all(peaks[0] > 1 << 20 for peaks in real.values())  # every pass allocates for real
    assert peak_bytes(config, passes, fake=True, text_length=8) == real
