"""Samplers in the k-diffusion style, and the PixArt ε-model -> denoiser wrapper.

Every sampler is `sample_xxx(model, x, sigmas, extra_args=None, callback=None, disable=None, ...)`,
where `model(x, sigma_batch, **extra_args)` returns the denoised x0 in the VE parameterisation
x = x0 + σ·ε, and `sigmas` come from pixart_core.schedule (high to low, normally ending in 0).
Maths in λ = -log σ, the half log-SNR (λ = log α - log σ_VP of DPM-Solver and SA-Solver).
"""
from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import trange

from . import schedule

logger = logging.getLogger(__name__)


def default_noise_sampler(x: torch.Tensor, generator: torch.Generator | None = None):
    """Standard-normal noise shaped like x, from `generator` when given (else the global RNG)."""
    def sample(sigma, sigma_next):
        if generator is None:
            return torch.randn_like(x)
        # Drawn on the generator's device so a CPU seed gives the same noise on any accelerator.
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    return sample


def per_row_noise_sampler(x: torch.Tensor, generators):
    """Noise shaped like x whose row i comes from generators[i] alone, so a sample's noise does not depend
    on its batch mates (a batch of one draws exactly what default_noise_sampler draws)."""
    if len(generators) != x.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {x.shape[0]}")

    def sample(sigma, sigma_next):
        rows = [torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=x.dtype) for g in generators]
        return torch.cat(rows).to(x.device)
    return sample


