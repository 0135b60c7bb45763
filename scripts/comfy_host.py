"""A real, headless ComfyUI host for tests and command-line runs.

Library (standard library only, HTTP through urllib):

* :func:`ensure_host` builds the unmodified ComfyUI 0.3.75 tree (``scripts/build_comfyui_host.sh``)
  plus what it needs to start here: a ``torchvision`` import-only stand-in and a front-end root.
* :class:`ComfyHost` starts ``main.py --cpu`` on 127.0.0.1 with its own base directory (this pack
  symlinked into ``custom_nodes/``), then queues API-format prompts and waits for their history.
* :func:`workflow_to_api` converts a UI-format workflow (what the canvas saves) to the API format.

CLI: ``python scripts/comfy_host.py build`` prepares the host and prints the ComfyUI folder;
``python scripts/comfy_host.py convert WORKFLOW.json`` prints the API form (starts a host for the
node schemas).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

log = logging.getLogger("comfy_host")

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "comfyui"
COMFY_DIR = CACHE / "ComfyUI"
STUBS_DIR = CACHE / "stubs"
WEBROOT_DIR = CACHE / "webroot"
BUILD_SCRIPT = REPO / "scripts" / "build_comfyui_host.sh"

BASE_SUBDIRS = ("custom_nodes", "models", "input", "output", "temp", "user")
LOG_NAME = "comfyui.log"

__all__ = [
    "HostError", "PromptError", "ExecutionError", "MissingNodesError", "WorkflowError",
    "ensure_host", "ComfyHost", "free_port", "link_models",
    "workflow_to_api", "load_workflow", "is_api_prompt",
]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

class HostError(RuntimeError):
    """The host could not be built, started or reached; the message ends with the log tail."""


class PromptError(HostError):
    """``POST /prompt`` refused a prompt (HTTP 400) or validated only part of it.

    ``error`` is the server's ``error`` object, ``node_errors`` maps node id to its errors.
    """

    def __init__(self, message: str, error: Mapping | None = None,
                 node_errors: Mapping | None = None, status: int | None = None):
        super().__init__(message)
        self.error = dict(error or {})
        self.node_errors = dict(node_errors or {})
        self.status = status

    @property
    def node_ids(self) -> list[str]:
        """Node ids named by the refusal (``node_errors`` keys, or the id in ``details``)."""
        ids = list(self.node_errors)
        details = str(self.error.get("details", ""))
        if not ids and "#" in details:  # "Node ID '#12'"
            ids.append(details.split("#", 1)[1].strip("'\" "))
        return ids


class ExecutionError(HostError):
    """A queued prompt ended with status "error" (or was interrupted).

    ``entry`` is the history entry; ``node_id``/``node_type``/``exception_type``/``traceback``
    come from its ``execution_error`` message when there is one.
    """

    def __init__(self, message: str, entry: Mapping, interrupted: bool = False):
        super().__init__(message)
        self.entry = entry
        self.interrupted = interrupted
        err = _status_message(entry, "execution_error") or _status_message(entry, "execution_interrupted") or {}
        self.node_id = err.get("node_id")
        self.node_type = err.get("node_type")
        self.exception_type = err.get("exception_type")
        self.exception_message = err.get("exception_message")
        tb = err.get("traceback") or []
        self.traceback = "".join(tb) if isinstance(tb, list) else str(tb)


class MissingNodesError(HostError):
    """Node ids expected in ``/object_info`` are absent (typically a custom pack failed to import)."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = missing


def _status_message(entry: Mapping, kind: str) -> dict | None:
    for msg in (entry.get("status") or {}).get("messages") or []:
        if isinstance(msg, (list, tuple)) and len(msg) == 2 and msg[0] == kind:
            return msg[1]
    return None


# --------------------------------------------------------------------------------------------
# Building the host
# --------------------------------------------------------------------------------------------

