"""T5 v1.1 in GGUF (llama.cpp's names): small T5 files written with the gguf writer in F16, Q8_0 and Q4_K
encode like the fp32 model within the quantization error, weights stay quantized, and other files
are refused in one sentence.

Bounds (random-weight T5, d_model 256, 2 layers, 16-token prompt): the output's relative error vs
the fp32 model is at most 3x the largest relative weight error of the file (measured: F16 0,
Q8_0 1.1% for 0.5% weights, Q4_K 15% for 7.8% weights), and the GGUF model equals the fp32 model
loaded with the same dequantized weights to 1e-5.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import gguf_fixtures as gf
import t5_fixtures as tf
from pixart_core import gguf as core_gguf
from pixart_core.__main__ import main as cli
from pixart_core.t5 import T5LoadError, load_t5

gguf = pytest.importorskip("gguf")
PROMPT = "a watercolour fox in a snowy birch forest"
QTYPES = ("F16", "Q8_0", "Q4_K")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf_t5")
    tf.copy_tokenizer(folder)
    sd = gf.t5_state_dict()
    save_file(sd, str(folder / "t5_fp32.safetensors"))
    out = {"sd": sd, "fp32": folder / "t5_fp32.safetensors", "folder": folder}
    for qtype in QTYPES:
        out[qtype] = gf.write_t5_gguf(folder / f"t5-v1_1-xxl-encoder-{qtype}.gguf", sd, qtype)
    return out


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_t5_encodes_within_the_quantization_error(files, qtype, tmp_path):
    ref, ref_mask = load_t5(files["fp32"]).encode([PROMPT], max_length=16)
    t5 = load_t5(files[qtype])
    assert t5.tokenizer_dir == files["folder"]  # found beside the file, as for .safetensors T5s
    emb, mask = t5.encode([PROMPT], max_length=16)
    assert torch.equal(mask, ref_mask)
    reader = core_gguf.GGUFReader(files[qtype])
    dequantized = {k: reader.get(k) for k in reader.keys()}
    weight_err = max(rel(dequantized[k], v) for k, v in files["sd"].items())
    save_file(dequantized, str(tmp_path / "dequantized.safetensors"))
    same, _ = load_t5(tmp_path / "dequantized.safetensors", tokenizer_path=files["folder"]).encode([PROMPT], 16)
    assert rel(emb, same) <= 1e-5  # the GGUF path computes exactly with the stored weights
    err = rel(emb, ref)
    assert err <= 3 * weight_err + 1e-6, (qtype, err, weight_err)
    if qtype == "F16":
        assert err <= 1e-6  # the fixture's weights are fp16-exact
    else:
        assert err > 0  # it really is the quantized file


def test_quantized_weights_stay_quantized(files):
    t5 = load_t5(files["Q8_0"])
    q = t5.model.encoder.block[0].layer[0].SelfAttention.q
    assert isinstance(q, core_gguf.QuantizedLinear) and q.qweight.dtype == torch.uint8
    assert isinstance(t5.model.shared, core_gguf.QuantizedEmbedding) and t5.model.encoder.embed_tokens is t5.model.shared
    dense = sum(p.numel() * p.element_size() for p in t5.model.parameters())
    stored = sum(b.numel() for n, b in t5.model.named_buffers() if n.endswith("qweight"))
    file_size = files["Q8_0"].stat().st_size
    assert 0.9 * file_size < stored + dense < 1.05 * file_size  # no dequantized copy is kept
    assert dense < 0.01 * stored  # only norms and the position-bias table are dense


def test_q8_0_torch_dequantization_equals_gguf(files):
    reader = core_gguf.GGUFReader(files["Q8_0"])
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    q = reader.quantized(key)
    ours = core_gguf.dequantize(q.raw, q.qtype, q.shape)
    theirs = gguf.quants.dequantize(q.raw.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert q.qtype == "Q8_0" and torch.equal(ours, torch.from_numpy(theirs).reshape(q.shape))


def test_q4_k_fixture_bytes_decode_with_gguf():
    x = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    y = gguf.quants.dequantize(gf.quantize_q4_k(x), gguf.GGMLQuantizationType.Q4_K)
    assert 0.02 < np.linalg.norm(y - x) / np.linalg.norm(x) < 0.12


def test_gguf_of_another_architecture_is_one_sentence(tmp_path):
    path = gf.write_llama_gguf(tmp_path / "llama-3-8b-Q4_K_M.gguf")
    with pytest.raises(T5LoadError, match=r"is a GGUF file of a llama model .*not a T5 encoder") as err:
        load_t5(path, tokenizer_path=tf.COMFY_T5_TOKENIZER_DIR)
    assert "\n" not in str(err.value) and "llama-3-8b-Q4_K_M.gguf" in str(err.value)


def test_missing_gguf_package_says_what_to_install(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(T5LoadError, match=r"needs the gguf package.*pip install gguf"):
        load_t5(files["Q8_0"])


def test_full_t5_gguf_decoder_is_ignored(files, tmp_path):
    """llama.cpp's `t5` architecture also holds the decoder (dec.*) and LM head: the encoder loads alone."""
    extra = {"dec.blk.0.attn_q.weight": torch.zeros(256, 256), "output.weight": torch.zeros(32128, 256)}
    path = gf.write_t5_gguf(tmp_path / "t5-full-Q8_0.gguf", files["sd"], "Q8_0", arch="t5", extra=extra)
    a, _ = load_t5(path, tokenizer_path=files["folder"]).encode([PROMPT], 16)
    b, _ = load_t5(files["Q8_0"]).encode([PROMPT], 16)
    assert torch.equal(a, b)


def test_cli_encodes_a_gguf_t5(files, tmp_path, capsys):
    out = tmp_path / "emb.safetensors"
    assert cli(["encode", "--t5", str(files["Q8_0"]), "--t5-dtype", "fp32", "--device", "cpu",
                "--prompt", PROMPT, "--max-length", "16", str(out)]) == 0
    assert "embeds (1, 16, 256)" in capsys.readouterr().out


def test_t5_loader_node_lists_and_loads_gguf(files):
    if not tf.COMFY_T5_TOKENIZER_DIR.is_dir():
        pytest.skip("needs the ComfyUI tree: run scripts/build_comfyui_host.sh")
    from test_nodes import _import_comfy_and_pack
    pack = _import_comfy_and_pack()
    import folder_paths
    folder_paths.add_model_folder_path("text_encoders", str(files["folder"]), is_default=True)
    n = pack.nodes
    name = files["Q4_K"].name
    assert name in n.loaders.t5_choices()
    clip = n.PixArtSuiteT5Loader.execute(name, "fp32", "cpu")[0]
    cond = n.PixArtSuiteT5TextEncode.execute(clip, PROMPT, "α: 120 tokens")[0]
    want, _ = load_t5(files["Q4_K"]).encode([PROMPT], 120)
    q = clip.cond_stage_model.transformer.encoder.block[0].layer[0].SelfAttention.q
    assert type(q).__name__ == "QuantizedLinear"  # the pack's own copy of pixart_core.gguf
    assert rel(cond[0][1][n.text_encoder.OUTPUTS_KEY], want) <= 1e-5  # the T5 outputs; cond[0][0] zeroes the padding
    lora = files["folder"] / "t5_only_lora.safetensors"
    save_file({"lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(4, 256),
               "lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.zeros(256, 4)}, str(lora))
    _, same_clip, text = n.lora.apply_lora(None, clip, str(lora), 1.0, 1.0)
    assert "GGUF-quantized T5 weights cannot take a LoRA" in text and "applied 0 of 2 keys" in text
