"""One-step distillation by interval splitting: the objective against a float64 reference written out
by hand, its fixed point (an exact MeanFlow model), what training it does to the 1-step sample, and the
adversarial term's critic against a hand-written hinge loss and finite differences."""

import copy

import pytest
import torch

from emf_dist.critic import SceneCritic
from emf_dist.model import VelocityNet
from emf_dist.samplers import sample
from emf_dist.split_distill import SplitDistillConfig, SplitDistillLoss
from tests.helpers import random_text, randomised, tiny_config


def _nets(seed=0, dtype=torch.float64):
    cfg = tiny_config(time_embedding="dual")
    torch.manual_seed(seed)
    student = randomised(VelocityNet(cfg).to(dtype), seed=seed)
    teacher = randomised(VelocityNet(cfg).to(dtype), seed=seed + 1).eval().requires_grad_(False)
    return cfg, student, teacher


def _batch(cfg, batch=6, seed=3, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen, dtype=dtype)
    return x, random_text(batch, 5, cfg.text_dim, seed=seed + 1, dtype=dtype)


def _reference_loss(student, teacher, x, text, cfg: SplitDistillConfig, seed):
    """The same draws as the objective (drop, then noise, from one generator), the teacher's k steps as
    an explicit loop over t = 1, 1 - 1/k, ..., 0 with its conditional and unconditional calls made
    separately, and the adaptive weight as MeanFlow's."""
    gen = torch.Generator().manual_seed(seed)
    batch = x.shape[0]
    drop = torch.rand(batch, generator=gen) < cfg.text_drop
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    z, k, w = noise.clone(), cfg.teacher_steps, cfg.guidance
    null = torch.ones(batch, dtype=torch.bool)
    with torch.no_grad():
        for i in range(k):
            t, r = torch.full((batch,), 1 - i / k), torch.full((batch,), 1 - (i + 1) / k)
            # A dropped row's conditional call is already the null condition, so w leaves it unguided.
            u_cond, u_uncond = teacher(z, r, t, *text, drop), teacher(z, r, t, *text, null)
            z = z - (1 / k) * (u_uncond + w * (u_cond - u_uncond))
    u = student(noise, torch.zeros(batch), torch.ones(batch), *text, drop)
    err = ((u - (noise - z)) ** 2).flatten(1).mean(1)
    return ((err.detach() + cfg.adaptive_c) ** -cfg.adaptive_p * err).mean()


@pytest.mark.parametrize("teacher_steps, text_drop, guidance", [(2, 0.0, 1.0), (4, 0.5, 1.0), (4, 0.5, 2.0)])
def test_loss_and_gradients_equal_a_float64_reference(teacher_steps, text_drop, guidance):
    cfg, student, teacher = _nets()
    x, text = _batch(cfg)
    distill = SplitDistillConfig(teacher_steps=teacher_steps, text_drop=text_drop, guidance=guidance)
    loss, stats = SplitDistillLoss(distill, teacher)(student, x, *text, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad(loss, list(student.parameters()))

    reference = _reference_loss(student, teacher, x, text, distill, seed=9)
    reference_grads = torch.autograd.grad(reference, list(student.parameters()))
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=0)
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert loss > 0 and stats["mse"] > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_an_exact_mean_flow_model_is_its_own_fixed_point():
    """Data at one point x*: the average velocity is (z_t - x*) / t for every r, so k steps and one
    step both land on x* and the student that equals the teacher has nothing to learn."""
    target = torch.randn(1, 3, 8, 8, dtype=torch.float64)

    class ExactAverageVelocity(torch.nn.Module):
        def forward(self, z, r, t, *text):
            return (z - target) / t.view(-1, 1, 1, 1)

    exact = ExactAverageVelocity()
    x, text = _batch(tiny_config())
    loss, stats = SplitDistillLoss(SplitDistillConfig(teacher_steps=4), exact)(exact, x, *text)
    assert float(stats["mse"]) < 1e-24
    off_by_one = SplitDistillLoss(SplitDistillConfig(teacher_steps=4), exact)(
        lambda *a: exact(*a[:6]) + 1.0, x, *text)[1]["mse"]
    torch.testing.assert_close(float(off_by_one), 1.0)


