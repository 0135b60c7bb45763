"""Fine-tuning without ComfyUI: the official training objective, LoRA adapters, a fixed-noise validation loss.

- The objective is PixArt-Σ's own (../shared/pixart_spec.md §6.1; the reference's IDDPM
  `training_losses` with LossType.MSE and learned-range variance): ε-MSE at timesteps drawn
  uniformly from 0..999, plus the variational-bound term in bits that trains the variance channels
  with the predicted mean detached (the decoder NLL at t = 0, the KL to the true posterior elsewhere).
- LoRA adapters sit on the native linear layers (names and weights unchanged; the folded
  cross-attention reads W + ΔW); each diffusers/PEFT module gets its own rank-r pair, so a fused qkv
  carries separate to_q/to_k/to_v LoRAs, exactly what PEFT trains on diffusers'
  PixArtTransformer2DModel. Export uses pixart_core.lora's one name mapping.
- The validation loss is ε-MSE at fixed noise levels with fixed seeds over the training latents,
  computed through a k-diffusion denoiser D(x; σ), so the PixArt Validation Loss node (ComfyUI's
  model) and the CLI give the same number for the same weights.

Latents here are in the model's space (VAE latents × LATENT_SCALE), as the reference trains.
"""
from __future__ import annotations

import functools
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import schedule
from .files import save_result
from .lora import TRANSFORMER, native_modules
from .model import KVCompress, PixArt, PixArtBlock
from .ops import gemm_dtype

NUM_TIMESTEPS = schedule.NUM_TRAIN_TIMESTEPS
TARGET_GROUPS = {  # --targets names -> native module suffixes inside every block
    "attn": ("attn.qkv", "attn.proj"),
    "cross_attn": ("cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj"),
    "mlp": ("mlp.fc1", "mlp.fc2"),
}
DEFAULT_TARGETS = tuple(TARGET_GROUPS)  # every linear layer of every block: PEFT's usual PixArt target set
VALIDATION_LEVELS = 8
VALIDATION_SEED = 0


# -------------------------------------------------------------------------------------------------
# the official objective
# -------------------------------------------------------------------------------------------------

@functools.cache
def _tables() -> dict[str, torch.Tensor]:
    """float64 schedule tables of the reference's GaussianDiffusion (private: never handed out)."""
    betas = schedule.betas()
    ac = schedule.alphas_cumprod()
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "sqrt_ac": ac.sqrt(),
        "sqrt_one_minus_ac": (1.0 - ac).sqrt(),
        "sqrt_recip_ac": (1.0 / ac).sqrt(),
        "sqrt_recipm1_ac": (1.0 / ac - 1.0).sqrt(),
        "posterior_log_variance": torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log(),
        "posterior_coef_x0": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_coef_xt": (1.0 - ac_prev) * (1.0 - betas).sqrt() / (1.0 - ac),
        "log_betas": betas.log(),
    }


