"""README "Scaling out": the convert command it gives for xDiT, run as written on an official .pth, makes the
transformer/ of a diffusers pipeline folder that diffusers' PixArtSigmaPipeline (what xDiT builds on) loads
and runs, with the same transformer output as ours."""
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from pixart_core.__main__ import main as cli
from pixart_core.loading import load_pixart
from tests.pixart_fixtures import inputs, random_model
from tests.t5_fixtures import write_tiny_t5_diffusers_root
from tests.test_loading import write_pth

diffusers = pytest.importorskip("diffusers")
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_convert_command() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Scaling out", 1)[1].split("\n## ", 1)[0]
    (line,) = [m.group(1) for m in re.finditer(r"^python -m pixart_core (convert .*)$", section, re.M)]
    return shlex.split(line)


def write_pipeline_parts(root: Path) -> None:
    """What `huggingface-cli download PixArt-alpha/PixArt-Sigma-XL-2-1024-MS --exclude "transformer/*"` gives,
    tiny: text_encoder/, tokenizer/, vae/, scheduler/ and model_index.json."""
    write_tiny_t5_diffusers_root(root)
    diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4,
                            norm_num_groups=4, sample_size=64).save_pretrained(root / "vae")
    diffusers.DPMSolverMultistepScheduler().save_pretrained(root / "scheduler")
    index = {"_class_name": "PixArtSigmaPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "PixArtTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (root / "model_index.json").write_text(json.dumps(index))


def test_readme_convert_command_makes_a_pipeline_folder_diffusers_loads(tmp_path, monkeypatch):
    args = readme_convert_command()
    assert args[0] == "convert" and args[1].endswith(".pth") and args[2].endswith("/transformer"), args
    monkeypatch.chdir(tmp_path)
    model = random_model(seed=3).eval()
    write_pth(model, tmp_path / args[1])
    pipeline_root = tmp_path / Path(args[2]).parent
    write_pipeline_parts(pipeline_root)

    assert cli(args) in (None, 0)

    pipe = diffusers.PixArtSigmaPipeline.from_pretrained(str(pipeline_root), torch_dtype=torch.float32)
    ours = load_pixart(tmp_path / args[1]).model.eval()
    x, t, y, mask = inputs(model.config, height=16, width=16)
    with torch.no_grad():
        ref = pipe.transformer(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask, return_dict=False)[0]
        mine = ours(x, t, y, mask)
    assert ((mine - ref).norm() / ref.norm()).item() <= 1e-5
    latents = pipe("a cat", num_inference_steps=2, height=256, width=256, output_type="latent",
                   generator=torch.Generator().manual_seed(0), max_sequence_length=16).images
    assert latents.shape == (1, 4, 32, 32) and torch.isfinite(latents).all()