def test_training_brings_the_one_step_sample_to_the_teachers_k_step_sample():
    cfg, student, _ = _nets(dtype=torch.float32)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    x, text = _batch(cfg, batch=8, dtype=torch.float32)
    held_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(100))

    def gap():
        one = sample(student, held_out, *text, steps=1)
        four = sample(teacher, held_out, *text, steps=4)
        return float((one - four).pow(2).mean())

    before = gap()
    objective = SplitDistillLoss(SplitDistillConfig(teacher_steps=4, text_drop=0.0), teacher)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss, _ = objective(student, x, *text, generator=gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before > 1e-3  # the randomised net's 1-step and 4-step samples really differ
    assert gap() < 0.2 * before


def _critic(cfg, dtype=torch.float64):
    torch.manual_seed(5)
    return SceneCritic(cfg.in_channels, cfg.input_size, cfg.text_dim, width=4).to(dtype)


def _reference_adversarial(student, critic, x, text, cfg: SplitDistillConfig, seed):
    """The student's and the critic's hinge terms with each side scored in its own forward, written out:
    real (image, caption) pairs, the student's 1-step samples, and images under the caption of the row
    before (among the rows that kept their caption)."""
    gen = torch.Generator().manual_seed(seed)
    batch = x.shape[0]
    drop = torch.rand(batch, generator=gen) < cfg.text_drop
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    keep = ~drop
    fake = (noise - student(noise, torch.zeros(batch), torch.ones(batch), *text, drop))[keep]
    real, pooled = x[keep], text[2][keep]
    frozen = copy.deepcopy(critic).requires_grad_(False)
    student_term = -frozen(fake, pooled).mean()
    wrong = pooled[torch.arange(len(pooled)) - 1]
    critic_term = (torch.relu(1 - critic(real, pooled)).mean() + torch.relu(1 + critic(fake.detach(), pooled)).mean()
                   + 0.5 * torch.relu(1 + critic(real, wrong)).mean())
    return student_term, critic_term


def test_adversarial_term_gives_each_network_its_own_gradient():
    cfg, student, teacher = _nets()
    x, text = _batch(cfg)
    critic = _critic(cfg)
    distill = SplitDistillConfig(teacher_steps=2, text_drop=0.3, adversarial=0.7)
    loss, stats = SplitDistillLoss(distill, teacher, critic)(student, x, *text, generator=torch.Generator().manual_seed(9))
    student_grads = torch.autograd.grad(loss, list(student.parameters()), retain_graph=True)
    critic_grads = torch.autograd.grad(loss, list(critic.parameters()))

    reference_critic = copy.deepcopy(critic)
    student_term, critic_term = _reference_adversarial(student, reference_critic, x, text, distill, seed=9)
    regression = _reference_loss(student, teacher, x, text, distill, seed=9)
    torch.testing.assert_close(loss, regression + 0.7 * student_term + critic_term, rtol=1e-12, atol=0)
    torch.testing.assert_close(stats["critic"], critic_term.detach(), rtol=1e-12, atol=0)
    # The student sees the regression and lambda times its hinge term, through a critic held fixed ...
    wanted = torch.autograd.grad(regression + 0.7 * student_term, list(student.parameters()))
    for got, want in zip(student_grads, wanted):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # ... the critic its own hinge loss only, checked by central differences along a random direction.
    params = list(reference_critic.parameters())
    direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype)
                 for i, p in enumerate(params)]

    def critic_loss_at(step: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(step * d)
            value = float(_reference_adversarial(student, reference_critic, x, text, distill, seed=9)[1])
            for p, d in zip(params, direction):
                p.sub_(step * d)
        return value

    eps = 1e-6
    numeric = (critic_loss_at(eps) - critic_loss_at(-eps)) / (2 * eps)
    analytic = sum(float((g * d).sum()) for g, d in zip(critic_grads, direction))
    assert abs(analytic) > 1e-3  # the critic does receive a gradient
    assert numeric == pytest.approx(analytic, rel=1e-6)


def test_adversarial_distillation_needs_a_critic_and_rows_with_captions():
    cfg, student, teacher = _nets()
    x, text = _batch(cfg)
    with pytest.raises(ValueError, match="needs a critic"):
        SplitDistillLoss(SplitDistillConfig(adversarial=0.1), teacher)
    critic = _critic(cfg)
    every_row_dropped = SplitDistillConfig(teacher_steps=2, text_drop=0.999999, adversarial=0.1)
    loss, stats = SplitDistillLoss(every_row_dropped, teacher, critic)(student, x, *text,
                                                                        generator=torch.Generator().manual_seed(4))
    assert "critic" not in stats and all(p.grad is None for p in critic.parameters())
    torch.testing.assert_close(loss, _reference_loss(student, teacher, x, text, every_row_dropped, seed=4),
                               rtol=1e-12, atol=0)


def test_config_errors_name_the_field():
    assert "teacher_steps" in " ".join(SplitDistillConfig(teacher_steps=1).validate())
    assert "text_drop" in " ".join(SplitDistillConfig(text_drop=1.0).validate())
    assert "guidance" in " ".join(SplitDistillConfig(guidance=0.0).validate())
    assert "adversarial" in " ".join(SplitDistillConfig(adversarial=-1.0).validate())
    assert not SplitDistillConfig().validate()
