"""pixart_core's input checks and file helpers (checks.py, files.py) and the bounds they put on the
pipeline, the schedule, the bins and the loaders (issue #10). The command line is in test_cli_errors.py,
the nodes on the real host in tests/e2e/test_reliability.py, random inputs in test_fuzz.py."""
from __future__ import annotations

import json
import os
import pickle
import stat
import tempfile

import pytest
import torch
from safetensors.torch import save_file

from pixart_core import bins, checks, schedule
from pixart_core.checks import InputError, clean_text, real_number, whole_number
from pixart_core.config import tiny
from pixart_core.files import atomic_write, prepare_output, read_json_object, save_result, torch_load
from pixart_core.loading import CheckpointError, read_checkpoint, save_checkpoint
from pixart_core.pipeline import Conditioning, generate, sampling_bytes
from tests.pixart_fixtures import random_model


@pytest.fixture
def small_device(monkeypatch):
    """Every device has 64 MiB, so the memory checks can be seen refusing."""
    monkeypatch.setattr(checks, "device_memory", lambda device="cpu": 64 << 20)


# -------------------------------------------------------------------------------------------------
# numbers and text
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    (float("nan"), "guidance must be a finite number, got nan"),
    (float("-inf"), "guidance must be a finite number, got -inf"),
    (10 ** 400, "guidance must be a finite number, got inf"),  # an int beyond float range
    ("4.5", "guidance must be a number, got '4.5'"),
    (True, "guidance must be a number, got True"),
    (101, "guidance must be a number from 0 to 100, got 101"),
], ids=["nan", "-inf", "huge int", "text", "bool", "above"])
def test_real_numbers_are_finite_and_in_range(value, message):
    with pytest.raises(InputError) as e:
        real_number("guidance", value, 0, 100)
    assert str(e.value) == message
    assert real_number("guidance", 4, 0, 100) == 4.0


@pytest.mark.parametrize("value, message", [
    (-1, "seed must be a whole number from 0 to 18446744073709551615, got -1"),
    (2 ** 64, "seed must be a whole number from 0 to 18446744073709551615, got 18446744073709551616"),
    (1.5, "seed must be a whole number, got 1.5"),
    (float("nan"), "seed must be a whole number, got nan"),
])
def test_whole_numbers(value, message):
    with pytest.raises(InputError) as e:
        whole_number("seed", value, 0, checks.SEED_MAX)
    assert str(e.value) == message
    assert whole_number("seed", 7.0, 0, checks.SEED_MAX) == 7 and whole_number("seed", checks.SEED_MAX, 0) == 2 ** 64 - 1


def test_text_that_utf8_cannot_hold_is_replaced_and_counted():
    assert clean_text("a cat") == ("a cat", 0)
    assert clean_text("a \ud800 cat \udcff") == ("a \ufffd cat \ufffd", 2)
    assert clean_text("ünïcode ✓ 猫") == ("ünïcode ✓ 猫", 0)


def test_an_argparse_type_from_a_check():
    parse = checks.argument(whole_number, 1, 4096)
    assert parse("16") == 16 and parse("1e3") == 1000
    with pytest.raises(Exception, match="must be a whole number from 1 to 4096, got 0"):
        parse("0")
    with pytest.raises(Exception, match="must be a whole number, got 'x'"):
        parse("x")


# -------------------------------------------------------------------------------------------------
# bounded work: schedule, bins, sampling
# -------------------------------------------------------------------------------------------------

def test_a_tiny_denoise_cannot_ask_for_an_endless_schedule():
    with pytest.raises(InputError, match=r"denoise 1e-09 with 20 steps would need a 20,000,000,000-step schedule; "
                                         r"use a denoise of at least 2e-05 or fewer steps"):
        schedule.make_sigmas("karras", 20, 1e-9)
    with pytest.raises(InputError, match="denoise must be a finite number, got nan"):
        schedule.make_sigmas("karras", 20, float("nan"))


def test_resize_refuses_a_scale_that_cannot_fit(small_device):
    images = torch.rand(1, 3, 8, 512)
    with pytest.raises(InputError) as e:
        bins.resize_and_center_crop(images, 4096, 16)  # covering 4096 px of height from 8 px: 262144 px wide
    assert str(e.value) == ("covering 16x4096 px from 512x8 px images (scaled to 262144x4096 before the crop) would need "
                            "at least 12.0 GiB, more than the 64.0 MiB of memory this machine has; crop the images "
                            "closer to the wanted aspect ratio first")
    assert bins.resize_and_center_crop(images, 16, 16).shape == (1, 3, 16, 16)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny(model_max_length=8)).eval()


def cond(width=32, length=8):
    return Conditioning(torch.randn(1, length, width), torch.ones(1, length, dtype=torch.long))


def test_generate_refuses_a_batch_that_cannot_fit_with_the_figure(model, small_device):
    need = sampling_bytes(4096, 32, 32, 64, 2)
    with pytest.raises(InputError) as e:
        generate(model, cond(), cond(), height=256, width=256, steps=1, batch=4096)
    assert str(e.value) == (f"sampling 4096 image(s) of 256x256 px would need at least {checks.format_bytes(need)}, "
                            "more than the 64.0 MiB of memory this machine has; use a smaller batch or size")


