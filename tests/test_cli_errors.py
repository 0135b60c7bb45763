"""The command line given bad options, bad files and bad destinations, each run as a real subprocess
(`python -m pixart_core ...`): exit status 2, one line saying what to do, no traceback, inputs intact,
and destinations refused before any work (issue #10, cases 1-4, 5 and 7).

All the commands are started at once (a few at a time) by one fixture; each test reads its result.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from pixart_core.__main__ import main
from pixart_core.config import tiny
from pixart_core.loading import save_checkpoint
from tests.pixart_fixtures import random_model
from tests.t5_fixtures import write_tiny_t5_hf_folder

REPO = Path(__file__).resolve().parent.parent
PYTHON_OBJECTS = ("refused - the file contains Python objects, not just tensors, and loading it could run code; "
                  "convert it to .safetensors with a trusted tool")


def _unwritable_folder(tmp: Path) -> Path:
    """A folder this process cannot create files in: chmod for a normal user; root ignores modes, so
    a read-only system folder then (as the issue's read-only destination)."""
    if os.geteuid() != 0:
        folder = tmp / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    for candidate in ("/sys", "/proc/sys"):
        try:
            Path(candidate, ".pixart-probe").touch()
        except OSError:
            return Path(candidate)
    pytest.skip("no read-only folder available to root here")


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    model = random_model(tiny(model_max_length=300))
    pth = save_checkpoint(model.state_dict(), model.config, tmp / "tiny-256.pth")  # the name gives the size
    (tmp / "link.pth").symlink_to(pth)
    os.link(pth, tmp / "hard.pth")
    t5 = write_tiny_t5_hf_folder(tmp / "t5" / "text_encoder")
    (tmp / "a-folder").mkdir()
    readonly = _unwritable_folder(tmp)
    for name, inner, text in [("bad-json", "config.json", '{"sample_size": 128,\n  "num_layers": }'),
                              ("json-list", "config.json", "[1, 2, 3]"),
                              ("big-sample", "transformer/config.json",
                               json.dumps({"_class_name": "PixArtTransformer2DModel", "sample_size": "big"}))]:
        (tmp / name / inner).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name / inner).write_text(text)
    marker = tmp / "payload-ran"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Payload(marker)}, tmp / "evil.pth")

    gen = ["generate", "--model", str(pth), "--t5", str(t5), "--t5-dtype", "fp32", "--prompt", "a cat",
           "--height", "256", "--width", "256", "--steps", "2"]
    enc = ["encode", "--t5", str(t5), "--t5-dtype", "fp32", "--prompt", "a cat"]
    cases = {
        "seed -1": gen + ["--seed", "-1", str(tmp / "o.latent")],
        "seed 2**64": gen + ["--seed", str(2 ** 64), str(tmp / "o.latent")],
        "batch 0": gen + ["--batch", "0", str(tmp / "o.latent")],
        "guidance nan": gen + ["--guidance", "nan", str(tmp / "o.latent")],
        "huge layer range": gen + ["--kv-layers", "0-99999999999999999999", str(tmp / "o.latent")],
        "convert onto itself": ["convert", str(pth), str(pth)],
        "convert onto a symlink to the input": ["convert", str(pth), str(tmp / "link.pth")],
        "generate into missing folders": gen + [str(tmp / "new" / "deeper" / "o.latent")],
        "generate into a read-only folder": gen + [str(readonly / "o.latent")],
        "generate onto a folder": gen + [str(tmp / "a-folder")],
        "config with bad JSON": ["inspect", str(tmp / "bad-json")],
        "config that is a JSON list": ["inspect", str(tmp / "json-list")],
        "config field of the wrong type": ["inspect", str(tmp / "big-sample")],
        "malicious pickle as the T5": ["encode", "--t5", str(tmp / "evil.pth"), "--tokenizer", str(t5),
                                       "--prompt", "a cat", str(tmp / "e.safetensors")],
    }
    argv = {name: [sys.executable, "-m", "pixart_core", *args] for name, args in cases.items()}
    # undecodable bytes on the command line arrive as lone surrogates (surrogateescape)
    argv["prompt with bytes that are not UTF-8"] = [
        os.fsencode(a) for a in [sys.executable, "-m", "pixart_core", *enc[:-1]]] + [
        b"a cat \xff\xfe on a mat", os.fsencode(str(tmp / "e.safetensors"))]
    before = sha(pth)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8"}

    def run(args):
        return subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp, timeout=300)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(argv, pool.map(run, argv.values())))
    return {"tmp": tmp, "results": results, "pth": pth, "before": before, "marker": marker, "readonly": readonly,
            "gen": gen, "enc": enc}


