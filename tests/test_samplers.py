"""Samplers and the PixArt denoiser wrapper.

Parity with diffusers' DPMSolverMultistepScheduler / SASolverScheduler and with independent
re-derivations of the official PixArt DPM-Solver++ and SA-Solver; convergence to the exact ODE
solution on Gaussian data; output statistics of the stochastic samplers; CFG batching and masks.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixart_core import samplers as P
from pixart_core import schedule as S
from pixart_core.samplers import SAMPLERS, PixArtDenoiser

CONTEXT = torch.zeros(2, 3, 8)  # the stub ε-model ignores captions


pytestmark = pytest.mark.usefixtures("one_thread")


class StubEps:
    """Deterministic nonlinear ε-model with PixArt's call signature and 8 output channels."""

    def __init__(self, channels=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(channels, channels, 3, 3, generator=g, dtype=torch.float64) * 0.3
        self.bias = torch.randn(1, channels, 1, 1, generator=g, dtype=torch.float64)
        self.timesteps = []

    def __call__(self, x, timesteps, context=None, context_mask=None, c_size=None, c_ar=None):
        self.timesteps.append(timesteps.detach().clone())
        # float64 inside whatever x is, so ε depends on the inputs and not on the caller's precision
        phase = (timesteps.double() / 1000).view(-1, 1, 1, 1)
        h = F.conv2d(x.double(), self.weight, padding=1)
        eps = torch.tanh(h + torch.sin(3 * phase + self.bias)) * (0.3 + 0.4 * phase) + 0.9 * phase * x.double()
        eps = eps.to(x.dtype)
        return torch.cat([eps, torch.full_like(eps, 1e3)], dim=1)  # channels 4..7: "variance", must be ignored


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def noise(seed=0, shape=(2, 4, 16, 16), dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def official_schedule(steps):
    """α, σ (VP) and λ on the official time-uniform grid, from an independent NoiseScheduleVP('discrete')."""
    t = np.linspace(1.0, 1e-3, steps + 1)
    log_alphas = 0.5 * np.cumsum(np.log(1.0 - np.linspace(1e-4, 0.02, 1000)))
    log_a = np.interp(t, np.arange(1, 1001) / 1000.0, log_alphas)
    alpha = np.exp(log_a)
    sigma = np.sqrt(1.0 - alpha ** 2)
    return t, alpha, sigma, log_a - np.log(sigma)


def official_data_prediction(eps_model, x, t, alpha, sigma):
    eps = eps_model(x, torch.full((x.shape[0],), 1000 * t - 1, dtype=x.dtype))[:, :4]  # official t_input
    return (x - sigma * eps) / alpha


# --------------------------------------------------------------------------------------------------
# DPM-Solver++(2M)
# --------------------------------------------------------------------------------------------------

def official_dpmpp_2m(eps_model, x, steps):
    """Multistep DPM-Solver++ order 2, lower_order_final at every step count, in VP form (Lu et al. 2022)."""
    t, alpha, sigma, lam = official_schedule(steps)
    states = [x]
    m_prev, m = None, official_data_prediction(eps_model, x, t[0], alpha[0], sigma[0])
    for k in range(1, steps + 1):
        h = lam[k] - lam[k - 1]
        phi = math.expm1(-h)
        x_next = sigma[k] / sigma[k - 1] * x - alpha[k] * phi * m
        if 1 < k < steps:  # first step: no history; last step: first order (the PixArt fork's rule)
            r = (lam[k - 1] - lam[k - 2]) / h
            x_next = x_next - 0.5 * alpha[k] * phi * (m - m_prev) / r
        x = x_next
        states.append(x)
        if k < steps:
            m_prev, m = m, official_data_prediction(eps_model, x, t[k], alpha[k], sigma[k])
    return x, states, alpha


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpmpp_2m_matches_diffusers(steps):
    from diffusers import DPMSolverMultistepScheduler
    stub = StubEps()
    sch = DPMSolverMultistepScheduler()
    sch.set_timesteps(steps)
    latents = noise()
    ref = latents.clone()
    for t in sch.timesteps:  # the diffusers pipeline loop: unscaled VP latents, integer timesteps
        eps = stub(ref, t.float().expand(ref.shape[0]))[:, :4]
        ref = sch.step(eps, t, ref).prev_sample
    sigmas = S.sigmas_diffusers(steps)
    x = latents * math.sqrt(1 + sigmas[0].item() ** 2)  # VP x_T = x_VE / sqrt(1 + σ_max²)
    out = P.sample_dpmpp_2m(PixArtDenoiser(stub), x, sigmas, extra_args={"context": CONTEXT}, disable=True)
    assert rel(out, ref) < 1e-5  # both end at σ = 0, where VP and VE coincide
    ours = torch.stack([t[0] for t in stub.timesteps[steps:]])
    assert torch.allclose(ours.double(), sch.timesteps.double(), atol=1e-3)


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpmpp_2m_reproduces_official_pixart_solver(steps):
    ref_model, model = StubEps(), StubEps()
    x_vp = noise(1, dtype=torch.float64)
    ref, ref_states, alpha = official_dpmpp_2m(ref_model, x_vp, steps)

    # keep_sigma_min: the official end point t = 1e-3, reproduced exactly
    states = []
    sig = S.sigmas_dpm_time_uniform(steps, keep_sigma_min=True)
    out = P.sample_dpmpp_2m(PixArtDenoiser(model), x_vp / alpha[0], sig, extra_args={"context": CONTEXT},
                            callback=states.append, disable=True)
    assert rel(out, ref / alpha[-1]) < 1e-6  # x_VE = x_VP / α
    assert len(states) == steps and [d["i"] for d in states] == list(range(steps))
    for k, d in enumerate(states):
        assert rel(d["x"], ref_states[k] / alpha[k]) < 1e-6
    assert torch.allclose(torch.stack([t[0] for t in model.timesteps]),
                          torch.stack([t[0] for t in ref_model.timesteps]), atol=2e-4)  # 1000t - 1, non-integer

    # default grid: same model calls and states; the final step lands on the x0 estimate, where the
    # official solver stops at σ_min and keeps σ_min·ε̂ of noise
    states = []
    out0 = P.sample_dpmpp_2m(PixArtDenoiser(StubEps()), x_vp / alpha[0], S.sigmas_dpm_time_uniform(steps),
                             extra_args={"context": CONTEXT}, callback=states.append, disable=True)
    for k, d in enumerate(states):
        assert rel(d["x"], ref_states[k] / alpha[k]) < 1e-6
    last = states[-1]
    assert torch.equal(out0, last["denoised"])
    eps_hat = (last["x"] - last["denoised"]) / last["sigma"]
    assert rel(out0 + S.sigma_min() * eps_hat, ref / alpha[-1]) < 1e-6
    assert rel(out0, ref / alpha[-1]) > 1e-4  # the two end points genuinely differ


def test_dpmpp_2m_first_order_on_first_and_last_step():
    x = noise(2, dtype=torch.float64)
    model = PixArtDenoiser(StubEps())
    kw = {"extra_args": {"context": CONTEXT}, "disable": True}
    sig = torch.tensor([80.0, 10.0, 1.0], dtype=torch.float64)  # two steps, ending above 0
    assert torch.allclose(P.sample_dpmpp_2m(model, x, sig, **kw), P.sample_ddim(model, x, sig, **kw), rtol=1e-12)
    sig = torch.tensor([80.0, 10.0, 1.0, 0.3], dtype=torch.float64)  # the middle step is second order
    assert rel(P.sample_dpmpp_2m(model, x, sig, **kw), P.sample_ddim(model, x, sig, **kw)) > 1e-3


# --------------------------------------------------------------------------------------------------
# SA-Solver
# --------------------------------------------------------------------------------------------------

def official_sa_solver(eps_model, x, steps, noises, predictor_order=2, corrector_order=2):
    """PixArt's SA-Solver ('few_steps', PEC, data prediction) in VP form, Adams weights by Gauss-Legendre quadrature."""
    t, alpha, sigma, lam = official_schedule(steps)
    gl_nodes, gl_weights = np.polynomial.legendre.leggauss(24)

    def adams(x, k, idx, values, tau, z):
        # x_t = e^{-τ²h} σ_t/σ_s x_s + (1+τ²) σ_t e^{-τ²λ_t} Σ_j D_j ∫ e^{(1+τ²)λ} ℓ_j(λ) dλ + σ_t sqrt(1-e^{-2τ²h}) z
        kappa, h = 1 + tau * tau, lam[k] - lam[k - 1]
        lq = lam[k - 1] + (gl_nodes + 1) / 2 * h
        wq = gl_weights * h / 2
        coeffs = []
        for j in idx:
            ell = np.prod([(lq - lam[o]) / (lam[j] - lam[o]) for o in idx if o != j], axis=0)
            coeffs.append(np.sum(wq * np.exp(kappa * lq) * ell))
        if len(idx) == 2:  # the official O(h³) "rescaling" of the order-2 weights (SA-Solver App. D)
            g = kappa * h - 1 + math.exp(-kappa * h)
            if idx[0] == k:  # corrector: nodes λ_t, λ_s
                extra = math.exp(kappa * lam[k]) * (h / 2 - g / (kappa ** 2 * h))
            else:  # predictor: nodes λ_s, λ_{s-1}
                extra = math.exp(kappa * lam[k]) * (h * h / 2 - g / kappa ** 2) / (lam[idx[0]] - lam[idx[1]])
            coeffs = [coeffs[0] + extra, coeffs[1] - extra]
        out = math.exp(-tau * tau * h) * sigma[k] / sigma[k - 1] * x
        for c, v in zip(coeffs, values):
            out = out + kappa * sigma[k] * math.exp(-tau * tau * lam[k]) * c * v
        return out + sigma[k] * math.sqrt(-math.expm1(-2 * tau * tau * h)) * z

    data = {0: official_data_prediction(eps_model, x, t[0], alpha[0], sigma[0])}
    for k in range(1, steps + 1):
        tau = 0.0 if k == steps else (1.0 if 0.2 <= t[k] <= 0.8 else 0.0)  # sa_sampler.py: eta=1 on t in [0.2, 0.8]
        p = min(predictor_order, k, steps - k + 1)
        idx = [k - 1 - j for j in range(p)]
        x_pred = adams(x, k, idx, [data[j] for j in idx], tau, noises[k])
        if k == steps:
            x = x_pred
            break
        data[k] = official_data_prediction(eps_model, x_pred, t[k], alpha[k], sigma[k])
        c = min(corrector_order, k + 1, steps - k + 2)
        idx = [k - j for j in range(c)]
        x = adams(x, k, idx, [data[j] for j in idx], tau, noises[k])
    return x, alpha


def indexed_noise_sampler(sigmas, noises):
    """A noise_sampler returning the pre-drawn draw of the step that ends at sigma_next."""
    sig = sigmas.double()

    def sample(sigma, sigma_next):
        return noises[int((sig - float(sigma_next)).abs().argmin())]
    return sample


@pytest.mark.parametrize("steps", [10, 25])
def test_sa_solver_reproduces_official_pixart_sampler(steps):
    x_vp = noise(3, dtype=torch.float64)
    noises = {k: noise(100 + k, dtype=torch.float64) for k in range(1, steps + 1)}
    ref, alpha = official_sa_solver(StubEps(), x_vp, steps, noises)
    sig = S.sigmas_dpm_time_uniform(steps, keep_sigma_min=True)
    out = P.sample_sa_solver(PixArtDenoiser(StubEps()), x_vp / alpha[0], sig, extra_args={"context": CONTEXT},
                             noise_sampler=indexed_noise_sampler(sig, noises), disable=True)
    assert rel(out, ref / alpha[-1]) < 1e-6
    # the stochastic window matters: without its noise the result is far off
    off = P.sample_sa_solver(PixArtDenoiser(StubEps()), x_vp / alpha[0], sig, extra_args={"context": CONTEXT},
                             tau=lambda s: 0.0, disable=True)
    assert rel(off, ref / alpha[-1]) > 1e-2


def test_sa_solver_default_tau_window():
    tau = P.tau_window()
    at = (lambda ts: tau(S.timestep_to_sigma(torch.tensor(ts, dtype=torch.float64))))
    assert [at(t) for t in (998.0, 799.5, 799.0, 500.0, 199.0, 198.5, 10.0)] == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert P.tau_window(0.5, 200, 800)(S.timestep_to_sigma(torch.tensor(800.0))) == 0.5


@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("stochastic", [False, True])
def test_sa_solver_matches_diffusers(steps, stochastic):
    from diffusers import SASolverScheduler
    # diffusers' SASolverScheduler stops at σ_min, like the official sampler
    sig = torch.cat([S.sigmas_diffusers(steps)[:-1], torch.tensor([S.sigma_min()])])
    if stochastic:
        # τ = 1 on every step but the last, which both implementations keep deterministic; diffusers reads τ
        # at the step's start timestep, we read it at the step's target σ
        probe = SASolverScheduler()
        probe.set_timesteps(steps)
        last_t = int(probe.timesteps[-1])
        tau_fn, tau = (lambda t: 1 if t > last_t else 0), (lambda s: 1.0 if float(s) >= float(sig[-2]) * 0.999 else 0.0)
    else:
        tau_fn, tau = (lambda t: 0), (lambda s: 0.0)
    sch = SASolverScheduler(tau_func=tau_fn)
    sch.set_timesteps(steps)
    stub = StubEps()
    latents = noise(4)
    ref = latents.clone()
    gen = torch.Generator().manual_seed(5)
    for t in sch.timesteps:
        eps = stub(ref, t.float().expand(ref.shape[0]))[:, :4]
        ref = sch.step(eps, t, ref, generator=gen).prev_sample
    gen = torch.Generator().manual_seed(5)  # one draw per step, in the same order as diffusers
    out = P.sample_sa_solver(PixArtDenoiser(stub), latents * math.sqrt(1 + sig[0].item() ** 2), sig,
                             extra_args={"context": CONTEXT}, tau=tau, disable=True,
                             noise_sampler=lambda s, sn: torch.randn(latents.shape, generator=gen))
    assert rel(out, ref * math.sqrt(1 + S.sigma_min() ** 2)) < 1e-5


@pytest.mark.parametrize("orders", [(1, 1), (3, 3), (3, 4), (2, 1)])
def test_sa_solver_other_orders_match_diffusers(orders):
    from diffusers import SASolverScheduler
    steps = 8
    sig = torch.cat([S.sigmas_diffusers(steps)[:-1], torch.tensor([S.sigma_min()])])
    sch = SASolverScheduler(tau_func=lambda t: 0, predictor_order=orders[0], corrector_order=orders[1])
    sch.set_timesteps(steps)
    stub, latents = StubEps(), noise(4)
    ref = latents.clone()
    for t in sch.timesteps:
        ref = sch.step(stub(ref, t.float().expand(2))[:, :4], t, ref).prev_sample
    out = P.sample_sa_solver(PixArtDenoiser(stub), latents * math.sqrt(1 + sig[0].item() ** 2), sig,
                             extra_args={"context": CONTEXT}, tau=lambda s: 0.0, predictor_order=orders[0],
                             corrector_order=orders[1], disable=True)
    assert rel(out, ref * math.sqrt(1 + S.sigma_min() ** 2)) < 1e-5


# --------------------------------------------------------------------------------------------------
# Analytic Gaussian data: exact denoiser and exact probability-flow ODE solution
# --------------------------------------------------------------------------------------------------

MU = torch.tensor([0.3, -0.2, 0.0, 0.5], dtype=torch.float64).view(1, 4, 1, 1)
STD = torch.tensor([0.5, 1.0, 0.8, 0.3], dtype=torch.float64).view(1, 4, 1, 1)


def gaussian_denoiser(x, sigma):
    """E[x0 | x0 + σε] for x0 ~ N(MU, STD²) per channel."""
    s2 = (sigma.view(-1, 1, 1, 1) ** 2).to(x.dtype)
    return MU + STD ** 2 / (STD ** 2 + s2) * (x - MU)


def exact_ode(x_start, sigma_start, sigma_end):
    """Probability-flow ODE dx/dσ = (x - D)/σ solved in closed form: x - μ ∝ sqrt(s² + σ²)."""
    return MU + (x_start - MU) * torch.sqrt(STD ** 2 + sigma_end ** 2) / torch.sqrt(STD ** 2 + sigma_start ** 2)


def test_exact_ode_solution_satisfies_the_ode():
    x_t = noise(5, (3, 4, 2, 2), torch.float64) * 20
    for sigma in (0.05, 0.7, 3.0, 40.0):
        d = 1e-6 * sigma
        path = (lambda s: exact_ode(x_t, 20.0, s))
        lhs = (path(sigma + d) - path(sigma - d)) / (2 * d)
        rhs = (path(sigma) - gaussian_denoiser(path(sigma), torch.tensor([sigma]))) / sigma
        assert torch.allclose(lhs, rhs, rtol=1e-6, atol=1e-9)


def gaussian_error(name, sigmas, **kwargs):
    sigmas = sigmas.double()
    x_t = MU + torch.sqrt(STD ** 2 + sigmas[0] ** 2) * noise(6, (4, 4, 4, 4), torch.float64)
    out = SAMPLERS[name](gaussian_denoiser, x_t.clone(), sigmas, disable=True, **kwargs)
    exact = exact_ode(x_t, sigmas[0], sigmas[-1])
    return rel(out - MU, exact - MU)


DETERMINISTIC = [("dpmpp_2m", {}), ("euler", {}), ("ddim", {"eta": 0.0}), ("sa_solver", {"tau": lambda s: 0.0})]


@pytest.mark.parametrize("name,kwargs", DETERMINISTIC)
def test_deterministic_samplers_converge_to_exact_ode_solution(name, kwargs):
    errors = [gaussian_error(name, S.make_sigmas("karras", n), **kwargs) for n in (10, 20, 40, 80)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    if name in ("euler", "ddim"):  # first order: error halves when the steps double
        assert errors[-1] < 0.05 and 1.7 < errors[-2] / errors[-1] < 2.3, errors
    else:  # second order
        assert errors[-1] < 5e-3 and errors[-2] / errors[-1] > 3.5, errors


@pytest.mark.parametrize("name,kwargs", [d for d in DETERMINISTIC if d[0] != "ddim"])
def test_official_grid_reaches_exact_ode_solution(name, kwargs):
    # On the time-uniform grid the error changes sign near 20 steps (the final jump vs the solver's
    # own error), so only the size at many steps is checked here, on both end-point conventions.
    bound = 0.03 if name == "euler" else 4e-3
    assert gaussian_error(name, S.sigmas_dpm_time_uniform(80), **kwargs) < bound
    assert gaussian_error(name, S.sigmas_dpm_time_uniform(80, keep_sigma_min=True), **kwargs) < bound


def test_ddim_eta0_is_euler_and_single_step_is_denoised():
    x = noise(7, dtype=torch.float64) * 14
    model = PixArtDenoiser(StubEps())
    kw = {"extra_args": {"context": CONTEXT}, "disable": True}
    sig = S.make_sigmas("linspace", 8).double()
    assert torch.allclose(P.sample_ddim(model, x, sig, **kw), P.sample_euler(model, x, sig, **kw), rtol=1e-10)
    one = torch.tensor([14.0, 0.0], dtype=torch.float64)
    d = model(x, torch.full((2,), 14.0, dtype=torch.float64), CONTEXT)
    for name in SAMPLERS:
        want = d
        if name == "lcm":  # the consistency output keeps c_skip of the (VP) input
            c_skip, c_out = P.lcm_boundary(float(S.sigma_to_timestep(torch.tensor(14.0, dtype=torch.float64))))
            want = c_out * d + c_skip * x / math.sqrt(1 + 14.0 ** 2)
        assert torch.allclose(SAMPLERS[name](model, x, one, **kw), want, rtol=1e-12, atol=1e-12), name
        assert torch.equal(SAMPLERS[name](model, x, torch.zeros(0), **kw), x), name  # denoise = 0


# --------------------------------------------------------------------------------------------------
# Stochastic samplers
# --------------------------------------------------------------------------------------------------

GAUSS_MU, GAUSS_STD = 0.3, 0.5


def scalar_gaussian_denoiser(x, sigma):
    return GAUSS_MU + GAUSS_STD ** 2 / (GAUSS_STD ** 2 + sigma.view(-1, 1, 1, 1) ** 2) * (x - GAUSS_MU)


def stochastic_run(name, sigmas, seed=9, **kwargs):
    sigmas = sigmas.double()
    x_t = GAUSS_MU + math.sqrt(GAUSS_STD ** 2 + sigmas[0].item() ** 2) * noise(8, (20000, 1, 1, 1), torch.float64)
    out = SAMPLERS[name](scalar_gaussian_denoiser, x_t, sigmas, generator=torch.Generator().manual_seed(seed),
                         disable=True, **kwargs)
    ode = GAUSS_MU + (x_t - GAUSS_MU) * GAUSS_STD / math.sqrt(GAUSS_STD ** 2 + sigmas[0].item() ** 2)
    assert rel(out - GAUSS_MU, ode - GAUSS_MU) > 0.2  # really stochastic, not the ODE transport of x_T
    return out


@pytest.mark.parametrize("sigmas,kwargs", [
    (S.sigmas_dpm_time_uniform(25), {}),  # PixArt's SA-Solver setting: 25 steps, τ = 1 on 0.2 <= t <= 0.8
    (S.make_sigmas("karras", 80), {"tau": lambda s: 1.0}),  # fully stochastic (SDE) sampling
])
def test_sa_solver_draws_from_the_data_distribution(sigmas, kwargs):
    out = stochastic_run("sa_solver", sigmas, **kwargs)
    assert abs(out.mean().item() - GAUSS_MU) < 0.012  # standard error ≈ 0.0035
    assert abs(out.std().item() - GAUSS_STD) < 0.012


def test_ddim_eta1_variance_follows_the_exact_recursion():
    # Ancestral DDIM is weakly first order: for Gaussian data each step maps N(μ, v) to N(μ, c²v + σ_up²)
    # exactly, so the output std is known for any grid, and it tends to the data std as steps grow.
    def predicted_std(sigmas):
        sig = sigmas.double().tolist()
        v, s2 = GAUSS_STD ** 2 + sig[0] ** 2, GAUSS_STD ** 2
        for a, b in zip(sig, sig[1:]):
            shrink = s2 / (s2 + a * a)
            if b == 0:
                v = shrink ** 2 * v
                continue
            up = min(b, math.sqrt(b * b * (a * a - b * b) / (a * a)))
            c = shrink + math.sqrt(b * b - up * up) / a * (1 - shrink)
            v = c * c * v + up * up
        return math.sqrt(v)

    for steps, lo in ((40, 0.42), (160, 0.47)):
        sig = S.make_sigmas("karras", steps)
        out = stochastic_run("ddim", sig, eta=1.0)
        assert abs(out.mean().item() - GAUSS_MU) < 0.012
        assert abs(out.std().item() - predicted_std(sig)) < 0.01
        assert lo < predicted_std(sig) < GAUSS_STD


@pytest.mark.parametrize("name,kwargs", [("sa_solver", {}), ("ddim", {"eta": 1.0})])
def test_stochastic_samplers_are_seeded(name, kwargs):
    model = PixArtDenoiser(StubEps())
    x = noise(10) * 80
    sig = S.make_sigmas("dpm_time_uniform", 12)

    def run(seed):
        return SAMPLERS[name](model, x, sig, extra_args={"context": CONTEXT}, disable=True,
                              generator=torch.Generator().manual_seed(seed), **kwargs)
    assert torch.equal(run(1), run(1))
    assert rel(run(1), run(2)) > 1e-3
    calls = []
    SAMPLERS[name](model, x, sig, extra_args={"context": CONTEXT}, disable=True,
                   noise_sampler=lambda s, sn: calls.append((float(s), float(sn))) or torch.zeros_like(x), **kwargs)
    assert calls and all(a > b > 0 for a, b in calls)


def test_callback_contents():
    seen = []
    model = PixArtDenoiser(StubEps())
    sig = S.make_sigmas("karras", 6)
    for name in SAMPLERS:
        seen.clear()
        SAMPLERS[name](model, noise(11) * 157, sig, extra_args={"context": CONTEXT}, callback=seen.append,
                       disable=True)
        assert [d["i"] for d in seen] == list(range(6)), name
        for d in seen:
            assert set(d) == {"x", "i", "sigma", "sigma_hat", "denoised"}
            assert float(d["sigma"]) == float(sig[d["i"]]) and float(d["sigma_hat"]) == float(sig[d["i"]])
            if name == "sa_solver" and d["i"] > 0:
                continue  # PEC: its denoised was evaluated at the predictor, before the corrector moved x
            if name == "lcm":
                continue  # the consistency output c_out·x0 + c_skip·x (what LCM returns), checked in test_fewstep
            expected = model(d["x"], d["sigma"] * torch.ones(2), CONTEXT)
            assert torch.allclose(d["denoised"], expected, rtol=1e-5, atol=1e-4), name


# --------------------------------------------------------------------------------------------------
# PixArtDenoiser
# --------------------------------------------------------------------------------------------------

class RecordingModel:
    """ε = 0.5·x_in + (masked mean of the caption) + t/1000 (+ c_size/1000); variance channels huge."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, timesteps, context, context_mask=None, c_size=None, c_ar=None):
        self.calls.append({"x": x.clone(), "t": timesteps.clone(), "context": context.clone(),
                           "mask": None if context_mask is None else context_mask.clone(),
                           "c_size": c_size, "c_ar": c_ar})
        m = torch.ones(context.shape[:2]) if context_mask is None else context_mask.to(context.dtype)
        caption = (context.sum(-1) * m).sum(1) / m.sum(1)
        eps = 0.5 * x + caption.view(-1, 1, 1, 1) + (timesteps / 1000).view(-1, 1, 1, 1)
        if c_size is not None:
            eps = eps + (c_size.sum(-1) / 1000 + c_ar.sum(-1)).view(-1, 1, 1, 1)
        return torch.cat([eps, torch.full_like(eps, 1e6)], dim=1)


def captions(seed, batch, length, width=6):
    return torch.randn(batch, length, width, generator=torch.Generator().manual_seed(seed))


def test_denoiser_without_cfg():
    model = RecordingModel()
    x, sigma = noise(12), torch.tensor([3.0, 0.5])
    cond = captions(1, 2, 4)
    out = PixArtDenoiser(model)(x, sigma, cond, uncond_context=captions(2, 2, 4), cfg_scale=1.0)
    assert len(model.calls) == 1  # scale 1: the unconditional pass is skipped
    call = model.calls[0]
    assert call["x"].shape[0] == 2 and torch.equal(call["context"], cond) and call["mask"] is None
    assert torch.allclose(call["x"], x / torch.sqrt(1 + sigma ** 2).view(-1, 1, 1, 1))
    assert torch.allclose(call["t"], S.sigma_to_timestep(sigma))
    eps = 0.5 * call["x"] + cond.sum(-1).mean(1).view(-1, 1, 1, 1) + (call["t"] / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(out, x - sigma.view(-1, 1, 1, 1) * eps, atol=1e-5)  # variance channels dropped
    PixArtDenoiser(model)(x, sigma, cond, cfg_scale=4.5)  # no uncond given: no CFG either
    assert model.calls[-1]["x"].shape[0] == 2


def separate_eps(x, sigma, context, mask=None):
    return (x - PixArtDenoiser(RecordingModel())(x, sigma, context, mask)) / sigma.view(-1, 1, 1, 1)


def test_denoiser_cfg_is_one_batched_call_in_uncond_cond_order():
    model = RecordingModel()
    x, sigma, scale = noise(13), torch.tensor([7.0, 7.0]), 4.5
    cond, uncond = captions(3, 2, 5), captions(4, 2, 5)
    out = PixArtDenoiser(model)(x, sigma, cond, uncond_context=uncond, cfg_scale=scale)
    assert len(model.calls) == 1
    call = model.calls[0]
    assert torch.equal(call["context"][:2], uncond) and torch.equal(call["context"][2:], cond)
    assert torch.equal(call["x"][:2], call["x"][2:]) and torch.equal(call["t"][:2], call["t"][2:])
    assert call["mask"] is None  # equal lengths and no masks: nothing to build
    eps_u, eps_c = separate_eps(x, sigma, uncond), separate_eps(x, sigma, cond)
    assert torch.allclose(out, x - 7.0 * (eps_u + scale * (eps_c - eps_u)), atol=1e-4)


def test_denoiser_cfg_masks_per_half():
    model = RecordingModel()
    x, sigma = noise(14), torch.tensor([2.0, 2.0])
    cond, uncond = captions(5, 2, 4), captions(6, 2, 4)
    cond_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    out = PixArtDenoiser(model)(x, sigma, cond, cond_mask, uncond, None, cfg_scale=3.0)
    mask = model.calls[0]["mask"]
    assert torch.equal(mask[:2], torch.ones(2, 4, dtype=cond_mask.dtype)) and torch.equal(mask[2:], cond_mask)
    eps_u, eps_c = separate_eps(x, sigma, uncond), separate_eps(x, sigma, cond, cond_mask)
    assert torch.allclose(out, x - 2.0 * (eps_u + 3.0 * (eps_c - eps_u)), atol=1e-4)
    # the official-PixArt convention (null caption attended over the prompt's mask) is the caller passing it
    PixArtDenoiser(model)(x, sigma, cond, cond_mask, uncond, cond_mask, cfg_scale=3.0)
    assert torch.equal(model.calls[-1]["mask"], torch.cat([cond_mask, cond_mask]))
    PixArtDenoiser(model)(x, sigma, cond, None, uncond, cond_mask.bool(), cfg_scale=3.0)
    assert model.calls[-1]["mask"].dtype == torch.bool and model.calls[-1]["mask"][2:].all()


@pytest.mark.parametrize("cond_len,uncond_len", [(5, 2), (2, 6)])
def test_denoiser_cfg_pads_different_lengths(cond_len, uncond_len):
    model = RecordingModel()
    x, sigma = noise(15), torch.tensor([4.0, 1.0])
    cond, uncond = captions(7, 2, cond_len), captions(8, 1, uncond_len)  # batch-1 uncond is broadcast
    out = PixArtDenoiser(model)(x, sigma, cond, uncond_context=uncond, cfg_scale=2.0)
    call = model.calls[0]
    n = max(cond_len, uncond_len)
    assert call["context"].shape == (4, n, 6)
    assert torch.equal(call["context"][:2, :uncond_len], uncond.expand(2, -1, -1))
    assert torch.equal(call["context"][2:, :cond_len], cond)
    assert not call["context"][:2, uncond_len:].any() and not call["context"][2:, cond_len:].any()
    expected_mask = torch.zeros(4, n, dtype=torch.long)
    expected_mask[:2, :uncond_len] = 1
    expected_mask[2:, :cond_len] = 1
    assert torch.equal(call["mask"], expected_mask)
    eps_u, eps_c = separate_eps(x, sigma, uncond.expand(2, -1, -1)), separate_eps(x, sigma, cond)
    assert torch.allclose(out, x - sigma.view(-1, 1, 1, 1) * (eps_u + 2.0 * (eps_c - eps_u)), atol=1e-4)


def test_denoiser_micro_conditions_and_broadcasting():
    model = RecordingModel()
    x = noise(16)
    c_size, c_ar = torch.tensor([[1024.0, 768.0]]), torch.tensor([[1.33]])
    out = PixArtDenoiser(model)(x, torch.tensor(5.0), captions(9, 1, 3), uncond_context=captions(10, 1, 3),
                                cfg_scale=2.0, c_size=c_size, c_ar=c_ar)
    call = model.calls[0]
    assert call["context"].shape[0] == 4 and call["t"].shape == (4,)  # scalar σ and batch-1 captions broadcast
    assert torch.equal(call["c_size"], c_size.expand(4, 2)) and torch.equal(call["c_ar"], c_ar.expand(4, 1))
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="context has batch 3, expected 2"):
        PixArtDenoiser(model)(x, torch.tensor(5.0), captions(9, 3, 3))


def test_denoiser_with_the_real_model():
    model_mod = pytest.importorskip("pixart_core.model")
    from pixart_core.config import PixArtConfig
    cfg = PixArtConfig(depth=1, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=16,
                       sample_size=32, pe_interpolation=0.5, resolution=256)
    model = model_mod.PixArt(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # the reference init zeroes the output layers
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.1))
    den = PixArtDenoiser(model)
    x, sigma = noise(17, (2, 4, 8, 8)) * 3, torch.tensor([3.0, 3.0])
    cond = torch.randn(2, 6, 32, generator=g)
    cond_mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    uncond = torch.randn(1, 3, 32, generator=g)
    with torch.no_grad():
        out = den(x, sigma, cond, cond_mask, uncond, None, cfg_scale=4.5)
        eps_c = (x - den(x, sigma, cond, cond_mask)) / 3.0
        eps_u = (x - den(x, sigma, uncond)) / 3.0
    assert rel(out, x - 3.0 * (eps_u + 4.5 * (eps_c - eps_u))) < 1e-4  # padding + masks change nothing
    sig = S.make_sigmas("dpm_time_uniform", 2)
    y = P.sample_dpmpp_2m(den, noise(18, (2, 4, 8, 8)) * sig[0], sig, disable=True,
                          extra_args={"context": cond, "context_mask": cond_mask, "uncond_context": uncond,
                                      "cfg_scale": 4.5})
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("steps", [10, 20])
def test_vp_scaled_end_point_equals_the_official_solver_output(steps):
    """keep_sigma_min ends on the official last state in VE scale; vp_scaled turns it into exactly what
    the official solver returns (they differ by √(1 + σ_min²) ≈ 1 + 5e-5 before)."""
    x_vp = noise(1, dtype=torch.float64)
    ref, _, alpha = official_dpmpp_2m(StubEps(), x_vp, steps)
    sig = S.sigmas_dpm_time_uniform(steps, keep_sigma_min=True)
    out = P.sample_dpmpp_2m(PixArtDenoiser(StubEps()), x_vp / alpha[0], sig, extra_args={"context": CONTEXT},
                            disable=True)
    assert rel(S.vp_scaled(out, sig[-1]), ref) < 1e-6
    assert rel(out, ref) > 2e-5
