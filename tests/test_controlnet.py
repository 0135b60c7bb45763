"""PixArt ControlNet (PixArt-δ ControlNet-Half): the forward against an independent reference, file
layouts and conversion, the model loader reading the official ControlNet file as PixArt-α, errors.

The reference below is written from the official wiring (PixArt-alpha `diffusion/model/nets/
pixart_controlnet.py` and the diffusers research project's `PixArtControlNetTransformerModel`):
diffusers' own PixArtTransformer2DModel for the base, deep copies of its BasicTransformerBlocks
loaded with the ControlNet's weights for the control copies, and plain nn.Linear projections, so no
code of pixart_core runs in it except the key renaming of the weights.
"""
import copy

import pytest
import torch

from pixart_core import PRESETS, KVCompress
from pixart_core.__main__ import main as cli
from pixart_core.config import tiny
from pixart_core.controlnet import (ControlInput, PixArtControlNet, describe_controlnet, load_controlnet,
                                    official_to_diffusers_controlnet, read_controlnet, save_controlnet)
from pixart_core.loading import CheckpointError, load_pixart
from tests.pixart_fixtures import inputs, random_controlnet, random_model, randomize, rel_err
from tests.test_model import diffusers_twin

ALPHA = PRESETS["alpha-1024-ms"].replace(depth=3, hidden_size=144, num_heads=2, caption_channels=32,
                                         model_max_length=20)


