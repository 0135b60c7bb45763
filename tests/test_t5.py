"""pixart_core.t5: every weight layout loads to the same encoder, tokenisation matches the
official call, precision handling, the prompt cache and the error messages."""
import importlib.util
import logging
import os
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

import t5_fixtures as fx
from pixart_core import t5

pytestmark = pytest.mark.skipif(
    not fx.COMFY_T5_TOKENIZER_DIR.is_dir(),
    reason="needs ComfyUI's T5 tokenizer: run scripts/build_comfyui_host.sh")

PROMPTS = ["a photo of a cat", "two dogs playing in the snow, oil painting"]
CAT_IDS = [3, 9, 1202, 13, 3, 9, 1712, 1]
TOKENIZER = fx.COMFY_T5_TOKENIZER_DIR


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    te = root / "text_encoders"
    return {
        "hf": fx.write_tiny_t5_hf_folder(root / "hf"),
        "hf_sharded": fx.write_tiny_t5_hf_folder(root / "hf_sharded", sharded=True),
        "hf_bin": fx.write_tiny_t5_bin_folder(root / "hf_bin"),
        "diffusers": fx.write_tiny_t5_diffusers_root(root / "diffusers"),
        "fp32": fx.write_tiny_t5_single_file(te / "t5_fp32.safetensors", "fp32"),
        "fp16": fx.write_tiny_t5_single_file(te / "t5xxl_fp16.safetensors", "fp16"),
        "fp8": fx.write_tiny_t5_single_file(te / "t5xxl_fp8_e4m3fn.safetensors", "fp8_e4m3fn"),
        "scaled_fp8": fx.write_tiny_t5_single_file(te / "t5xxl_fp8_e4m3fn_scaled.safetensors", "scaled_fp8"),
        "clip_l": fx.write_clip_l_like_file(te / "clip_l.safetensors"),
        "root": root,
    }


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These models are tiny: extra threads only add overhead, a lot of it on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_cache():
    t5.clear_cache()
    yield
    t5.clear_cache()


