"""Peak live bytes of the MeanFlow step's passes on the adapted SANA, as the fine-tune runs them on GPU.

    grad     the gradient pass: bf16 autocast (with CUDA's layer_norm rule, benchmarks/cuda_autocast.py),
             diffusers' gradient checkpointing of the blocks, forward and backward. Each trainable
             parameter's gradient is dropped once accumulated, as ZeRO copies it into its reduce bucket
             (the bucket and the gradient partitions are model states, counted apart).
    jvp      the JVP pass: emf_dist.meanflow.time_derivative as the loss calls it (float32, autocast
             off, forward-mode AD through the JVP attention processors), ``jvp_chunk`` rows at a time
    forward  a no-grad bf16 forward of the trained model: folded guidance's conditional + unconditional
             pass; it also stands for the teacher's (objective.velocity=teacher), whose frozen weights
             autocast does not cache, so the teacher holds less
    step     the whole MeanFlowLoss call (every row r != t) and its backward, on real tensors only:
             the check that the step's peak is its largest pass's plus the batch

The model is built as the fine-tune builds it (EMF's conversion and freezing, checkpointing on) on
real CPU tensors, or with ``fake`` on the meta device and counted under FakeTensorMode, where no
tensor holds memory or is computed: the same ops, shapes and dtypes, so the same count
(tests/test_memory_meter.py), at any size.
"""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.cuda_autocast import cuda_layer_norm_rule
from benchmarks.measure import time_and_peak
from benchmarks.memory_meter import LiveBytes, fake_cpu_weights
from emf_dist.meanflow import MeanFlowConfig, MeanFlowLoss, time_derivative
from emf_dist.time_sampling import TimeSamplerConfig

PASSES = ("grad", "jvp", "forward")
LATENT_CHANNELS, CAPTION_CHANNELS = 32, 2304  # DC-AE latents; Gemma-2 2B's hidden size
CROSS_HEAD_DIM, SELF_HEAD_DIM = 112, 32

# SanaTransformer2DModel for SANA-1.6B at 1024 px (SanaMS_1600M_P1_D20 in diffusers'
# scripts/convert_sana_to_diffusers.py, image_size 1024); diffusers' own defaults for the class.
SANA_1600M_1024PX = dict(
    in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=70,
    attention_head_dim=SELF_HEAD_DIM, num_layers=20, num_cross_attention_heads=20,
    cross_attention_head_dim=CROSS_HEAD_DIM, cross_attention_dim=2240, caption_channels=CAPTION_CHANNELS,
    mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1, norm_elementwise_affine=False,
    norm_eps=1e-6, interpolation_scale=None)


def sana_config(width: int, layers: int, side: int) -> dict:
    """SANA-1.6B's proportions at another width, depth and latent side: head sizes 32 (self) and 112
    (cross), so both head counts grow with the width; MLP ratio 2.5; the real caption width."""
    if width % SELF_HEAD_DIM or width % CROSS_HEAD_DIM:
        raise ValueError(f"width {width} must be a multiple of {SELF_HEAD_DIM} and {CROSS_HEAD_DIM} (of 224)")
    return {**SANA_1600M_1024PX, "num_attention_heads": width // SELF_HEAD_DIM, "num_layers": layers,
            "num_cross_attention_heads": width // CROSS_HEAD_DIM, "cross_attention_dim": width,
            "sample_size": side}


def build(config: dict, meta: bool = False) -> torch.nn.Module:
    """The fine-tune's model: EMF's conversion and freezing, gradient checkpointing on."""
    from diffusers import SanaTransformer2DModel

    from emf_dist.backbones import DiffusersBackbone, convert_to_meanflow, freeze_for_emf_finetune
    from emf_dist.backbones.families import family_for
    from emf_dist.backbones.time_convention import FlowTimeConvention

    torch.manual_seed(0)
    with torch.device("meta") if meta else contextlib.nullcontext():
        transformer = SanaTransformer2DModel(**config)
        backbone = DiffusersBackbone(transformer, family_for(type(transformer).__name__), FlowTimeConvention())
        convert_to_meanflow(backbone)
    freeze_for_emf_finetune(backbone)
    backbone.cfg.checkpointing = True
    return backbone


def _drop_gradients_once_accumulated(net: torch.nn.Module) -> None:
    for param in net.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))