@pytest.mark.parametrize("change, message", [
    ({"guidance": float("nan")}, "guidance must be a finite number, got nan"),
    ({"denoise": float("inf")}, "denoise must be a finite number, got inf"),
    ({"seed": -1}, "seed must be a whole number from 0 to 18446744073709551615, got -1"),
    ({"batch": 0}, "batch must be a whole number from 1 to 4096, got 0"),
    ({"height": 0}, "height must be a whole number from 1 to 16384, got 0"),
])
def test_generate_refuses_bad_numbers(model, change, message):
    with pytest.raises(InputError) as e:
        generate(model, cond(), cond(), steps=1, **change)
    assert str(e.value) == message


def test_the_largest_seed_works_with_a_stochastic_sampler(model):
    out = generate(model, cond(), cond(), height=256, width=256, steps=2, sampler="sa_solver", seed=checks.SEED_MAX)
    assert torch.isfinite(out.latents).all() and out.seed == 2 ** 64 - 1


# -------------------------------------------------------------------------------------------------
# writing files
# -------------------------------------------------------------------------------------------------

def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.latent"
    target.write_bytes(b"old")
    target.chmod(0o640)
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [target]
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # replacing keeps the permissions


def test_a_new_file_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "new.latent") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new.latent").stat().st_mode) == 0o644


def test_a_result_that_cannot_be_written_is_saved_elsewhere(tmp_path):
    calls = []

    def write(path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        path.write_bytes(b"latents")

    with pytest.raises(InputError) as e:
        save_result(tmp_path / "o.latent", write, "latents")
    rescued = calls[1].parent / e.value.args[0].split(" it was saved to ")[1].split(" instead")[0].rsplit("/", 1)[1]
    try:
        assert str(e.value).startswith(f"could not write the latents to {tmp_path / 'o.latent'} ([Errno 28] No space "
                                       "left on device); it was saved to " + tempfile.gettempdir())
        assert rescued.read_bytes() == b"latents"
    finally:
        rescued.unlink()
    assert not (tmp_path / "o.latent").exists()


def test_prepare_output_refuses_an_input_inside_a_folder_output(tmp_path):
    model = random_model(tiny())
    folder = save_checkpoint(model.state_dict(), model.config, tmp_path / "pixart")  # a diffusers folder
    with pytest.raises(InputError, match="config.json is an input of this command"):
        save_checkpoint(model.state_dict(), model.config, folder, inputs=[folder])
    assert read_checkpoint(folder).layout == "diffusers"  # untouched
    with pytest.raises(InputError, match="is a file, but a folder is written here"):
        prepare_output(tmp_path / "pixart" / "config.json", folder_files=["config.json"])


# -------------------------------------------------------------------------------------------------
# reading untrusted files
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ('{"a": 1,}', "invalid JSON at line 1 column 9 (Expecting property name enclosed in double quotes)"),
    ("[1]", "holds a JSON list, but a configuration is a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "the JSON is nested too deeply to be a configuration file"),
])
def test_json_errors_name_the_file_and_place(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        read_json_object(path)
    assert str(e.value).startswith(f"{path}: {message}")
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(InputError, match="not a text file"):
        read_json_object(path)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo payload",))


def test_pickles_that_torch_save_did_not_write_are_refused(tmp_path):
    torch.save({"w": torch.zeros(1), "x": _Payload()}, tmp_path / "globals.pth")
    with pytest.raises(InputError, match="globals.pth: refused - the file contains Python objects"):
        torch_load(tmp_path / "globals.pth")
    (tmp_path / "raw.pth").write_bytes(pickle.dumps(_Payload(), protocol=4))
    with pytest.raises(InputError, match="raw.pth: refused - it is not a file written by torch.save"):
        torch_load(tmp_path / "raw.pth")
    torch.save({"w": torch.zeros(100)}, tmp_path / "cut.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "cut.pth").read_bytes()[:300])
    with pytest.raises(InputError, match=r"cut.pth: cannot read this file \(RuntimeError: .*\); it is 300 bytes and "
                                         r"looks truncated or corrupt - download it again"):
        torch_load(tmp_path / "cut.pth")


def test_a_shard_index_cannot_point_outside_its_folder(tmp_path):
    model = random_model(tiny())
    folder = save_checkpoint(model.state_dict(), model.config, tmp_path / "pixart")
    (tmp_path / "secret.safetensors").write_bytes(b"")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "secret.safetensors"))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "../secret.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"field weight_map names '../secret.safetensors', which is not a file "
                                              r"in this folder"):
        read_checkpoint(folder)


def test_a_forged_block_index_is_refused_before_building(tmp_path):
    model = random_model(tiny(depth=2))
    sd = dict(model.state_dict())
    sd["blocks.99999.mlp.fc2.bias"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "forged.safetensors"))
    from pixart_core.loading import load_pixart
    with pytest.raises(CheckpointError, match="has blocks up to 99999 but no block 2 - the file is incomplete"):
        load_pixart(tmp_path / "forged.safetensors")
