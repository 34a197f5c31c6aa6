"""adrec.schedule: one contract swept over every named schedule and a few T, plus closed forms."""
from __future__ import annotations

import math

from typing import get_args

import numpy as np
import pytest
import torch
from scipy.stats import beta as beta_distribution

import adrec.schedule
from adrec.config import NoiseScheduleName, TrialConfig
from adrec.schedule import SCHEDULES, NoiseSchedule, make_betas

torch.set_num_threads(1)  # tiny tensors: extra threads only contend with the other test processes

STEPS = (24, 32, 77, 200)  # the sweep's range is 24..200
CASES = [(name, t) for name in SCHEDULES for t in STEPS]
CASE_IDS = [f"{name}-T{t}" for name, t in CASES]


def test_the_eight_schedules_are_named_once_in_the_config() -> None:
    assert SCHEDULES == get_args(NoiseScheduleName)
    assert set(SCHEDULES) == {"linear", "cosine", "sqrt", "trunc_lin", "trunc_cos", "pw_lin", "beta", "beta_cdf"}
    assert not hasattr(adrec.schedule, "TrialConfig")  # schedules are built from (name, T, a, b)


@pytest.mark.parametrize("name, steps", CASES, ids=CASE_IDS)
def test_betas_in_unit_interval_and_alpha_bar_strictly_decreasing(name: str, steps: int) -> None:
    sched = NoiseSchedule.build(name, steps)
    assert sched.betas.shape == (steps,) and sched.betas.dtype == np.float64
    assert np.all(sched.betas > 0) and np.all(sched.betas <= 1)
    ab = sched.alphas_cumprod
    assert 0 < ab[0] < 1
    assert np.all(np.diff(ab) < 0)
    assert np.all(ab >= 0)
    assert sched.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_array_equal(sched.alphas_cumprod_prev[1:], ab[:-1])


@pytest.mark.parametrize("name", SCHEDULES, ids=str)
def test_every_t_of_the_sweep_range_is_valid(name: str) -> None:
    for steps in range(24, 201):
        NoiseSchedule.build(name, steps)


@pytest.mark.parametrize("steps", STEPS, ids=lambda t: f"T{t}")
def test_linear_and_trunc_lin_endpoints(steps: int) -> None:
    scale = 1000 / steps
    lin, trunc = make_betas("linear", steps), make_betas("trunc_lin", steps)
    assert lin[0] == pytest.approx(scale * 1e-4, rel=1e-12)
    assert lin[-1] == pytest.approx(scale * 0.02, rel=1e-12)
    np.testing.assert_allclose(np.diff(lin), (scale * 0.02 - scale * 1e-4) / (steps - 1), rtol=1e-9)
    np.testing.assert_allclose(trunc, lin + 0.01, rtol=0, atol=1e-15)


@pytest.mark.parametrize("steps", STEPS, ids=lambda t: f"T{t}")
def test_beta_cdf_schedule_with_a_b_one_is_trunc_lin(steps: int) -> None:
    np.testing.assert_allclose(make_betas("beta_cdf", steps, 1.0, 1.0), make_betas("trunc_lin", steps),
                               rtol=1e-12, atol=0)


def test_beta_cdf_schedule_shape_follows_a_and_b() -> None:
    # a < 1, b > 1: the range is mostly covered in the first steps.
    fast, uniform = make_betas("beta_cdf", 32, 0.3, 10.0), make_betas("beta_cdf", 32, 1.0, 1.0)
    assert fast[0] == uniform[0] and fast[-1] == pytest.approx(uniform[-1], rel=1e-12)
    assert np.all(fast[1:-1] > uniform[1:-1])


@pytest.mark.parametrize("a, b", [(0.3, 10.0), (1.0, 1.0), (2.0, 5.0)], ids=str)
@pytest.mark.parametrize("steps", STEPS, ids=lambda t: f"T{t}")
def test_beta_schedule_is_the_authors_beta_ppf(steps: int, a: float, b: float) -> None:
    """ᾱ_i = Beta-ppf(1 - (i + 1)/T; a, b): unclipped, so ᾱ ends at 0 and the last beta is 1."""
    sched = NoiseSchedule.build("beta", steps, a, b)
    expected = beta_distribution.ppf(1 - np.arange(1, steps + 1) / steps, a, b)
    np.testing.assert_allclose(sched.alphas_cumprod, expected, rtol=1e-9, atol=1e-12)
    assert sched.betas[-1] == 1.0
    if (a, b) == (1.0, 1.0):  # ᾱ = 1 - s: beta_i = 1 / (T - i)
        np.testing.assert_allclose(sched.betas, 1 / (steps - np.arange(steps)), rtol=1e-12)