def reference_forward(base, nets, x, t, y, mask, hints, strengths, c_size=None, c_ar=None):
    """Base + ControlNets the official way, on diffusers modules (fp32, no autograd)."""
    twin = diffusers_twin(base)
    B, _, H, W = x.shape
    p, D = base.config.patch_size, base.config.hidden_size
    branches = []
    for net, hint in zip(nets, hints):
        sd = official_to_diffusers_controlnet(net.state_dict())
        copies, before, after = [], torch.nn.Linear(D, D), []
        for i in range(net.num_blocks):
            block = copy.deepcopy(twin.transformer_blocks[i])
            block.load_state_dict({k.split(".", 3)[3]: v for k, v in sd.items()
                                   if k.startswith(f"controlnet_blocks.{i}.transformer_block.")})
            copies.append(block)
            proj = torch.nn.Linear(D, D)
            proj.load_state_dict({"weight": sd[f"controlnet_blocks.{i}.after_proj.weight"],
                                  "bias": sd[f"controlnet_blocks.{i}.after_proj.bias"]})
            after.append(proj)
        before.load_state_dict({"weight": sd["controlnet_blocks.0.before_proj.weight"],
                                "bias": sd["controlnet_blocks.0.before_proj.bias"]})
        branches.append((copies, before, after, hint))
    added = {"resolution": c_size, "aspect_ratio": c_ar} if twin.config.use_additional_conditions else {}
    with torch.no_grad():
        hs = twin.pos_embed(x)  # (B, N, D)
        timestep, embedded = twin.adaln_single(t, added, batch_size=B, hidden_dtype=hs.dtype)
        enc = twin.caption_projection(y).view(B, -1, D)
        enc_mask = None if mask is None else ((1 - mask.float()) * -10000.0).unsqueeze(1)
        states = [twin.pos_embed(hint.expand(B, -1, -1, -1)) for *_, hint in branches]  # the base's embedder
        for i, block in enumerate(twin.transformer_blocks):
            if i >= 1:  # after base block i-1: control copy i-1 of every ControlNet, from the same stream
                adds = []
                for b, ((copies, before, after, _), s) in enumerate(zip(branches, strengths)):
                    j = i - 1
                    if j >= len(copies):
                        continue
                    inp = hs + before(states[b]) if j == 0 else states[b]
                    states[b] = copies[j](inp, encoder_hidden_states=enc, encoder_attention_mask=enc_mask,
                                          timestep=timestep)
                    adds.append(after[j](states[b]) * s)
                for a in adds:
                    hs = hs + a
            hs = block(hs, encoder_hidden_states=enc, encoder_attention_mask=enc_mask, timestep=timestep)
        shift, scale = (twin.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)
        hs = twin.proj_out(twin.norm_out(hs) * (1 + scale) + shift)
        hs = hs.reshape(B, H // p, W // p, p, p, -1)
        return torch.einsum("nhwpqc->nchpwq", hs).reshape(B, -1, H, W)


def hint_for(x, seed=9):
    return torch.randn(1, *x.shape[1:], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shared_t", [False, True])
def test_matches_reference_sigma(shared_t):
    """Non-zero before/after_proj, masks, a non-square latent, strength != 1; both block paths
    (per-sample timesteps, and one timestep for the batch as under CFG: fused modulation and gates)."""
    base = random_model(tiny(depth=4)).eval()
    net = random_controlnet(base.config, num_blocks=2)
    x, t, y, mask = inputs(base.config, height=16, width=24)
    if shared_t:
        t = torch.full_like(t, 500.0)
    hint = hint_for(x)
    with torch.no_grad():
        ours = base(x, t, y, mask, controls=[ControlInput(net, hint, 0.7)])
        plain = base(x, t, y, mask)
    ref = reference_forward(base, [net], x, t, y, mask, [hint], [0.7])
    assert rel_err(ours, ref) <= 1e-5
    assert rel_err(ours, plain) > 1e-2  # the branch really steers


def test_matches_reference_alpha_micro_conditions_and_chained_controlnets():
    base = random_model(ALPHA).eval()
    nets = [random_controlnet(base.config, num_blocks=2, seed=5), random_controlnet(base.config, num_blocks=1, seed=6)]
    x, t, y, mask = inputs(base.config, height=12, width=20)
    c_size, c_ar = torch.tensor([[96.0, 160.0]] * 2), torch.tensor([[0.6]] * 2)
    hints = [hint_for(x, 9), hint_for(x, 10)]
    with torch.no_grad():
        ours = base(x, t, y, mask, c_size=c_size, c_ar=c_ar,
                    controls=[ControlInput(nets[0], hints[0], 1.3), ControlInput(nets[1], hints[1], 0.5)])
        one = base(x, t, y, mask, c_size=c_size, c_ar=c_ar, controls=[ControlInput(nets[0], hints[0], 1.3)])
    ref = reference_forward(base, nets, x, t, y, mask, hints, [1.3, 0.5], c_size, c_ar)
    assert rel_err(ours, ref) <= 1e-5
    assert rel_err(ours, one) > 1e-3  # the second ControlNet adds its own contribution


def test_strength_zero_and_zero_after_proj_are_the_plain_model_bit_for_bit():
    base = random_model(tiny(depth=3)).eval()
    net = random_controlnet(base.config, num_blocks=2)
    x, t, y, mask = inputs(base.config, height=16, width=16)
    with torch.no_grad():
        plain = base(x, t, y, mask)
        assert torch.equal(base(x, t, y, mask, controls=[ControlInput(net, hint_for(x), 0.0)]), plain)
        for block in net.controlnet:  # the official initialisation
            torch.nn.init.zeros_(block.after_proj.weight)
            torch.nn.init.zeros_(block.after_proj.bias)
        assert torch.equal(base(x, t, y, mask, controls=[ControlInput(net, hint_for(x), 1.0)]), plain)


def test_copy_i_attends_as_block_i_with_kv_compression():
    """With KV compression on layer 0 the copy of block 0 compresses too; on layer 1 only base block 1."""
    base = random_model(tiny(depth=3)).eval()
    net = random_controlnet(base.config, num_blocks=2)
    x, t, y, mask = inputs(base.config, height=16, width=16)
    hint = hint_for(x)
    for layers in ((0,), (1,), (0, 1, 2)):
        kv = KVCompress(layers, 2, "avgpool")
        with torch.no_grad():
            got = base(x, t, y, mask, kv_compress=kv, controls=[ControlInput(net, hint, 0.8)])
            # by hand: the wiring, with each block's KV setting passed explicitly
            context, m = base._prepare_captions(y, mask, 2)
            tok = base.embed(x, torch.float32)
            t_emb = base.t_embedder(t, torch.float32)
            t0, ys = base.t_block(t_emb), base.y_embedder(context)
            c = base.embed(hint.expand(2, -1, -1, -1), torch.float32)
            for i, block in enumerate(base.blocks):
                tok = block(tok, ys, t0, m, (8, 8), kv.for_layer(i))
                if i < 2:
                    cb = net.controlnet[i]
                    c = cb.copied_block(tok + cb.before_proj(c) if i == 0 else c, ys, t0, m, (8, 8), kv.for_layer(i))
                    tok = tok + 0.8 * cb.after_proj(c)
            want = base.unpatchify(base.final_layer(tok, t_emb), 8, 8)
        assert rel_err(got, want) <= 1e-5, layers


def test_hint_is_checked_and_broadcast():
    base = random_model(tiny(depth=2)).eval()
    net = random_controlnet(base.config)
    x, t, y, mask = inputs(base.config, height=16, width=16)
    with torch.no_grad():
        one = base(x, t, y, mask, controls=[ControlInput(net, hint_for(x), 1.0)])
        two = base(x, t, y, mask, controls=[ControlInput(net, hint_for(x).repeat(2, 1, 1, 1), 1.0)])
        assert torch.equal(one, two)
        with pytest.raises(ValueError, match="hint latent is 8x8 but the latent being sampled is 16x16"):
            base(x, t, y, mask, controls=[ControlInput(net, torch.zeros(1, 4, 8, 8))])
        with pytest.raises(ValueError, match="takes 4-channel latents"):
            base(x, t, y, mask, controls=[ControlInput(net, torch.zeros(1, 16, 16, 16))])


def test_check_base_refuses_other_shapes_and_adopts_heads():
    base = tiny(depth=3)
    with pytest.raises(ValueError, match="is 96 wide but the PixArt model is 64 wide"):
        random_controlnet(base.replace(hidden_size=96, num_heads=2)).check_base(base)
    with pytest.raises(ValueError, match="has 3 copied blocks but the PixArt model only 3"):
        random_controlnet(base, num_blocks=3).check_base(base)
    with pytest.raises(ValueError, match="another shape"):
        random_controlnet(base.replace(mlp_ratio=2.0)).check_base(base)
    net = random_controlnet(base.replace(num_heads=2))
    net.check_base(base)
    assert net.config.num_heads == 4 and net.controlnet[0].copied_block.attn.num_heads == 4


# -------------------------------------------------------------------------------------------------
# files
# -------------------------------------------------------------------------------------------------

def official_file(base, net, path):
    """The released container: {'state_dict': base_model.* (pos_embed included) + controlnet.*}."""
    from tests.test_loading import official_sd
    sd = {f"base_model.{k}": v for k, v in official_sd(base).items()}
    sd.update({f"controlnet.{k}": v for k, v in net.controlnet.state_dict().items()})
    torch.save({"state_dict": sd}, path)
    return path


@pytest.fixture
def alpha_pair(tmp_path):
    base = random_model(ALPHA).eval()
    net = random_controlnet(base.config, num_blocks=2)
    return base, net, official_file(base, net, tmp_path / "PixArt-XL-2-1024-ControlNet.pth")


def test_layouts_and_containers_give_the_same_output(alpha_pair, tmp_path):
    base, net, official = alpha_pair
    raw = read_controlnet(official)
    assert (raw.layout, raw.base_family, raw.has_base_model, raw.config.depth) == ("official", "alpha", True, 2)
    outs = [save_controlnet(net.state_dict(), tmp_path / "cn.safetensors", "diffusers"),
            save_controlnet(net.state_dict(), tmp_path / "cn_official.safetensors"),
            save_controlnet(net.state_dict(), tmp_path / "cn_folder"),
            save_controlnet(net.state_dict(), tmp_path / "cn.pth")]
    assert (tmp_path / "cn_folder" / "config.json").read_text().count('"num_layers": 2') == 1
    x, t, y, mask = inputs(base.config, height=16, width=12)
    hint = hint_for(x)
    with torch.no_grad():
        want = base(x, t, y, mask, controls=[ControlInput(net, hint, 0.9)])
        for path in [official, *outs]:
            loaded = load_controlnet(path)
            assert torch.equal(base(x, t, y, mask, controls=[ControlInput(loaded, hint, 0.9)]), want), path
    assert read_controlnet(outs[0]).layout == "diffusers" and read_controlnet(outs[2]).layout == "diffusers"
    keys = set(torch.load(outs[3], weights_only=True)["state_dict"])
    assert keys == set(net.state_dict()) and "controlnet.0.before_proj.weight" in keys
    from safetensors import safe_open
    with safe_open(str(outs[0]), "pt") as f:
        names = set(f.keys())
    assert "controlnet_blocks.1.transformer_block.attn1.to_q.weight" in names
    assert "controlnet_blocks.0.before_proj.bias" in names and not any("copied_block" in k for k in names)


def test_model_loader_reads_the_official_controlnet_file_as_pixart_alpha(alpha_pair):
    base, _, official = alpha_pair
    loaded = load_pixart(official)
    assert loaded.config == base.config  # PixArt-α 1024-MS, micro-conditions, from the base_model.* part
    x, t, y, mask = inputs(base.config, height=16, width=16)
    with torch.no_grad():
        assert torch.equal(loaded.model(x, t, y, mask), base(x, t, y, mask))


def test_cli_inspect_and_convert_both_ways(alpha_pair, tmp_path, capsys):
    _, net, official = alpha_pair
    assert cli(["inspect", str(official)]) == 0
    text = capsys.readouterr().out
    assert "PixArt ControlNet" in text and "copied blocks: 2" in text and "PixArt-α" in text
    assert "micro_condition:" in text  # and the α model inside the same file
    assert cli(["convert", str(official), str(tmp_path / "hed_diffusers")]) == 0
    assert cli(["convert", str(tmp_path / "hed_diffusers"), str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)["state_dict"]
    assert set(back) == set(net.state_dict()) and all(torch.equal(back[k], v) for k, v in net.state_dict().items())
    capsys.readouterr()
    assert cli(["inspect", str(tmp_path / "hed_diffusers")]) == 0
    assert "layout:      diffusers" in capsys.readouterr().out
    assert cli(["convert", "--base-model", str(official), str(tmp_path / "alpha.safetensors")]) == 0
    assert load_pixart(tmp_path / "alpha.safetensors").config.micro_condition


def test_not_a_controlnet_is_one_sentence(tmp_path):
    from safetensors.torch import save_file
    cases = {
        "sd_cn.safetensors": ({"input_hint_block.0.weight": torch.zeros(2, 3, 3, 3)}, "an SD1.x/SDXL ControlNet"),
        "flux_cn.safetensors": ({"controlnet_x_embedder.weight": torch.zeros(2, 2)}, "a Flux ControlNet"),
        "pixart.safetensors": ({"t_block.1.weight": torch.zeros(2, 2)},
                               "a PixArt model, not a PixArt ControlNet \\(load it with"),
        "other.safetensors": ({"foo.weight": torch.zeros(2)}, "not a PixArt ControlNet - it has neither"),
    }
    for name, (sd, message) in cases.items():
        save_file(sd, str(tmp_path / name))
        with pytest.raises(CheckpointError, match=message) as err:
            read_controlnet(tmp_path / name)
        assert "\n" not in str(err.value) and name in str(err.value)
    net = random_controlnet(tiny(depth=3), num_blocks=2)
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("controlnet.1.after_proj")}
    save_file(sd, str(tmp_path / "cut.safetensors"))
    with pytest.raises(CheckpointError, match="missing key controlnet.1.after_proj.weight"):
        read_controlnet(tmp_path / "cut.safetensors")
    save_file(net.state_dict(), str(tmp_path / "cn_only.safetensors"))
    with pytest.raises(CheckpointError, match="PixArt ControlNet without a base model.*Load PixArt ControlNet"):
        load_pixart(tmp_path / "cn_only.safetensors")
    assert "copied blocks: 2" in describe_controlnet(tmp_path / "cn_only.safetensors")


def test_dtypes_and_no_grad_free_paths():
    """bf16 weights cast on the fly (CastOps) and a forward with autograd both work."""
    base = random_model(tiny(depth=2)).eval()
    net = random_controlnet(base.config)
    x, t, y, mask = inputs(base.config, height=16, width=16)
    hint = hint_for(x)
    with torch.no_grad():
        want = base(x, t, y, mask, controls=[ControlInput(net, hint, 1.0)])
    half = PixArtControlNet(net.config, dtype=torch.bfloat16)
    half.load_state_dict(net.state_dict())
    with torch.no_grad():
        got = base(x, t, y, mask, controls=[ControlInput(half, hint, 1.0)])
    assert rel_err(got, want) < 2e-2
    grad = base(x, t, y, mask, controls=[ControlInput(net, hint, 1.0)])
    assert rel_err(grad.detach(), want) <= 1e-6 and grad.requires_grad
    randomize(net, 11)  # the module is an ordinary nn.Module