def _batch(rows: int, side: int, text_length: int) -> dict:
    z = torch.randn(rows, LATENT_CHANNELS, side, side)
    t = torch.rand(rows) * 0.8 + 0.1
    return dict(x=torch.randn_like(z), z=z, v=torch.randn_like(z), r=t * 0.5, t=t, target=torch.randn_like(z),
                # the shards keep text states in float16, all positions real (padding changes no size)
                tokens=torch.randn(rows, text_length, CAPTION_CHANNELS).half(),
                mask=torch.ones(rows, text_length, dtype=torch.bool), drop=torch.zeros(rows, dtype=torch.bool),
                pooled=torch.zeros(rows, CAPTION_CHANNELS))  # the shards carry one; SANA ignores it


def _gpu_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _run(net, name: str, b: dict, jvp_chunk: int, meter: LiveBytes) -> dict[str, int]:
    """Run one pass under ``meter``; returns its peak, the gradient pass's per phase."""
    text = (b["tokens"], b["mask"], b["pooled"])
    if name == "grad":
        with _gpu_autocast():
            u = net(b["z"], b["r"], b["t"], *text, b["drop"])
            loss = (u.float() - b["target"]).pow(2).mean()
        del u
        forward = meter.peak
        meter.reset_peak()
        loss.backward()
        return {"grad_forward": forward, "grad_backward": meter.peak}
    if name == "jvp":
        with _gpu_autocast():  # the loss runs under the trainer's autocast; time_derivative turns it off
            time_derivative(net, b["z"], b["r"], b["t"], b["v"], text, b["drop"], MeanFlowConfig(jvp_chunk=jvp_chunk))
    elif name == "forward":
        with torch.no_grad(), _gpu_autocast():
            net(b["z"], b["t"], b["t"], *text, b["drop"])
    elif name == "step":  # every row r != t: the most JVP rows a step can have
        objective = MeanFlowLoss(MeanFlowConfig(time=TimeSamplerConfig(r_neq_t=1.0), jvp_chunk=jvp_chunk))
        with _gpu_autocast():
            loss, _ = objective(net, b["x"], *text)
        loss.backward()
    else:
        raise ValueError(f"unknown pass {name!r}")
    return {name: meter.peak}


def peak_bytes(config: dict, passes: dict[str, list[int]], *, fake: bool, text_length: int = 300,
               jvp_chunk: int = 0) -> dict[str, list[int]]:
    """{pass: [peak live bytes at each row count]} for ``passes`` = {pass: [row counts]}; the gradient
    pass reports its forward and its backward (with the recomputation) as grad_forward, grad_backward."""
    if fake and "step" in passes:
        raise ValueError("the step picks its JVP rows with nonzero(), which fake tensors cannot: count it on real ones")
    net = build(config, meta=fake)
    side = config["sample_size"]
    out = {}
    # The layer_norm rule stays on through backward: checkpointing recomputes blocks there, under
    # the forward's autocast state, and must see the forward's dtypes.
    with cuda_layer_norm_rule(), FakeTensorMode() if fake else contextlib.nullcontext():
        if fake:
            fake_cpu_weights(net)
        _drop_gradients_once_accumulated(net)
        for name, row_counts in passes.items():
            for rows in row_counts:
                b = _batch(rows, side, text_length)
                with LiveBytes() as meter:
                    for phase, peak in _run(net, name, b, jvp_chunk, meter).items():
                        out.setdefault(phase, []).append(peak)
    return out


def rss_and_count(spec: dict) -> dict:
    """One pass on real tensors in this process: its LiveBytes count and the process's RSS growth
    over it (benchmarks/measure.py; run it through measure.run_isolated, which pins glibc's mmap
    threshold so freed tensors leave RSS)."""
    torch.set_num_threads(1)
    width, layers, side, text = spec["shape"]
    net = build(sana_config(width, layers, side))
    _drop_gradients_once_accumulated(net)
    b = _batch(spec["rows"], side, text)
    counted = {}

    def work():
        with LiveBytes() as meter:
            counted.update(_run(net, spec["pass"], b, 0, meter))

    with cuda_layer_norm_rule():
        rss = time_and_peak(lambda: work, repeats=2)["peak_mib"]
    return {"rss_mib": rss, "counted_mib": max(counted.values()) / 2**20}


if __name__ == "__main__":  # python -m benchmarks.sana_passes '<spec json>': see rss_and_count
    import json
    import sys

    print(json.dumps(rss_and_count(json.loads(sys.argv[1]))))
