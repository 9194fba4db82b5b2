"""Model-state bytes per GPU under DeepSpeed ZeRO-2 and ZeRO-3: DeepSpeed's own estimators, and the
layout the trainer actually has.

DeepSpeed's ``estimate_zero{2,3}_model_states_mem_needs_all_cold`` assume mixed precision with 16-bit
weights: 2 bytes per parameter of 16-bit weights on every GPU (ZeRO-2; partitioned under ZeRO-3) and
18 bytes partitioned (16-bit and float32 gradients, float32 master weights, Adam's two moments),
plus 4 bytes per parameter of the largest layer for ZeRO-3. They count every parameter as trained.

The trainer keeps float32 weights and DeepSpeed's bf16 mode off (bf16 comes from autocast:
emf_dist/train/engine.py, docs/findings.md §12). Read from DeepSpeed 0.19.8's
runtime/zero/stage_1_and_2.py and stage3.py, per GPU with N data-parallel ranks, P parameters of
which T trained:

    ZeRO-2   4 P        weights, replicated (the frozen ones too)
             4 T / N    the optimizer's float32 copy of its partition (cloned even from float32 weights)
             4 T / N    the gradient partition
             8 T / N    AdamW's two moments
             4 R        the reduce bucket, R = reduce_bucket_size elements (5e8 by default) of float32
    ZeRO-3   4 P / N    weights, partitioned (the frozen ones too; the optimizer reuses float32 partitions)
             12 T / N   gradient partition + AdamW's moments
             4 R        the reduce bucket
             4 G        gathered weights, G <= stage3_max_live_parameters (1e9 by default)

A frozen teacher (objective.velocity=teacher) is a plain float32 module on every GPU under either
stage: 4 bytes per parameter of the parent, not partitioned.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass

REDUCE_BUCKET = int(5e8)  # DeepSpeed's reduce_bucket_size default; the engine config sets none
MAX_LIVE_PARAMETERS = int(1e9)  # DeepSpeed's stage3_max_live_parameters default


@dataclass(frozen=True)
class Counts:
    total: int  # parameters of the converted model
    trainable: int  # under EMF's freezing
    parent: int  # the unconverted parent (the teacher)
    largest_layer: int  # DeepSpeed's definition: the most parameters one module holds directly


def _no_offload_row(text: str, options: str) -> float:
    """GiB per GPU of the estimator's printed row whose options are exactly ``options``."""
    for line in text.splitlines():
        parts = [part.strip() for part in line.split("|")]
        if len(parts) == 3 and parts[2] == options:
            return float(re.sub("GB$", "", parts[1]))
    raise RuntimeError(f"DeepSpeed's estimator printed no row {options!r}:\n{text}")


def deepspeed_estimate(stage: int, params: int, largest_layer: int, gpus: int) -> tuple[float, str]:
    """(GiB per GPU with nothing offloaded, the estimator's printed table) from DeepSpeed's own
    estimator; it prints binary gigabytes (2**30) and labels them GB."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if stage == 2:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

            estimate_zero2_model_states_mem_needs_all_cold(total_params=params, num_gpus_per_node=gpus, num_nodes=1)
        else:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

            estimate_zero3_model_states_mem_needs_all_cold(total_params=params, largest_layer_params=largest_layer,
                                                           num_gpus_per_node=gpus, num_nodes=1)
    options = "offload_optimizer=none" if stage == 2 else "offload_param=none, offload_optimizer=none, zero_init=1"
    return _no_offload_row(out.getvalue(), options), out.getvalue()


def float32_layout(stage: int, counts: Counts, gpus: int, teacher: bool) -> dict[str, int]:
    """Bytes per GPU of the trainer's model states, by item (module docstring)."""
    total, trained = counts.total, counts.trainable
    if stage == 2:
        items = {"weights": 4 * total, "optimizer copy": 4 * trained // gpus}
    elif stage == 3:
        items = {"weights": 4 * total // gpus, "gathered weights": 4 * min(MAX_LIVE_PARAMETERS, total)}
    else:
        raise ValueError(f"stage {stage}: the plan covers ZeRO-2 and ZeRO-3")
    items |= {"gradients": 4 * trained // gpus, "AdamW moments": 8 * trained // gpus, "reduce bucket": 4 * REDUCE_BUCKET}
    if teacher:
        items["teacher"] = 4 * counts.parent
    return items