def in_process(argv, capsys) -> str:
    """The last stderr line of main(argv), which must return 2: the cheaper variants of the cases above."""
    assert main(argv) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def refused(cli, case: str) -> str:
    """The one-line message of a command that must exit with status 2 and no traceback."""
    r = cli["results"][case]
    assert r.returncode == 2, (case, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    return last


@pytest.mark.parametrize("case, message", [
    ("seed -1", "error: argument --seed: must be a whole number from 0 to 18446744073709551615, got -1"),
    ("seed 2**64", "error: argument --seed: must be a whole number from 0 to 18446744073709551615, "
                   "got 18446744073709551616"),
    ("batch 0", "error: argument --batch: must be a whole number from 1 to 4096, got 0"),
    ("guidance nan", "error: argument --guidance: must be a finite number, got nan"),
    ("huge layer range", "error: argument --kv-layers: layers names layer 999999999..., which no model has; "
                         "use numbers like 14-27, or all"),
])
def test_bad_numbers_are_refused_by_the_argument_parser(cli, case, message):
    # one line: the sentence and where the help is, not argparse's whole usage text
    assert refused(cli, case).endswith(f"{message} (see python -m pixart_core generate --help)")


def test_layers_beyond_the_depth_name_it(cli, capsys):
    argv = cli["gen"] + ["--kv-layers", "0-40", str(cli["tmp"] / "o.latent")]
    assert in_process(argv, capsys) == ("error: layers '0-40' names layer 40, but this model has layers 0-1; "
                                        "use numbers up to 1 or all")


@pytest.mark.parametrize("case, output", [("convert onto itself", "tiny-256.pth"),
                                          ("convert onto a symlink to the input", "link.pth"),
                                          ("hard link (in process)", "hard.pth")])
def test_an_output_that_is_the_input_is_refused_and_the_input_kept(cli, case, output, capsys):
    # it died with SIGBUS and left a 4 KB unreadable file (issue #10, case 2)
    same = "" if output == "tiny-256.pth" else f" (the same file as {cli['pth']})"
    message = (in_process(["convert", str(cli["pth"]), str(cli["tmp"] / output)], capsys) if "in process" in case
               else refused(cli, case))
    assert message == (f"error: output {cli['tmp'] / output} is an input of this command{same}; writing it would "
                       "destroy the input - choose another output name")
    assert sha(cli["pth"]) == cli["before"]


def test_missing_output_folders_are_created(cli):
    r = cli["results"]["generate into missing folders"]
    assert r.returncode == 0, r.stderr
    out = cli["tmp"] / "new" / "deeper" / "o.latent"
    assert r.stdout.startswith(f"wrote {out}: 256x256 px latents")
    from safetensors.torch import load_file
    assert load_file(str(out))["latent_tensor"].shape == (1, 4, 32, 32)
    assert not [p for p in out.parent.iterdir() if p.name != "o.latent"]  # no temporary file left behind


@pytest.mark.parametrize("case, words", [
    ("generate into a read-only folder", "cannot write in {readonly}"),
    ("generate onto a folder", "{tmp}/a-folder is a folder; give the name of a file"),
])
def test_bad_destinations_are_refused_before_the_work(cli, case, words):
    # they failed only after sampling, with a raw SafetensorError/PermissionError (issue #10, case 3)
    message = refused(cli, case)
    assert words.format(readonly=cli["readonly"], tmp=cli["tmp"]) in message, message
    assert "Loaded T5 encoder" not in cli["results"][case].stderr  # nothing was loaded, let alone sampled


def test_encode_and_convert_check_their_destinations_too(cli, capsys):
    assert in_process(cli["enc"] + [str(cli["tmp"] / "a-folder")], capsys) == (
        f"error: output {cli['tmp'] / 'a-folder'} is a folder; give the name of a file (in it, or elsewhere)")
    assert in_process(["convert", str(cli["pth"]), str(cli["readonly"] / "x.safetensors")], capsys).startswith(
        f"error: output {cli['readonly'] / 'x.safetensors'}: cannot write in {cli['readonly']} (")


@pytest.mark.parametrize("case, words", [
    ("config with bad JSON", "bad-json/config.json: invalid JSON at line 2 column 17 (Expecting value); fix the file "
                             "or download it again"),
    ("config that is a JSON list", "json-list/config.json: holds a JSON list, but a configuration is a JSON object"),
    ("config field of the wrong type", "big-sample/transformer/config.json: field sample_size must be a whole "
                                       "number, got 'big' (e.g. 128 for 1024-px models)"),
])
def test_diffusers_config_errors_name_the_file_and_field(cli, case, words):
    # a JSON error without the file name, an AttributeError, a TypeError (issue #10, case 4)
    message = refused(cli, case)
    assert message.startswith(f"error: {cli['tmp']}/") and words in message, message


def test_a_destination_below_a_file_is_refused(cli, capsys):
    message = in_process(["convert", str(cli["pth"]), str(cli["pth"] / "x.safetensors")], capsys)
    assert f"{cli['pth']} cannot be created because a file is in the way" in message


def test_malicious_pickles_get_one_message_from_both_loaders(cli, capsys):
    # the T5 loader called it "truncated or corrupt" and quoted weights_only=False (issue #10, case 5)
    expected = f"error: {cli['tmp'] / 'evil.pth'}: {PYTHON_OBJECTS}"
    assert refused(cli, "malicious pickle as the T5") == expected
    assert in_process(["inspect", str(cli["tmp"] / "evil.pth")], capsys) == expected  # the model loader
    assert not cli["marker"].exists()


def test_undecodable_prompt_bytes_are_replaced_and_reported(cli):
    r = cli["results"]["prompt with bytes that are not UTF-8"]
    assert r.returncode == 0, r.stderr
    assert "2 character(s) that are not valid Unicode text" in r.stderr and "replaced by U+FFFD" in r.stderr
    assert r.stdout.startswith(f"wrote {cli['tmp'] / 'e.safetensors'}: embeds (1, 300, 32)")
