"""Training schedule, sigma <-> timestep conversion (DPM-Solver 'discrete'), and the step grids."""
import math

import numpy as np
import pytest
import torch

from pixart_core import schedule as S


def official_log_alpha(t):
    """Independent NoiseScheduleVP('discrete'): log α piecewise-linear over t_k = (k+1)/1000."""
    betas = np.linspace(1e-4, 0.02, 1000)
    log_alphas = 0.5 * np.cumsum(np.log(1.0 - betas))
    return np.interp(t, np.arange(1, 1001) / 1000.0, log_alphas)


def test_training_schedule_values():
    b = S.betas()
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4, abs=1e-18) and b[-1].item() == pytest.approx(0.02, abs=1e-17)
    assert (b[1] - b[0]).item() == pytest.approx((0.02 - 1e-4) / 999, rel=1e-12)
    ac = S.alphas_cumprod()
    assert ac[0].item() == pytest.approx(1 - 1e-4, rel=1e-15)
    assert ac[1].item() == pytest.approx((1 - 1e-4) * (1 - b[1].item()), rel=1e-15)
    sig = S.discrete_sigmas()
    assert sig[0].item() == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)), rel=1e-12)  # 0.0100005
    assert sig[-1].item() == pytest.approx(157.40728, rel=1e-6)
    assert torch.all(sig[1:] > sig[:-1])
    assert S.sigma_min() == sig[0].item() and S.sigma_max() == sig[-1].item()


def test_discrete_sigmas_match_diffusers_float32_schedule():
    from diffusers import DPMSolverMultistepScheduler
    ac32 = DPMSolverMultistepScheduler().alphas_cumprod
    ref = ((1 - ac32) / ac32).sqrt().double()
    # diffusers builds ᾱ in float32; 1 - ᾱ then loses digits near t = 0, nowhere else
    rel = (ref / S.discrete_sigmas() - 1).abs()
    assert rel.max() < 1e-4 and rel[100:].max() < 2e-6


def test_timestep_to_sigma_integer_and_between():
    ts = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(S.timestep_to_sigma(ts), S.discrete_sigmas(), rtol=1e-12, atol=0)
    # log α is linear between integer timesteps, not σ
    la = lambda t: -0.5 * math.log1p(S.timestep_to_sigma(torch.tensor(t, dtype=torch.float64)).item() ** 2)
    assert la(10.25) == pytest.approx(0.75 * la(10.0) + 0.25 * la(11.0), rel=1e-12)
    assert la(998.5) == pytest.approx(0.5 * la(998.0) + 0.5 * la(999.0), rel=1e-12)


def test_conversion_matches_official_noise_schedule():
    t = torch.rand(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.999 + 1e-3
    ref = np.sqrt(np.expm1(-2 * official_log_alpha(t.numpy())))
    ours = S.timestep_to_sigma(1000 * t - 1)  # the model's timestep input is 1000·t - 1
    assert np.allclose(ours.numpy(), ref, rtol=1e-12, atol=0)
    assert S.sigma_to_timestep(torch.tensor(ref)).numpy() == pytest.approx((1000 * t - 1).numpy(), abs=1e-8)


def test_sigma_to_timestep_is_exact_inverse():
    g = torch.Generator().manual_seed(1)
    t = torch.rand(50000, dtype=torch.float64, generator=g) * 1100 - 0.5  # includes linear extrapolation past 999
    assert (S.sigma_to_timestep(S.timestep_to_sigma(t)) - t).abs().max() < 1e-9
    s = torch.logspace(-2.2, 2.5, 5000, dtype=torch.float64)
    assert ((S.timestep_to_sigma(S.sigma_to_timestep(s)) / s) - 1).abs().max() < 1e-12
    assert S.sigma_to_timestep(S.discrete_sigmas()).numpy() == pytest.approx(np.arange(1000), abs=1e-9)


def test_conversion_dtypes_and_shapes():
    s32 = torch.tensor([[157.40728, 1.0], [0.5, 0.0100005]], dtype=torch.float32)
    t = S.sigma_to_timestep(s32)
    assert t.dtype == torch.float32 and t.shape == (2, 2)
    assert t[0, 0].item() == pytest.approx(999.0, abs=1e-3) and t[1, 1].item() == pytest.approx(0.0, abs=1e-3)
    assert S.timestep_to_sigma(torch.tensor([0, 999])).dtype == torch.float64  # integers in, float64 out
    assert S.timestep_to_sigma(torch.tensor(999.0)).shape == ()
    assert S.timestep_to_sigma(500).item() == pytest.approx(S.discrete_sigmas()[500].item(), rel=1e-12)


@pytest.mark.parametrize("steps", [1, 5, 14, 20, 25])
def test_dpm_time_uniform_grid(steps):
    sig = S.sigmas_dpm_time_uniform(steps)
    assert sig.dtype == torch.float32 and sig.shape == (steps + 1,) and sig[-1].item() == 0.0
    t = np.linspace(1.0, 1e-3, steps + 1)
    official_timesteps = 1000 * t[:-1] - 1
    ts = S.sigma_to_timestep(sig[:-1].double()).numpy()
    assert ts == pytest.approx(official_timesteps, abs=2e-4)  # float32 sigmas
    assert sig[0].item() == pytest.approx(S.sigma_max(), rel=1e-7)
    kept = S.sigmas_dpm_time_uniform(steps, keep_sigma_min=True)
    assert kept.shape == (steps + 1,) and torch.equal(kept[:-1], sig[:-1])
    assert kept[-1].item() == pytest.approx(S.sigma_min(), rel=1e-6)  # t = 1e-3 is timestep 0
    assert torch.all(kept[1:] < kept[:-1])


def test_dpm_time_uniform_timesteps_are_not_integers():
    ts = S.sigma_to_timestep(S.sigmas_dpm_time_uniform(20)[:-1].double())
    assert ts[1].item() == pytest.approx(999 - 999 / 20, abs=2e-4)  # 949.05
    assert ts[-1].item() == pytest.approx(999 / 20 - 0.0, abs=2e-4)  # t = 1e-3 + 0.999/20 -> 49.95


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 5, 7, 10, 14, 20, 25, 50, 61])
def test_sigmas_diffusers_match_scheduler(spacing, steps):
    from diffusers import DPMSolverMultistepScheduler
    sch = DPMSolverMultistepScheduler(timestep_spacing=spacing)
    sch.set_timesteps(steps)
    ts = S.diffusers_timesteps(steps, spacing)
    assert np.array_equal(ts, sch.timesteps.numpy())
    sig = S.sigmas_diffusers(steps, spacing)
    assert sig.shape == sch.sigmas.shape and sig[-1].item() == 0.0 == sch.sigmas[-1].item()
    # same timesteps; σ agree to the precision of diffusers' float32 ᾱ
    assert torch.allclose(sig[:-1].double(), sch.sigmas[:-1].double(), rtol=1e-4, atol=0)
    # (diffusers' trailing-61 grid ends at timestep -1, which it feeds the model with σ_0; we map σ_0 to 0)
    assert torch.allclose(S.sigma_to_timestep(sig[:-1].double()), torch.from_numpy(ts.clip(0)).double(), atol=1e-3)


