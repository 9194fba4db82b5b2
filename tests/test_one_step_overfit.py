"""End to end on the real text encoder: MeanFlow learns to generate in ONE step, flow matching does not.

Each of three captions owns two images (its colored block in one corner or the opposite one),
so the data distribution given the text is bimodal. A one-step MeanFlow model must map noise
onto one of the two images; one Euler step of flow matching can at best return their mean
(x = z_1 - v(z_1, 1) = E[x | text]), a half-intensity blend that matches neither. The score
is the squared error to the nearest training image of the sample's own caption.
"""

import numpy as np
import pytest
import torch

from emf_dist.local_trainer import InMemoryData, LocalTrainConfig, train_local
from emf_dist.meanflow import MeanFlowConfig, MeanFlowLoss
from emf_dist.model import ModelConfig, VelocityNet
from emf_dist.samplers import sample
from emf_dist.text_encoder import TextEncoder, TextEncoderConfig
from emf_dist.time_sampling import TimeSamplerConfig

SIDE = 8
CAPTIONS = ["a red block", "a blue block", "a yellow block"]
COLORS = [(1.0, -1.0, -1.0), (-1.0, -1.0, 1.0), (1.0, 1.0, -1.0)]
CORNERS = [[(0, 0), (4, 4)], [(0, 4), (4, 0)], [(0, 0), (4, 4)]]
MEANFLOW_MAX_ERROR = 0.05  # a sample this close to a training image is that image with light noise
FLOW_MATCHING_MIN_ERROR = 0.15  # the two-image blend sits 0.25 from each image


def _dataset(encoder: TextEncoder) -> InMemoryData:
    images, captions = [], []
    for caption, color, corners in zip(CAPTIONS, COLORS, CORNERS):
        for top, left in corners:
            image = -torch.ones(3, SIDE, SIDE)
            image[:, top:top + 4, left:left + 4] = torch.tensor(color)[:, None, None]
            images.append(image)
            captions.append(caption)
    text = encoder.encode(captions)
    return InMemoryData(torch.stack(images), text.tokens.float(), text.mask, text.pooled.float())


def _train_and_sample(data: InMemoryData, mode: str) -> np.ndarray:
    torch.manual_seed(0)
    model = VelocityNet(ModelConfig(input_size=SIDE, patch_size=2, width=64, depth=3, heads=4, text_dim=384,
                                    time_scale=1.0, time_embedding="dual" if mode == "meanflow" else "single"))
    loss = MeanFlowConfig(mode=mode, time=TimeSamplerConfig(r_neq_t=0.5), text_drop=0.0,
                          adaptive_p=1.0 if mode == "meanflow" else 0.0)
    ema = train_local(model, MeanFlowLoss(loss), data, LocalTrainConfig(steps=500, batch_size=16, lr=1e-3,
                                                                        warmup=20, ema_decay=0.99))["ema"]
    ema.copy_to(model)
    rows = torch.arange(24) % len(data)
    noise = torch.randn(24, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    images = sample(model, noise, data.tokens[rows], data.mask[rows], data.pooled[rows], steps=1,
                    mean_flow=mode == "meanflow")
    errors = []
    for image, row in zip(images, rows.tolist()):
        own = [row - row % 2, row - row % 2 + 1]  # the two images of this sample's caption
        errors.append(min(float((image - data.images[k]).square().mean()) for k in own))
    return np.array(errors)


@pytest.fixture(scope="module")
def data():
    return _dataset(TextEncoder(TextEncoderConfig(max_length=8)))


def test_meanflow_reproduces_each_caption_in_one_step_and_flow_matching_does_not(data):
    meanflow = _train_and_sample(data, "meanflow")
    flow_matching = _train_and_sample(data, "flow_matching")
    print(f"\none-step error to nearest own image: MeanFlow mean {meanflow.mean():.4f} max {meanflow.max():.4f}; "
          f"flow matching mean {flow_matching.mean():.4f} min {flow_matching.min():.4f}")
    assert meanflow.max() < MEANFLOW_MAX_ERROR
    assert flow_matching.mean() > FLOW_MATCHING_MIN_ERROR