def test_beta_schedule_defaults_start_with_strong_noise() -> None:
    assert make_betas("beta", 32, 0.3, 10.0)[0] == pytest.approx(0.836294, abs=1e-6)


def _cos_ab(s: float, offset: float) -> float:
    return math.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2


@pytest.mark.parametrize("steps", STEPS, ids=lambda t: f"T{t}")
def test_cosine_alpha_bar_matches_the_cos2_formula_up_to_the_clip(steps: int) -> None:
    sched = NoiseSchedule.build("cosine", steps)
    unclipped = sched.betas < 0.999
    last = int(np.argmin(unclipped)) if not unclipped.all() else steps  # first clipped beta
    assert last >= steps - 1  # only the final beta may hit the 0.999 clip
    expected = np.array([_cos_ab((i + 1) / steps, 0.008) / _cos_ab(0.0, 0.008) for i in range(steps)])
    np.testing.assert_allclose(sched.alphas_cumprod[:last], expected[:last], rtol=1e-9)
    assert np.all(sched.betas <= 0.999)


@pytest.mark.parametrize("steps", STEPS, ids=lambda t: f"T{t}")
def test_trunc_cos_starts_at_alpha_bar_of_zero(steps: int) -> None:
    # Truncated: ᾱ_i = f(i/T), so the first step already carries 1 - f(0) of noise.
    sched = NoiseSchedule.build("trunc_cos", steps)
    expected = np.array([_cos_ab(i / steps, 0.1) for i in range(steps)])
    np.testing.assert_allclose(sched.alphas_cumprod, expected, rtol=1e-9)
    assert sched.betas[0] == pytest.approx(1 - _cos_ab(0.0, 0.1), rel=1e-12)


@pytest.mark.parametrize("steps", STEPS, ids=lambda t: f"T{t}")
def test_sqrt_alpha_bar_matches_its_formula_before_the_clip(steps: int) -> None:
    sched = NoiseSchedule.build("sqrt", steps)
    f = lambda s: 1 - math.sqrt(s + 1e-4)  # noqa: E731
    expected = np.array([f((i + 1) / steps) / f(0.0) for i in range(steps - 1)])
    np.testing.assert_allclose(sched.alphas_cumprod[:-1], expected, rtol=1e-9)


@pytest.mark.parametrize("steps", STEPS, ids=lambda t: f"T{t}")
def test_pw_lin_pieces(steps: int) -> None:
    scale = 1000 / steps
    betas = make_betas("pw_lin", steps)
    np.testing.assert_allclose(betas[[0, 9, 10, -1]], [scale * 1e-4 + 0.01, scale * 1e-4, scale * 1e-4,
                                                       scale * 0.02], rtol=1e-12)
    assert np.all(np.diff(betas[:10]) < 0) and np.all(np.diff(betas[10:]) > 0)


@pytest.mark.parametrize(
    "name, steps",
    [("linear", 19), ("trunc_lin", 20), ("trunc_lin", 10), ("pw_lin", 19), ("pw_lin", 10), ("beta_cdf", 20)],
    ids=lambda v: str(v),
)
def test_invalid_schedule_and_t_are_rejected_naming_both(name: str, steps: int) -> None:
    with pytest.raises(ValueError, match=rf"noise_schedule='{name}'.*diffusion_steps\b.*\b{steps}\b"):
        NoiseSchedule.build(name, steps)
    with pytest.raises(ValueError, match=rf"noise_schedule='{name}'"):
        TrialConfig(noise_schedule=name, diffusion_steps=steps)


def test_unknown_schedule_and_too_few_steps() -> None:
    with pytest.raises(ValueError, match=r"noise_schedule='quad' is not one of linear, cosine"):
        make_betas("quad", 32)
    with pytest.raises(ValueError, match=r"diffusion_steps=1 must be >= 2"):
        NoiseSchedule.build("cosine", 1)


def test_the_config_validates_its_schedule() -> None:
    TrialConfig(noise_schedule="beta", diffusion_steps=40, beta_a=2.0, beta_b=3.0)
    with pytest.raises(ValueError, match=r"noise_schedule='beta_cdf' with diffusion_steps=20"):
        TrialConfig(noise_schedule="beta_cdf", diffusion_steps=20)


