"""The EMA of the weights: its shadow lives where the weights do, and it averages them."""

import torch

from emf_dist.ema import EMA


def test_shadow_follows_the_parameters_device_and_averages():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    assert all(shadow.device == p.device for shadow, p in zip(ema.shadow.values(), model.parameters()))
    before = {name: s.clone() for name, s in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # first update: decay min(0.5, 1/10) = 0.1, so 90% of the way to the new weights
    for name, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[name], before[name] + 0.9)
