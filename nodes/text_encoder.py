"""pixart_core's T5 as a real comfy.sd.CLIP, and the T5 Text Encode (PixArt) node.

The CLIP is ComfyUI's own class around two small adapters:
- PixArtT5Tokenizer.tokenize_with_weights: pixart_core's tokenisation (pad to max_length, truncate
  keeping EOS, no caption cleaning, no "(word:1.2)" weight syntax - the official Σ inference has none).
- PixArtT5Encoder (the cond-stage nn.Module): runs pixart_core's T5 on those ids with the attention
  mask. The mask travels inside the embeddings: padded positions are exactly-zero rows
  (pixart_core.model.caption_mask), so stock nodes that slice, concatenate or average CONDITIONING
  keep it right. The T5's outputs at every position ride along under OUTPUTS_KEY for the official Σ
  null conditioning (the negative attended over the prompt's tokens: nodes/sampling.py).
  Its weights are `t5xxl.transformer.*`, the names of ComfyUI's own PixArt T5, so CLIPSave and
  CheckpointSave write files ComfyUI's loaders (and ours) read.
Memory is ComfyUI's: the CLIP's ModelPatcher moves the T5 weights to the GPU for encoding and back
after. The T5's Linear/Embedding/LayerNorm modules are switched to cast-capable classes (ComfyUI's
comfy.ops ones) so a T5 that does not fit in VRAM is loaded partially, as ComfyUI's own T5 is.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import torch
from comfy_api.latest import io, ui

import comfy.model_management as mm
import comfy.ops
import comfy.sd

from ..pixart_core.model import masked_captions
from ..pixart_core.t5 import DEFAULT_MAX_LENGTH, T5LoadError, clean_prompt, load_t5
from .common import CATEGORY, queue_check, show_text

log = logging.getLogger("PixArt-Σ")

TOKEN_KEY = "t5xxl"  # the key ComfyUI's T5 tokenizers use, so token-passing nodes keep working
META_KEY = "pixart_t5"  # our own entry: max_length and the tokens dropped per prompt
OUTPUTS_KEY = "pixart_t5_outputs"  # CONDITIONING entry: the T5 outputs at every position, padding included
MAX_LENGTHS = {"Σ: 300 tokens": 300, "α: 120 tokens": 120}


# -------------------------------------------------------------------------------------------------
# the CLIP parts
# -------------------------------------------------------------------------------------------------

class PixArtT5Tokenizer:
    """ComfyUI tokenizer interface over pixart_core's T5 tokenisation."""

    def __init__(self, t5, embedding_directory=None, tokenizer_data={}):
        self.t5 = t5

    def tokenize_with_weights(self, text: str, return_word_ids=False, max_length=None, tokenizer_options={},
                              **kwargs):
        max_length = int(max_length or tokenizer_options.get("pixart_max_length", DEFAULT_MAX_LENGTH))
        ids, _, dropped = self.t5.tokenize([text], max_length)
        pairs = [(int(t), 1.0, 0) if return_word_ids else (int(t), 1.0) for t in ids[0].tolist()]
        return {TOKEN_KEY: [pairs], META_KEY: {"max_length": max_length, "truncated": dropped}}

    def untokenize(self, token_weight_pair):
        return [(p, self.t5.tokenizer.convert_ids_to_tokens(p[0])) for p in token_weight_pair]

    def state_dict(self):
        return {}


class _CastT5LayerNorm(torch.nn.Module, comfy.ops.CastWeightBiasOp):
    """HF T5LayerNorm (RMS norm, weight only) that can take its weight from another device, like comfy.ops layers."""
    bias = None

    def forward(self, hidden_states):
        weight = self.weight
        stream = None
        if self.comfy_cast_weights or self.weight_function:
            weight, _, stream = comfy.ops.cast_bias_weight(self, device=hidden_states.device, dtype=self.weight.dtype,
                                                           offloadable=True)
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(weight.dtype)
        out = weight * hidden_states
        comfy.ops.uncast_bias_weight(self, weight, None, stream)
        return out


def _make_castable(module: torch.nn.Module) -> None:
    """Switch the T5's layers to ComfyUI's cast-capable classes in place (same parameters, same maths)."""
    for m in module.modules():
        if type(m) is torch.nn.Linear:
            m.__class__ = comfy.ops.disable_weight_init.Linear
        elif type(m) is torch.nn.Embedding:
            m.__class__ = comfy.ops.disable_weight_init.Embedding
            m.bias = None  # comfy.ops' Embedding has an (empty) bias slot
        elif type(m).__name__ == "T5LayerNorm" and hasattr(m, "variance_epsilon"):
            m.__class__ = _CastT5LayerNorm


