"""Property-based fuzzing (hypothesis) of everything a user or a downloaded file controls.

Targets: the KV layer-list parser, the aspect-ratio bin and size functions, the command line's
argument parsing, checkpoint key/config detection on random and mutated state dicts, and the
readers of untrusted files (JSON configs, .pth pickles, .safetensors headers).

Two properties for every example:
- nothing raises but the pack's own InputError (CheckpointError and T5LoadError are InputErrors),
  or argparse's usage exit for the command line;
- nothing allocates without a bound: while the examples run, the process's address space is capped
  at what it uses plus 1 GiB, and the pack is told the device has 64 MiB, so an allocation the pack
  did not size-check first fails the test (as MemoryError or torch's allocator error).

Runs are deterministic (derandomize, no example database) and small enough for CI.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import resource
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixart_core import bins, checks
from pixart_core.__main__ import build_parser
from pixart_core.checks import InputError
from pixart_core.config import tiny
from pixart_core.files import read_json_object, torch_load
from pixart_core.loading import (RawCheckpoint, _strip_prefix, build_model, check_diffusers_config, detect_config,
                                 detect_layout, diffusers_to_official, official_to_diffusers, read_safetensors)
from pixart_core.model import parse_layers
from tests.pixart_fixtures import random_model

FAKE_DEVICE_MEMORY = 64 << 20


def fuzz(n):
    return settings(max_examples=n, derandomize=True, database=None, deadline=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


@pytest.fixture
def bounded(monkeypatch):
    """The pack believes the device has 64 MiB; the process may grow by at most 1 GiB."""
    monkeypatch.setattr(checks, "device_memory", lambda device="cpu": FAKE_DEVICE_MEMORY)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _address_space() + (1 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def only_our_errors(fn, *args, **kwargs):
    """fn's result, or None when it raised the pack's InputError; anything else propagates (a failure)."""
    try:
        return fn(*args, **kwargs)
    except InputError:
        return None


# -------------------------------------------------------------------------------------------------
# the layer-list parser
# -------------------------------------------------------------------------------------------------

numbers_text = st.one_of(st.integers(0, 40).map(str), st.integers(0, 10 ** 30).map(str), st.just("9" * 5000))
layer_item = st.one_of(numbers_text, st.tuples(numbers_text, numbers_text).map("-".join),
                       st.tuples(numbers_text, numbers_text).map(lambda t: f" {t[0]} - {t[1]} "))
layer_text = st.one_of(st.lists(layer_item, min_size=1, max_size=8).map(",".join),
                       st.text(max_size=40), st.sampled_from(["all", "none", "off", "", " ALL ", "-", "1--2", "1,,2"]))


@fuzz(300)
@given(text=layer_text, depth=st.one_of(st.none(), st.integers(1, 64)))
def test_layer_parser(bounded, text, depth):
    layers = only_our_errors(parse_layers, text, depth)
    if layers is not None:
        assert list(layers) == sorted(set(layers))
        assert all(0 <= i < (depth or 0) for i in layers)


# -------------------------------------------------------------------------------------------------
# bins and sizes
# -------------------------------------------------------------------------------------------------

any_number = st.one_of(st.integers(-10 ** 30, 10 ** 30), st.integers(-4, 20000),
                       st.floats(allow_nan=True, allow_infinity=True), st.booleans())
resolutions = st.one_of(st.sampled_from([256, 512, 1024, 2048, 2880, 4096]), st.integers(-10, 10 ** 6))


@fuzz(300)
@given(h=any_number, w=any_number, resolution=resolutions, table=st.sampled_from(["full", "test", "TEST", ""]))
def test_nearest_bin(bounded, h, w, resolution, table):
    result = only_our_errors(bins.nearest_bin, h, w, resolution, table)
    if result is not None:
        assert result in bins.get_table(resolution, table).values()


@fuzz(200)
@given(h=any_number, w=any_number, max_side=st.integers(-10, 10 ** 6), allow_larger=st.booleans())
def test_check_size(bounded, h, w, max_side, allow_larger):
    result = only_our_errors(bins.check_size, h, w, max_side, allow_larger)
    if result is not None:
        assert all(v > 0 and v % 16 == 0 for v in result)


@fuzz(120)
@given(shape=st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 24), st.integers(0, 24)),
       height=st.one_of(st.integers(-3, 64), st.integers(-3, 200_000)),
       width=st.one_of(st.integers(-3, 64), st.integers(-3, 200_000)))
def test_resize_and_center_crop(bounded, shape, height, width):
    images = torch.rand(shape)
    out = only_our_errors(bins.resize_and_center_crop, images, height, width)
    if out is not None:
        assert out.shape == (*shape[:2], height, width)


# -------------------------------------------------------------------------------------------------
# command-line arguments
# -------------------------------------------------------------------------------------------------

PARSER = build_parser()
SUBCOMMANDS = {a.dest: a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)}["command"].choices
words = st.one_of(st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1", "2", "1e3", "1e999", "0x10", "4097", "16385",
                                   "18446744073709551616", "18446744073709551615", "0-99999999999999999999", "all",
                                   "", "-"]),
                  st.integers(-10 ** 25, 10 ** 25).map(str), st.floats().map(str),
                  st.text(alphabet=string.printable, max_size=12))


@st.composite
def command_lines(draw):
    name = draw(st.sampled_from(sorted(SUBCOMMANDS)))
    options = [o for a in SUBCOMMANDS[name]._actions for o in a.option_strings if o not in ("-h", "--help")]
    argv = [name]
    for _ in range(draw(st.integers(0, 6))):
        argv.append(draw(st.sampled_from(options)) if options else "--x")
        argv.append(draw(words))
    argv += draw(st.lists(words, max_size=3))  # positionals
    return argv


@fuzz(300)
@given(argv=command_lines())
def test_command_line_parsing(bounded, argv):
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            args = PARSER.parse_args(argv)
    except SystemExit as e:
        assert e.code == 2  # argparse's usage error: one line naming the option
        return
    if getattr(args, "seed", None) is not None:
        assert 0 <= args.seed <= checks.SEED_MAX
    for name in ("guidance",):
        if getattr(args, name, None) is not None:
            assert math.isfinite(getattr(args, name))
    for name in ("batch", "steps", "height", "width", "kv_ratio", "max_length"):
        if getattr(args, name, None) is not None:
            assert isinstance(getattr(args, name), int) and getattr(args, name) >= 1
    if getattr(args, "kv_layers", None) is not None:
        parse_layers(args.kv_layers, None)


# -------------------------------------------------------------------------------------------------
# checkpoint detection on random and mutated state dicts
# -------------------------------------------------------------------------------------------------

BASE = {k: v.clone() for k, v in random_model(tiny(depth=2)).state_dict().items()}
BASE_KEYS = sorted(BASE)
small_shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)


# weighted: most mutations keep the file recognisable, so detection and building get exercised too
MUTATIONS = ["drop", "reshape", "reshape", "reshape", "dtype", "dtype", "rename", "junk", "block", "block", "prefix",
             "empty"]


@st.composite
def mutated_state_dicts(draw):
    sd = dict(BASE)
    if draw(st.booleans()):
        sd = official_to_diffusers(sd)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(MUTATIONS))
        key = draw(st.sampled_from(sorted(sd) or ["x"]))
        if kind == "drop":
            sd.pop(key, None)
        elif kind == "reshape":
            sd[key] = torch.zeros(draw(small_shapes))
        elif kind == "dtype":
            dtype = draw(st.sampled_from([torch.int64, torch.bool, torch.float16, torch.uint8]))
            sd[key] = torch.zeros(3, 3, dtype=dtype)
        elif kind == "rename":
            sd[draw(st.text(max_size=30))] = sd.pop(key, torch.zeros(1))
        elif kind == "junk":
            sd[draw(st.text(max_size=30))] = torch.zeros(draw(small_shapes))
        elif kind == "block":
            index = draw(st.one_of(st.integers(0, 40), st.integers(10 ** 5, 10 ** 30)))
            sd[f"blocks.{index}.attn.sr.weight"] = torch.zeros(draw(small_shapes))
            sd[f"transformer_blocks.{index}.attn1.to_q.weight"] = torch.zeros(draw(small_shapes))
        elif kind == "prefix":
            sd = {"model.diffusion_model." + k: v for k, v in sd.items()}
        elif kind == "empty":
            sd = {}
    return sd


def load_state_dict(sd, diffusers_config=None):
    sd = _strip_prefix(sd)
    layout = detect_layout(sd, "fuzz.safetensors")
    if layout == "diffusers":
        sd = diffusers_to_official(sd, "fuzz.safetensors")
    raw = RawCheckpoint("fuzz.safetensors", sd, layout,
                        None if diffusers_config is None else check_diffusers_config(diffusers_config, "config.json"))
    config, _ = detect_config(raw)
    return build_model(config, sd, "fuzz.safetensors")


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10 ** 20, 10 ** 20), st.floats(),
                                     st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=6)
diffusers_configs = st.one_of(st.none(), st.fixed_dictionaries(
    {}, optional={k: json_values for k in ("num_attention_heads", "sample_size", "interpolation_scale",
                                           "num_layers", "caption_channels")}))


def test_unmutated_state_dict_loads():
    assert load_state_dict(dict(BASE)).config.depth == 2  # the fuzz starts from a valid model


@fuzz(150)
@given(sd=mutated_state_dicts(), config=diffusers_configs)
def test_checkpoint_detection_on_mutated_state_dicts(bounded, sd, config):
    model = only_our_errors(load_state_dict, sd, config)
    if model is not None:
        assert model.config.depth >= 1


@fuzz(60)
@given(sd=st.dictionaries(st.text(max_size=40), small_shapes.map(torch.zeros), max_size=8))
def test_checkpoint_detection_on_random_state_dicts(bounded, sd):
    only_our_errors(load_state_dict, sd)


# -------------------------------------------------------------------------------------------------
# untrusted files: JSON configs, pickles, safetensors headers
# -------------------------------------------------------------------------------------------------

@fuzz(100)
@given(data=st.one_of(st.binary(max_size=200), json_values.map(lambda v: repr(v).encode()),
                      st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n)))
def test_json_reader(bounded, tmp_path, data):
    path = tmp_path / "config.json"
    path.write_bytes(data)
    config = only_our_errors(read_json_object, path)
    assert config is None or isinstance(config, dict)


def _pth_bytes():
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.arange(12.0).reshape(3, 4)}}, buf)
    return buf.getvalue()


def _safetensors_bytes():
    from safetensors.torch import save
    return save({"w": torch.arange(12.0).reshape(3, 4), "b": torch.zeros(5)})


@st.composite
def mutated_bytes(draw, base):
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "cut", "digits"]))
        if kind == "flip":
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:]
            if not data:
                break
        else:  # forged sizes: a run of large digits in a header or pickle
            data[at:at + 4] = b"9999"
    return bytes(data)


ORIGINALS = {"model.pth": (_pth_bytes(), torch_load), "model.safetensors": (_safetensors_bytes(), read_safetensors)}


@pytest.mark.parametrize("name", sorted(ORIGINALS))
@fuzz(80)
@given(data=st.data())
def test_readers_on_mutated_files(bounded, tmp_path, name, data):
    original, reader = ORIGINALS[name]
    path = tmp_path / name
    path.write_bytes(data.draw(mutated_bytes(original)))
    only_our_errors(reader, path)