# Import-only stand-in for torchvision. ComfyUI 0.3.75 imports it at module level
# (comfy/sd.py -> comfy/ldm/cascade/*.py: `import torchvision`; comfy/ldm/cosmos/*.py:
# `from torchvision import transforms`; comfy/ldm/ace/vae/music_dcae_pipeline.py:
# `import torchvision.transforms`) but only Stable Cascade, Cosmos and ACE use it at run time.
# PyPI's torchvision cannot load beside torch 2.13.0+cpu. No dist-info is written, so
# transformers/diffusers availability checks (importlib.metadata) still report "not installed".
_STUB_INIT = '''"""Import-only torchvision stand-in written by scripts/comfy_host.py (not the real package)."""
__version__ = "0.0.0+comfy-host-stub"
__comfy_host_stub__ = True


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(
        "torchvision stand-in: %r is unavailable (this host has no real torchvision; "
        "only Stable Cascade, Cosmos and ACE models need it)" % (__name__ + "." + name))
'''
_STUB_MODULES = ("", "transforms", "transforms/functional", "transforms/v2", "transforms/v2/functional", "models",
                 "ops", "io", "utils")
# transformers treats any findable torchvision as real and imports these names from it at module
# level (image_utils), e.g. when T5EncoderModel is imported: give it the names, nothing behind them.
# spandrel (the upscale-model loader behind ComfyUI's Load Upscale Model) imports these at start-up,
# for its LaMa and RestoreFormer architectures only: the ESRGAN family never calls them.
_SPANDREL_NAMES = ("\nfrom torchvision.transforms import InterpolationMode  # noqa: F401\n\n\n"
                   "def rotate(*args, **kwargs):\n    raise NotImplementedError('torchvision stand-in')\n\n\n"
                   "def normalize(*args, **kwargs):\n    raise NotImplementedError('torchvision stand-in')\n")
_STUB_EXTRAS = {
    "transforms": "\nimport enum\n\n\nclass InterpolationMode(enum.Enum):\n    NEAREST = 'nearest'\n"
                  "    NEAREST_EXACT = 'nearest-exact'\n    BILINEAR = 'bilinear'\n    BICUBIC = 'bicubic'\n"
                  "    BOX = 'box'\n    HAMMING = 'hamming'\n    LANCZOS = 'lanczos'\n",
    "transforms/functional": "\n\ndef pil_to_tensor(pic):\n    raise NotImplementedError('torchvision stand-in')\n"
                             + _SPANDREL_NAMES,
}


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _write_stubs(stubs_dir: Path) -> None:
    pkg = stubs_dir / "torchvision"
    for mod in _STUB_MODULES:
        target = pkg / mod / "__init__.py" if mod else pkg / "__init__.py"
        _write_if_changed(target, _STUB_INIT + _STUB_EXTRAS.get(mod, ""))


def _write_webroot(webroot: Path) -> None:
    _write_if_changed(webroot / "index.html",
                      "<!doctype html><title>ComfyUI (headless test host)</title>"
                      "<p>Headless ComfyUI host: no front-end installed. Use the HTTP API.</p>\n")