class PixArtT5Encoder(torch.nn.Module):
    """The CLIP's cond_stage_model: pixart_core's T5 encoder behind ComfyUI's text-encoder interface."""

    def __init__(self, t5=None, device=None, dtype=None, model_options={}):
        super().__init__()
        self.t5 = t5
        self.t5xxl = torch.nn.Module()  # registered children, so the CLIP's ModelPatcher moves these weights
        self.t5xxl.transformer = t5.model
        _make_castable(self.transformer)
        if device is not None:
            self.transformer.to(device)
        self.dtypes = {p.dtype for p in self.transformer.parameters()}

    @property
    def transformer(self):
        return self.t5xxl.transformer

    def state_dict(self, *args, **kwargs):
        """Without the tied alias of the token embedding (encoder.embed_tokens is `shared`): one tensor
        under two names cannot be written to safetensors (CLIPSave), and ComfyUI would patch it twice."""
        sd = super().state_dict(*args, **kwargs)
        if self.transformer.encoder.embed_tokens is self.transformer.shared:
            alias = kwargs.get("prefix", "") + "t5xxl.transformer.encoder.embed_tokens."
            for key in [k for k in sd if k.startswith(alias)]:
                del sd[key]
        return sd

    @property
    def width(self) -> int:
        return self.t5.width

    def reset_clip_options(self):
        pass

    def set_clip_options(self, options):
        pass  # clip layers / projected pooling have no meaning for T5

    def load_sd(self, sd):
        return self.transformer.load_state_dict(sd, strict=False)

    def encode_token_weights(self, token_weight_pairs):
        """(embeddings (1, L, D) float32 with exactly-zero padding rows, None, {OUTPUTS_KEY: the unmasked
        embeddings}) on ComfyUI's intermediate device."""
        sections = token_weight_pairs[TOKEN_KEY]
        ids = torch.tensor([[p[0] for p in section] for section in sections], dtype=torch.long)  # (S, L)
        mask = (ids != self.t5.tokenizer.pad_token_id).long()
        mask[:, 0] = 1  # a sequence always has a first token (EOS for an empty prompt)
        device = next(self.transformer.parameters()).device
        with torch.no_grad():
            out = self.transformer(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        out = out.to(self.t5.dtype)  # pixart_core's T5TextEncoder.encode returns the compute dtype
        if not torch.isfinite(out).all():
            raise ValueError(f"T5 from {self.t5.path} produced inf/NaN embeddings in {self.t5.dtype}; "
                             "load it with dtype bf16 or fp32 instead")
        # Sections are pieces of one prompt (ComfyUI's convention): concatenated along the tokens.
        full = out.float().reshape(1, -1, out.shape[-1]).to(mm.intermediate_device())
        return masked_captions(full, mask.reshape(1, -1)), None, {OUTPUTS_KEY: full}


def _default_dtype(load_device) -> torch.dtype:
    if mm.is_device_cpu(load_device) or mm.should_use_bf16(load_device):
        return torch.bfloat16
    return torch.float16


def load_t5_clip(path, dtype: str = "default", device: str = "auto") -> comfy.sd.CLIP:
    """A comfy.sd.CLIP around pixart_core's T5 (see the module docstring)."""
    if device == "cpu":
        load_device = offload_device = torch.device("cpu")
    else:
        load_device = mm.get_torch_device() if device == "gpu" else mm.text_encoder_device()
        offload_device = mm.text_encoder_offload_device()
    compute = {"default": _default_dtype(load_device), "fp32": torch.float32, "bf16": torch.bfloat16,
               "fp16": torch.float16}[dtype]
    try:
        t5 = load_t5(path, dtype=compute, device=offload_device)
    except (T5LoadError, FileNotFoundError) as e:
        raise ValueError(f"t5_name: {e}") from None
    target = SimpleNamespace(params={"t5": t5}, clip=PixArtT5Encoder,
                             tokenizer=lambda **kw: PixArtT5Tokenizer(t5, **kw))
    options = {"load_device": load_device, "offload_device": offload_device, "initial_device": offload_device,
               "dtype": compute}
    clip = comfy.sd.CLIP(target, parameters=sum(p.numel() for p in t5.model.parameters()), model_options=options)
    log.info("PixArt: T5 %s ready (d_model %d, %s, encodes on %s)", t5.path.name, t5.width,
             str(compute).replace("torch.", ""), load_device)
    return clip


def is_pixart_t5(clip) -> bool:
    return isinstance(getattr(clip, "tokenizer", None), PixArtT5Tokenizer)


# -------------------------------------------------------------------------------------------------
# the node
# -------------------------------------------------------------------------------------------------

def _truncate_stock(tokens: dict, max_length: int) -> int:
    """Cut a stock T5 tokenisation (no padding, EOS last) to max_length tokens, keeping EOS; returns the drop count."""
    dropped = 0
    for i, section in enumerate(tokens[TOKEN_KEY]):
        if len(section) > max_length:
            dropped += len(section) - max_length
            tokens[TOKEN_KEY][i] = section[: max_length - 1] + section[-1:]
    return dropped


class PixArtSuiteT5TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PixArtSuiteT5TextEncode",
            display_name="T5 Text Encode (PixArt)",
            category=CATEGORY,
            description="Encodes a prompt with T5 the way the official PixArt code does: padded to the model's "
                        "token length with an attention mask, longer prompts cut with a visible warning. Use the "
                        "same node with an empty text for the negative.",
            inputs=[
                io.Clip.Input("clip", tooltip="The T5 from 'Load T5 Encoder (PixArt)' (exact: padded, with mask) or "
                                              "ComfyUI's CLIPLoader with type pixart (unpadded, no mask: close, not exact)."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, default="",
                                tooltip="The prompt, used as written (no lower-casing, no (word:1.2) weights)."),
                io.Combo.Input("max_length", options=list(MAX_LENGTHS), default="Σ: 300 tokens",
                               tooltip="T5 tokens the model was trained with: 300 for PixArt-Σ, 120 for PixArt-α. "
                                       "Longer prompts are cut and a warning is shown."),
            ],
            outputs=[io.Conditioning.Output(tooltip="Embeddings (1, tokens, 4096), padding zeroed (the mask travels "
                                                    "inside, through any conditioning node), for the PixArt Sampler "
                                                    "or any sampler.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, text):
        return queue_check(lambda text: clean_prompt(text, "text"), text=text)

    @classmethod
    def execute(cls, clip, text, max_length) -> io.NodeOutput:
        text, replaced = clean_prompt(text, "text")
        if max_length not in MAX_LENGTHS:
            raise ValueError(f"max_length {max_length!r} is not one of {', '.join(MAX_LENGTHS)}")
        if clip is None or not hasattr(clip, "tokenize"):
            raise ValueError("clip is not connected to a text encoder; connect 'Load T5 Encoder (PixArt)'")
        limit = MAX_LENGTHS[max_length]
        if is_pixart_t5(clip):
            tokens = clip.tokenize(text, max_length=limit)
            dropped = sum(tokens[META_KEY]["truncated"])
            used = sum(p[0] != 0 for p in tokens[TOKEN_KEY][0]) or 1
            note = ""
        else:
            tokens = clip.tokenize(text)
            if TOKEN_KEY not in tokens or len(tokens) != 1:
                raise ValueError(f"clip holds {', '.join(sorted(tokens)) or 'no'} text encoder(s), not a T5 alone; "
                                 "connect 'Load T5 Encoder (PixArt)' or CLIPLoader with type pixart")
            dropped = _truncate_stock(tokens, limit)
            used = len(tokens[TOKEN_KEY][0])
            note = " (stock CLIP: unpadded, no attention mask - use 'Load T5 Encoder (PixArt)' for exact PixArt output)"
        conditioning = clip.encode_from_tokens_scheduled(tokens)
        if dropped:
            message = (f"Prompt too long: {dropped} of {limit + dropped} T5 tokens were cut off at max_length "
                       f"{limit}; shorten the prompt or move the important words to the front.")
            log.warning("T5 Text Encode (PixArt): %s", message)
        else:
            message = f"{used} of {limit} T5 tokens used."
        message += note
        if replaced:
            message += (f" {replaced} character(s) that are not valid Unicode text were replaced by U+FFFD; "
                        "check the prompt's source.")
            log.warning("T5 Text Encode (PixArt): %d invalid character(s) in the prompt replaced by U+FFFD", replaced)
        show_text(cls, message)
        return io.NodeOutput(conditioning, ui=ui.PreviewText(message))