# --- the DDPM verbs -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, steps", CASES, ids=CASE_IDS)
def test_add_noise_at_t0(name: str, steps: int) -> None:
    sched = NoiseSchedule.build(name, steps)
    ts = sched.tensors()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    t = torch.zeros(3, 5, dtype=torch.long)
    out = ts.add_noise(x0, t, eps)
    ab0 = sched.alphas_cumprod[0]
    assert torch.equal(out, ts.sqrt_ab[0] * x0 + ts.sqrt_one_minus_ab[0] * eps)
    expected = math.sqrt(ab0) * x0.double() + math.sqrt(1 - ab0) * eps.double()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)
    # No noise: only the sqrt(ᾱ_0) shrink remains.
    torch.testing.assert_close(ts.add_noise(x0, t, torch.zeros_like(x0)), x0 * math.sqrt(ab0), rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", SCHEDULES, ids=str)
def test_add_noise_per_token_timesteps(name: str) -> None:
    ts = NoiseSchedule.build(name, 32).tensors()
    x0, eps = torch.ones(2, 3, 4), torch.full((2, 3, 4), 2.0)
    t = torch.tensor([[0, 5, 31], [31, 5, 0]])
    out = ts.add_noise(x0, t, eps)
    for b in range(2):
        for l in range(3):
            s = int(t[b, l])
            expected = ts.sqrt_ab[s] + 2 * ts.sqrt_one_minus_ab[s]
            torch.testing.assert_close(out[b, l], expected.expand(4), rtol=0, atol=0)


N_SAMPLES = 200_000


@pytest.mark.parametrize("name", SCHEDULES, ids=str)
@pytest.mark.parametrize("t", [0, 7, 31], ids=lambda t: f"t{t}")
def test_q_sample_moments(name: str, t: int) -> None:
    """Empirical mean and variance of x_t | x0 over N samples per coordinate.

    The mean's standard error is sqrt((1-ᾱ)/N) <= 1/sqrt(N) = 0.0022; the sample variance's is
    (1-ᾱ) sqrt(2/(N-1)) <= 0.0032. 5 standard errors per coordinate (4 coordinates) leave a false
    failure probability below 1e-5, while a wrong coefficient (e.g. ᾱ instead of sqrt(ᾱ)) misses
    by > 0.05 for every schedule here.
    """
    sched = NoiseSchedule.build(name, 32)
    ts = sched.tensors()
    ab = sched.alphas_cumprod[t]
    x0 = torch.tensor([1.0, -2.0, 0.5, 3.0]).expand(N_SAMPLES, 4)
    eps = torch.randn(N_SAMPLES, 4, generator=torch.Generator().manual_seed(t), dtype=torch.float64).float()
    x_t = ts.add_noise(x0, torch.full((N_SAMPLES,), t), eps).double()
    mean, var = x_t.mean(0), x_t.var(0)
    se_mean, se_var = math.sqrt((1 - ab) / N_SAMPLES), (1 - ab) * math.sqrt(2 / (N_SAMPLES - 1))
    torch.testing.assert_close(mean, math.sqrt(ab) * x0[0].double(), rtol=0, atol=5 * se_mean + 1e-6)
    torch.testing.assert_close(var, torch.full((4,), 1 - ab, dtype=torch.float64), rtol=0, atol=5 * se_var + 1e-7)


@pytest.mark.parametrize("name, steps", CASES, ids=CASE_IDS)
def test_step_at_t0_returns_the_x0_prediction(name: str, steps: int) -> None:
    ts = NoiseSchedule.build(name, steps).tensors()
    assert ts.coef_x0[0].item() == 1.0
    assert ts.coef_xt[0].item() == 0.0
    g = torch.Generator().manual_seed(1)
    x0_pred, x_t, noise = (torch.randn(4, 8, generator=g) for _ in range(3))
    assert torch.equal(ts.step(x0_pred, x_t, 0, noise), x0_pred)


@pytest.mark.parametrize("name, steps", CASES, ids=CASE_IDS)
def test_step_is_the_posterior_mean_plus_sigma_noise(name: str, steps: int) -> None:
    """With the true x0 plugged in, eq. 7's mean equals eq. 11's (x_t - β/sqrt(1-ᾱ) ε)/sqrt(α)."""
    sched = NoiseSchedule.build(name, steps)
    ts = sched.tensors()
    g = torch.Generator().manual_seed(2)
    x0, eps, z = (torch.randn(16, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for t in (1, steps // 2, steps - 2):
        ab, beta = sched.alphas_cumprod[t], sched.betas[t]
        x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
        mean = ts.step(x0.float(), x_t.float(), t, torch.zeros(16, 8)).double()
        expected = (x_t - beta / math.sqrt(1 - ab) * eps) / math.sqrt(1 - beta)
        torch.testing.assert_close(mean, expected, rtol=1e-4, atol=1e-4)
        noisy = ts.step(x0.float(), x_t.float(), t, z.float()).double()
        torch.testing.assert_close(noisy - mean, ts.sigma[t].double() * z.float().double(), rtol=0, atol=1e-5)
    # "fixed large" variance: sigma_t^2 = beta_t for t >= 1, sigma_0^2 = posterior variance at t=1.
    np.testing.assert_allclose(ts.sigma[1:].double().numpy() ** 2, sched.betas[1:], rtol=1e-5)
