import torch

from diffusion_em.blur import BlurOperator
from util.fft import conv_circular, o2p, p2o


def _dense(op, H, W):
    """The operator's matrix, column by column (small sizes only)."""
    eye = torch.eye(H * W, dtype=torch.float64).reshape(H * W, 1, H, W)
    return op.A(eye).reshape(H * W, H * W).T


def test_adjoint():
    g = torch.Generator().manual_seed(0)
    k = torch.rand(7, 7, generator=g, dtype=torch.float64)
    op = BlurOperator.from_kernel(k / k.sum(), (12, 16), 0.01)
    x = torch.randn(2, 3, 12, 16, generator=g, dtype=torch.float64)
    y = torch.randn(2, 3, 12, 16, generator=g, dtype=torch.float64)
    assert torch.allclose((op.A(x) * y).sum(), (x * op.A_adjoint(y)).sum(), rtol=1e-12)


def test_true_convolution_centre_and_direct_sum():
    k = torch.zeros(5, 5, dtype=torch.float64)
    k[2, 2] = 1
    x = torch.randn(1, 1, 9, 9, dtype=torch.float64)
    assert torch.allclose(conv_circular(x, k), x)
    k = torch.rand(5, 5, dtype=torch.float64)
    out = conv_circular(x, k)
    # (k ⊛ x)[p] = Σ_q k[q + c] x[p − q], circular, c = centre
    i, j = 4, 1
    direct = sum(k[a + 2, b + 2] * x[0, 0, (i - a) % 9, (j - b) % 9] for a in range(-2, 3) for b in range(-2, 3))
    assert torch.allclose(out[0, 0, i, j], direct)
    assert torch.allclose(o2p(p2o(k, (9, 9)), (9, 9), (5, 5)), k)


def test_pigdm_solve_matches_dense():
    g = torch.Generator().manual_seed(1)
    H, W, sigma, r2 = 6, 8, 0.1, 0.3
    k = torch.rand(3, 3, generator=g, dtype=torch.float64)
    op = BlurOperator.from_kernel(k / k.sum(), (H, W), sigma)
    A = _dense(op, H, W)
    y = torch.randn(1, 1, H, W, generator=g, dtype=torch.float64)
    x0 = torch.randn(1, 1, H, W, generator=g, dtype=torch.float64)
    u = op.pigdm_solve(y, x0, r2).flatten()
    expect = A.T @ torch.linalg.solve(r2 * A @ A.T + sigma ** 2 * torch.eye(H * W, dtype=torch.float64),
                                      y.flatten() - A @ x0.flatten())
    assert torch.allclose(u, expect, atol=1e-10)


def test_operator_is_immutable():
    op = BlurOperator.from_kernel(torch.ones(3, 3) / 9, (8, 8), 0.1)
    K_before = op.K.clone()
    op2 = op.with_kernel(torch.eye(3) / 3)
    assert torch.equal(op.kernel, torch.ones(1, 1, 3, 3) / 9) and torch.equal(op.K, K_before)  # old one intact
    assert torch.equal(op2.kernel, (torch.eye(3) / 3)[None, None]) and not torch.allclose(op2.K, op.K)
    try:
        op.sigma = 0.2
        raise AssertionError("operator was mutated")
    except AttributeError:
        pass