def ensure_host(comfy_dir: str | os.PathLike | None = None) -> Path:
    """Make sure a runnable ComfyUI tree exists and return its folder.

    ``comfy_dir`` (or the ``COMFYUI_DIR`` environment variable) points at an existing ComfyUI
    checkout to use instead of the pinned 0.3.75 tree that ``scripts/build_comfyui_host.sh``
    unpacks into ``.cache/comfyui/ComfyUI``. Also writes the torchvision stand-in
    (``.cache/comfyui/stubs``) and the front-end root (``.cache/comfyui/webroot``). Idempotent.
    """
    chosen = comfy_dir or os.environ.get("COMFYUI_DIR")
    if chosen:
        path = Path(chosen).resolve()
        if not (path / "main.py").is_file():
            raise HostError(f"{path} is not a ComfyUI folder (no main.py)")
    else:
        path = COMFY_DIR
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".ensure_host.lock", "w") as lock:  # one builder at a time (parallel test runs)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not chosen and not (path / "main.py").is_file():
            log.info("building the ComfyUI host with %s", BUILD_SCRIPT)
            proc = subprocess.run(["bash", str(BUILD_SCRIPT)], cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0 or not (path / "main.py").is_file():
                raise HostError(f"{BUILD_SCRIPT.name} failed (exit {proc.returncode}):\n"
                                f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        _write_stubs(STUBS_DIR)
        _write_webroot(WEBROOT_DIR)
    return path


def _has_module(python: str, name: str) -> bool:
    """Whether ``python`` can find module ``name`` (found, not imported)."""
    if Path(python).resolve() == Path(sys.executable).resolve():
        import importlib.util
        return importlib.util.find_spec(name) is not None
    code = f"import importlib.util,sys; sys.exit(importlib.util.find_spec({name!r}) is None)"
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def link_models(src: str | os.PathLike, models_dir: str | os.PathLike) -> list[Path]:
    """Symlink every file under ``src`` (laid out like ComfyUI's models/) into ``models_dir``.

    ``src/vae_approx/x.safetensors`` becomes ``models_dir/vae_approx/x.safetensors`` (nested
    folders kept). Existing links are replaced; existing real files are left alone.
    Returns the links made.
    """
    src, models_dir = Path(src).resolve(), Path(models_dir)
    if not src.is_dir():
        raise HostError(f"models folder {src} does not exist")
    made = []
    for root, _dirs, files in os.walk(src, followlinks=True):
        for name in files:
            source = Path(root) / name
            rel = source.relative_to(src)
            if len(rel.parts) < 2:  # a loose file is in no model folder: ComfyUI would not see it
                log.warning("ignoring %s: not inside a model-type folder", source)
                continue
            target = models_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink():
                target.unlink()
            elif target.exists():
                continue
            target.symlink_to(source)
            made.append(target)
    return made


# --------------------------------------------------------------------------------------------
# The host process
# --------------------------------------------------------------------------------------------

class ComfyHost:
    """A ComfyUI server process on 127.0.0.1 with its own base directory.

    >>> with ComfyHost(".cache/run") as host:          # doctest: +SKIP
    ...     entry = host.run(api_prompt)
    ...     pngs = host.output_images(entry)

    ``base_dir`` gets custom_nodes/, models/, input/, output/, temp/, user/ and the server log
    (``comfyui.log``); this pack (the repository root) is symlinked as
    ``custom_nodes/<pack_name>``. ComfyUI empties temp/ when it starts.

    ``torchvision_stub`` puts the import-only torchvision stand-in on PYTHONPATH (None: only when
    ``python`` finds no torchvision). ``env`` adds environment variables for the server.
    ``pack_dir=None`` links nothing (the pack is installed there already); ``log_path`` puts the
    server log elsewhere (a user's ComfyUI folder gets none of ours).
    """

    def __init__(self, base_dir: str | os.PathLike, port: int | None = None, extra_args: Iterable[str] = (),
                 *, comfy_dir: str | os.PathLike | None = None, python: str | None = None,
                 pack_dir: str | os.PathLike | None = REPO, pack_name: str | None = None,
                 startup_timeout: float = 120.0, env: Mapping[str, str] | None = None,
                 torchvision_stub: bool | None = None, cpu: bool = True, log_path: str | os.PathLike | None = None):
        self.cpu = cpu  # --cpu: tests and CI; run_workflow.py turns it off when CUDA is there
        self.base_dir = Path(base_dir).resolve()
        self.port = port
        self.extra_args = list(extra_args)
        self.comfy_dir = Path(comfy_dir).resolve() if comfy_dir else None
        self.python = python or sys.executable
        self.pack_dir = Path(pack_dir).resolve() if pack_dir else None
        self.pack_name = pack_name or (self.pack_dir.name if self.pack_dir else None)
        self.startup_timeout = startup_timeout
        self.env = dict(env or {})
        self.torchvision_stub = torchvision_stub
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex
        self.log_path = Path(log_path) if log_path else self.base_dir / LOG_NAME
        self._log_file = None
        self._object_info: dict | None = None
        self.startup_s: float | None = None
        self._make_dirs()

    # -- layout ---------------------------------------------------------------------------
    def _make_dirs(self) -> None:
        for sub in BASE_SUBDIRS:
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        if self.pack_dir is not None:
            link = self.custom_nodes_dir / self.pack_name
            if link.is_symlink() and link.resolve() != self.pack_dir:
                link.unlink()
            if not link.exists() and not link.is_symlink():
                link.symlink_to(self.pack_dir, target_is_directory=True)
            elif not link.is_symlink():
                raise HostError(f"{link} exists and is not a symlink to {self.pack_dir}")

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def temp_dir(self) -> Path:
        return self.base_dir / "temp"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.base_dir / "custom_nodes"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle ------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [self.python, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base_dir), "--database-url", "sqlite:///:memory:",
                "--disable-api-nodes", "--disable-auto-launch", "--front-end-root", str(WEBROOT_DIR),
                *self.extra_args]

    def start(self) -> "ComfyHost":
        """Start the server and wait until ``GET /system_stats`` answers 200."""
        if self.running:
            return self
        comfy_dir = self.comfy_dir or ensure_host()
        if not STUBS_DIR.exists() or not (WEBROOT_DIR / "index.html").exists():
            ensure_host(comfy_dir)
        auto_port = self.port is None
        env = os.environ.copy()
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        stub = self.torchvision_stub
        if stub is None:  # auto: only where no torchvision can be found
            stub = not _has_module(self.python, "torchvision")
        if stub:
            paths.insert(0, str(STUBS_DIR))
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("TQDM_MININTERVAL", "1")
        env.update(self.env)
        for attempt in range(3):
            if auto_port:
                self.port = free_port()
            try:
                return self._launch(comfy_dir, env)
            except HostError:
                # the free port was taken between choosing and binding: choose again
                if not (auto_port and "address already in use" in self.log_text().lower() and attempt < 2):
                    raise
                log.warning("port %d was taken; retrying on another", self.port)
        raise AssertionError("unreachable")

    def _launch(self, comfy_dir: Path, env: Mapping[str, str]) -> "ComfyHost":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n==== comfy_host: {' '.join(self.command())}\n".encode())
        self._log_file.flush()
        self._log_offset = self.log_path.stat().st_size
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command(), cwd=comfy_dir, env=dict(env), stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
        log.info("ComfyUI pid %d on %s (log %s)", self.proc.pid, self.url, self.log_path)
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        log.info("ComfyUI ready in %.1f s", self.startup_s)
        return self

    def _wait_ready(self, t0: float) -> None:
        while True:
            code = self.proc.poll()
            if code is not None:
                raise HostError(f"ComfyUI exited with code {code} before it was ready\n{self.log_tail()}")
            try:
                status, _ = self._request("GET", "/system_stats", timeout=2)
                if status == 200:
                    return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() - t0 > self.startup_timeout:
                raise HostError(f"ComfyUI not ready after {self.startup_timeout:.0f} s\n{self.log_tail()}")
            time.sleep(0.25)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the server, SIGKILL it after ``timeout`` s; returns its exit code."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("ComfyUI pid %d ignored SIGTERM; killing it", self.proc.pid)
                    self.proc.kill()
                    self.proc.wait(timeout)
            code = self.proc.returncode
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    def __enter__(self) -> "ComfyHost":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):  # last resort: never leave a server behind
        try:
            if self.running:
                self.proc.kill()
        except Exception:
            pass

    # -- log --------------------------------------------------------------------------------
    def log_text(self, since_start: bool = True) -> str:
        """The server log (this start only, unless ``since_start`` is false)."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        if since_start:
            data = data[getattr(self, "_log_offset", 0):]
        return data.decode("utf-8", "replace")

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the server log, framed for error messages."""
        tail = self.log_text().replace("\r", "\n").splitlines()[-lines:]
        return f"---- ComfyUI log tail ({self.log_path}) ----\n" + "\n".join(tail)

    def import_failures(self) -> dict[str, str]:
        """Custom-node / comfy_extras modules that failed to import: {module path or file: reason}."""
        failed: dict[str, str] = {}
        for line in self.log_text().splitlines():
            line = line.strip()
            if line.startswith("Cannot import ") and " module for custom nodes: " in line:
                path, reason = line[len("Cannot import "):].split(" module for custom nodes: ", 1)
                failed[path] = reason
            elif "(IMPORT FAILED): " in line:
                failed.setdefault(line.split("(IMPORT FAILED): ", 1)[1], "")
            elif line.startswith("IMPORT FAILED: "):  # comfy_extras summary: file name only
                name = line[len("IMPORT FAILED: "):]
                if not any(Path(k).name == name for k in failed):
                    failed[name] = ""
        return failed

    def pack_import_error(self) -> str | None:
        """Why this pack failed to import (traceback text from the log), or None if it loaded."""
        if self.pack_name is None:
            return None
        module_path = str(self.custom_nodes_dir / self.pack_name)
        text = self.log_text()
        marker = f"Cannot import {module_path} module for custom nodes:"
        if marker not in text and f"(IMPORT FAILED): {module_path}" not in text:
            return None
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if marker in line:
                start = i
                while start > 0 and not lines[start - 1].startswith("Traceback"):
                    start -= 1
                    if i - start > 80:
                        break
                return "\n".join(lines[max(start - 1, 0):i + 1])
        return f"{module_path}: IMPORT FAILED"

    # -- HTTP -------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None, timeout: float = 60) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        text = raw.decode("utf-8", "replace")
        try:
            return status, json.loads(text) if text else None
        except json.JSONDecodeError:
            return status, text

    def get(self, path: str, timeout: float = 60) -> Any:
        status, body = self._request("GET", path, timeout=timeout)
        if status != 200:
            raise HostError(f"GET {path}: HTTP {status}: {str(body)[:2000]}")
        return body

    def post(self, path: str, body: Any = None, timeout: float = 60) -> tuple[int, Any]:
        return self._request("POST", path, {} if body is None else body, timeout=timeout)

    def system_stats(self) -> dict:
        return self.get("/system_stats")

    def object_info(self, node: str | None = None) -> dict:
        """``GET /object_info`` (all node schemas) or ``/object_info/<node>`` ({node: schema})."""
        if node is None:
            self._object_info = self.get("/object_info")
            return self._object_info
        return self.get("/object_info/" + urllib.parse.quote(node, safe=""))

    def require_nodes(self, node_ids: Iterable[str]) -> dict:
        """Schemas of ``node_ids``; raises :class:`MissingNodesError` naming the missing ones,
        with this pack's import error (if any), all import failures and the log tail."""
        info = self.object_info()
        wanted = list(node_ids)
        missing = [n for n in wanted if n not in info]
        if missing:
            parts = [f"node types missing from /object_info: {', '.join(missing)}"]
            pack_err = self.pack_import_error()
            if pack_err:
                parts.append(f"pack {self.pack_name!r} failed to import:\n{pack_err}")
            elif self.pack_name:
                pack_init = (self.pack_dir / "__init__.py") if self.pack_dir else None
                if pack_init is not None and not pack_init.exists():
                    parts.append(f"pack {self.pack_name!r} has no __init__.py ({pack_init})")
            failures = self.import_failures()
            if failures:
                parts.append("import failures: " + "; ".join(f"{k}: {v}" if v else k for k, v in failures.items()))
            parts.append(self.log_tail())
            raise MissingNodesError("\n".join(parts), missing)
        return {n: info[n] for n in wanted}

    def queue(self, api_prompt: Mapping, *, client_id: str | None = None, extra_data: Mapping | None = None,
              allow_partial: bool = False) -> str:
        """``POST /prompt``; returns the prompt id.

        Raises :class:`PromptError` on HTTP 400, and also when the server accepted only some
        outputs (``node_errors`` not empty) unless ``allow_partial`` (then the queued prompt is
        deleted before raising).
        """
        body: dict[str, Any] = {"prompt": dict(api_prompt), "client_id": client_id or self.client_id}
        if extra_data:
            body["extra_data"] = dict(extra_data)
        status, resp = self.post("/prompt", body)
        if status != 200 or not isinstance(resp, dict) or "prompt_id" not in resp:
            err = resp.get("error", {}) if isinstance(resp, dict) else {"message": str(resp)}
            node_errors = resp.get("node_errors", {}) if isinstance(resp, dict) else {}
            raise PromptError(_format_prompt_error(err, node_errors, api_prompt, status),
                              err if isinstance(err, dict) else {"message": str(err)}, node_errors, status)
        prompt_id = resp["prompt_id"]
        if resp.get("node_errors") and not allow_partial:
            self.post("/queue", {"delete": [prompt_id]})
            raise PromptError(_format_prompt_error({"message": "some outputs failed validation"},
                                                   resp["node_errors"], api_prompt, status),
                              {"message": "some outputs failed validation"}, resp["node_errors"], status)
        return prompt_id

    def history(self, prompt_id: str | None = None) -> dict:
        """``GET /history`` or the entry for one prompt id (``{}`` while it has not finished)."""
        if prompt_id is None:
            return self.get("/history")
        return (self.get("/history/" + urllib.parse.quote(prompt_id, safe="")) or {}).get(prompt_id, {})

    def queue_state(self) -> dict:
        """{'running': [prompt ids], 'pending': [prompt ids]} from ``GET /queue``."""
        q = self.get("/queue")
        return {"running": [item[1] for item in q.get("queue_running", [])],
                "pending": [item[1] for item in q.get("queue_pending", [])]}

    def wait(self, prompt_id: str, timeout: float = 600.0, poll: float = 0.1,
             on_poll: Callable[[str, float], None] | None = None) -> dict:
        """Poll ``/history/<id>`` until the prompt finishes; returns its history entry.

        Raises :class:`ExecutionError` (status "error": node, exception and traceback in the
        message; ``interrupted`` set for interrupts), :class:`HostError` if the server died or
        ``timeout`` passed. ``on_poll(state, elapsed_s)`` is called on each poll with state
        "pending" / "running" / "finishing" / "done".
        """
        t0 = time.monotonic()
        delay = min(poll, 0.05)
        while True:
            entry = self.history(prompt_id)
            status = entry.get("status") or {}
            if entry and (status.get("completed") or status.get("status_str") in ("success", "error")):
                if on_poll:
                    on_poll("done", time.monotonic() - t0)
                break
            if not self.running:
                raise HostError(f"ComfyUI exited (code {self.proc.poll() if self.proc else None}) "
                                f"while prompt {prompt_id} was queued\n{self.log_tail()}")
            elapsed = time.monotonic() - t0
            if elapsed > timeout:
                raise HostError(f"prompt {prompt_id} not finished after {timeout:.0f} s "
                                f"(queue: {self.queue_state()})\n{self.log_tail()}")
            if on_poll:
                q = self.queue_state()
                state = ("running" if prompt_id in q["running"] else
                         "pending" if prompt_id in q["pending"] else "finishing")
                on_poll(state, elapsed)
            time.sleep(delay)
            delay = min(delay * 1.5, poll)
        if status.get("status_str") == "error" or not status.get("completed", True):
            interrupted = _status_message(entry, "execution_interrupted") is not None
            raise ExecutionError(_format_execution_error(prompt_id, entry, interrupted), entry, interrupted)
        return entry

    def run(self, api_prompt: Mapping, timeout: float = 600.0, **queue_kwargs) -> dict:
        """:meth:`queue` then :meth:`wait`; returns the history entry."""
        return self.wait(self.queue(api_prompt, **queue_kwargs), timeout=timeout)

    def output_images(self, entry: Mapping, kinds: Iterable[str] = ("output",)) -> list[Path]:
        """Files of the ``images`` outputs in a history entry (``type`` in ``kinds``; add
        "temp" for PreviewImage), in node-id order as the server lists them."""
        kinds = set(kinds)
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        files = []
        for _node_id, out in (entry.get("outputs") or {}).items():
            for img in out.get("images", []) or []:
                kind = img.get("type", "output")
                if kind in kinds and kind in roots:
                    files.append(roots[kind] / img.get("subfolder", "") / img["filename"])
        return files

    def interrupt(self, prompt_id: str | None = None) -> int:
        """``POST /interrupt`` (global, or only if ``prompt_id`` is running); returns the HTTP status."""
        status, _ = self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        return status

    def free_memory(self, unload_models: bool = True) -> int:
        """``POST /free``: unload models / free memory after the current prompt."""
        status, _ = self.post("/free", {"unload_models": unload_models, "free_memory": True})
        return status

    def __repr__(self) -> str:
        state = f"pid {self.proc.pid}" if self.running else "stopped"
        return f"<ComfyHost {self.url if self.port else '(no port)'} {state} base={self.base_dir}>"