def _at(name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Table entries for integer timesteps t (B,) as fp32 (B, 1, 1, ...), as the reference extracts them."""
    values = _tables()[name][t.long().cpu()].float()
    return values.view(-1, *([1] * (like.ndim - 1))).to(like.device)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x0 + sqrt(1 - ᾱ_t)·ε."""
    return _at("sqrt_ac", t, x0) * x0 + _at("sqrt_one_minus_ac", t, x0) * noise


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-probability of x's 1/255-wide bin under N(means, exp(log_scales)²), open-ended at ±1 (nats)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def variational_bound(x0, x_t, t, eps, var_values) -> torch.Tensor:
    """(B,) bits per dimension of the reference's VB term: KL(q(x_{t-1}|x_t,x0) ‖ p(x_{t-1}|x_t)), or the
    decoder NLL at t = 0, with p's mean from `eps` and its log-variance interpolated by var_values ∈ [-1, 1]."""
    true_mean = _at("posterior_coef_x0", t, x0) * x0 + _at("posterior_coef_xt", t, x0) * x_t
    min_log = _at("posterior_log_variance", t, x0)
    pred_x0 = _at("sqrt_recip_ac", t, x0) * x_t - _at("sqrt_recipm1_ac", t, x0) * eps
    model_mean = _at("posterior_coef_x0", t, x0) * pred_x0 + _at("posterior_coef_xt", t, x0) * x_t
    frac = (var_values + 1) / 2
    model_log_var = frac * _at("log_betas", t, x0) + (1 - frac) * min_log
    kl = _mean_flat(_normal_kl(true_mean, min_log, model_mean, model_log_var)) / math.log(2.0)
    nll = -_mean_flat(_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
    return torch.where(t.to(kl.device) == 0, nll, kl)


def official_loss(output, x0, x_t, t, noise) -> dict[str, torch.Tensor]:
    """The reference's training terms per sample, (B,) each: mse (ε), vb (variance, mean detached), loss = mse + vb.
    output: (B, 2C, H, W) model output, ε then the learned-range variance values."""
    C = x0.shape[1]
    if output.shape[1] != 2 * C:
        raise ValueError(f"the model outputs {output.shape[1]} channels; the official loss needs ε and the "
                         f"learned variance ({2 * C} channels)")
    eps, var_values = output.float().split(C, dim=1)
    mse = _mean_flat((noise - eps) ** 2)
    vb = variational_bound(x0, x_t, t, eps.detach(), var_values)
    return {"mse": mse, "vb": vb, "loss": mse + vb}


@dataclass
class Sample:
    """One training example: latents (1, C, H, W) in model space, caption embeddings (1, L, C') and mask (1, L)."""
    latents: torch.Tensor
    context: torch.Tensor
    mask: torch.Tensor
    name: str = ""


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar, what backward() runs on
    terms: dict  # mse, vb, loss: (B,) each, detached
    timesteps: torch.Tensor
    noise: torch.Tensor


def stack(samples: list[Sample]) -> Sample:
    """Samples of one latent size (captions all encoded to the model's token length) -> one batch."""
    sizes = {tuple(s.latents.shape[-2:]) for s in samples}
    if len(sizes) > 1:
        raise ValueError(f"a batch needs latents of one size, got {sorted(sizes)}; use batch size 1 for mixed sizes")
    return Sample(torch.cat([s.latents for s in samples]), torch.cat([s.context for s in samples]),
                  torch.cat([s.mask for s in samples]), ",".join(s.name for s in samples))


def training_step(model: PixArt, batch: Sample, generator: torch.Generator, caption_dropout: float = 0.0) -> StepResult:
    """One forward pass with the official loss: t ~ U{0..999}, ε ~ N(0, I) from `generator` (CPU), and with
    probability caption_dropout a sample's caption replaced by the checkpoint's null caption (y_embedding,
    attended over the caption's own mask, as the reference drops captions)."""
    x0 = batch.latents.float()
    B = x0.shape[0]
    device = next(model.parameters()).device
    t = torch.randint(0, NUM_TIMESTEPS, (B,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    drop = torch.rand(B, generator=generator) < caption_dropout
    x0, context, mask = x0.to(device), batch.context.to(device), batch.mask.to(device)
    if drop.any():
        null = model.y_embedder.y_embedding.weight
        if not null.abs().sum():
            raise ValueError("caption dropout needs the checkpoint's null caption (y_embedding), which this file "
                             "does not have (diffusers files drop it); set caption dropout to 0")
        context = torch.where(drop.to(device)[:, None, None], null[: context.shape[1]].to(context), context)
    x_t = q_sample(x0, t, noise)
    output = model(x_t, t.to(device).float(), context, mask)
    terms = official_loss(output, x0, x_t, t.to(device), noise)
    return StepResult(terms["loss"].mean(), {k: v.detach() for k, v in terms.items()}, t, noise)


# -------------------------------------------------------------------------------------------------
# LoRA adapters
# -------------------------------------------------------------------------------------------------

class LoraWeight(nn.Module):
    """One rank-r LoRA per output part of a linear layer (q, k, v of a fused projection), as PEFT has one per
    diffusers module: the layer gives W·x + alpha/r·[B₁A₁x; B₂A₂x; ...]. PEFT's initialisation: A
    Kaiming-uniform, B zero, so training starts from the unchanged model."""

    def __init__(self, weight: torch.Tensor, parts: int, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        rows, cols = weight.shape[0] // parts, weight[0].numel()
        downs = []
        for _ in range(parts):
            down = torch.empty(rank, cols)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
            downs.append(nn.Parameter(down.to(weight.device)))
        self.down = nn.ParameterList(downs)  # A: (r, in)
        self.up = nn.ParameterList(nn.Parameter(weight.new_zeros(rows, rank, dtype=torch.float32))
                                   for _ in range(parts))  # B: (out / parts, r)
        self.rank, self.alpha = rank, float(alpha)

    def delta(self) -> torch.Tensor:
        """alpha/r·[B₁A₁; B₂A₂; ...]: (out, in), fp32."""
        return torch.cat([b @ a for a, b in zip(self.down, self.up)]) * (self.alpha / self.rank)

    def forward(self, x):
        """(..., in) -> (..., out): the LoRA's share of the layer output, through the rank-r bottleneck (no
        full-size weight or weight gradient is formed, as in PEFT)."""
        dtype = gemm_dtype(x)
        x = x.to(dtype)
        out = [F.linear(F.linear(x, a.to(dtype)), b.to(dtype)) for a, b in zip(self.down, self.up)]
        return torch.cat(out, dim=-1) * (self.alpha / self.rank)


@functools.cache
def _lora_class(base: type) -> type:
    """`base` (a Linear type) with a LoRA attached as `self.lora`; set on a layer's class for the run, so its
    name, weights and state-dict keys stay as they are."""
    if not hasattr(base, "params_for"):  # layers that do not say their weights: W·x from their own forward
        return type(f"Lora{base.__name__}", (base,),
                    {"forward": lambda self, x: base.forward(self, x) + self.lora(x).to(x.dtype)})

    def forward(self, x):
        w, b = base.params_for(self, x)
        return (F.linear(x.to(w.dtype), w, b) + self.lora(x)).to(x.dtype)

    def params_for(self, like):  # what the model's fused paths (folded cross-attention, gates) read: W + ΔW
        w, b = base.params_for(self, like)
        return w + self.lora.delta().reshape(w.shape).to(w), b

    return type(f"Lora{base.__name__}", (base,), {"forward": forward, "params_for": params_for})


@dataclass
class LoraAdapters:
    """The adapters injected into a model: native module name -> (module, its LoraWeight, diffusers part names)."""
    modules: dict = field(default_factory=dict)
    rank: int = 0
    alpha: float = 0.0

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, lw, _ in self.modules.values() for p in lw.parameters()]

    def merged_weight(self, native: str) -> torch.Tensor:
        """W + ΔW of one adapted layer (what a loader applying the exported LoRA computes), fp32."""
        module, lw, _ = self.modules[native]
        return (module.weight.float() + lw.delta().reshape(module.weight.shape)).detach()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA in diffusers/PEFT names with alpha: transformer.<module>.lora_A/lora_B.weight, .alpha."""
        out = {}
        for _, lw, names in self.modules.values():
            for name, a, b in zip(names, lw.down, lw.up):
                out[f"{TRANSFORMER}.{name}.lora_A.weight"] = a.detach().float().cpu().contiguous()
                out[f"{TRANSFORMER}.{name}.lora_B.weight"] = b.detach().float().cpu().contiguous()
                out[f"{TRANSFORMER}.{name}.alpha"] = torch.tensor(lw.alpha)
        return out

    def peft_config(self) -> dict:
        """What PEFT's LoraConfig needs to rebuild these adapters (diffusers' lora_adapter_metadata)."""
        names = sorted({n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0"
                        for _, _, ns in self.modules.values() for n in ns})
        return {"r": self.rank, "lora_alpha": self.alpha, "target_modules": names, "init_lora_weights": True}

    def remove(self) -> None:
        """Take the adapters out, leaving the model as it was."""
        for module, _, _ in self.modules.values():
            module.__class__ = type(module).__mro__[1]
            del module.lora
        self.modules.clear()


def target_modules(model: PixArt, targets=DEFAULT_TARGETS) -> dict[str, list[str]]:
    """Native module name -> its diffusers/PEFT part names, for the modules a --targets list selects."""
    bad = [g for g in targets if g not in TARGET_GROUPS]
    if bad:
        raise ValueError(f"unknown LoRA target {bad[0]!r}; choose from {', '.join(TARGET_GROUPS)}")
    suffixes = tuple(s for g in targets for s in TARGET_GROUPS[g])
    found = {}
    for native, parts in native_modules(model.config.depth).items():
        if native.startswith("blocks.") and native.split(".", 2)[2] in suffixes:
            found[native] = [name for name, _ in parts]
    return found


def inject_lora(model: PixArt, rank: int = 16, alpha: float | None = None, targets=DEFAULT_TARGETS,
                seed: int = 0) -> LoraAdapters:
    """Freeze the model and add trainable LoRA adapters (fp32) on the chosen modules; alpha defaults to rank."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a whole number of at least 1, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    adapters = LoraAdapters(rank=rank, alpha=alpha)
    for native, names in target_modules(model, targets).items():
        module = model.get_submodule(native)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{native} is a {type(module).__name__}; LoRA targets here are linear layers")
        module.lora = LoraWeight(module.weight, len(names), rank, alpha, generator)
        module.__class__ = _lora_class(type(module))
        adapters.modules[native] = (module, module.lora, names)
    return adapters


# -------------------------------------------------------------------------------------------------
# validation loss at fixed noise
# -------------------------------------------------------------------------------------------------

def validation_timesteps(levels: int = VALIDATION_LEVELS) -> list[int]:
    """`levels` training timesteps spread evenly over 0..999 (centres of equal slices)."""
    if not isinstance(levels, int) or not 1 <= levels <= NUM_TIMESTEPS:
        raise ValueError(f"noise levels must be a whole number from 1 to {NUM_TIMESTEPS}, got {levels!r}")
    return [min(NUM_TIMESTEPS - 1, round((k + 0.5) * NUM_TIMESTEPS / levels - 0.5)) for k in range(levels)]


def validation_noise(seed: int, index: int, levels: int, shape) -> torch.Tensor:
    """(levels, C, H, W): the fixed noise of latent number `index` (a CPU generator seeded seed + index)."""
    g = torch.Generator("cpu").manual_seed((int(seed) + int(index)) % 2 ** 63)
    return torch.randn((levels, *shape[-3:]), generator=g)


@dataclass
class Validation:
    loss: float  # mean ε-MSE over latents and levels
    per_level: list[float]  # mean over latents, one per timestep
    timesteps: list[int]
    count: int  # latents

    @classmethod
    def from_terms(cls, terms: list[list[float]]) -> "Validation":
        """From validation_terms() of every latent."""
        if not terms:
            raise ValueError("no latents to validate on")
        per_level = [sum(col) / len(terms) for col in zip(*terms)]
        return cls(sum(per_level) / len(per_level), per_level, validation_timesteps(len(per_level)), len(terms))

    def describe(self) -> str:
        lo, hi = self.timesteps[0], self.timesteps[-1]
        return (f"validation loss {self.loss:.5f} (ε-MSE over {self.count} latents x {len(self.timesteps)} fixed "
                f"noise levels t={lo}..{hi}; per level, low to high noise: "
                + " ".join(f"{v:.4f}" for v in self.per_level) + ")")


@torch.no_grad()
def validation_terms(denoiser: Callable, x0: torch.Tensor, index: int, seed: int = VALIDATION_SEED,
                     levels: int = VALIDATION_LEVELS, on_step: Callable[[], None] | None = None) -> list[float]:
    """ε-MSE per fixed noise level of `denoiser(x, sigma) -> x0 estimate` (k-diffusion form, x = x0 + σ·ε) on
    latent number `index`, x0 (1, C, H, W) in model space, with that latent's fixed noise. The same
    weights give the same numbers on every run and in ComfyUI, so losses before and after training compare."""
    timesteps = validation_timesteps(levels)
    sigmas = schedule.discrete_sigmas()[timesteps].float().to(x0.device)
    x0 = x0.float()
    noise = validation_noise(seed, index, levels, x0.shape).to(x0.device)
    out = []
    for k in range(levels):
        sigma, eps = sigmas[k : k + 1], noise[k : k + 1]
        x = x0 + eps * sigma
        eps_pred = (x - denoiser(x, sigma).float()) / sigma
        out.append(float(((eps_pred - eps) ** 2).mean()))
        if on_step is not None:
            on_step()
    return out


def validation_loss(model: PixArt, samples: list[Sample], seed: int = VALIDATION_SEED,
                    levels: int = VALIDATION_LEVELS) -> Validation:
    """The validation loss of a pixart_core model over training samples (what the ComfyUI node computes)."""
    from .samplers import PixArtDenoiser

    device = next(model.parameters()).device
    denoise = PixArtDenoiser(model)
    terms = []
    for i, s in enumerate(samples):
        context, mask = s.context.to(device), s.mask.to(device)
        terms.append(validation_terms(lambda x, sigma: denoise(x, sigma, context, mask), s.latents.to(device), i,
                                      seed, levels))
    return Validation.from_terms(terms)


# -------------------------------------------------------------------------------------------------
# the training loop
# -------------------------------------------------------------------------------------------------

class _CheckpointedBlock(PixArtBlock):
    """A block that recomputes its activations in backward instead of keeping them (gradient checkpointing);
    set on the blocks' class for the run, so names and weights stay as they are."""

    def forward(self, *args):
        if torch.is_grad_enabled():
            return checkpoint(super().forward, *args, use_reentrant=False)
        return super().forward(*args)


@contextmanager
def gradient_checkpointing(model: PixArt, enabled: bool = True) -> Iterator[None]:
    blocks = [b for b in model.blocks if type(b) is PixArtBlock] if enabled else []
    for b in blocks:
        b.__class__ = _CheckpointedBlock
    try:
        yield
    finally:
        for b in blocks:
            b.__class__ = PixArtBlock


@dataclass
class TrainConfig:
    steps: int = 500
    rank: int = 16
    alpha: float | None = None  # None: alpha = rank (scale 1)
    learning_rate: float = 1e-4
    batch_size: int = 1
    seed: int = 0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    caption_dropout: float = 0.0
    grad_clip: float = 1.0
    weight_decay: float = 1e-2
    gradient_checkpointing: bool = True

    def check(self) -> None:
        for name in ("steps", "rank", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be a whole number of at least 1, got {v!r}")
        if not (0 < self.learning_rate < 1):
            raise ValueError(f"learning rate must be between 0 and 1 (1e-4 is usual for PixArt LoRAs), got "
                             f"{self.learning_rate}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption dropout must be in [0, 1), got {self.caption_dropout}")
        if self.grad_clip < 0:
            raise ValueError(f"gradient clipping must be >= 0 (0 = off), got {self.grad_clip}")

    def as_metadata(self, kv: KVCompress | None = None) -> dict[str, str]:
        return {"steps": str(self.steps), "rank": str(self.rank), "alpha": str(self.alpha or self.rank),
                "learning_rate": str(self.learning_rate), "batch_size": str(self.batch_size), "seed": str(self.seed),
                "targets": ",".join(self.targets), "caption_dropout": str(self.caption_dropout),
                "kv_compression": (f"layers {','.join(map(str, kv.layers))} ratio {kv.ratio} {kv.mode}"
                                   if kv is not None and kv.layers and kv.ratio > 1 else "off")}


@dataclass
class TrainResult:
    adapters: LoraAdapters
    losses: list[float]  # per step: the official loss (mse + vb), batch mean
    mse: list[float]
    steps_done: int
    interrupted: bool = False


def train_lora(model: PixArt, samples: list[Sample], config: TrainConfig,
               on_step: Callable[[int, float], None] | None = None,
               should_stop: Callable[[], bool] | None = None, progress_bar: bool = False,
               adapters: LoraAdapters | None = None) -> TrainResult:
    """Train LoRA adapters (injected here unless given) with the official loss; AdamW, gradients clipped. KV
    compression is the model's own setting (model.kv_compress).
    Stops early, keeping what was trained, when should_stop() turns True or on KeyboardInterrupt."""
    from tqdm.auto import trange

    config.check()
    if not samples:
        raise ValueError("no training samples")
    if config.batch_size > 1:
        stack(samples)  # one size for all, or a clear error now rather than at the first step
    adapters = adapters or inject_lora(model, config.rank, config.alpha, config.targets, config.seed)
    params = adapters.parameters()
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator("cpu").manual_seed(config.seed)
    order: list[int] = []
    result = TrainResult(adapters, [], [], 0)
    was_training = model.training
    model.train()
    try:
        with gradient_checkpointing(model, config.gradient_checkpointing), torch.enable_grad():
            bar = trange(config.steps, desc="Training LoRA", disable=not progress_bar)
            for step in bar:
                if should_stop is not None and should_stop():
                    result.interrupted = True
                    break
                picked = []
                while len(picked) < config.batch_size:
                    if not order:
                        order = torch.randperm(len(samples), generator=generator).tolist()
                    picked.append(samples[order.pop()])
                out = training_step(model, stack(picked), generator, config.caption_dropout)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                loss = float(out.loss.detach())
                if not math.isfinite(loss):
                    raise FloatingPointError(f"the training loss became {loss} at step {step + 1}; lower the "
                                             "learning rate or train in fp32")
                result.losses.append(loss)
                result.mse.append(float(out.terms["mse"].mean()))
                result.steps_done = step + 1
                bar.set_postfix(loss=f"{loss:.4f}")
                if on_step is not None:
                    on_step(step + 1, loss)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        model.train(was_training)
    return result


# -------------------------------------------------------------------------------------------------
# files
# -------------------------------------------------------------------------------------------------

def save_lora(adapters: LoraAdapters, path, metadata: dict[str, str] | None = None) -> Path:
    """The LoRA as .safetensors in diffusers/PEFT names with alpha, plus diffusers' lora_adapter_metadata."""
    from safetensors.torch import save_file
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: write the LoRA as .safetensors")
    meta = {"format": "pt", "pixart_lora_source": "pixart_core train-lora",
            "lora_adapter_metadata": json.dumps(adapters.peft_config())}
    meta.update({f"pixart_train_{k}": v for k, v in (metadata or {}).items()})
    tensors = adapters.state_dict()
    return save_result(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), "LoRA")
