"""The DiT itself: parity with diffusers and ComfyUI, position embedding, KV compression, sizes."""
import math

import pytest
import torch
import torch.nn.functional as F

from pixart_core import PixArt, KVCompress, PRESETS
from pixart_core.config import tiny
from pixart_core.loading import diffusers_config, official_to_diffusers
from pixart_core.model import compress_tokens, sincos_pos_embed
from tests.pixart_fixtures import inputs, random_model, rel_err


def diffusers_twin(model):
    from diffusers import PixArtTransformer2DModel
    cfg = {k: v for k, v in diffusers_config(model.config).items() if not k.startswith("_")}
    twin = PixArtTransformer2DModel(**cfg).eval()
    missing, unexpected = twin.load_state_dict(
        {k: v for k, v in official_to_diffusers(model.state_dict()).items() if k != "y_embedding"}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return twin


def run_diffusers(twin, x, t, y, mask, c_size=None, c_ar=None):
    added = {"resolution": c_size, "aspect_ratio": c_ar} if twin.config.use_additional_conditions else {}
    with torch.no_grad():
        return twin(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask,
                    added_cond_kwargs=added, return_dict=False)[0]


@pytest.mark.parametrize("height,width,masked,pe", [
    (16, 16, False, 0.5), (16, 24, True, 0.5), (24, 12, True, 1.0), (20, 32, True, 2.0), (32, 32, True, 0.5)])
def test_matches_diffusers(height, width, masked, pe):
    model = random_model(tiny(pe_interpolation=pe)).eval()
    x, t, y, mask = inputs(model.config, height=height, width=width, masked=masked)
    with torch.no_grad():
        ours = model(x, t, y, mask)
    ref = run_diffusers(diffusers_twin(model), x, t, y, mask)
    assert ours.shape == (2, 8, height, width)
    assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("name", ["sigma-256", "alpha-1024-ms"])
def test_matches_diffusers_released_configs(name):
    """The released geometry (PE base size, pe_interpolation, micro-conditioning), narrow and shallow."""
    cfg = PRESETS[name].replace(depth=1, hidden_size=96, num_heads=2, caption_channels=32, model_max_length=20)
    model = random_model(cfg).eval()
    H = cfg.sample_size // 4  # small latents, off the native size, non-square
    x, t, y, mask = inputs(cfg, height=H, width=H + 6)
    c_size, c_ar = torch.tensor([[H * 8.0, (H + 6) * 8.0]] * 2), torch.tensor([[H / (H + 6)]] * 2)
    with torch.no_grad():
        ours = model(x, t, y, mask, c_size=c_size, c_ar=c_ar)
    ref = run_diffusers(diffusers_twin(model), x, t, y, mask, c_size, c_ar)
    assert rel_err(ours, ref) <= 1e-5


def test_mask_is_applied_and_prompt_mask_repeats_over_cfg_batch():
    model = random_model().eval()
    x, t, y, mask = inputs(model.config, batch=2)
    with torch.no_grad():
        masked = model(x, t, y, mask)
        unmasked = model(x, t, y, None)
        y_garbage = y.clone()
        y_garbage[mask == 0] = 1e3  # what lies under the mask must not matter
        assert torch.allclose(model(x, t, y_garbage, mask), masked, atol=1e-6)
        # the reference repeats a (1, L) prompt mask over a 2-sample batch
        repeated = model(x, t, y, mask[:1])
        explicit = model(x, t, y, mask[:1].repeat(2, 1))
    assert rel_err(masked, unmasked) > 1e-3
    assert torch.equal(repeated, explicit)


def _comfy_twin(model):
    from tests.comfy_env import import_comfy
    import_comfy()
    import comfy.ops
    from comfy.ldm.pixart.pixartms import PixArtMS
    cfg = model.config
    twin = PixArtMS(input_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                    hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads,
                    caption_channels=cfg.caption_channels, model_max_length=cfg.model_max_length,
                    micro_condition=cfg.micro_condition,
                    # what comfy/model_detection.py sets when the official file carries pos_embed
                    pe_interpolation=cfg.sample_size // 64,
                    dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    sd = {k: v for k, v in model.state_dict().items()}
    missing, unexpected = twin.load_state_dict(sd, strict=False)
    assert not [k for k in missing if "pos_embed" not in k] and not unexpected, (missing, unexpected)
    return twin.eval()


def test_matches_comfyui_at_native_size():
    cfg = PRESETS["sigma-512"].replace(depth=2, hidden_size=96, num_heads=2, caption_channels=32, model_max_length=20)
    model = random_model(cfg).eval()
    twin = _comfy_twin(model)
    x, t, y, _ = inputs(cfg, height=64, width=64, masked=False)  # 512 px: the model's native size
    with torch.no_grad():
        ours = model(x, t, y)[:, :4]
        theirs = twin(x, t, y)
    assert rel_err(ours, theirs) <= 1e-5


def test_departs_from_comfyui_off_native_size():
    """ComfyUI re-derives base_size from the latent size but keeps the pe_interpolation it guessed
    from the official file's pos_embed; the reference keeps both fixed (spec §3.4). A 512 model at
    1024 px then sees positions over [0, 64) instead of its trained [0, 32). This is the difference
    that decides whether 2K weights work at 4K, so it is asserted, not hidden.
    """
    cfg = PRESETS["sigma-512"].replace(depth=2, hidden_size=96, num_heads=2, caption_channels=32, model_max_length=20)
    model = random_model(cfg).eval()
    twin = _comfy_twin(model)
    x, t, y, _ = inputs(cfg, height=128, width=128, masked=False)  # a 512 model at 1024 px
    with torch.no_grad():
        ours = model(x, t, y)[:, :4]
        theirs = twin(x, t, y)
        ref = run_diffusers(diffusers_twin(model), x, t, y, None)[:, :4]
    assert rel_err(ours, ref) <= 1e-5  # we follow the reference
    assert rel_err(ours, theirs) > 0.05  # ComfyUI does not


def test_pos_embed_layout_and_range():
    pe = sincos_pos_embed(3, 5, 16, base_size=4, pe_interpolation=2.0).reshape(3, 5, 16)
    # w coordinate first: the first quarter is sin of the column position, constant down a column
    assert torch.allclose(pe[0, :, :4], pe[2, :, :4])
    assert torch.allclose(pe[:, 0, 8:12], pe[:, 4, 8:12])
    # columns are spread over [0, base_size / pe_interpolation) = [0, 2): step 4/5/2 = 0.4
    assert pe[0, 1, 0].item() == pytest.approx(math.sin(0.4), abs=1e-6)
    assert pe[1, 0, 8].item() == pytest.approx(math.sin(4 / 3 / 2), abs=1e-6)
    assert pe[0, 0, 4].item() == pytest.approx(1.0)  # cos(0)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)  # the null caption is not trained


def test_real_size_parameter_counts():
    counts = {name: trainable(PixArt(cfg.replace(kv_compress_layers=()), device="meta")) for name, cfg in PRESETS.items()}
    assert counts["sigma-1024-ms"] == 610_856_096
    assert counts["sigma-2k-ms"] == counts["sigma-256"] == 610_856_096
    assert counts["alpha-1024-ms"] == 611_349_152
    with_conv = PixArt(PRESETS["sigma-2k-ms"].replace(kv_compress_layers=tuple(range(14, 28))), device="meta")
    assert trainable(with_conv) == 610_856_096 + 14 * 8064


def test_average_conv_equals_average_pooling():
    model = random_model(tiny(kv_compress_layers=(1,), kv_compress_mode="conv"))
    attn = model.blocks[1].attn
    attn.reset_kv_compress_weights()
    t = torch.randn(2, 6 * 8, 64)
    pooled = F.avg_pool2d(t.transpose(1, 2).reshape(2, 64, 6, 8), 2).flatten(2).transpose(1, 2)
    assert torch.allclose(attn.sr(t.transpose(1, 2).reshape(2, 64, 6, 8)).flatten(2).transpose(1, 2), pooled, atol=1e-6)
    # and the whole conv path (with its LayerNorm) equals the weight-free one
    with_weights = compress_tokens(t, (6, 8), 2, "conv", attn.sr, attn.norm)
    assert torch.allclose(with_weights, compress_tokens(t, (6, 8), 2, "conv"), atol=1e-5)
    assert torch.allclose(compress_tokens(t, (6, 8), 2, "avgpool"), pooled)


@pytest.mark.parametrize("mode,hw,expected", [
    ("conv", (8, 8), 16), ("avgpool", (8, 8), 16), ("ave", (8, 8), 16), ("uniform", (8, 8), 16),
    ("conv", (7, 9), 12), ("avgpool", (7, 9), 12), ("ave", (7, 9), 12), ("uniform", (7, 9), 20)])
def test_compressed_token_counts(mode, hw, expected):
    t = torch.randn(1, hw[0] * hw[1], 16)
    assert compress_tokens(t, hw, 2, mode).shape == (1, expected, 16)


def test_compressed_layers_attend_over_quarter_of_the_keys(monkeypatch):
    model = random_model(tiny(depth=4)).eval()
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((q.shape[2], k.shape[2]))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    x, t, y, mask = inputs(model.config, height=16, width=16, masked=False)
    with torch.no_grad():
        model(x, t, y, kv_compress=KVCompress(layers=(2, 3), ratio=2, mode="avgpool"))
    self_attn = seen[0::2]  # self- and cross-attention alternate
    assert self_attn == [(64, 64), (64, 64), (64, 16), (64, 16)]


def test_kv_compression_changes_output_only_where_enabled():
    model = random_model(tiny(depth=2)).eval()
    x, t, y, mask = inputs(model.config, height=16, width=16)
    with torch.no_grad():
        off = model(x, t, y, mask)
        on = model(x, t, y, mask, kv_compress=KVCompress(layers=(1,), mode="avgpool"))
        none = model(x, t, y, mask, kv_compress=KVCompress(layers=(), mode="avgpool"))
    assert torch.equal(off, none)
    assert rel_err(on, off) > 1e-4


def test_grid_too_small_for_compression_is_refused():
    model = random_model(tiny())
    x, t, y, mask = inputs(model.config, height=2, width=8)
    with pytest.raises(ValueError, match="at least 2x2"):
        model(x, t, y, mask, kv_compress=KVCompress(layers=(0,), mode="conv"))


def test_bad_inputs_have_clear_errors():
    model = random_model(tiny())
    x, t, y, mask = inputs(model.config, height=16, width=16)
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        model(x[:, :, :15], t, y, mask)
    with pytest.raises(ValueError, match="expects 32"):
        model(x, t, torch.randn(2, 16, 48), mask)
    with pytest.raises(ValueError, match="no valid token"):
        model(x, t, y, torch.zeros_like(mask))


def test_chunked_feed_forward_is_exact():
    model = random_model().eval()
    x, t, y, mask = inputs(model.config, height=16, width=16)
    with torch.no_grad():
        whole = model(x, t, y, mask)
        model.ff_chunk = 10
        chunked = model(x, t, y, mask)
    assert torch.allclose(whole, chunked, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_compute_tracks_fp32(dtype):
    model = random_model().eval()
    x, t, y, mask = inputs(model.config, height=16, width=16)
    with torch.no_grad():
        ref = model(x, t, y, mask)
        model.to(dtype)
        model.compute_dtype = dtype
        low = model(x, t, y, mask)
    assert low.dtype == dtype
    assert rel_err(low, ref) < 3e-2


def test_fp8_weights_upcast_at_compute():
    model = random_model().eval()
    x, t, y, mask = inputs(model.config, height=16, width=16)
    with torch.no_grad():
        ref = model(x, t, y, mask)
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
        out = model(x, t, y, mask)
    assert model.blocks[0].mlp.fc1.weight.dtype == torch.float8_e4m3fn
    assert out.dtype == torch.float32 and rel_err(out, ref) < 0.15


def _standard_cross_attention(ca, x, k, v, mask):
    B, N, D = x.shape
    q = ca.q_linear(x).view(B, N, ca.num_heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return ca.proj(out.transpose(1, 2).reshape(B, N, D))


@pytest.mark.parametrize("length,masked", [(1, False), (5, True), (15, False), (15, True)])
def test_folded_cross_attention_equals_standard(length, masked):
    from pixart_core.model import CrossAttention
    torch.manual_seed(0)
    ca = CrossAttention(64, 4).eval()  # head_dim 16
    for p in ca.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, y = torch.randn(2, 40, 64), torch.randn(2, length, 64)
    mask = None
    if masked:
        mask = torch.ones(2, 1, 1, length, dtype=torch.bool)
        mask[1, ..., length // 2 + 1:] = False
    with torch.no_grad():
        k, v = ca.kv_linear(y).chunk(2, dim=-1)
        k, v = (t.reshape(2, length, 4, 16).transpose(1, 2) for t in (k, v))
        ref = _standard_cross_attention(ca, x, k, v, mask)
        folded = ca.folded(x, k, v, mask)
        through_forward = ca(x, y, mask)
    assert rel_err(folded, ref) < 1e-6
    assert torch.equal(through_forward, folded)  # L < head_dim: forward takes the folded path


def test_cross_attention_folds_only_short_captions_and_only_readable_layers():
    from pixart_core.model import CrossAttention

    class PlainOps:  # layers that do not hand out their weights (as an unknown ops set)
        Linear = torch.nn.Linear

    calls = []
    x = torch.randn(1, 8, 64)
    for ops, length, folds in [(None, 15, True), (None, 16, False), (PlainOps, 4, False)]:
        ca = CrossAttention(64, 4, **({} if ops is None else {"operations": ops})).eval()
        handle = ca.q_linear.register_forward_hook(lambda *a: calls.append(1))
        with torch.no_grad():
            out = ca(x, torch.randn(1, length, 64))
        handle.remove()
        assert out.shape == (1, 8, 64)
        assert (len(calls) == 0) == folds, (ops, length)
        calls.clear()


def test_folded_cross_attention_in_bf16_tracks_fp32():
    from pixart_core.model import CrossAttention
    torch.manual_seed(0)
    ca = CrossAttention(64, 4).eval()
    x, y = torch.randn(2, 40, 64), torch.randn(2, 6, 64)
    with torch.no_grad():
        ref = ca(x, y)
        low = ca.to(torch.bfloat16)(x.bfloat16(), y.bfloat16())
    assert low.dtype == torch.bfloat16
    assert rel_err(low, ref) < 1e-2


@pytest.mark.parametrize("chunk", [None, 40])
def test_shared_timestep_fast_path_matches_diffusers_and_autograd_path(chunk):
    """Under CFG every sample has the same timestep: the modulation is fused into the norms and the
    gates into the output GEMMs, accumulating in place. Same function as the general path."""
    model = random_model().eval()
    model.ff_chunk = chunk
    x, _, y, mask = inputs(model.config, height=16, width=16)
    t = torch.tensor([321.0, 321.0])
    with torch.no_grad():
        fast = model(x, t, y, mask)
        general = model(x, torch.tensor([321.0, 321.0 + 1e-3]), y, mask)  # not shared: the plain path
    with torch.enable_grad():
        autograd = model(x, t, y, mask)  # no in-place updates under autograd
    ref = run_diffusers(diffusers_twin(model), x, t, y, mask)
    assert rel_err(fast, ref) <= 1e-5
    assert rel_err(autograd.detach(), fast) <= 1e-6
    assert rel_err(general, fast) < 1e-3 and not torch.equal(general, fast)


def test_cross_attention_does_not_fold_where_gemms_run_in_low_precision(monkeypatch):
    """Folded scores come out of a GEMM: in bf16 they would be rounded, so with native bf16 kernels
    (a GPU, an AVX512-BF16 CPU) the standard path runs; without them bf16 multiplies in fp32 and folds."""
    import pixart_core.ops
    from pixart_core.model import CrossAttention
    ca = CrossAttention(64, 4).eval().to(torch.bfloat16)
    x, y = torch.randn(1, 8, 64, dtype=torch.bfloat16), torch.randn(1, 4, 64, dtype=torch.bfloat16)
    calls = []
    ca.q_linear.register_forward_hook(lambda *a: calls.append(1))
    for native, folds in [(False, True), (True, False)]:
        monkeypatch.setattr(pixart_core.ops, "cpu_has_native_gemm", lambda dtype, native=native: native)
        calls.clear()
        with torch.no_grad():
            ca(x, y)
        assert (not calls) == folds, native


def test_zero_rows_are_padding():
    """Without a mask, exactly-zero caption rows are padding (caption_mask): the mask travels inside the
    embeddings. An all-zero caption attends one of its (identical) tokens, which is attending to all."""
    from pixart_core.model import caption_mask, masked_captions
    model = random_model().eval()
    x, t, y, mask = inputs(model.config, batch=2)
    with torch.no_grad():
        want = model(x, t, y, mask)
        assert torch.equal(caption_mask(masked_captions(y, mask)), mask.bool())
        assert rel_err(model(x, t, masked_captions(y, mask)), want) < 1e-6
        zeros = torch.zeros_like(y)
        assert caption_mask(zeros).sum() == 2
        assert rel_err(model(x, t, zeros), model(x, t, zeros, torch.ones_like(mask))) < 1e-6


def test_block_replacements_run_instead_of_blocks():
    """block_replace[i] runs in place of block i; `original` runs the block as usual on a copy of the stream."""
    import copy
    model = random_model().eval()
    x, t, y, mask = inputs(model.config, batch=2)

    def keep(tokens, inputs, original):
        given = tokens.clone()
        out = original(tokens, inputs)
        assert torch.equal(tokens, given)  # the block updated its copy, not what the replacement holds
        return out

    with torch.no_grad():
        plain = model(x, t, y, mask)
        assert torch.equal(model(x, t, y, mask, block_replace={0: keep, 1: keep}), plain)
        skipped = model(x, t, y, mask, block_replace={1: lambda tokens, inputs, original: tokens})
        shallow = copy.deepcopy(model)
        del shallow.blocks[1]
        assert torch.equal(skipped, shallow(x, t, y, mask)) and rel_err(skipped, plain) > 1e-3


def test_tables_are_leaf_weights_under_the_official_names():
    """scale_shift_table and y_embedding are `weight`s of leaf layers (ops.Table, for weight patchers that
    reach leaf layers only) and keep the official state-dict names, loading from either form."""
    from pixart_core.ops import Table
    model = random_model()
    keys = set(model.state_dict())
    assert {"blocks.0.scale_shift_table", "final_layer.scale_shift_table", "y_embedder.y_embedding"} <= keys
    assert not any(k.endswith("table.weight") or k.endswith("y_embedding.weight") for k in keys)
    tables = [m for m in model.modules() if isinstance(m, Table)]
    assert len(tables) == model.config.depth + 2 and all(not list(m.children()) for m in tables)
    assert not model.y_embedder.y_embedding.weight.requires_grad and model.blocks[0].scale_shift_table.weight.requires_grad
    other = random_model(seed=3)
    leaf_names = {(k + ".weight" if "table" in k or "y_embedding" in k else k): v for k, v in model.state_dict().items()}
    other.load_state_dict(leaf_names)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())