def _format_prompt_error(err: Mapping, node_errors: Mapping, api_prompt: Mapping, status) -> str:
    lines = [f"prompt refused (HTTP {status}): {err.get('message', '')}"
             + (f" [{err.get('details')}]" if err.get("details") else "")]
    for node_id, ne in (node_errors or {}).items():
        ctype = ne.get("class_type") or (api_prompt.get(node_id) or {}).get("class_type", "?")
        for e in ne.get("errors", []):
            lines.append(f"  node {node_id} ({ctype}): {e.get('type')}: {e.get('message')}"
                         + (f": {e.get('details')}" if e.get("details") else ""))
    return "\n".join(lines)


def _format_execution_error(prompt_id: str, entry: Mapping, interrupted: bool) -> str:
    if interrupted:
        m = _status_message(entry, "execution_interrupted") or {}
        return f"prompt {prompt_id} interrupted at node {m.get('node_id')} ({m.get('node_type')})"
    m = _status_message(entry, "execution_error")
    if not m:
        msgs = (entry.get("status") or {}).get("messages")
        return f"prompt {prompt_id} failed: {json.dumps(msgs)[:4000]}"
    tb = m.get("traceback") or []
    tb = "".join(tb) if isinstance(tb, list) else str(tb)
    return (f"prompt {prompt_id} failed in node {m.get('node_id')} ({m.get('node_type')}): "
            f"{m.get('exception_type')}: {m.get('exception_message')}\n"
            f"Traceback (most recent call last, in the server):\n{tb}")


