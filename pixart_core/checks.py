"""Checks of the values people give (node inputs, CLI options, library arguments), each ending in one
sentence that names the value and says what works. Used by the CLI, the pipeline and the ComfyUI nodes.

- whole_number / real_number: type, range, and (for reals) finiteness: NaN and infinities are refused
  everywhere, since a NaN guidance or denoise gives black images or all-NaN latents with no error.
- SEED_MAX: seeds are 0 .. 2**64-1, in ComfyUI and here.
- clean_text: text that cannot be encoded as UTF-8 (lone surrogates from JSON or from undecodable
  command-line bytes) has those characters replaced, and the count is returned so the caller can say so.
- check_fits: refuse an allocation the device can never hold, with the figure, before making it.
- argument: the same checks as argparse `type=` functions.
"""
from __future__ import annotations

import argparse
import math
import numbers
import os

SEED_MAX = 2 ** 64 - 1


class InputError(ValueError):
    """A value, text or file given by the user that cannot be used; the message says what would work."""


def _named(name: str, rest: str) -> str:
    return f"{name} {rest}" if name else rest


def _range_text(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"from {lo} to {hi}"
    if lo is not None:
        return f"of at least {lo}"
    return f"of at most {hi}"


def whole_number(name: str, value, lo: int | None = None, hi: int | None = None, hint: str = "") -> int:
    """`value` as an int within lo..hi (either may be None), or InputError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(_named(name, f"must be a whole number, got {value!r}{hint}"))
    if not isinstance(value, numbers.Integral):
        if not math.isfinite(float(value)) or value != int(value):
            raise InputError(_named(name, f"must be a whole number, got {value!r}{hint}"))
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InputError(_named(name, f"must be a whole number {_range_text(lo, hi)}, got {value}{hint}"))
    return value


def real_number(name: str, value, lo: float | None = None, hi: float | None = None, hint: str = "") -> float:
    """`value` as a finite float within lo..hi (either may be None), or InputError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(_named(name, f"must be a number, got {value!r}{hint}"))
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range
        value = math.inf if value > 0 else -math.inf
    if not math.isfinite(value):
        raise InputError(_named(name, f"must be a finite number, got {value}{hint}"))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InputError(_named(name, f"must be a number {_range_text(lo, hi)}, got {value:g}{hint}"))
    return value


def clean_text(text: str) -> tuple[str, int]:
    """(text with every character UTF-8 cannot encode replaced by U+FFFD, how many were replaced)."""
    if not isinstance(text, str):
        raise InputError(f"the text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        pass
    cleaned = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)  # all UTF-8 refuses
    return cleaned, sum(a != b for a, b in zip(text, cleaned))


def usable_device(device):
    """`device` as a torch.device that works here, or InputError naming it."""
    import torch
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device {str(device)!r} is not a device name; use 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"device {str(device)!r} is not usable here ({reason}); use 'cpu' or an available "
                         "accelerator") from None
    return device


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def device_memory(device="cpu") -> int:
    """Total memory of a device in bytes: an accelerator's own memory, else the machine's RAM."""
    import torch
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: psutil when present, else no limit known
        try:
            import psutil
            return psutil.virtual_memory().total
        except ImportError:
            return 1 << 62


def check_fits(what: str, nbytes: int, device="cpu", advice: str = "") -> None:
    """Refuse `what` when it would need more than the device's whole memory (it could never run)."""
    total = device_memory(device)
    if nbytes > total:
        raise InputError(f"{what} would need at least {format_bytes(nbytes)}, more than the "
                         f"{format_bytes(total)} of memory this {'machine' if str(device) == 'cpu' else 'device'} "
                         f"has{'; ' + advice if advice else ''}")


def cli_type(parse):
    """An argparse `type=` from a function of the word that raises InputError: argparse then prints
    "argument --x: <the message>" and exits with status 2."""
    def convert(text: str):
        try:
            return parse(text)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = getattr(parse, "__name__", "value")  # argparse names the type in some messages
    return convert


def argument(check, *args, **kwargs):
    """An argparse `type=` for a number: the word parsed, then `check("", value, *args)`; e.g.
    ``type=argument(whole_number, 1, 4096)``."""
    def parse(text: str):
        try:
            value = float(text) if check is real_number else int(text)
        except ValueError:
            try:
                value = float(text)  # "1e3" for a whole-number option is checked as one
            except ValueError:
                raise InputError(f"must be {'a number' if check is real_number else 'a whole number'}, "
                                 f"got {text!r}") from None
        return check("", value, *args, **kwargs)

    parse.__name__ = check.__name__
    return cli_type(parse)