def test_sigmas_diffusers_known_timesteps():
    assert S.diffusers_timesteps(5).tolist() == [999, 799, 599, 400, 200]
    assert S.diffusers_timesteps(5, "leading").tolist() == [830, 664, 498, 332, 166]
    assert S.diffusers_timesteps(5, "trailing").tolist() == [999, 799, 599, 399, 199]
    assert len(S.diffusers_timesteps(61, "trailing")) == 62  # numpy arange quirk, kept to match diffusers
    with pytest.raises(ValueError, match="spacing must be 'linspace', 'leading' or 'trailing', got 'cosine'"):
        S.sigmas_diffusers(5, "cosine")


def test_karras():
    sig = S.sigmas_karras(7, 0.01, 100.0, rho=7.0)
    assert sig.shape == (8,) and sig[-1].item() == 0.0
    assert sig[0].item() == pytest.approx(100.0, rel=1e-6) and sig[-2].item() == pytest.approx(0.01, rel=1e-6)
    roots = sig[:-1].double() ** (1 / 7)
    assert torch.allclose(roots[1:] - roots[:-1], (roots[1] - roots[0]).expand(6), rtol=1e-5)  # uniform in σ^(1/ρ)
    mid = ((100.0 ** (1 / 7) + 0.01 ** (1 / 7)) / 2) ** 7
    assert sig[3].item() == pytest.approx(mid, rel=1e-6)
    full = S.make_sigmas("karras", 10)
    assert full[0].item() == pytest.approx(S.sigma_max(), rel=1e-6)
    assert full[-2].item() == pytest.approx(S.sigma_min(), rel=1e-6)


def test_registry_and_make_sigmas():
    assert set(S.STEP_GRIDS) == {"dpm_time_uniform", "linspace", "leading", "trailing", "karras", "lcm", "dmd"}
    assert S.FIXED_GRIDS == {"dmd"}  # one step only: tests/test_fewstep.py
    for name in set(S.STEP_GRIDS) - S.FIXED_GRIDS:
        sig = S.make_sigmas(name, 12)
        assert sig.shape == (13,) and sig[-1].item() == 0.0 and torch.all(sig[:-2] > sig[1:-1])
    assert torch.equal(S.make_sigmas("linspace", 12), S.sigmas_diffusers(12))
    assert torch.equal(S.make_sigmas("dpm_time_uniform", 12), S.sigmas_dpm_time_uniform(12))
    # denoise < 1: the last steps of a longer schedule, like ComfyUI's KSampler
    assert torch.equal(S.make_sigmas("dpm_time_uniform", 10, denoise=0.5), S.sigmas_dpm_time_uniform(20)[-11:])
    assert torch.equal(S.make_sigmas("karras", 6, denoise=0.7), S.make_sigmas("karras", 8)[-7:])  # int(6/0.7) = 8
    assert S.make_sigmas("leading", 10, denoise=0.3).shape == (11,)
    assert S.make_sigmas("linspace", 10, denoise=0.0).numel() == 0
    with pytest.raises(ValueError, match="unknown step grid 'simple'"):
        S.make_sigmas("simple", 10)
    with pytest.raises(ValueError, match="steps must be a whole number from 1 to 10000, got 0"):
        S.make_sigmas("karras", 0)
