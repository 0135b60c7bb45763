"""Fine-tuning inside ComfyUI 0.3.75 (in process, CPU, tiny models): the stock Train LoRA on the pack's MODEL
(its multi_res bug and the Rebatch Latents workaround, KV compression trained through), LoRAs from Train
LoRA and from `train-lora` loading in each other with the same patched weights, and the PixArt Validation
Loss node giving pixart_core's number."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import pixart_fixtures as pf
import t5_fixtures as tf
from pixart_core import lora as core_lora
from pixart_core import training as tr
from pixart_core.config import tiny
from pixart_core.loading import save_checkpoint
from pixart_core.pipeline import LATENT_SCALE
from test_nodes import _one_thread  # noqa: F401 - autouse: tiny models run fastest on one thread

SCALE = LATENT_SCALE["sigma"]  # ComfyUI's SDXL latent format multiplies LATENT samples by this


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if not tf.COMFY_T5_TOKENIZER_DIR.is_dir():
        pytest.skip("needs the ComfyUI tree: run scripts/build_comfyui_host.sh")
    from test_nodes import _import_comfy_and_pack
    pack = _import_comfy_and_pack()
    import folder_paths
    root = tmp_path_factory.mktemp("training_models")
    for name in ("diffusion_models", "loras"):
        (root / name).mkdir()
        folder_paths.add_model_folder_path(name, str(root / name), is_default=True)
    plain, kv = tiny(), tiny(kv_compress_layers=(1,), kv_compress_mode="conv")
    save_checkpoint(pf.random_model(plain).state_dict(), plain, root / "diffusion_models" / "train_tiny.safetensors")
    save_checkpoint(pf.random_model(kv).state_dict(), kv, root / "diffusion_models" / "train_tiny_kv.safetensors")
    n = pack.nodes

    def load(name):
        return n.PixArtSuiteModelLoader.execute(name, "auto", "fp32", "checkpoint", "avgpool")[0]

    return pack, n, root, load


def data(n=2, seed=1):
    """Samples (model space) and the same data as ComfyUI LATENTs (VAE space) and CONDITIONINGs."""
    items = []
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        mask = torch.zeros(1, 16, dtype=torch.long)
        mask[0, : 4 + 5 * i] = 1
        items.append(tr.Sample(torch.randn(1, 4, 16, 16, generator=g) * 0.8, torch.randn(1, 16, 32, generator=g),
                               mask))
    latents = [{"samples": s.latents / SCALE} for s in items]
    conds = [[[s.context, {"attention_mask": s.mask}]] for s in items]
    return items, latents, conds


def train_stock(model, latents, conds, steps=3, lr=5e-3, **kw):
    from comfy_extras.nodes_train import TrainLoraNode
    args = dict(batch_size=1, steps=steps, grad_accumulation_steps=1, learning_rate=lr, rank=2, optimizer="AdamW",
                loss_function="MSE", seed=0, training_dtype="fp32", lora_dtype="fp32", algorithm="LoRA",
                gradient_checkpointing=False, existing_lora="[None]")
    args.update(kw)
    out = TrainLoraNode.execute(model=[model], latents=latents, positive=conds, **{k: [v] for k, v in args.items()})
    return out.result  # (model, lora state dict, loss map, steps)


def core_model(path):
    from pixart_core.loading import load_pixart
    return load_pixart(path, dtype=torch.float32).model


def patched(patcher):
    from test_lora import patched as comfy_patched
    return comfy_patched(patcher, "diffusion_model.")


# -------------------------------------------------------------------------------------------------
# the stock Train LoRA on the pack's MODEL
# -------------------------------------------------------------------------------------------------

def test_stock_train_lora_needs_a_list_of_latents(env):
    """ComfyUI 0.3.75 comfy_extras/nodes_train.py, TrainLoraNode.execute: one LATENT input (a batch, or a single
    image) leaves `multi_res` unassigned and fails at `real_dataset=latents if multi_res else None`; stock Rebatch
    Latents with batch size 1 turns a batch into a list of single latents, the path that works. If this test
    fails because the batch trains, ComfyUI has fixed the bug: drop the workaround note in the workflows."""
    from comfy_extras.nodes_rebatch import LatentRebatch
    pack, n, root, load = env
    model = load("train_tiny.safetensors")
    _, latents, conds = data(2)
    batch = {"samples": torch.cat([lat["samples"] for lat in latents])}
    flat = [conds[0][0], conds[1][0]]
    with pytest.raises(UnboundLocalError, match="multi_res"):
        train_stock(model, [batch], [flat], steps=1)
    with pytest.raises(UnboundLocalError, match="multi_res"):
        train_stock(model, [latents[0]], [conds[0]], steps=1)
    rebatched = LatentRebatch.execute([batch], [1]).result[0]
    assert len(rebatched) == 2
    trained, lora_sd, losses, steps = train_stock(model, rebatched, [flat], steps=2)
    assert steps == 2 and len(losses["loss"]) == 2
    assert "diffusion_model.blocks.0.attn.qkv.lora_up.weight" in lora_sd


@pytest.mark.parametrize("algorithm, key", [("LoHa", "hada_w1_a"), ("LoKr", "lokr_w1"), ("OFT", "oft_blocks")])
def test_stock_train_lora_runs_every_algorithm(env, algorithm, key):
    pack, n, root, load = env
    _, latents, conds = data(2)
    lora_sd = train_stock(load("train_tiny.safetensors"), latents, conds, steps=1, algorithm=algorithm)[1]
    assert any(k.endswith(key) for k in lora_sd), sorted(lora_sd)[:5]


def test_stock_train_lora_trains_the_kv_compressed_path(env):
    """On a checkpoint with KV-compression convs, Train LoRA puts a LoRA on them; its zero-initialised factor
    moves only when KV compression is on, i.e. only when the gradient runs through the compressed keys/values."""
    pack, n, root, load = env
    model = load("train_tiny_kv.safetensors")
    _, latents, conds = data(2)
    key = "diffusion_model.blocks.1.attn.sr.lora_down.weight"
    on = train_stock(model, latents, conds, steps=2)[1]
    off_model = n.PixArtSuiteKVCompression.execute(model, "none", 2, "conv")[0]
    off = train_stock(off_model, latents, conds, steps=2)[1]
    assert on[key].abs().max() > 0 and off[key].abs().max() == 0
    assert on["diffusion_model.blocks.1.attn.norm.diff"].abs().max() > 0


# -------------------------------------------------------------------------------------------------
# LoRAs from both trainers load in each other
# -------------------------------------------------------------------------------------------------

def test_train_lora_file_loads_in_pixart_core_with_the_same_weights(env):
    import comfy.sd
    pack, n, root, load = env
    model = load("train_tiny.safetensors")
    _, latents, conds = data(2)
    lora_sd = train_stock(model, latents, conds)[1]
    path = root / "loras" / "stock_trained.safetensors"
    save_file({k: v.contiguous() for k, v in lora_sd.items()}, str(path))  # what Save LoRA writes
    comfy = patched(comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0)[0])
    ours = patched(n.PixArtSuiteLoraLoader.execute(model, "stock_trained.safetensors", 1.0, None, 1.0)[0])
    core = core_model(root / "diffusion_models" / "train_tiny.safetensors")
    lora = core_lora.read_lora(path)
    assert core_lora.merge_lora(core, lora) == {} and not lora.unmatched
    state = core.state_dict()
    assert set(comfy) == set(ours) and len(comfy) > 40  # LoRA factors, and diff_b on every bias
    for key in comfy:  # ComfyUI names a table by its layer's weight, pixart_core by the official name
        official = key if key in state else key.removesuffix(".weight")
        assert (comfy[key] - ours[key]).abs().max() <= 1e-6, key
        assert (comfy[key] - state[official]).abs().max() <= 1e-6, key


@pytest.fixture(scope="module")
def cli_lora(env):
    """A LoRA trained by pixart_core (what train-lora writes) and the weights it trained, native names."""
    pack, n, root, load = env
    core = core_model(root / "diffusion_models" / "train_tiny.safetensors")
    result = tr.train_lora(core, data(2)[0], tr.TrainConfig(steps=3, rank=2, learning_rate=5e-3,
                                                            gradient_checkpointing=False))
    tr.save_lora(result.adapters, root / "loras" / "cli_trained.safetensors")
    return "cli_trained.safetensors", {native + ".weight": result.adapters.merged_weight(native)
                                       for native in result.adapters.modules}


def test_cli_lora_loads_in_comfyui_with_the_same_weights(env, cli_lora):
    import nodes as comfy_nodes
    pack, n, root, load = env
    name, want = cli_lora
    model = load("train_tiny.safetensors")
    ours = n.PixArtSuiteLoraLoader.execute(model, name, 1.0, None, 1.0)
    text = ours.ui.as_dict()["text"][0]
    stock = comfy_nodes.LoraLoader().load_lora(model, None, name, 1.0, 0.0)[0]
    for patcher in (ours[0], stock):
        got = patched(patcher)
        assert set(got) == set(want)
        for key in want:
            assert (got[key] - want[key]).abs().max() <= 1e-6, key
    assert "applied 60 of 60 keys" in text and "NOT applied" not in text


# -------------------------------------------------------------------------------------------------
# PixArt Validation Loss
# -------------------------------------------------------------------------------------------------

def test_validation_node_gives_pixart_cores_number(env, cli_lora):
    """The node (ComfyUI's model, LATENTs in VAE space, patched by a LoRA) and pixart_core (the merged weights)
    measure the same loss; it is deterministic and per-latent captions count."""
    pack, n, root, load = env
    model = load("train_tiny.safetensors")
    items, latents, conds = data(3)
    node = n.PixArtSuiteValidationLoss
    first = node.execute([model], latents, conds, [4], [0])
    core = core_model(root / "diffusion_models" / "train_tiny.safetensors")
    want = tr.validation_loss(core, items, seed=0, levels=4).loss
    assert abs(first.result[0] - want) <= 1e-4 * want
    assert node.execute([model], latents, conds, [4], [0]).result[0] == first.result[0]
    assert "ε-MSE over 3 latents x 4 fixed noise levels" in first.ui.as_dict()["text"][0]
    one_caption = node.execute([model], latents, [conds[0]], [4], [0]).result[0]
    assert one_caption != first.result[0]
    lora = core_lora.read_lora(root / "loras" / cli_lora[0])
    with_lora = n.PixArtSuiteLoraLoader.execute(model, cli_lora[0], 1.0, None, 1.0)[0]
    core_lora.merge_lora(core, lora)
    got = node.execute([with_lora], latents, conds, [4], [0]).result[0]
    assert abs(got - tr.validation_loss(core, items, seed=0, levels=4).loss) <= 1e-4 * got
    with pytest.raises(ValueError, match="2 captions for 3 latents"):
        node.execute([model], latents, conds[:2], [4], [0])
