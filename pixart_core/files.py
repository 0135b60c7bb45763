"""Files in and out: untrusted inputs read safely, results written so they are never half-written or lost.

Reading (every loader uses these, so a file gets the same message from each):
- torch_load: `torch.load(weights_only=True)`; a file holding Python objects is refused with one message.
- read_json_object: a JSON object from a config/index file; errors name the file, line and column.
- unreadable: the message for a file that is truncated or corrupt.

Writing (every file the pack writes goes through these):
- prepare_output: check a destination BEFORE the work (not an input, not a folder, writable; missing
  parent folders are created).
- atomic_write: a temporary file in the target folder, fsync, os.replace: readers see the old file or
  the complete new one, and an input still memory-mapped is never overwritten in place.
- save_result: atomic_write, and when even that fails after the work, a copy in the temp folder.
"""
from __future__ import annotations

import json
import os
import re
import stat
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .checks import InputError

MAX_JSON_BYTES = 16 << 20  # configs and shard indexes are kilobytes; anything this big is not one
_INPUT_SCAN_FILES = 10_000  # files of an input folder compared with an output (a model folder has a few)


# -------------------------------------------------------------------------------------------------
# reading
# -------------------------------------------------------------------------------------------------

def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def unreadable(path, err: Exception, error: type[Exception] = InputError) -> Exception:
    """The error for a file a reader failed on: its size, the reader's own words, what to do."""
    path = Path(path)
    try:
        size = f"{path.stat().st_size:,} bytes"
    except OSError:
        size = "unreadable"
    return error(f"{path}: cannot read this file ({type(err).__name__}: {_first_line(err)}); it is {size} and "
                 "looks truncated or corrupt - download it again")


def torch_load(path, error: type[Exception] = InputError):
    """A `.pth`/`.bin`/`.pt` file's contents with `weights_only=True` (a file must not run code),
    memory-mapped when the container allows it. Raises `error` with one sentence."""
    import torch
    path = Path(path)
    try:
        mmap = zipfile.is_zipfile(path)  # torch.save's zip container maps; the legacy format cannot
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises many types here; all mean "unusable file"
        text = str(e)
        if re.search(r"\bglobal\b", text, re.IGNORECASE):  # the safe unpickler met a class or function
            raise error(f"{path}: refused - the file contains Python objects, not just tensors, and loading it "
                        "could run code; convert it to .safetensors with a trusted tool") from None
        if "Unsupported operand" in text:  # pickle opcodes torch.save never writes
            raise error(f"{path}: refused - it is not a file written by torch.save (its pickle data uses "
                        "instructions the safe loader does not accept: it holds Python objects or is corrupt); "
                        "use the .safetensors version or download it again") from None
        raise unreadable(path, e, error) from None


