"""The blur operator A x = k ⊛ x (circular, FFT), as a small immutable value.

Physics side in [0, 1]. A kernel update makes a new operator (`with_kernel`); nothing mutates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from util.fft import p2o


@dataclass(frozen=True)
class BlurOperator:
    """Circular blur by a centred kernel, noise std `sigma` (in [0, 1] units).

    K: OTF (1 or B, 1, H, W//2+1) broadcast over colour channels; `kernel` the (…, s, s) kernel it came from.
    """
    kernel: torch.Tensor
    K: torch.Tensor
    shape: tuple[int, int]
    sigma: float

    @staticmethod
    def from_kernel(kernel: torch.Tensor, shape: tuple[int, int], sigma: float) -> "BlurOperator":
        if kernel.dim() == 2:
            kernel = kernel[None, None]
        elif kernel.dim() == 3:
            kernel = kernel[:, None]
        kernel = kernel.detach()
        return BlurOperator(kernel=kernel, K=p2o(kernel, tuple(shape)), shape=tuple(shape), sigma=float(sigma))

    def with_kernel(self, kernel: torch.Tensor) -> "BlurOperator":
        return BlurOperator.from_kernel(kernel, self.shape, self.sigma)

    def row(self, r: int) -> "BlurOperator":
        """The operator of batch row r: this one when every row is blurred alike, else row r's kernel."""
        if self.K.shape[0] == 1:
            return self
        return BlurOperator(kernel=self.kernel[r:r + 1], K=self.K[r:r + 1], shape=self.shape, sigma=self.sigma)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """k ⊛ x."""
        return torch.fft.irfft2(torch.fft.rfft2(x) * self.K, s=self.shape)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Correlation with k: the adjoint of A."""
        return torch.fft.irfft2(torch.fft.rfft2(y) * self.K.conj(), s=self.shape)

    def pigdm_solve(self, y: torch.Tensor, x0: torch.Tensor, r2) -> torch.Tensor:
        """ΠGDM vector u = Aᵀ (r² A Aᵀ + σ² I)⁻¹ (y − A x0), diagonal in Fourier (docs/algorithm.md §1).

        r2 is a float or a tensor broadcastable to (B, 1, 1, 1).
        """
        K = self.K
        num = K.conj() * (torch.fft.rfft2(y) - K * torch.fft.rfft2(x0))
        den = r2 * (K.abs() ** 2) + self.sigma ** 2
        return torch.fft.irfft2(num / den, s=self.shape)
