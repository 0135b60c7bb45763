"""Peak CPU RAM of each shipped workflow at its real size, with real-size random weights.

    python -m benchmarks.workflow_memory [--cache DIR] [--depth 1] [--steps 1] [WORKFLOW ...]
        # writes benchmarks/results/workflow_memory-cpu.json and .md

Writes random weight files of the released sizes and layouts (once, into --cache, outside git):
the PixArt-Σ 1024 and 2K `.pth` (official container, fp32), a 24-layer T5 v1.1 XXL as ComfyUI's
single-file `t5xxl_fp16.safetensors` (HF names, fp16, streamed to disk so writing it needs no
19 GB), the SDXL VAE (diffusers names, fp32: ComfyUI converts them; also linked as the SD1.5 VAE,
which has the same architecture and size), a Σ canny ControlNet (diffusers layout), PixArt-α 1024-MS
with its HED ControlNet in one official `.pth` and RealESRGAN_x4plus (23 RRDB blocks). Then runs each workflow in the real ComfyUI host (scripts/comfy_host.py, --cpu),
one server process at a time, with the sampler / training steps set to --steps, and samples the
server process's /proc status (VmRSS, RssAnon, RssFile, VmHWM) every 0.1 s.

Reduced depth: a 28-block step on these 2 CPU cores takes minutes at 1024 px and hours at 4K, so
the PixArt files (and the ControlNet's 13 copies) are written with --depth blocks and the missing
blocks' exact weight bytes are added: peak(28) = peak(depth) + (28 - depth) x bytes(block), and
(13 - depth) x bytes(copy) for the ControlNet. This holds because a step keeps only the residual
stream between blocks (activations are per block, so they do not grow with depth) and the weights
are resident while the workflow runs; it is checked by measuring txt2img_1024 at two depths. It is
an upper bound if the peak falls before the PixArt model is loaded. A ControlNet copy i feeds base
block i + 1, so ControlNet workflows need --depth >= 2 and run depth - 1 copies. Training runs at least
2 steps (stock Loss Graph divides by steps - 1). A run that passes --timeout, or whose server the OOM
killer ends, keeps its peak so far and the server-log stage it had reached (a lower bound). Training with gradient
checkpointing also keeps one residual-stream copy and LoRA/optimizer state per block; that part is
added too (see `train_extra_per_block`). The T5, VAE and upscaler are always full size.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import struct
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_CACHE = Path(os.environ.get("PIXART_MEMORY_CACHE", Path.home() / ".cache" / "pixart_workflow_memory"))
FULL_DEPTH = 28
CONTROLNET_COPIES = 13  # the released PixArt-δ ControlNet-Half copies blocks 0..12
# copy i feeds base block i + 1, so a reduced-depth ControlNet run has depth - 1 copies
CONTROLNET_WORKFLOWS = {"controlnet_canny": "pixart_sigma_controlnet_canny.safetensors",
                        "controlnet_hed_alpha": "PixArt-XL-2-1024-ControlNet.pth"}
TRAIN_MIN_STEPS = 2  # the stock LossGraphNode divides by steps - 1
ESRGAN_X4 = dict(num_feat=64, num_block=23, num_grow=32)  # RealESRGAN_x4plus
STEP_KEYS = {"PixArtSuiteSampler": "steps", "KSampler": "steps", "PixArtSuiteSigmas": "steps", "TrainLoraNode": "steps"}
KV_CLASS = "PixArtSuiteKVCompression"
WORKFLOWS = ("txt2img_1024", "img2img", "controlnet_canny", "txt2img_2k", "train_lora", "txt2img_4k_kv_compression",
             "ksampler_stock", "sampler_custom_advanced", "hires_fix_1024_to_2k", "train_lora_resolution_2k",
             "train_lora_kv_compression_4k", "upscale_refine_4k", "controlnet_hed_alpha")
T5_XXL = dict(d_model=4096, d_ff=10240, heads=64, d_kv=64, layers=24, vocab=32128)
GIB = 2 ** 30

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
log = logging.getLogger("workflow_memory")


# ---------------------------------------------------------------------------------------------
# byte arithmetic (unit-tested: tests/test_workflow_memory.py)
# ---------------------------------------------------------------------------------------------

def block_param_count(hidden: int = 1152, caption: int = 4096, mlp_ratio: float = 4.0) -> int:
    """Parameters of one PixArt DiT block: self-attn qkv+proj, cross-attn q, kv, proj, the MLP and the
    6 x hidden scale_shift_table (the caption projection is outside the blocks)."""
    d, f = hidden, int(hidden * mlp_ratio)
    attn = 3 * d * d + 3 * d + d * d + d
    cross = d * d + d + 2 * d * d + 2 * d + d * d + d  # kv read the projected caption (width d)
    mlp = d * f + f + f * d + d
    return attn + cross + mlp + 6 * d


def t5_param_count(d_model: int, d_ff: int, heads: int, d_kv: int, layers: int, vocab: int) -> int:
    inner = heads * d_kv
    layer = 4 * d_model * inner + 3 * d_model * d_ff + 2 * d_model
    return vocab * d_model + layers * layer + 32 * heads + d_model


def missing_bytes(depth: int, full: int, bytes_per_block: int) -> int:
    """What the blocks left out of a reduced-depth run would have added."""
    if not 0 < depth <= full:
        raise ValueError(f"depth {depth} must be in 1..{full}")
    return (full - depth) * bytes_per_block


def train_extra_per_block(tokens: int, hidden: int = 1152, rank: int = 16, batch: int = 1,
                          act_bytes: int = 2, lora_bytes: int = 4, lora_linears=None) -> int:
    """Per block, training keeps one checkpointed residual stream (tokens x hidden in the training
    dtype) and the LoRA parameters with their gradient and two AdamW moments (4 copies, lora dtype)."""
    d, f = hidden, hidden * 4
    lora_linears = lora_linears or [(d, 3 * d), (d, d), (d, d), (d, 2 * d), (d, d), (d, f), (f, d)]
    lora = sum(rank * (i + o) for i, o in lora_linears)
    return batch * tokens * hidden * act_bytes + 4 * lora * lora_bytes


# ---------------------------------------------------------------------------------------------
# real-size random weights
# ---------------------------------------------------------------------------------------------

def write_safetensors_streamed(path: Path, specs: list[tuple[str, tuple[int, ...]]], fill, dtype="F16") -> Path:
    """A safetensors file written tensor by tensor (header first), so no tensor set is held at once.
    ``fill(name, shape)`` returns the tensor in ``dtype``."""
    size = {"F16": 2, "F32": 4}[dtype]
    header, offset = {}, 0
    for name, shape in specs:
        n = math.prod(shape) * size
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(path.suffix + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in specs:
            t = fill(name, shape).contiguous()
            f.write(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    tmp.replace(path)
    return path


def t5_specs(d_model, d_ff, heads, d_kv, layers, vocab) -> list[tuple[str, tuple[int, ...]]]:
    inner = heads * d_kv
    specs = [("shared.weight", (vocab, d_model))]
    for i in range(layers):
        a, m = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        specs += [(a + f"SelfAttention.{p}.weight", (inner, d_model)) for p in "qkv"]
        specs.append((a + "SelfAttention.o.weight", (d_model, inner)))
        if i == 0:
            specs.append((a + "SelfAttention.relative_attention_bias.weight", (32, heads)))
        specs.append((a + "layer_norm.weight", (d_model,)))
        specs += [(m + "DenseReluDense.wi_0.weight", (d_ff, d_model)), (m + "DenseReluDense.wi_1.weight", (d_ff, d_model)),
                  (m + "DenseReluDense.wo.weight", (d_model, d_ff)), (m + "layer_norm.weight", (d_model,))]
    specs.append(("encoder.final_layer_norm.weight", (d_model,)))
    return specs


def write_t5(path: Path) -> Path:
    import torch
    g = torch.Generator().manual_seed(0)

    def fill(name, shape):
        if name.endswith("layer_norm.weight"):
            return torch.ones(shape, dtype=torch.float16)
        std = 1.0 if name == "shared.weight" or "relative" in name else shape[-1] ** -0.5
        return torch.randn(shape, generator=g, dtype=torch.float32).mul_(std).half()

    return write_safetensors_streamed(path, t5_specs(**T5_XXL), fill)


def pixart_state_dict(preset_name: str, depth: int):
    import torch
    from pixart_core.config import preset
    sys.path.insert(0, str(REPO / "tests"))
    from pixart_fixtures import random_model
    from pixart_core.model import sincos_pos_embed
    config = preset(preset_name).replace(depth=depth, kv_compress_layers=())
    sd = {k: v.detach().float().contiguous() for k, v in random_model(config).state_dict().items()}
    side = config.sample_size // config.patch_size
    sd["pos_embed"] = sincos_pos_embed(side, side, config.hidden_size, config.base_size,
                                       config.pe_interpolation)[None].contiguous()
    return sd, config


def block_bytes(sd: dict, prefix: str = "blocks.0.") -> int:
    return sum(v.numel() * v.element_size() for k, v in sd.items() if k.startswith(prefix))


def write_models(cache: Path, depth: int) -> dict:
    """The model folder for ``depth`` (ComfyUI layout) and the bytes per block for the arithmetic."""
    import torch
    from safetensors.torch import save_file
    models = cache / f"models_depth{depth}"
    info_path = models / "info.json"
    t5 = cache / "shared" / "t5xxl_fp16.safetensors"
    if not t5.is_file():
        log.info("writing the 24-layer T5-XXL fp16 (9.5 GB) to %s", t5)
        write_t5(t5)
    vae = cache / "shared" / "sdxl_vae.safetensors"
    esrgan = cache / "shared" / "RealESRGAN_x4plus.pth"
    if not esrgan.is_file():
        torch.save({"params_ema": rrdbnet_state_dict(**ESRGAN_X4)}, esrgan)
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("controlnet_copies") == controlnet_copies(depth):
            return info
    if not vae.is_file():
        from diffusers import AutoencoderKL
        net = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            sample_size=1024, scaling_factor=0.13025)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(vae))
    info = {"depth": depth}
    for name, preset_name in (("PixArt-Sigma-XL-2-1024-MS.pth", "sigma-1024-ms"), ("PixArt-Sigma-XL-2-2K-MS.pth", "sigma-2k-ms")):
        sd, config = pixart_state_dict(preset_name, depth)
        (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": sd}, models / "diffusion_models" / name)
        info["block_bytes_fp32"] = block_bytes(sd)
        info[f"{name}_bytes"] = (models / "diffusion_models" / name).stat().st_size
    from pixart_core.controlnet import save_controlnet
    from pixart_fixtures import random_controlnet
    from pixart_core.config import preset
    copies = controlnet_copies(depth)
    cn_sd = random_controlnet(preset("sigma-1024-ms"), num_blocks=copies).state_dict()
    # copies 1..12 hold a block and an after_proj; only copy 0 has the before_proj
    info["controlnet_copy_bytes_fp32"] = sum(v.numel() * v.element_size() for k, v in cn_sd.items()
                                             if k.startswith("controlnet.0.") and "before_proj" not in k)
    info["controlnet_copies"] = copies
    save_controlnet(cn_sd, models / "controlnet" / CONTROLNET_WORKFLOWS["controlnet_canny"], layout="diffusers")
    del cn_sd
    # PixArt-α 1024-MS + its HED ControlNet-Half in one official .pth (base_model.*, controlnet.*)
    sd, config = pixart_state_dict("alpha-1024-ms", depth)
    sd = {f"base_model.{k}": v for k, v in sd.items()}
    net = random_controlnet(config, num_blocks=copies).controlnet.state_dict()
    sd.update({f"controlnet.{k}": v.detach().float().contiguous() for k, v in net.items()})
    torch.save({"state_dict": sd}, models / "controlnet" / CONTROLNET_WORKFLOWS["controlnet_hed_alpha"])
    info["alpha_block_bytes_fp32"] = block_bytes(sd, "base_model.blocks.0.")
    info["alpha_controlnet_copy_bytes_fp32"] = block_bytes(sd, "controlnet.0.") - block_bytes(sd, "controlnet.0.before_proj")
    del sd, net
    # the SD1.5 VAE (vae-ft-ema) has the SDXL VAE's architecture and size; only its latent scale differs
    for sub, f, name in (("text_encoders", t5, t5.name), ("vae", vae, vae.name),
                         ("vae", vae, "vae-ft-ema-560000-ema-pruned.safetensors"),
                         ("upscale_models", esrgan, esrgan.name)):
        (models / sub).mkdir(parents=True, exist_ok=True)
        link = models / sub / name
        if not link.exists():
            link.symlink_to(f)
    info_path.write_text(json.dumps(info, indent=2))
    return info


def controlnet_copies(depth: int) -> int:
    return max(depth - 1, 1)


def rrdbnet_state_dict(num_feat: int, num_block: int, num_grow: int, scale: int = 4, seed: int = 0) -> dict:
    """Real-ESRGAN's RRDBNet in its own key names (conv_first, body.N.rdbK.convJ, conv_body, conv_upI,
    conv_hr, conv_last), random values."""
    import torch
    g = torch.Generator().manual_seed(seed)

    def conv(prefix, n_in, n_out):
        return {prefix + "weight": torch.randn(n_out, n_in, 3, 3, generator=g) * (n_in * 9) ** -0.5,
                prefix + "bias": torch.zeros(n_out)}

    sd = conv("conv_first.", 3, num_feat)
    for b in range(num_block):
        for k in (1, 2, 3):
            for j in range(1, 6):
                sd.update(conv(f"body.{b}.rdb{k}.conv{j}.", num_feat + (j - 1) * num_grow, num_feat if j == 5 else num_grow))
    sd.update(conv("conv_body.", num_feat, num_feat))
    for i in range(1, {2: 1, 4: 2}[scale] + 1):
        sd.update(conv(f"conv_up{i}.", num_feat, num_feat))
    sd.update(conv("conv_hr.", num_feat, num_feat))
    sd.update(conv("conv_last.", num_feat, 3))
    return sd


def write_inputs(input_dir: Path, comfy_dir: Path) -> None:
    from PIL import Image
    import numpy as np
    input_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(comfy_dir / "input" / "example.png", input_dir / "example.png")
    data = input_dir / "pixart_lora_dataset"
    data.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"a photo number {i} of a small cactus")
    sys.path.insert(0, str(REPO / "tests" / "e2e"))
    from controlnet_model_fixtures import HED_MAP, write_hed_map
    write_hed_map(input_dir / HED_MAP, 1024, 1024)


# ---------------------------------------------------------------------------------------------
# measuring one workflow in its own server process
# ---------------------------------------------------------------------------------------------

def read_status(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def log_stage(text: str, previous: str) -> str:
    """The last server-log line that is not a progress bar: which loader / node is running."""
    for line in reversed(text.replace("\r", "\n").splitlines()):
        line = line.strip()
        if line and "it/s]" not in line and "s/it]" not in line and "%|" not in line:
            return line[:120]
    return previous


class Sampler(threading.Thread):
    """Samples /proc/<pid>/status; also keeps the peak per stage of the server log, so a run stopped
    at its time cap still says what it had reached and what each stage needed."""

    def __init__(self, pid: int, log_path: Path | None = None, every: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.every, self.stop_flag = pid, every, threading.Event()
        self.log_path, self.log_offset = log_path, log_path.stat().st_size if log_path and log_path.exists() else 0
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.at_peak = {}
        self.last = {}
        self.stage, self.stages = "start", {}  # stage -> [first seen s, peak VmRSS, peak RssAnon]
        self.t0 = time.monotonic()

    def _read_stage(self):
        if self.log_path is None:
            return
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                new = f.read()
        except OSError:
            return
        if new:
            self.log_offset += len(new)
            self.stage = log_stage(new.decode("utf-8", "replace"), self.stage)

    def run(self):
        n = 0
        while not self.stop_flag.is_set():
            try:
                s = read_status(self.pid)
            except (OSError, ValueError):
                break
            if n % 10 == 0:
                self._read_stage()
            n += 1
            self.last = s
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s.get(k, 0))
            if s.get("VmRSS", 0) >= self.peak["VmRSS"]:
                self.at_peak = {**s, "stage": self.stage}
            st = self.stages.setdefault(self.stage, [round(time.monotonic() - self.t0), 0, 0])
            st[1], st[2] = max(st[1], s.get("VmRSS", 0)), max(st[2], s.get("RssAnon", 0))
            time.sleep(self.every)


def prepare_prompt(host, name: str, steps: int, depth: int) -> dict:
    from run_workflow import to_api
    from comfy_host import load_workflow
    api = to_api(host, load_workflow(REPO / "workflows" / f"{name}.json"))
    for entry in api.values():
        key = STEP_KEYS.get(entry["class_type"])
        if key:
            entry["inputs"][key] = max(steps, TRAIN_MIN_STEPS) if entry["class_type"] == "TrainLoraNode" else steps
        if entry["class_type"] == KV_CLASS and depth < FULL_DEPTH:
            # the blocks that stay uncompressed (0-13) are the larger per-block peak: run them
            entry["inputs"]["layers"] = "none"
    return api


def measure(name: str, models: Path, base: Path, steps: int, depth: int, timeout: float) -> dict:
    import comfy_host
    comfy_dir = comfy_host.ensure_host()
    if base.exists():
        shutil.rmtree(base)
    host = comfy_host.ComfyHost(base, comfy_dir=comfy_dir, cpu=True)
    comfy_host.link_models(models, host.models_dir)
    write_inputs(host.input_dir, comfy_dir)
    t0 = time.monotonic()
    with host:
        idle = read_status(host.proc.pid)
        api = prepare_prompt(host, name, steps, depth)
        sampler = Sampler(host.proc.pid, host.log_path)
        sampler.start()
        capped, killed = False, None
        try:
            entry = host.wait(host.queue(api), timeout=timeout, poll=0.5)
            ok, error = True, None
            del entry
        except (comfy_host.HostError, OSError) as e:
            ok, error = False, str(e)[:2000]
            capped = "not finished after" in str(e)
            # the kernel's OOM killer ends the server with SIGKILL: its peak so far is a lower bound
            time.sleep(1)
            if host.proc.poll() is not None:
                killed = host.proc.returncode
        sampler.stop_flag.set()
        sampler.join()
        if killed is not None:
            return {"workflow": name, "ok": False, "error": error, "steps": steps, "depth": depth,
                    "wall_s": round(time.monotonic() - t0, 1), "idle": idle, "peak_vmhwm": sampler.peak["VmRSS"],
                    "peak_sampled": sampler.peak, "at_peak": sampler.at_peak, "capped": False, "killed": killed,
                    "timeout_s": timeout, "stages": sampler.stages, "last_stage": sampler.stage}
        final = read_status(host.proc.pid)
    return {"workflow": name, "ok": ok, "error": error, "steps": steps, "depth": depth,
            "wall_s": round(time.monotonic() - t0, 1), "idle": idle, "peak_vmhwm": final.get("VmHWM"),
            "peak_sampled": sampler.peak, "at_peak": sampler.at_peak, "capped": capped,
            "timeout_s": timeout, "stages": sampler.stages, "last_stage": sampler.stage}


TRAIN_TOKENS = {"train_lora": 4096, "train_lora_resolution_2k": 16384, "train_lora_kv_compression_4k": 16384}
TWO_MODELS = {"hires_fix_1024_to_2k"}  # the 1024 and the 2K model are both loaded


def extrapolate(result: dict, info: dict, cn_copies: int = CONTROLNET_COPIES) -> dict:
    """The 28-block figures: the measured peaks plus the weights (fp32, as ComfyUI keeps them on the CPU)
    of the blocks left out, the ControlNet copies left out, and for training the per-block extras."""
    name, depth = result["workflow"], result["depth"]
    add = missing_bytes(depth, FULL_DEPTH, info["block_bytes_fp32"]) * (2 if name in TWO_MODELS else 1)
    if name == "controlnet_hed_alpha":  # the α base replaces the Σ one
        add = missing_bytes(depth, FULL_DEPTH, info["alpha_block_bytes_fp32"])
        add += missing_bytes(info["controlnet_copies"], cn_copies, info["alpha_controlnet_copy_bytes_fp32"])
    elif name == "controlnet_canny":
        add += missing_bytes(info.get("controlnet_copies", depth), cn_copies, info["controlnet_copy_bytes_fp32"])
    if name in TRAIN_TOKENS:
        add += missing_bytes(depth, FULL_DEPTH, train_extra_per_block(TRAIN_TOKENS[name]))
    return {"added_bytes": add, "peak_full_bytes": result["peak_vmhwm"] + add,
            "peak_anon_full_bytes": result["peak_sampled"]["RssAnon"] + add}


def run_label(r: dict) -> str:
    label = f"d = {r['depth']}, {r['steps']} step{'s' if r['steps'] > 1 else ''}"
    if r["workflow"] in TRAIN_TOKENS:
        label += f", {max(r['steps'], TRAIN_MIN_STEPS)} training steps"
    return label


def table(results: list[dict]) -> str:
    lines = ["| workflow | measured: peak RSS / peak anonymous (depth, steps) | + left-out blocks | "
             "**peak RSS, 28 blocks** | **peak anonymous, 28 blocks** | run (s) |",
             "|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (WORKFLOWS.index(r["workflow"]) if r["workflow"] in WORKFLOWS else 99,
                                            r["depth"], r["steps"])):
        if r.get("killed") is not None:
            lines.append(f"| `{r['workflow']}` | server killed (exit {r['killed']}, the kernel's OOM killer on this "
                         f"23 GiB machine) in \"{r['last_stage'][:70]}\": "
                         f"{r['peak_vmhwm'] / GIB:.2f} / {r['peak_sampled']['RssAnon'] / GIB:.2f} GiB last sampled "
                         f"({run_label(r)}) | "
                         f"{r['added_bytes'] / GIB:.2f} GiB | **> {r['peak_full_bytes'] / GIB:.1f} GiB** | "
                         f"**> {r['peak_anon_full_bytes'] / GIB:.1f} GiB** | {r['wall_s']:.0f} |")
            continue
        if r.get("capped"):
            lines.append(f"| `{r['workflow']}` | stopped at the {r['timeout_s']:.0f} s cap in \"{r['last_stage'][:70]}\": "
                         f"{r['peak_vmhwm'] / GIB:.2f} / {r['peak_sampled']['RssAnon'] / GIB:.2f} GiB so far "
                         f"({run_label(r)}) | "
                         f"{r['added_bytes'] / GIB:.2f} GiB | **≥ {r['peak_full_bytes'] / GIB:.1f} GiB** | "
                         f"**≥ {r['peak_anon_full_bytes'] / GIB:.1f} GiB** | {r['wall_s']:.0f} |")
            continue
        if not r["ok"]:
            lines.append(f"| `{r['workflow']}` | failed: {(r['error'] or '')[:160]!r} | | | | {r['wall_s']:.0f} |")
            continue
        lines.append(f"| `{r['workflow']}` | {r['peak_vmhwm'] / GIB:.2f} / {r['peak_sampled']['RssAnon'] / GIB:.2f} GiB "
                     f"({run_label(r)}) | "
                     f"{r['added_bytes'] / GIB:.2f} GiB | **{r['peak_full_bytes'] / GIB:.1f} GiB** | "
                     f"**{r['peak_anon_full_bytes'] / GIB:.1f} GiB** | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def report(path: Path) -> str:
    """Recompute the 28-block figures of every stored run and rewrite the .md table."""
    done = json.loads(path.read_text())
    for r in done["runs"]:
        if r["ok"] or r.get("capped") or r.get("killed") is not None:
            r.update(extrapolate(r, done["info"][f"depth{r['depth']}"]))
    path.write_text(json.dumps(done, indent=2))
    text = table(done["runs"])
    path.with_suffix(".md").write_text(text + "\n")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflows", nargs="*", default=list(WORKFLOWS))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=RESULTS / "workflow_memory-cpu.json")
    parser.add_argument("--report", action="store_true", help="only recompute the table from --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.report:
        print(report(args.out))
        return 0
    if args.depth < 2 and set(args.workflows) & set(CONTROLNET_WORKFLOWS):
        parser.error("the ControlNet workflows need --depth 2 or more: ControlNet copy i feeds base block i + 1")
    info = write_models(args.cache, args.depth)
    done = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": []}
    for name in args.workflows:
        log.info("== %s (depth %d, %d step)", name, args.depth, args.steps)
        r = measure(name, args.cache / f"models_depth{args.depth}", args.cache / "base", args.steps, args.depth, args.timeout)
        if r["ok"] or r["capped"] or r.get("killed") is not None:
            r.update(extrapolate(r, info))
        log.info("%s: %s", name, json.dumps({k: r.get(k) for k in ("ok", "peak_vmhwm", "peak_full_bytes", "wall_s", "error")}))
        done["runs"] = [x for x in done["runs"] if (x["workflow"], x["depth"], x["steps"]) != (name, args.depth, args.steps)]
        done["runs"].append(r)
        done["info"] = {**done.get("info", {}), f"depth{args.depth}": info}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(done, indent=2))
    print(report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