def read_json_object(path, error: type[Exception] = InputError) -> dict:
    """The JSON object in a config or index file; `error` names the file and, for bad JSON, the place."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise error(f"{path}: {size:,} bytes is far too large for a configuration file; it is not one")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: not a text file (byte {e.start} is not UTF-8); download it again") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); "
                    "fix the file or download it again") from None
    except RecursionError:
        raise error(f"{path}: the JSON is nested too deeply to be a configuration file") from None
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: holds a JSON {type(data).__name__}, but a configuration is a JSON object "
                    "({\"name\": value, ...}); fix the file or download it again")
    return data


def config_fields(config: dict, path, fields: dict, error: type[Exception] = InputError) -> dict:
    """The fields of a JSON config that are present and not null, each checked by its rule
    `name: (check, lo, example)` (a checks.py function and its lower bound); `error` names file and field."""
    checked = {}
    for name, (check, lo, example) in fields.items():
        if config.get(name) is not None:
            try:
                checked[name] = check(f"field {name}", config[name], lo)
            except InputError as e:
                raise error(f"{path}: {e}{f' ({example})' if example else ''}; fix the file or download it "
                            "again") from None
    return checked


# -------------------------------------------------------------------------------------------------
# writing
# -------------------------------------------------------------------------------------------------

def _files_under(folder: Path) -> Iterator[Path]:
    count = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames:
            yield Path(dirpath) / name
            count += 1
            if count >= _INPUT_SCAN_FILES:
                return


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # resolves symlinks; equal inode and device means a hard link too
    except OSError:
        return False


def _clash(target: Path, inputs: Iterable) -> Path | None:
    """The input file that writing `target` would replace, if any."""
    if not target.exists():
        return None
    for src in inputs:
        if src is None:
            continue
        src = Path(src)
        for f in (_files_under(src) if src.is_dir() else [src]):
            if _same(target, f):
                return f
    return None


def prepare_output(path, inputs: Iterable = (), folder_files: Iterable[str] | None = None,
                   what: str = "output") -> Path:
    """Check a destination before any work is done; returns it as a Path.

    `inputs` are the files/folders the work reads: an output that is one of them (the same file by
    name, symlink or hard link) is refused. `folder_files` None means `path` is a file; otherwise it
    is a folder and these are the names that will be written in it. Missing parent folders are
    created; a folder where a file is wanted (or the reverse) and unwritable places are refused.
    """
    out = Path(path).expanduser()
    inputs = [Path(p) for p in inputs if p is not None]
    targets = [out] if folder_files is None else [out / name for name in folder_files]
    for target in targets:
        clash = _clash(target, inputs)
        if clash is not None:
            same = "" if target == clash else f" (the same file as {clash})"
            raise InputError(f"{what} {target} is an input of this command{same}; writing it would destroy "
                             "the input - choose another output name")
    if folder_files is None:
        if out.is_dir():
            raise InputError(f"{what} {out} is a folder; give the name of a file (in it, or elsewhere)")
        where = out.parent
    else:
        if out.exists() and not out.is_dir():
            raise InputError(f"{what} {out} is a file, but a folder is written here; give a folder name "
                             "(without a suffix)")
        where = out
        for target in targets:
            if target.is_dir():
                raise InputError(f"{what} {target} is a folder where a file must be written; remove or rename it")
    try:
        where.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"{what} {out}: {where} cannot be created because a file is in the way; "
                         "choose another folder") from None
    except OSError as e:
        raise InputError(f"{what} {out}: cannot create the folder {where} ({e.strerror or e}); "
                         "choose another folder") from None
    try:  # the only reliable test (permissions, read-only mounts, root): make a file there
        fd, probe = tempfile.mkstemp(prefix=".pixart-write-test-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{what} {out}: cannot write in {where} ({e.strerror or e}); choose a folder you "
                         "can write to") from None
    return out


def _new_file_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)  # replacing a file keeps its permissions
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextmanager
def atomic_write(path) -> Iterator[Path]:
    """`with atomic_write(p) as tmp: write(tmp)`: on success tmp is fsynced and renamed onto p; on an
    error it is removed and p is untouched. tmp lies in p's folder (a rename never crosses devices)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (best effort: not every platform opens folders)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_result(path, write: Callable[[Path], None], what: str = "result", rescue: bool = True) -> Path:
    """`write(tmp)` through atomic_write(path), failures as InputError. With `rescue` (results that took
    work, like sampled latents), a result that cannot be written there (disk full, folder gone since
    prepare_output) is written to the temp folder instead and the error says where it is."""
    path = Path(path)
    try:
        with atomic_write(path) as tmp:
            write(tmp)
        return path
    except Exception as e:  # noqa: BLE001 - writers raise OSError, SafetensorError, RuntimeError ...
        first = e
    if not rescue:
        raise InputError(f"could not write the {what} to {path} ({_first_line(first)}); nothing was changed there")
    copy = Path(tempfile.gettempdir()) / f"pixart-rescued-{time.strftime('%Y%m%d-%H%M%S')}-{path.name}"
    try:
        with atomic_write(copy) as tmp:
            write(tmp)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"could not write the {what} to {path} ({_first_line(first)}) nor to {copy} "
                         f"({_first_line(e)}); free some disk space and run again") from None
    raise InputError(f"could not write the {what} to {path} ({_first_line(first)}); it was saved to {copy} "
                     "instead")


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                       "int32": "I32", "uint8": "U8", "bool": "BOOL"}


def safetensors_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    """A .safetensors file's bytes, the same bytes for the same tensors every time: the safetensors
    library writes its metadata in hash order, which differs from one process to the next, so files
    that must be byte-identical (batch outputs) are serialised here with sorted keys."""
    import torch
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        dtype = _SAFETENSORS_DTYPES[str(t.dtype).replace("torch.", "")]
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""  # little-endian, as torch holds it
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format's alignment padding
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)