# --------------------------------------------------------------------------------------------
# UI workflow -> API prompt
# --------------------------------------------------------------------------------------------

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
IGNORED_TYPES = {"Note", "MarkdownNote"}
MODE_MUTED, MODE_BYPASSED = 2, 4


class WorkflowError(ValueError):
    """The UI workflow cannot be converted (unknown node type, broken link, ...)."""


def is_api_prompt(data: Any) -> bool:
    """Whether ``data`` already is an API-format prompt ({id: {class_type, inputs}})."""
    return (isinstance(data, dict) and "nodes" not in data and bool(data)
            and all(isinstance(v, dict) and "class_type" in v for v in data.values()))


def load_workflow(path: str | os.PathLike) -> dict:
    """Read a workflow from JSON (UI or API format) or from a ComfyUI PNG (its ``workflow``,
    else ``prompt``, text chunk)."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        from PIL import Image
        with Image.open(path) as im:
            text = im.info.get("workflow") or im.info.get("prompt")
        if not text:
            raise WorkflowError(f"{path} holds no ComfyUI workflow")
        return json.loads(text)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _is_widget(spec: Any) -> bool:
    """Whether an object_info input spec ([type, options]) is shown as a widget."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return False
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput") or opts.get("rawLink"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _widget_inputs(schema: Mapping) -> list[tuple[str, bool]]:
    """(name, followed_by_control_widget) for each widget input, in the front-end's order."""
    result = []
    inputs = schema.get("input") or {}
    order = schema.get("input_order") or {}
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        names = order.get(section) or list(specs)
        for name in names:
            spec = specs.get(name)
            if not _is_widget(spec):
                continue
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            control = bool(opts.get("control_after_generate")) or (spec[0] == "INT" and name in SEED_NAMES)
            result.append((name, control))
    return result