def _callback(callback, x, i, sigma, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0, noise_sampler=None,
                generator=None):
    """DDIM (Song et al. 2021, eq. 12) in σ form; eta=0 is deterministic, eta=1 is DDPM-like ancestral sampling."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, generator) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if sigma_next == 0:
            x = denoised
            continue
        # DDIM's σ_t(η)² = η²(1-ᾱ')/(1-ᾱ)(1-ᾱ/ᾱ') becomes, divided by ᾱ', this VE noise level.
        sigma_up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
        sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)
        x = denoised + (x - denoised) * (sigma_down / sigma)
        if sigma_up > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), first order on the first and on the last step."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in trange(n, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, x, i, sigmas[i], denoised)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if sigma_next == 0:
            # λ' = ∞: the exponential integrator lands exactly on the data prediction.
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            # The official PixArt fork drops to first order on the final step at every step count
            # (lower_order_final without the steps < 10 condition); this also covers grids ending above 0.
            if old_denoised is None or i == n - 1:
                d = denoised
            else:
                r = h_last / h
                d = denoised + (denoised - old_denoised) / (2 * r)
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
    return x


def lcm_boundary(timestep: float, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> tuple[float, float]:
    """LCM's consistency boundary conditions (c_skip, c_out) at a training timestep, as diffusers' LCMScheduler."""
    scaled = float(timestep) * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / math.sqrt(scaled ** 2 + sigma_data ** 2)
    return c_skip, c_out


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, generator=None,
               sigma_data=0.5, timestep_scaling=10.0):
    """Latent Consistency Model multistep sampling (Luo et al. 2023), diffusers' LCMScheduler in σ form.

    Each step takes the consistency function f = c_out·x0 + c_skip·x_VP at the step's timestep and, except
    on the last step, noises it afresh to the next σ (x' = f + σ'·z, i.e. √ᾱ'·f + √(1-ᾱ')·z in VP). The last
    step returns f whatever the grid's end, as the scheduler does. Use schedule.sigmas_lcm for the timesteps.
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, generator) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    n = len(sigmas) - 1
    for i in trange(n, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma = float(sigmas[i])
        t = float(schedule.sigma_to_timestep(torch.tensor(sigma, dtype=torch.float64)))
        c_skip, c_out = lcm_boundary(t, sigma_data, timestep_scaling)
        # c_skip weighs the VP-scaled sample the scheduler sees, x / √(1 + σ²)
        consistent = denoised * c_out + x * (c_skip / math.sqrt(1.0 + sigma * sigma))
        _callback(callback, x, i, sigmas[i], consistent)
        if i == n - 1:
            x = consistent
        else:
            x = consistent + noise_sampler(sigmas[i], sigmas[i + 1]) * float(sigmas[i + 1])
    return x


def tau_window(eta: float = 1.0, lo: float = 199.0, hi: float = 799.0):
    """SA-Solver stochasticity τ(σ): eta while lo <= timestep(σ) <= hi, else 0.

    The default is PixArt-Σ sa_sampler.py's window 0.2 <= t <= 0.8 in continuous time, i.e.
    timesteps 199..799, applied at the step's target σ. diffusers' SASolverScheduler uses
    200 <= t <= 800 on the step's start timestep; tau_window(1.0, 200, 800) is the closest match.
    """
    def tau(sigma) -> float:
        t = float(schedule.sigma_to_timestep(torch.tensor(float(sigma), dtype=torch.float64)))
        return eta if lo <= t <= hi else 0.0
    return tau


def _sa_weights(node_lambdas, lambda_s: float, h: float, kappa: float) -> list[float]:
    # Weights w_j with Σ w_j D_j = κ ∫_{λ_s}^{λ_s+h} e^{-κ(λ_s+h-λ)} P(λ) dλ, P the polynomial through (λ_j, D_j).
    # In u = λ - λ_s: P(u) = Σ_k c_k u^k with c = V⁻¹D (V_jk = u_j^k), and the integral is Σ_k c_k M_k.
    m = len(node_lambdas)
    moments = [-math.expm1(-kappa * h)]
    for k in range(1, m):
        moments.append(h ** k - k / kappa * moments[-1])  # integration by parts
    if m == 2:
        # SA-Solver's "few steps" rescaling (paper App. D, used by PixArt and diffusers): the linear term
        # drops the exponential weight, an O(h³) change that the authors found helps at low step counts.
        moments[1] = kappa * h * h / 2
    u = [lam - lambda_s for lam in node_lambdas]
    vander = torch.tensor([[uj ** k for k in range(m)] for uj in u], dtype=torch.float64)
    w = torch.linalg.solve(vander.T, torch.tensor(moments, dtype=torch.float64))
    return w.tolist()


def _sa_step(x, node_lambdas, node_denoised, lambda_s, h, kappa):
    x = math.exp(-kappa * h) * x
    for w, d in zip(_sa_weights(node_lambdas, lambda_s, h, kappa), node_denoised):
        x = x + w * d
    return x


@torch.no_grad()
def sample_sa_solver(model, x, sigmas, extra_args=None, callback=None, disable=None, tau=None,
                     predictor_order=2, corrector_order=2, noise_sampler=None, generator=None):
    """SA-Solver (Xue et al. 2023): stochastic Adams predictor-corrector, data prediction, PEC mode.

    One model call per step. As in PixArt's sa_sampler.py: orders ramp up from 1, drop again at the
    end (lower_order_final), τ is read at each step's target σ, and the final step is a deterministic
    first-order predictor without a corrector. PEC evaluates the model at the predicted point, so for
    i > 0 the callback's `denoised` belongs to the predictor, not to the corrected x it is shown with.
    """
    if predictor_order < 1 or corrector_order < 0:
        raise ValueError(f"need predictor_order >= 1 and corrector_order >= 0, "
                         f"got {predictor_order} and {corrector_order}")
    extra_args = {} if extra_args is None else extra_args
    tau = tau_window() if tau is None else tau
    noise_sampler = default_noise_sampler(x, generator) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    n = len(sigmas) - 1
    keep = max(predictor_order, corrector_order)
    lambdas, history = [], []  # newest last
    denoised = model(x, sigmas[0] * s_in, **extra_args) if n > 0 else None
    for i in trange(n, disable=disable):
        _callback(callback, x, i, sigmas[i], denoised)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if sigma_next == 0:
            x = denoised  # λ' = ∞: every Adams weight but the newest vanishes
            break
        lam, lam_next = -math.log(sigma), -math.log(sigma_next)
        h = lam_next - lam
        lambdas, history = (lambdas + [lam])[-keep:], (history + [denoised])[-keep:]
        last = i == n - 1
        t = 0.0 if last else float(tau(sigma_next))
        kappa = 1.0 + t * t
        noise = 0.0
        if t > 0:
            # The predictor and the corrector share one draw, so the corrector refines the same path.
            noise = noise_sampler(sigmas[i], sigmas[i + 1]) * (sigma_next * math.sqrt(-math.expm1(-2 * t * t * h)))
        p = min(predictor_order, len(history), n - i)
        x_pred = _sa_step(x, lambdas[-p:], history[-p:], lam, h, kappa) + noise
        if last:
            x = x_pred
            break
        denoised = model(x_pred, sigmas[i + 1] * s_in, **extra_args)
        if corrector_order == 0:
            x = x_pred
        else:
            c = min(corrector_order, len(history) + 1, n - i + 1)
            x = _sa_step(x, (lambdas + [lam_next])[-c:], (history + [denoised])[-c:], lam, h, kappa) + noise
    return x


SAMPLERS = {
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "ddim": sample_ddim,
    "sa_solver": sample_sa_solver,
    "lcm": sample_lcm,
}


def _fit_batch(t, b: int, name: str):
    if t is None or t.shape[0] == b:
        return t
    if t.shape[0] == 1:
        return t.expand(b, *t.shape[1:])
    raise ValueError(f"{name} has batch {t.shape[0]}, expected {b} (or 1)")


def _pad_tokens(context, mask, length: int):
    pad = length - context.shape[1]
    if pad:
        context = torch.nn.functional.pad(context, (0, 0, 0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad))
    return context, mask


class PixArtDenoiser:
    """Wraps a PixArt ε-model (learned-variance output) as a k-diffusion denoiser D(x; σ) with batched CFG,
    and with perturbed-attention guidance when given `pag` (guidance.PAG): diffusers' batch order,
    [uncond, cond, cond perturbed] (CFG 1: [cond, cond perturbed]), one model call per step."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, sigma, context, context_mask=None, uncond_context=None, uncond_mask=None,
                 cfg_scale=1.0, c_size=None, c_ar=None, pag=None):
        from .guidance import apply_pag
        from .model import PerturbedAttention
        b, c = x.shape[0], x.shape[1]
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1)
        sigma = sigma.expand(b) if sigma.numel() == 1 else sigma
        sigma = sigma.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        bshape = (b,) + (1,) * (x.ndim - 1)
        x_in = x * (1.0 / torch.sqrt(1.0 + sigma * sigma)).view(bshape).to(x.dtype)
        timesteps = schedule.sigma_to_timestep(sigma)
        context = _fit_batch(context, b, "context")
        context_mask = _fit_batch(context_mask, b, "context_mask")
        c_size, c_ar = _fit_batch(c_size, b, "c_size"), _fit_batch(c_ar, b, "c_ar")
        use_cfg = uncond_context is not None and cfg_scale != 1.0
        use_pag = pag is not None and pag.active

        if not use_cfg and not use_pag:
            out = self.model(x_in, timesteps, context, context_mask=context_mask, c_size=c_size, c_ar=c_ar)
            eps = out[:, :c]  # channels c.. are the learned variance, unused by these samplers
            return x - eps.to(x.dtype) * sigma.view(bshape).to(x.dtype)
        if use_cfg:
            ctx, mask = self._cfg_context(b, context, context_mask, _fit_batch(uncond_context, b, "uncond_context"),
                                          _fit_batch(uncond_mask, b, "uncond_mask"))
        else:
            ctx, mask = context, context_mask
        parts = 2 if use_cfg else 1
        if use_pag:  # the prompt once more, at the end of the batch, with identity self-attention
            ctx = torch.cat([ctx, ctx[-b:]])
            mask = None if mask is None else torch.cat([mask, mask[-b:]])
            perturb = PerturbedAttention(pag.layers, tuple(range(parts * b, (parts + 1) * b)))
            parts += 1
        rep = (lambda v: None if v is None else torch.cat([v] * parts))
        out = self.model(rep(x_in), rep(timesteps), ctx, context_mask=mask, c_size=rep(c_size), c_ar=rep(c_ar),
                         **({"perturb": perturb} if use_pag else {}))
        chunks = out[:, :c].chunk(parts)
        if use_cfg:
            eps_uncond, eps_cond = chunks[0], chunks[1]
            eps = eps_uncond + cfg_scale * (eps_cond - eps_uncond)
        else:
            eps = eps_cond = chunks[0]
        if use_pag:
            scale = torch.tensor([pag.scale_at(t) for t in timesteps.tolist()], dtype=eps.dtype, device=eps.device)
            eps = apply_pag(eps, eps_cond, chunks[-1], scale.view(bshape))
        return x - eps.to(x.dtype) * sigma.view(bshape).to(x.dtype)

    @staticmethod
    def _cfg_context(b, cond, cond_mask, uncond, uncond_mask):
        """cat([uncond, cond]) along the batch, padding the shorter sequence with masked-out zeros."""
        if cond_mask is None and uncond_mask is None and cond.shape[1] == uncond.shape[1]:
            return torch.cat([uncond, cond]), None
        ref = cond_mask if cond_mask is not None else uncond_mask
        dtype = ref.dtype if ref is not None else torch.long
        # A missing mask means every token of that half is valid.
        if cond_mask is None:
            cond_mask = torch.ones(b, cond.shape[1], dtype=dtype, device=cond.device)
        if uncond_mask is None:
            uncond_mask = torch.ones(b, uncond.shape[1], dtype=dtype, device=uncond.device)
        length = max(cond.shape[1], uncond.shape[1])
        if cond.shape[1] != uncond.shape[1]:
            logger.debug("padding CFG contexts of lengths %d and %d to %d", uncond.shape[1], cond.shape[1], length)
        uncond, uncond_mask = _pad_tokens(uncond, uncond_mask.to(dtype), length)
        cond, cond_mask = _pad_tokens(cond, cond_mask.to(dtype), length)
        return torch.cat([uncond, cond]), torch.cat([uncond_mask, cond_mask])


__all__ = [
    "PixArtDenoiser", "SAMPLERS", "default_noise_sampler", "lcm_boundary", "sample_lcm", "per_row_noise_sampler", "sample_ddim", "sample_dpmpp_2m", "sample_euler",
    "sample_sa_solver", "tau_window",
]
