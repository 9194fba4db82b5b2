"""ZeRO-3 parameters for the hand-written JVP pass (emf_dist/model_jvp.py).

Under ZeRO-3 each rank holds a slice of every parameter; DeepSpeed's module hooks gather a
module's parameters around its ``forward``. The hand-written pass reads weights directly (it
never calls most modules' forward), so it asks for them piece by piece (the top-level
projections, each block, the final layer) and this context gathers exactly those, read-only,
and partitions them again on exit: the peak holds one block's full weights, as ZeRO-3's own
forward does.
"""

from __future__ import annotations

from typing import ContextManager

import torch.nn as nn


def gathered(parameters: list[nn.Parameter]) -> ContextManager:
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)