def _links_table(workflow: Mapping) -> dict[int, tuple[int, int, str]]:
    """link id -> (origin node id as str, origin slot, type); accepts list and object link forms."""
    table = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            table[int(link["id"])] = (str(link["origin_id"]), int(link["origin_slot"]), link.get("type", "*"))
        elif link:
            table[int(link[0])] = (str(link[1]), int(link[2]), link[5] if len(link) > 5 else "*")
    return table


def _types_match(a: Any, b: Any) -> bool:
    if a in (None, "*", "", 0) or b in (None, "*", "", 0):
        return True
    sa, sb = set(str(a).split(",")), set(str(b).split(","))
    return bool(sa & sb)


def workflow_to_api(ui_workflow: Mapping, object_info: Mapping) -> dict:
    """Convert a UI-format workflow (canvas save: nodes[], links[], widgets_values) to the API
    format ``{"<id>": {"class_type", "inputs", "_meta": {"title"}}}``.

    * widget values are assigned to the schema's widget inputs (required then optional, in
      ``input_order``), skipping the control_after_generate value that follows INT
      ``seed``/``noise_seed`` inputs and inputs whose options say ``control_after_generate``;
      a dict ``widgets_values`` is taken by name;
    * ``inputs[]`` entries with a link become ``[origin_id, slot]`` (converted widgets too,
      overriding the widget value);
    * Reroute nodes are followed, PrimitiveNode values are inlined;
    * muted nodes (mode 2) are dropped with the inputs they fed; bypassed nodes (mode 4) pass
      their input of the output's type through (same slot first, else the first match);
    * Note / MarkdownNote nodes are ignored.

    Raises :class:`WorkflowError` naming the node id and type when a type is not in
    ``object_info`` or a link is broken.
    """
    if is_api_prompt(ui_workflow):
        return json.loads(json.dumps(ui_workflow))
    if "nodes" not in ui_workflow:
        raise WorkflowError("not a UI-format workflow (no 'nodes')")
    subgraph_ids = {sg.get("id") for sg in ((ui_workflow.get("definitions") or {}).get("subgraphs") or [])}
    nodes = {str(node["id"]): node for node in ui_workflow["nodes"]}
    links = _links_table(ui_workflow)

    def node_label(node: Mapping) -> str:
        return f"node {node.get('id')} ({node.get('type')})"

    def resolve(link_id: int, seen: frozenset = frozenset()):
        """Follow a link to its real source: ('link', [id, slot]), ('value', v) or None (dropped)."""
        if link_id not in links:
            raise WorkflowError(f"link {link_id} is not in the workflow's links")
        if link_id in seen:
            raise WorkflowError(f"link cycle through link {link_id}")
        seen = seen | {link_id}
        origin_id, slot, ltype = links[link_id]
        origin = nodes.get(origin_id)
        if origin is None:
            raise WorkflowError(f"link {link_id} starts at missing node {origin_id}")
        otype = origin.get("type")
        mode = origin.get("mode", 0)
        if otype == "Reroute":
            ins = origin.get("inputs") or []
            up = ins[0].get("link") if ins else None
            return resolve(up, seen) if up is not None else None
        if otype == "PrimitiveNode":
            values = origin.get("widgets_values") or []
            if not values:
                raise WorkflowError(f"{node_label(origin)} has no value")
            return ("value", values[0])
        if mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASSED:
            outputs = origin.get("outputs") or []
            out_type = outputs[slot].get("type") if slot < len(outputs) else ltype
            ins = origin.get("inputs") or []
            candidates = ([ins[slot]] if slot < len(ins) else []) + list(ins)
            for inp in candidates:
                if inp.get("link") is not None and _types_match(inp.get("type"), out_type):
                    return resolve(inp["link"], seen)
            return None
        return ("link", [origin_id, slot])

    api: dict[str, dict] = {}
    for node in sorted(ui_workflow["nodes"], key=lambda n: (n.get("order", 0), str(n["id"]))):
        ntype = node.get("type")
        if ntype in IGNORED_TYPES or ntype in ("Reroute", "PrimitiveNode"):
            continue
        if node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
            continue
        if ntype in subgraph_ids:
            raise WorkflowError(f"{node_label(node)} is a subgraph; subgraphs are not supported")
        schema = object_info.get(ntype)
        if schema is None:
            raise WorkflowError(f"{node_label(node)}: node type {ntype!r} is not in object_info "
                                "(not installed, or its pack failed to import)")
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values")
        widgets = _widget_inputs(schema)
        if isinstance(values, dict):
            for name, _control in widgets:
                if name in values:
                    inputs[name] = values[name]
        elif values:
            i = 0
            for name, control in widgets:
                if i >= len(values):
                    break
                inputs[name] = values[i]
                i += 1
                if control and i < len(values) and isinstance(values[i], str) and values[i] in CONTROL_VALUES:
                    i += 1
        for inp in node.get("inputs") or []:
            name, link_id = inp.get("name"), inp.get("link")
            if link_id is None:
                continue
            src = resolve(link_id)
            if src is None:
                inputs.pop(name, None)
                continue
            inputs[name] = src[1]
        title = node.get("title") or schema.get("display_name") or ntype
        api[str(node["id"])] = {"inputs": inputs, "class_type": ntype, "_meta": {"title": title}}
    return api


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build the host (ComfyUI tree, stubs, web root); print its folder")
    conv = sub.add_parser("convert", help="print the API form of a UI workflow (starts a host for schemas)")
    conv.add_argument("workflow")
    conv.add_argument("--base", default=str(REPO / ".cache" / "run"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "build":
        print(ensure_host())
        return 0
    wf = load_workflow(args.workflow)
    with ComfyHost(args.base) as host:
        print(json.dumps(workflow_to_api(wf, host.object_info()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
