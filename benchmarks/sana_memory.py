"""Scale plan: SANA-1.6B at 1024 px, EMF's MeanFlow fine-tune, 8 x 80 GB GPUs, ZeRO-2 and ZeRO-3.

    python -m benchmarks.sana_memory           # the tables in docs/benchmarks.md
    python -m benchmarks.sana_memory --quick   # the base configuration only, no fit (a smoke run)

1. Parameters: SanaTransformer2DModel with the published 1600M-1024px config, built on the meta
   device, converted and frozen as the fine-tune does (benchmarks/sana_passes.py).
2. Model states per GPU: DeepSpeed's estimators, and the trainer's float32 layout
   (benchmarks/zero_states.py), with and without the teacher copy.
3. Activations: the peak live bytes of each pass (benchmarks/sana_passes.py) on small configurations
   with 1.6B's proportions, width, layers, image and text tokens varied; a linear fit per pass,
   peak(b) = F + b * s(width, layers, image tokens, text tokens); the fit predicts configurations
   it has not seen and then SANA-1.6B itself, and both are checked against direct counts.
4. The plan: the largest micro-batch whose model states + the largest pass peak + the step's own
   tensors fit in 80 GB less a margin, the micro-batch and accumulation for the target global
   batches, and the JVP pass's peak against the gradient pass's (``objective.jvp_chunk``).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import numpy as np
import torch

from benchmarks.sana_passes import SANA_1600M_1024PX, build, peak_bytes, sana_config
from benchmarks.zero_states import Counts, deepspeed_estimate, float32_layout

GPUS = 8
CAPACITY = 80 * 10**9  # "80 GB" read in decimal bytes (74.5 GiB), the smaller reading
MARGIN = CAPACITY // 10  # CUDA context, NCCL buffers, allocator fragmentation, kernel workspaces
TARGETS = (256, 512)  # half of SANA's; SANA's 1024 px recipe, 64 per GPU on 8 GPUs without accumulation
IMAGE_TOKENS, TEXT_TOKENS = 32 * 32, 300  # 1024 px through DC-AE's 32x downsampling; SANA's max_length
EMF_R_NEQ_T_END = 0.75  # EMF's schedule ends with 75% of rows r != t (TimeSamplerConfig.emf)
PHASES = ("grad_forward", "grad_backward", "jvp", "forward")

# (width, layers, latent side, text tokens): 1.6B's head sizes and MLP ratio, each axis varied.
GRID = [
    (224, 2, 32, 300),  # base: 1024 image tokens and 300 text tokens, as SANA at 1024 px
    (448, 2, 32, 300), (448, 2, 24, 300), (448, 2, 32, 150),  # width, and tokens at the second width
    (224, 1, 32, 300), (224, 4, 32, 300), (448, 4, 32, 300),  # layers
    (224, 2, 16, 300), (224, 2, 24, 300),  # image tokens
    (224, 2, 32, 150), (224, 2, 32, 75),  # text tokens
]
HOLDOUT = [(448, 4, 24, 150), (672, 3, 32, 300)]  # predicted by the fit, then counted
RSS_SHAPE = (224, 2, 32, 300)  # counted on real tensors against RSS
ROWS = (2, 4)  # two micro-batch sizes per configuration: the per-row slope and the fixed part
FULL_ROWS = (4, 16)
FEATURES = ("image tok x width", "layers x image tok x width", "text tok x width", "image tok", "text tok")
GiB, MiB = 2**30, 2**20


def features(width: int, layers: int, side: int, text: int) -> list[int]:
    image = side * side
    return [image * width, layers * image * width, text * width, image, text]


def counts(config: dict) -> Counts:
    from diffusers import SanaTransformer2DModel

    net = build(config, meta=True)
    with torch.device("meta"):
        parent = SanaTransformer2DModel(**config)
    return Counts(total=sum(p.numel() for p in net.parameters()),
                  trainable=sum(p.numel() for p in net.parameters() if p.requires_grad),
                  parent=sum(p.numel() for p in parent.parameters()),
                  largest_layer=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules()))


@functools.cache
def fixed_part_base(phase: str, shape: tuple) -> int:
    """What a pass's fixed bytes scale with: the trainable parameters (autocast's bf16 copies of the
    weights, cached while the forward runs), one block's (the backward recomputes one block at a
    time), or nothing (the JVP pass runs with autocast off)."""
    width, layers, side, _ = shape
    if phase == "jvp":
        return 0
    if phase == "grad_backward":
        net = build(sana_config(width, 1, side), meta=True)
        return sum(p.numel() for p in net.transformer.transformer_blocks[0].parameters())
    return counts(sana_config(width, layers, side)).trainable


def check_config_against_diffusers() -> list[str]:
    """Where SANA_1600M_1024PX differs from SanaTransformer2DModel's defaults (diffusers ships the
    1600M-1024px config as the class defaults)."""
    import inspect

    from diffusers import SanaTransformer2DModel

    defaults = {k: p.default for k, p in inspect.signature(SanaTransformer2DModel.__init__).parameters.items()}
    return [f"{k}: ours {v!r}, diffusers {defaults.get(k)!r}" for k, v in SANA_1600M_1024PX.items() if defaults.get(k) != v]


def slope_and_fixed(peaks: list[int], rows=ROWS) -> tuple[float, float]:
    slope = (peaks[1] - peaks[0]) / (rows[1] - rows[0])
    return slope, peaks[0] - rows[0] * slope


def measure(shape: tuple, rows=ROWS) -> dict[str, tuple[float, float]]:
    width, layers, side, text = shape
    peaks = peak_bytes(sana_config(width, layers, side), {p: list(rows) for p in ("grad", "jvp", "forward")},
                       fake=True, text_length=text)
    return {phase: slope_and_fixed(peaks[phase], rows) for phase in PHASES}


class Fit:
    """Per phase, least squares over the configurations: s = features . coef (bytes per row) and
    F = kappa * fixed_part_base."""

    def __init__(self, shapes: list[tuple], measured: list[dict]):
        x = np.array([features(*shape) for shape in shapes], dtype=np.float64)
        self.coef, self.kappa = {}, {}
        for phase in PHASES:
            slopes = np.array([m[phase][0] for m in measured])
            self.coef[phase] = np.linalg.lstsq(x, slopes, rcond=None)[0]
            base = np.array([fixed_part_base(phase, shape) for shape in shapes], dtype=np.float64)
            fixed = np.array([m[phase][1] for m in measured])
            self.kappa[phase] = float(base @ fixed / (base @ base)) if base.any() else 0.0

    def predict(self, phase: str, shape: tuple) -> tuple[float, float]:
        return float(np.dot(self.coef[phase], features(*shape))), self.kappa[phase] * fixed_part_base(phase, shape)


def step_tensors(rows: int, image_tokens: int = IMAGE_TOKENS, text_tokens: int = TEXT_TOKENS) -> int:
    """Bytes the step holds outside the passes: the batch on the GPU (latents float32, text states
    float16, mask), noise, z, v, target, du/dt and u (float32 latents)."""
    latent = 32 * image_tokens * 4
    return rows * (8 * latent + text_tokens * 2304 * 2 + text_tokens)


class Plan:
    def __init__(self, per_pass: dict[str, tuple[float, float]]):
        self.s = {phase: per_pass[phase][0] for phase in PHASES}
        self.f = {phase: per_pass[phase][1] for phase in PHASES}

    def pass_peak(self, phase: str, rows: int) -> float:
        return self.f[phase] + rows * self.s[phase] if rows else 0.0

    def grad(self, rows: int) -> float:
        return max(self.pass_peak("grad_forward", rows), self.pass_peak("grad_backward", rows))

    def step(self, rows: int, teacher: bool) -> float:
        """The step's transient peak: every row r != t (any schedule), the teacher's forward on 2 x rows
        (folded guidance doubles it)."""
        peaks = [self.grad(rows), self.pass_peak("jvp", rows)]
        if teacher:
            peaks.append(self.pass_peak("forward", 2 * rows))
        return max(peaks) + step_tensors(rows)

    def largest_micro_batch(self, states: int, teacher: bool) -> int:
        budget, rows = CAPACITY - MARGIN - states, 0
        while self.step(rows + 1, teacher) <= budget:
            rows += 1
        return rows

    def largest_chunk_under_grad(self, rows: int) -> int:
        """The most JVP rows at once whose pass peak stays under the gradient pass's at ``rows``."""
        return min(rows, int((self.grad(rows) - self.f["jvp"]) // self.s["jvp"]))


def accumulation(target: int, largest: int) -> tuple[int, int]:
    """(micro_batch, grad_accum) with micro_batch * grad_accum * GPUS == target, micro_batch <= largest."""
    for accum in range(1, target + 1):
        if target % (GPUS * accum) == 0 and target // (GPUS * accum) <= largest:
            return target // (GPUS * accum), accum
    raise ValueError(f"no micro-batch <= {largest} reaches {target} on {GPUS} GPUs")


def real_equals_fake() -> list[str]:
    """The count on real tensors of the smallest configuration against the fake-tensor count."""
    config, passes = sana_config(224, 1, 16), {p: [2] for p in ("grad", "jvp", "forward")}
    real = peak_bytes(config, passes, fake=False)
    fake = peak_bytes(config, passes, fake=True)
    return [f"{phase}: real {real[phase][0]:,} B, fake {fake[phase][0]:,} B" + ("" if real[phase] == fake[phase] else
                                                                             "  DIFFER") for phase in PHASES]


def rss_check() -> list[list]:
    """Each pass on real tensors in a fresh process: the count against the kernel's RSS growth."""
    from benchmarks.measure import run_isolated

    rows = []
    for name in ("grad", "jvp", "forward"):
        result = run_isolated("benchmarks.sana_passes", {"shape": list(RSS_SHAPE), "pass": name, "rows": 4},
                              timed=False)
        rows.append([name, f"{result['counted_mib']:.1f}", f"{result['rss_mib']:.1f}",
                     f"{(result['rss_mib'] / result['counted_mib'] - 1) * 100:+.1f}%"])
    return rows


def step_check() -> str:
    """A whole MeanFlowLoss step (every row r != t) on real tensors against its passes' largest peak."""
    config, rows = sana_config(224, 1, 16), 4
    peaks = peak_bytes(config, {"grad": [rows], "jvp": [rows], "step": [rows]}, fake=False)
    largest = max(peaks[phase][0] for phase in ("grad_forward", "grad_backward", "jvp"))
    extra = peaks["step"][0] - largest
    return (f"step peak {peaks['step'][0] / MiB:.2f} MiB = largest pass {largest / MiB:.2f} MiB + {extra / MiB:.2f} MiB; "
            f"the plan allows {step_tensors(rows, 16 * 16, TEXT_TOKENS) / MiB:.2f} MiB for the step's own tensors")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def states_table(c: Counts) -> tuple[str, dict]:
    rows, layout = [], {}
    for stage in (2, 3):
        everything, _ = deepspeed_estimate(stage, c.total, c.largest_layer, GPUS)
        trained, _ = deepspeed_estimate(stage, c.trainable, c.largest_layer, GPUS)
        frozen = 2 * (c.total - c.trainable) // (1 if stage == 2 else GPUS)  # 16-bit, as the estimator assumes
        for teacher in (False, True):
            layout[stage, teacher] = sum(float32_layout(stage, c, GPUS, teacher).values())
        items = float32_layout(stage, c, GPUS, teacher=True)
        rows.append([f"ZeRO-{stage}", f"{everything:.2f}", f"{trained + frozen / GiB:.2f}",
                     f"{layout[stage, False] / GiB:.2f}", f"{items['teacher'] / GiB:.2f}",
                     f"{layout[stage, True] / GiB:.2f}"])
    header = ["stage", "DeepSpeed estimator, all trained", "DeepSpeed estimator, EMF freezing",
              "float32 layout, EMF freezing", "+ teacher", "float32 layout + teacher"]
    return _table(header, rows), layout


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, deepspeed {__import__('deepspeed').__version__}, "
          f"diffusers {__import__('diffusers').__version__}")
    mismatch = check_config_against_diffusers()
    print("config vs SanaTransformer2DModel defaults:", "equal" if not mismatch else "; ".join(mismatch))
    c = counts(SANA_1600M_1024PX)
    print(f"parameters: parent {c.parent:,}; converted {c.total:,}; trainable under EMF freezing {c.trainable:,} "
          f"(frozen {c.total - c.trainable:,}); largest layer {c.largest_layer:,}")
    _, printed = deepspeed_estimate(2, c.total, c.largest_layer, GPUS)
    print("DeepSpeed's ZeRO-2 estimator as it prints:\n" + "\n".join(
        line for line in printed.splitlines() if not line.startswith("[")))
    table, layout = states_table(c)
    print("\nModel states per GPU, GiB (8 GPUs):\n" + table)

    shapes = GRID[:1] if args.quick else GRID
    measured = [measure(shape) for shape in shapes]
    print("\nPer-row bytes s and fixed bytes F of each pass, small configurations (MiB):")
    print(_table(["width, layers, side, text"] + [f"{p} s / F" for p in PHASES],
                 [[shape] + [f"{m[p][0] / MiB:.3f} / {m[p][1] / MiB:.2f}" for p in PHASES]
                  for shape, m in zip(shapes, measured)]))
    full_shape = (2240, 20, 32, TEXT_TOKENS)
    full = measure(full_shape, rows=FULL_ROWS)
    if args.quick:
        plan = Plan(full)
    else:
        fit = Fit(shapes, measured)
        print("\nFitted s, bytes per row, per feature (" + ", ".join(FEATURES) + "); F = kappa * params:")
        for phase in PHASES:
            base = "one block's params" if phase == "grad_backward" else "trainable params"
            print(f"  {phase}: s = " + " + ".join(f"{v:.2f} {name}" for v, name in zip(fit.coef[phase], FEATURES))
                  + f"; F = {fit.kappa[phase]:.3f} x {base}")
        checks = []
        for shape in HOLDOUT + [full_shape]:
            counted = full if shape == full_shape else measure(shape)
            for phase in PHASES:
                s_pred, f_pred = fit.predict(phase, shape)
                checks.append([shape, phase, f"{s_pred / MiB:.2f}", f"{counted[phase][0] / MiB:.2f}",
                               f"{(s_pred / counted[phase][0] - 1) * 100:+.1f}%", f"{f_pred / MiB:.1f}",
                               f"{counted[phase][1] / MiB:.1f}"])
        print("\nFit vs direct count (holdout configurations, then SANA-1.6B at 1024 px):")
        print(_table(["width, layers, side, text", "pass", "s fit MiB", "s counted MiB", "fit error",
                      "F fit MiB", "F counted MiB"], checks))
        # Plan on the larger of fit and count per phase: either is a reading of the same code.
        plan = Plan({p: (max(fit.predict(p, full_shape)[0], full[p][0]), max(fit.predict(p, full_shape)[1], full[p][1]))
                     for p in PHASES})

    rows = []
    for stage in (2, 3):
        for teacher in (False, True):
            states = layout[stage, teacher]
            largest = plan.largest_micro_batch(states, teacher)
            at = {t: accumulation(t, largest) for t in TARGETS}
            used = states + plan.step(at[512][0], teacher)
            rows.append([f"ZeRO-{stage}", "teacher" if teacher else "data", f"{states / GiB:.1f}", largest,
                         GPUS * largest] + [f"{m} x {a}" for m, a in at.values()] + [f"{used / GiB:.1f}"])
    print(f"\nPlan, {GPUS} x 80 GB (budget {(CAPACITY - MARGIN) / GiB:.1f} GiB per GPU after a "
          f"{MARGIN / GiB:.1f} GiB margin), every row r != t:")
    print(_table(["stage", "velocity", "model states GiB", "largest micro-batch", "global without accumulation"]
                 + [f"micro_batch x grad_accum for {t}" for t in TARGETS] + ["GiB per GPU at 512"], rows))

    bound = []
    for b in sorted({accumulation(t, 10**6)[0] for t in TARGETS} | {plan.largest_micro_batch(layout[2, False], False)}):
        bound.append([b, f"{plan.grad(b) / GiB:.2f}", f"{plan.pass_peak('jvp', round(EMF_R_NEQ_T_END * b)) / GiB:.2f}",
                      f"{plan.pass_peak('jvp', b) / GiB:.2f}", plan.largest_chunk_under_grad(b)])
    print("\nJVP pass against the gradient pass (GiB):")
    print(_table(["micro-batch b", "gradient pass peak", "JVP, 75% rows (EMF's end)", "JVP, all rows",
                  "largest jvp_chunk under the gradient pass"], bound))
    print("JVP per row {:.1f} MiB vs gradient pass per row {:.1f} MiB (backward, with the recompute) / {:.1f} MiB "
          "(forward)".format(plan.s["jvp"] / MiB, plan.s["grad_backward"] / MiB, plan.s["grad_forward"] / MiB))

    print("\nReal tensors vs fake-tensor counting (width 224, 1 layer, 256 image tokens, 2 rows):")
    print("\n".join("  " + line for line in real_equals_fake()))
    print(f"\nCount vs RSS growth, real tensors, {RSS_SHAPE} (width, layers, side, text), 4 rows, one process each:")
    print(_table(["pass", "counted MiB", "RSS MiB", "RSS vs count"], rss_check()))
    print("Whole step (width 224, 1 layer, 256 image tokens, 4 rows, real tensors): " + step_check())
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
