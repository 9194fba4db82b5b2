"""The training steps that benchmarks.gpu_step times: model cases, objective variants, one
optimizer step of each, its model FLOPs, and the error of du/dt in each variant's precision."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from emf_dist.attention import jvp_backend
from emf_dist.meanflow import MeanFlowConfig, MeanFlowLoss, time_derivative
from emf_dist.model import VelocityNet, preset
from emf_dist.time_sampling import TimeSamplerConfig


@dataclass
class StepCase:
    label: str
    model: str  # a preset of emf_dist.model
    input_size: int  # latent side: tokens = (input_size / 2)^2
    batch: int


CASES = [StepCase("DiT-B/2, 256 tokens", "B", 32, 256), StepCase("DiT-XL/2, 1024 tokens", "XL", 64, 64)]
TEXT_LEN, TEXT_DIM = 77, 1024  # a padded caption of up to 77 tokens from a 1024-wide text encoder


@dataclass
class Variant:
    label: str
    r_neq_t: float  # 0: flow matching (no JVP pass)
    jvp: str = "fp32"  # "fp32", "tf32" (float32 pass, TF32 matmuls) or "bf16" (the pass under bf16 autocast)
    backend: str = "auto"  # JVP attention: "auto" (fused on CUDA) or "blockwise"


VARIANTS = [Variant("flow matching", 0.0), Variant("MeanFlow 25% r!=t, JVP fp32", 0.25),
            Variant("MeanFlow 25% r!=t, JVP tf32", 0.25, jvp="tf32"),
            Variant("MeanFlow 25% r!=t, JVP bf16", 0.25, jvp="bf16"),
            Variant("MeanFlow 25% r!=t, JVP fp32, blockwise attention", 0.25, backend="blockwise"),
            Variant("MeanFlow 75% r!=t, JVP fp32", 0.75)]


def build(case: StepCase, checkpointing: bool):
    torch.manual_seed(0)
    cfg = preset(case.model, input_size=case.input_size, patch_size=2, in_channels=4, text_dim=TEXT_DIM,
                 checkpointing=checkpointing)
    net = VelocityNet(cfg).cuda()
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(case.batch, 4, case.input_size, case.input_size, device="cuda", generator=gen)
    tokens = torch.randn(case.batch, TEXT_LEN, TEXT_DIM, device="cuda", generator=gen).half()
    real = 1 + torch.arange(case.batch, device="cuda") * 13 % TEXT_LEN
    mask = torch.arange(TEXT_LEN, device="cuda")[None] < real[:, None]
    pooled = torch.randn(case.batch, TEXT_DIM, device="cuda", generator=gen).half()
    return net, (x, tokens, mask, pooled)


@contextlib.contextmanager
def jvp_precision(variant: Variant):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = variant.jvp == "tf32"
    try:
        with jvp_backend(variant.backend):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def objective(variant: Variant) -> MeanFlowLoss:
    mode = "flow_matching" if variant.r_neq_t == 0 else "meanflow"
    return MeanFlowLoss(MeanFlowConfig(mode=mode, time=TimeSamplerConfig(r_neq_t=variant.r_neq_t),
                                       jvp_float32=variant.jvp != "bf16"))


def make_step(net, model, data, variant: Variant, optimizer):
    loss_fn = objective(variant)

    def step():
        # The same (r, t) and noise every step, so the JVP rows and so the FLOPs are fixed.
        gen = torch.Generator(device="cuda").manual_seed(2)
        with jvp_precision(variant), torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = loss_fn(model, *data, net=net, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


class ModelFlops(TorchDispatchMode):
    """Matmul, convolution and attention FLOPs by torch's own formulas (FlopCounterMode's), less
    products with a zero tangent. Forward-mode AD gives a Linear's weight an efficient zero
    tangent that the plain JVP pass never multiplies; under any dispatch mode it is materialised
    (an expanded scalar zero) and multiplied, so FlopCounterMode counts a Linear's JVP as 3x its
    forward instead of 2x, which would overstate the JVP pass's work by half."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None and not any(_materialised_zero(x) for x in tree_leaves((args, kwargs))):
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def _materialised_zero(x) -> bool:
    return isinstance(x, torch.Tensor) and x.numel() > 1 and not any(x.stride())


def step_flops(case: StepCase, variant: Variant) -> float:
    """Model FLOPs of one step: checkpointing off, blockwise JVP attention (see gpu_step's docstring).

    Counted at batch 4 and scaled: without checkpointing the full batch's activations would not
    fit, and every matmul is linear in the batch, the JVP rows included (exactly a quarter or
    three quarters of the rows have r != t when the batch is a multiple of 4)."""
    if case.batch % 4:
        raise ValueError(f"batch {case.batch}: FLOPs are counted at batch 4 and scaled, so use a multiple of 4")
    net, data = build(replace(case, batch=4), checkpointing=False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    step = make_step(net, net, data, Variant(variant.label, variant.r_neq_t, variant.jvp, "blockwise"), optimizer)
    counter = ModelFlops()
    with counter:
        step()
    del net, optimizer
    torch.cuda.empty_cache()
    return float(counter.total) * case.batch / 4


def jvp_error(case: StepCase, variant: Variant) -> str:
    """Relative error of du/dt in this variant's JVP precision and attention against the float32
    pass with IEEE matmuls and the blockwise attention (the reference; its own row reads "-")."""
    if variant.r_neq_t == 0 or (variant.jvp == "fp32" and variant.backend == "blockwise"):
        return "-"
    net, (x, tokens, mask, pooled) = build(case, checkpointing=False)
    gen = torch.Generator(device="cuda").manual_seed(3)
    with torch.no_grad():  # the zero-initialised gates and output layer make u, so du/dt, exactly zero
        for weight in net.parameters():
            if not weight.any():
                weight.normal_(std=0.02, generator=gen)
    rows = slice(0, min(16, case.batch))
    z, v = x[rows], torch.randn(x[rows].shape, device="cuda", generator=gen)
    t = torch.rand(z.shape[0], device="cuda", generator=gen)
    r = t * torch.rand(z.shape[0], device="cuda", generator=gen)
    text = (tokens[rows], mask[rows], pooled[rows])
    drop = torch.zeros(z.shape[0], dtype=torch.bool, device="cuda")

    def du_dt(v_: Variant):
        cfg = MeanFlowConfig(jvp_float32=v_.jvp != "bf16")
        with jvp_precision(v_), torch.autocast("cuda", dtype=torch.bfloat16):
            return time_derivative(net, z, r, t, v, text, drop, cfg).float()

    reference = du_dt(Variant("reference", 1.0, backend="blockwise"))
    return f"{((du_dt(variant) - reference).norm() / reference.norm()).item():.1e}"
