"""Noise schedules and the DDPM forward/reverse maths, kept out of the nn.Module.

A `NoiseSchedule` is built from (name, T, a, b), computes its betas once in float64 and validates
them: every beta must lie in (0, 1]; the names are `adrec.config.NoiseScheduleName`. The verbs
follow Ho et al. (2020), "Denoising Diffusion Probabilistic Models": `add_noise` is q(x_t | x_0)
(eq. 4) and `step` samples the posterior q(x_{t-1} | x_t, x_0) (eqs. 6-7) with the model's x_0
prediction plugged in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, get_args

import numpy as np
import torch

from adrec.config import NoiseScheduleName

SCHEDULES: tuple[str, ...] = get_args(NoiseScheduleName)
_MAX_BETA = 0.999


def _betas_for_alpha_bar(steps: int, alpha_bar: Callable[[float], float], left: bool = False) -> np.ndarray:
    """Discretise a continuous ᾱ(s), s in [0, 1] (Nichol & Dhariwal 2021, eq. 17).

    `left=True` is the truncated variant of DiffuRec/ADRec: the first beta is 1 - ᾱ(0), so the
    schedule starts with a noticeable amount of noise instead of none.
    """
    betas = [min(1 - alpha_bar(0.0), _MAX_BETA)] if left else []
    for i in range(steps - 1 if left else steps):
        t1, t2 = i / steps, (i + 1) / steps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), _MAX_BETA))
    return np.array(betas, dtype=np.float64)


def make_betas(name: str, steps: int, beta_a: float = 0.3, beta_b: float = 10.0) -> np.ndarray:
    """The authors' named schedules (ADRec's `get_named_beta_schedule`, `beta` included), plus
    `beta_cdf`, this project's variant of a Beta-shaped schedule.

    Linear-type schedules scale with 1000/T as in improved-DDPM so that T steps cover the same
    noise range whatever T is; this is why small T pushes the betas above 1.
    """
    scale = 1000.0 / steps
    if name == "linear":
        return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    if name == "trunc_lin":
        # The authors silently replace beta_end by scale*0.001+0.01 when it exceeds 1; we reject
        # such a T instead (validation below), so a trial never runs a schedule it did not name.
        return np.linspace(scale * 1e-4 + 0.01, scale * 0.02 + 0.01, steps, dtype=np.float64)
    if name == "pw_lin":
        if steps <= 10:
            raise ValueError(f"noise_schedule='pw_lin' needs diffusion_steps > 10, got {steps}")
        start, mid, end = scale * 1e-4 + 0.01, scale * 1e-4, scale * 0.02
        first = np.linspace(start, mid, 10, dtype=np.float64)
        return np.concatenate([first, np.linspace(mid, end, steps - 10, dtype=np.float64)])
    if name == "cosine":
        return _betas_for_alpha_bar(steps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    if name == "sqrt":
        return _betas_for_alpha_bar(steps, lambda s: 1 - math.sqrt(s + 1e-4))
    if name == "trunc_cos":
        return _betas_for_alpha_bar(steps, lambda s: math.cos((s + 0.1) / 1.1 * math.pi / 2) ** 2, left=True)
    if name == "beta":
        # The authors' schedule: ᾱ(s) = Beta-ppf(1 - s; a, b) on s = 0, 1/T, ..., 1, unclipped, so
        # ᾱ reaches 0 and the last beta is exactly 1 (a=0.3, b=10, T=32: beta_0 = 0.836).
        from scipy.stats import beta as beta_distribution

        alpha_bar = beta_distribution.ppf(1.0 - np.linspace(0.0, 1.0, steps + 1), beta_a, beta_b)
        return 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    if name == "beta_cdf":
        # trunc_lin's range, but walked along the Beta(a, b) CDF instead of a straight line:
        # beta_i = start + (end - start) F(i / (T-1); a, b). a = b = 1 is exactly trunc_lin; a < 1
        # reaches strong noise early, b > a spends more steps near the end of the range.
        from scipy.special import betainc

        s = np.linspace(0.0, 1.0, steps, dtype=np.float64)
        start, end = scale * 1e-4 + 0.01, scale * 0.02 + 0.01
        return start + (end - start) * betainc(beta_a, beta_b, s)
    raise ValueError(f"noise_schedule={name!r} is not one of {', '.join(SCHEDULES)}")


@dataclass(frozen=True)
class NoiseSchedule:
    """Betas and the derived DDPM coefficients for one (name, T, a, b)."""

    name: str
    steps: int
    betas: np.ndarray  # (T,) float64

    @classmethod
    def build(cls, name: str, steps: int, beta_a: float = 0.3, beta_b: float = 10.0) -> "NoiseSchedule":
        if steps < 2:
            raise ValueError(f"diffusion_steps={steps} must be >= 2")
        betas = make_betas(name, steps, beta_a, beta_b)
        bad = np.flatnonzero(~((betas > 0) & (betas <= 1)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"noise_schedule={name!r} with diffusion_steps={steps} gives beta[{i}]={betas[i]:.4g} "
                "outside (0, 1]; use more diffusion steps or another schedule"
            )
        return cls(name=name, steps=steps, betas=betas)

    # float64 derived quantities (Ho et al. notation) --------------------------------------------
    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.append(1.0, self.alphas_cumprod[:-1])

    def tensors(self, device: torch.device | str = "cpu") -> "ScheduleTensors":
        ab, ab_prev, betas = self.alphas_cumprod, self.alphas_cumprod_prev, self.betas
        posterior_variance = betas * (1.0 - ab_prev) / (1.0 - ab)
        # The variance used when sampling: improved-DDPM's "fixed large" choice, as the authors do.
        log_variance = np.log(np.append(posterior_variance[1], betas[1:]))

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(a, dtype=torch.float32, device=device)

        return ScheduleTensors(
            sqrt_ab=t(np.sqrt(ab)),
            sqrt_one_minus_ab=t(np.sqrt(1.0 - ab)),
            coef_x0=t(betas * np.sqrt(ab_prev) / (1.0 - ab)),  # eq. 7, weight of x_0
            coef_xt=t((1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab)),  # eq. 7, weight of x_t
            sigma=t(np.exp(0.5 * log_variance)),
        )


@dataclass(frozen=True)
class ScheduleTensors:
    """The coefficients as float32 tensors on one device, indexed by integer timesteps."""

    sqrt_ab: torch.Tensor
    sqrt_one_minus_ab: torch.Tensor
    coef_x0: torch.Tensor
    coef_xt: torch.Tensor
    sigma: torch.Tensor

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε  (eq. 4); `t` broadcasts over x0[..., :]."""
        return self.sqrt_ab[t].unsqueeze(-1) * x0 + self.sqrt_one_minus_ab[t].unsqueeze(-1) * noise

    def step(self, x0_pred: torch.Tensor, x_t: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_{t-1} from the posterior mean (eq. 7) around the predicted x_0; no noise at t=0."""
        mean = self.coef_x0[t] * x0_pred + self.coef_xt[t] * x_t
        return mean + self.sigma[t] * noise if t > 0 else mean
