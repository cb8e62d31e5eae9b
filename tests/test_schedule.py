import numpy as np

from guided_diffusion.schedule import Schedule, get_betas, respaced_timesteps


def test_respacing_100():
    ts = respaced_timesteps(1000, 100)
    assert len(ts) == 100 and ts[0] == 0 and ts[1] == 10 and ts[2] == 20 and ts[-2] == 989 and ts[-1] == 999
    assert np.array_equal(ts, np.round(np.arange(100) * 999 / 99).astype(int))


def test_respaced_betas_keep_alphas_cumprod():
    base = np.cumprod(1 - get_betas("linear"))
    s = Schedule.create(100)
    assert np.allclose(np.cumprod(1 - s.betas), base[s.timesteps])
    full = Schedule.create(1000)
    assert np.allclose(full.betas, get_betas("linear"))
    assert np.all(s.posterior_variance >= 0) and s.posterior_variance[0] == 0


def test_linear_and_cosine():
    b = get_betas("linear")
    assert b[0] == 1e-4 and abs(b[-1] - 0.02) < 1e-12
    c = get_betas("cosine")
    assert np.all((c > 0) & (c <= 0.999)) and np.all(np.diff(np.cumprod(1 - c)) < 0)