@pytest.fixture
def forward_batches(monkeypatch):
    """Batch size of every T5 forward run, whoever runs it."""
    calls = []
    original = T5EncoderModel.forward

    def counting(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(T5EncoderModel, "forward", counting)
    return calls


def plain_model(state_dict):
    """A transformers T5EncoderModel built the ordinary way (no meta device), float32."""
    config = T5Config(**{k: v for k, v in fx.TINY_CONFIG.items() if k != "architectures"})
    model = T5EncoderModel(config)
    sd = dict(state_dict)
    sd.setdefault("encoder.embed_tokens.weight", sd["shared.weight"])
    model.load_state_dict(sd, strict=True)
    return model.eval()


def run_plain(model, prompts=PROMPTS, max_length=300):
    tokenizer = T5TokenizerFast.from_pretrained(str(TOKENIZER))
    batch = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state


@pytest.fixture(scope="module")
def reference():
    return run_plain(plain_model(fx.tiny_t5_state_dict()))


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ----------------------------------------------------------------------------- layouts

def test_hf_folder_equals_plain_transformers(files, reference):
    enc = t5.load_t5(files["hf"])
    embeds, mask = enc.encode(PROMPTS)
    assert embeds.shape == (2, 300, 32) and embeds.dtype == torch.float32
    assert mask.shape == (2, 300) and mask.dtype == torch.long
    assert torch.allclose(embeds, reference, atol=1e-5, rtol=0)
    assert enc.width == 32
    assert enc.config.num_layers == 2 and enc.config.num_heads == 4 and enc.config.d_kv == 8
    assert enc.config.d_ff == 64 and enc.config.vocab_size == 32128


@pytest.mark.parametrize("form", ["hf_sharded", "hf_bin", "diffusers", "fp32", "fp16"])
def test_lossless_layouts_give_the_same_embeddings(files, reference, form):
    enc = t5.load_t5(files[form], tokenizer_path=None if form.startswith(("hf", "diff")) else TOKENIZER)
    embeds, _ = enc.encode(PROMPTS)
    # The fixture weights are fp16 values, so even the fp16 file is exact in fp32 compute.
    assert torch.allclose(embeds, reference, atol=1e-5, rtol=0)


def test_diffusers_root_uses_its_sentencepiece_tokenizer(files):
    enc = t5.load_t5(files["diffusers"])
    assert enc.tokenizer_dir == files["diffusers"] / "tokenizer"
    assert (enc.tokenizer_dir / "spiece.model").is_file() and not (enc.tokenizer_dir / "tokenizer.json").exists()
    ids, _, _ = enc.tokenize("a photo of a cat", max_length=8)
    assert ids[0].tolist() == CAT_IDS


def test_fp8_file_is_close_but_lossy(files, reference):
    embeds, _ = t5.load_t5(files["fp8"], tokenizer_path=TOKENIZER).encode(PROMPTS)
    assert embeds.dtype == torch.float32
    assert 1e-3 < rel_err(embeds, reference) < 0.3


def test_scaled_fp8_is_dequantised_weight_times_scale(files, reference):
    path = files["scaled_fp8"]
    dequantised = {}
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert "scaled_fp8" in keys and "encoder.block.0.layer.0.SelfAttention.q.scale_weight" in keys
        for key in keys:
            if key == "scaled_fp8" or key.endswith(("scale_weight", "scale_input")) or key == "encoder.embed_tokens.weight":
                continue
            weight = f.get_tensor(key).float()
            scale_key = key[: -len("weight")] + "scale_weight"
            if scale_key in keys:
                weight = weight * f.get_tensor(scale_key).float()
            dequantised[key] = weight
    expected = run_plain(plain_model(dequantised))

    embeds, _ = t5.load_t5(path, tokenizer_path=TOKENIZER).encode(PROMPTS)
    assert torch.allclose(embeds, expected, atol=1e-5, rtol=0)
    assert rel_err(embeds, reference) < 0.2  # and the dequantised model is still the same model


def test_prefixed_combined_checkpoint(files, reference, tmp_path):
    """T5 under a prefix beside other components, as in ComfyUI-saved combined checkpoints."""
    sd = {"text_encoders.t5xxl.transformer." + k: v.half() for k, v in fx.tiny_t5_state_dict().items()}
    sd["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    sd["text_encoders.t5xxl.transformer.decoder.final_layer_norm.weight"] = torch.ones(32)  # ignored
    path = tmp_path / "combined.safetensors"
    save_file(sd, str(path))
    embeds, _ = t5.load_t5(path, tokenizer_path=TOKENIZER).encode(PROMPTS)
    assert torch.allclose(embeds, reference, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- tokenizer

def test_known_token_ids_padding_and_mask(files):
    enc = t5.load_t5(files["hf"])
    ids, mask, dropped = enc.tokenize(["a photo of a cat", ""], max_length=10)
    assert ids.tolist() == [CAT_IDS + [0, 0], [1] + [0] * 9]
    assert mask.tolist() == [[1] * 8 + [0, 0], [1] + [0] * 9]
    assert dropped == [0, 0]


def test_prompt_is_only_stripped(files):
    enc = t5.load_t5(files["hf"])
    ids, _, _ = enc.tokenize(["  a photo of a cat \n", "A Photo Of A Cat"], max_length=8)
    assert ids[0].tolist() == CAT_IDS
    assert ids[1].tolist() != CAT_IDS  # no lower-casing or other caption cleaning


def test_truncation_is_counted_and_logged(files, caplog):
    enc = t5.load_t5(files["hf"])
    with caplog.at_level(logging.WARNING, logger="pixart_core.t5"):
        embeds, mask = enc.encode(["a photo of a cat", "cat"], max_length=5)
    # 8 tokens with EOS into 5: the first 4 kept, EOS re-appended, 3 dropped
    assert enc.last_truncated == [3, 0]
    assert embeds.shape == (2, 5, 32)
    assert mask.tolist() == [[1] * 5, [1, 1, 0, 0, 0]]
    ids, _, _ = enc.tokenize("a photo of a cat", max_length=5)
    assert ids[0].tolist() == CAT_IDS[:4] + [1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "prompt 0" in warnings[0] and "3 tokens" in warnings[0]


def test_alpha_length_and_bad_max_length(files):
    enc = t5.load_t5(files["hf"])
    embeds, mask = enc.encode("a photo of a cat", max_length=120)
    assert embeds.shape == (1, 120, 32) and int(mask.sum()) == 8
    with pytest.raises(ValueError, match="max_length"):
        enc.encode("x", max_length=0)


# ----------------------------------------------------------------------------- precision

def _overflowing_file(tmp_path):
    """Feed-forward outputs above float16's range (about 2.5e5 here), as T5-XXL has."""
    sd = fx.tiny_t5_state_dict()
    for i in range(2):
        ffn = f"encoder.block.{i}.layer.1.DenseReluDense."
        sd[ffn + "wi_0.weight"] *= 30
        sd[ffn + "wi_1.weight"] *= 30
        sd[ffn + "wo.weight"] *= 128
    return fx.write_tiny_t5_single_file(tmp_path / "hot.safetensors", "fp32", state_dict=sd), sd


def test_fp16_is_finite_and_close_where_plain_fp16_is_not(tmp_path):
    path, sd = _overflowing_file(tmp_path)
    full, _ = t5.load_t5(path, tokenizer_path=TOKENIZER).encode(PROMPTS)
    enc = t5.load_t5(path, dtype=torch.float16, tokenizer_path=TOKENIZER)
    half, _ = enc.encode(PROMPTS)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert rel_err(half, full) < 5e-3
    assert enc.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert enc.model.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float16

    plain_half = run_plain(plain_model(sd).half())  # everything float16: the failure being avoided
    assert not torch.isfinite(plain_half).all() or rel_err(plain_half, full) > 0.1


def test_bf16_is_close(files, reference):
    enc = t5.load_t5(files["hf"], dtype="bf16")
    embeds, _ = enc.encode(PROMPTS)
    assert embeds.dtype == torch.bfloat16
    assert rel_err(embeds, reference) < 3e-2
    assert all(p.dtype == torch.bfloat16 for p in enc.model.parameters())


def test_non_finite_output_is_a_clear_error(tmp_path):
    sd = fx.tiny_t5_state_dict()
    sd["shared.weight"][3] = 1e6  # token id 3 ("▁") becomes inf in float16
    path = fx.write_tiny_t5_single_file(tmp_path / "inf.safetensors", "fp32", state_dict=sd)
    enc = t5.load_t5(path, dtype="fp16", tokenizer_path=TOKENIZER)
    with pytest.raises(FloatingPointError, match="bfloat16 or float32"):
        enc.encode("a photo of a cat")


# ----------------------------------------------------------------------------- cache, release

def test_cache_hit_skips_the_model(files, forward_batches):
    enc = t5.load_t5(files["hf"])
    first, first_mask = enc.encode(PROMPTS)
    again, again_mask = enc.encode(PROMPTS)
    assert forward_batches == [2]
    assert torch.equal(first, again) and torch.equal(first_mask, again_mask)
    again.add_(1)  # callers get their own tensors; the cache must not change
    assert torch.equal(enc.encode(PROMPTS)[0], first)

    mixed, _ = enc.encode([PROMPTS[1], "a new prompt", PROMPTS[1]])
    assert forward_batches == [2, 1]  # only the new prompt ran, once
    assert torch.equal(mixed[0], first[1]) and torch.equal(mixed[2], first[1])

    enc.encode(PROMPTS, max_length=120)
    assert forward_batches == [2, 1, 2]  # another length is another entry


def test_cache_is_keyed_by_encoder_identity(files, forward_batches):
    fp32 = t5.load_t5(files["hf"])
    bf16 = t5.load_t5(files["hf"], dtype="bf16")
    assert fp32.identity != bf16.identity
    assert str(files["hf"]) in fp32.identity
    fp32.encode("a cat")
    bf16.encode("a cat")
    t5.load_t5(files["hf"]).encode("a cat")  # a reload of the same encoder hits
    assert forward_batches == [1, 1]


def test_cache_is_bounded(files, forward_batches, monkeypatch):
    monkeypatch.setattr(t5, "CACHE_SIZE", 3)
    enc = t5.load_t5(files["hf"])
    for text in ["p0", "p1", "p2", "p3"]:
        enc.encode(text)
    enc.encode("p3")
    assert len(forward_batches) == 4
    enc.encode("p0")  # the oldest entry was evicted
    assert len(forward_batches) == 5


def test_release_frees_and_reloads_lazily(files, forward_batches):
    enc = t5.load_t5(files["hf"])
    before, _ = enc.encode(PROMPTS[0])
    enc.release()
    assert not enc.loaded
    assert torch.equal(enc.encode(PROMPTS[0])[0], before) and not enc.loaded  # cached: no reload
    after, _ = enc.encode(PROMPTS[1])
    assert enc.loaded and forward_batches == [1, 1]
    assert torch.allclose(after, t5.load_t5(files["fp32"], tokenizer_path=TOKENIZER).encode(PROMPTS[1])[0], atol=1e-5)


# ----------------------------------------------------------------------------- errors

def test_clip_l_file_is_named_as_clip(files):
    with pytest.raises(t5.T5LoadError, match=r"looks like a CLIP text encoder.*t5xxl_fp16") as err:
        t5.load_t5(files["clip_l"], tokenizer_path=TOKENIZER)
    assert "clip_l.safetensors" in str(err.value)


def _renamed(sd, old, new):
    return {k.replace(old, new): v for k, v in sd.items()}


@pytest.mark.parametrize("change, message", [
    (lambda sd: {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(4)}, "Stable Diffusion"),
    (lambda sd: {"t_block.1.weight": torch.ones(4), "blocks.0.attn.qkv.weight": torch.ones(4)}, "PixArt transformer"),
    (lambda sd: {"decoder.up_blocks.0.resnets.0.conv1.weight": torch.ones(4)}, "a VAE"),
    (lambda sd: {"model.layers.0.self_attn.q_proj.weight": torch.ones(4)}, "language model"),
    (lambda sd: _renamed({k: v for k, v in sd.items() if "wi_1" not in k}, "wi_0", "wi"), r"T5 \(v1\.0"),
    (lambda sd: {**sd, "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight": torch.ones(32, 4)}, "UMT5"),
])
def test_other_models_are_named(tmp_path, change, message):
    path = tmp_path / "other.safetensors"
    save_file(change(fx.tiny_t5_state_dict()), str(path))
    with pytest.raises(t5.T5LoadError, match=message):
        t5.load_t5(path, tokenizer_path=TOKENIZER)


def test_truncated_file_is_named(files, tmp_path):
    data = files["fp16"].read_bytes()
    broken = tmp_path / "t5xxl_fp16.safetensors"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(t5.T5LoadError, match="truncated or corrupt") as err:
        t5.load_t5(broken, tokenizer_path=TOKENIZER)
    assert str(broken) in str(err.value)


def test_missing_key_is_listed(tmp_path):
    sd = fx.tiny_t5_state_dict()
    del sd["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    path = fx.write_tiny_t5_single_file(tmp_path / "partial.safetensors", "fp16", state_dict=sd)
    with pytest.raises(t5.T5LoadError, match=r"missing 1 keys .*block\.1\.layer\.1\.DenseReluDense\.wi_1\.weight"):
        t5.load_t5(path, tokenizer_path=TOKENIZER)


def test_wrong_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        t5.load_t5(tmp_path / "nothing_here.safetensors")
    with pytest.raises(FileNotFoundError, match="holds no T5 weights"):
        t5.load_t5(tmp_path)


def test_missing_tokenizer_without_comfy(files, monkeypatch):
    monkeypatch.delitem(sys.modules, "comfy", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "comfy"))])
    assert importlib.util.find_spec("comfy") is None
    with pytest.raises(FileNotFoundError, match=r"spiece\.model or tokenizer\.json next to the weights") as err:
        t5.load_t5(files["fp16"])
    assert "ComfyUI" in str(err.value) and str(files["fp16"].parent) in str(err.value)


def test_tokenizer_found_through_comfy(files, monkeypatch):
    monkeypatch.delitem(sys.modules, "comfy", raising=False)
    monkeypatch.syspath_prepend(str(fx.COMFY_ROOT))
    enc = t5.load_t5(files["fp16"])
    assert enc.tokenizer_dir == fx.COMFY_T5_TOKENIZER_DIR
    assert enc.tokenize("a photo of a cat", max_length=8)[0][0].tolist() == CAT_IDS


def test_bad_dtype_and_device(files):
    with pytest.raises(ValueError, match="dtype"):
        t5.load_t5(files["hf"], dtype=torch.float64)
    with pytest.raises(ValueError, match="device .nonsense. is not a device name"):
        t5.load_t5(files["hf"], device="nonsense")
