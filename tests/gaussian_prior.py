"""An analytic ε-predictor for a white Gaussian image prior, for exact-posterior tests."""
from __future__ import annotations

import numpy as np
import torch

from guided_diffusion.schedule import get_betas


class GaussianEps(torch.nn.Module):
    """x0 ~ N(mu, s² I) in model space ([-1, 1]); ε(x_t, t) = E[ε | x_t] in closed form."""

    def __init__(self, mu: torch.Tensor, s: float, T: int = 1000):
        super().__init__()
        self.mu, self.s = mu, s
        self.register_buffer("ac", torch.as_tensor(np.cumprod(1 - get_betas("linear", T)), dtype=torch.float32))

    def x0_mean(self, x_t, t):
        a = self.ac[t].view(-1, 1, 1, 1)
        s2 = self.s ** 2
        return self.mu + a.sqrt() * s2 / (a * s2 + 1 - a) * (x_t - a.sqrt() * self.mu)

    def var_x0(self, t) -> float:
        """Var[x0 | x_t] in model units."""
        a = float(self.ac[t])
        s2 = self.s ** 2
        return s2 * (1 - a) / (a * s2 + 1 - a)

    def forward(self, x_t, t):
        a = self.ac[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * self.x0_mean(x_t, t)) / (1 - a).sqrt()
