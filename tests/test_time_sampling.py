"""(r, t) sampling and EMF's progress schedule."""

import pytest
import torch

from emf_dist.time_sampling import TimeSamplerConfig, sample_times, schedule_at


def test_emf_schedule_moves_linearly_from_start_to_end():
    cfg = TimeSamplerConfig.emf()
    assert schedule_at(cfg, 0.0) == (-0.5, 1.0, 0.25)
    assert schedule_at(cfg, 1.0) == (0.5, 2.0, 0.75)
    mu, sigma, share = schedule_at(cfg, 0.5)
    assert mu == pytest.approx(0.0) and sigma == pytest.approx(1.5) and share == pytest.approx(0.5)
    assert schedule_at(cfg, 7.0) == schedule_at(cfg, 1.0)  # progress is clamped


def test_constant_schedule_ignores_progress():
    cfg = TimeSamplerConfig(mu=-0.4, sigma=1.0, r_neq_t=0.25)
    assert schedule_at(cfg, 0.0) == schedule_at(cfg, 0.9) == (-0.4, 1.0, 0.25)


@pytest.mark.parametrize("distribution", ["uniform", "logit_normal"])
@pytest.mark.parametrize("share", [0.0, 0.25, 1.0])
def test_pairs_are_ordered_and_the_r_neq_t_share_is_exact(distribution, share):
    cfg = TimeSamplerConfig(distribution=distribution, r_neq_t=share)
    r, t = sample_times(cfg, 400, generator=torch.Generator().manual_seed(0))
    assert ((0 <= r) & (r <= t) & (t <= 1)).all()
    assert int((r != t).sum()) == round(share * 400)


def test_logit_normal_location_follows_the_schedule():
    """The median of sigmoid(N(mu, s)) is sigmoid(mu): the EMF schedule shifts t towards noise."""
    cfg = TimeSamplerConfig.emf()
    gen = torch.Generator().manual_seed(0)
    early = sample_times(cfg, 20000, 0.0, generator=gen)[1].median()
    late = sample_times(cfg, 20000, 1.0, generator=gen)[1].median()
    assert late > early + 0.1


def test_validate_reports_bad_values():
    problems = TimeSamplerConfig(r_neq_t=1.5, sigma=0.0).validate()
    assert any("r_neq_t" in p for p in problems) and any("sigma" in p for p in problems)


def test_full_interval_rows_are_exactly_the_one_step_query_and_a_fixed_share_of_r_neq_t():
    cfg = TimeSamplerConfig(r_neq_t=0.5, full_interval=0.25)
    r, t = sample_times(cfg, 400, generator=torch.Generator().manual_seed(0))
    full = (r == 0) & (t == 1)
    assert int(full.sum()) == 50 and int((r != t).sum()) == 200
    assert ((0 < r[~full]) | (r[~full] == t[~full])).all()  # the other rows keep their draws
    assert TimeSamplerConfig(full_interval=1.5).validate()
