"""A stand-in for the Hugging Face Hub on loopback, for download tests (HF_ENDPOINT=hub.url).

It answers what ``huggingface_hub`` asks, with the headers the real Hub sends:

* ``GET /api/models/{repo}/revision/{rev}?blobs=true`` (``HfApi.model_info(files_metadata=True)``):
  the commit (``sha``) and, per file, ``size``, ``blobId`` and ``lfs: {sha256, size, pointerSize}``;
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``: for the (LFS) files a 302 to the CDN with
  ``X-Repo-Commit``, ``X-Linked-Etag`` (the sha256), ``X-Linked-Size`` and the pointer's ``ETag``;
  errors as the Hub's 404/401 with ``X-Error-Code`` (RepoNotFound, EntryNotFound, GatedRepo);
* the CDN on a second loopback address (127.0.0.2, as the real CDN is another host): the bytes,
  ``Content-Length``, ``Accept-Ranges`` and 206 answers to ``Range: bytes=N-``.

Faults for the tests: ``cut_after[name] = n`` closes the connection after n bytes of the next
download of that file; ``corrupt.add(name)`` serves it with one byte changed (same size).
``requests`` records (host, method, path, Range, Authorization) of every request.
"""
from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class StandInHub:
    def __init__(self, repos: dict[str, dict[str, bytes]], token: str | None = None, gated: set[str] = frozenset()):
        self.repos = repos
        self.token, self.gated = token, set(gated)
        self.cut_after: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.requests: list[tuple[str, str, str, str | None, str | None]] = []
        self.blobs = {hashlib.sha256(data).hexdigest(): (repo, path)
                      for repo, files in repos.items() for path, data in files.items()}
        self._servers = [ThreadingHTTPServer((host, 0), self._handler()) for host in ("127.0.0.1", "127.0.0.2")]
        for server in self._servers:
            server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.2:{self._servers[1].server_address[1]}"

    def __enter__(self) -> "StandInHub":
        for server in self._servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def downloads(self, path: str) -> list[str | None]:
        """The Range header of each CDN GET of ``path`` (None: the whole file)."""
        sha = hashlib.sha256(next(f[path] for f in self.repos.values() if path in f)).hexdigest()
        return [rng for host, method, p, rng, _ in self.requests if method == "GET" and p == f"/cdn/{sha}"]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, headers: dict, body: bytes = b"") -> None:
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, status: int, code: str, message: str) -> None:
                self._send(status, {"X-Error-Code": code, "X-Error-Message": message,
                                    "Content-Type": "application/json"}, json.dumps({"error": message}).encode())

            def _authorized(self, repo: str) -> bool:
                if repo not in hub.gated:
                    return True
                if self.headers.get("Authorization") == f"Bearer {hub.token}":
                    return True
                self._error(401, "GatedRepo", f"Access to model {repo} is restricted.")
                return False

            def do_GET(self):
                self._route()

            def do_HEAD(self):
                self._route()

            def _route(self):
                url = urllib.parse.urlsplit(self.path)
                path = urllib.parse.unquote(url.path)
                hub.requests.append((self.headers.get("Host", ""), self.command, path, self.headers.get("Range"),
                                     self.headers.get("Authorization")))
                if path.startswith("/cdn/"):
                    return self._cdn(path[len("/cdn/"):])
                if path.startswith("/api/models/"):
                    return self._api(path[len("/api/models/"):])
                if "/resolve/" in path:
                    repo, rest = path.lstrip("/").split("/resolve/", 1)
                    return self._resolve(repo, rest.split("/", 1)[1] if "/" in rest else "")
                self._error(404, "RepoNotFound", "Not found")

            def _api(self, rest: str):
                repo, _, _rev = rest.partition("/revision/")
                if repo not in hub.repos:
                    return self._error(404, "RepoNotFound", f"Repository not found: {repo}")
                if not self._authorized(repo):
                    return
                siblings = [{"rfilename": p, "size": len(d), "blobId": hashlib.sha1(b"blob %d\0" % len(d) + d).hexdigest(),
                             "lfs": {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 134}}
                            for p, d in hub.repos[repo].items()]
                body = json.dumps({"_id": "x", "id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                                   "siblings": siblings}).encode()
                self._send(200, {"Content-Type": "application/json"}, body)

            def _resolve(self, repo: str, path: str):
                if repo not in hub.repos:
                    return self._error(404, "RepoNotFound", f"Repository not found: {repo}")
                if not self._authorized(repo):
                    return
                data = hub.repos[repo].get(path)
                if data is None:
                    self.send_response(404)
                    for k, v in {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT,
                                 "X-Error-Message": "Entry not found", "Content-Length": "0"}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    return
                sha = hashlib.sha256(data).hexdigest()
                self._send(302, {"Location": f"{hub.cdn}/cdn/{sha}", "X-Repo-Commit": COMMIT,
                                 "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                                 "ETag": f'"{hashlib.sha1(sha.encode()).hexdigest()}"'})

            def _cdn(self, sha: str):
                if sha not in hub.blobs:
                    return self._error(404, "EntryNotFound", "no such blob")
                repo, path = hub.blobs[sha]
                data = hub.repos[repo][path]
                if path in hub.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[len("bytes="):].split("-")[0])
                body = data[start:]
                headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                           "Content-Length": str(len(body)), "ETag": f'"{sha}"'}
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                self.send_response(206 if start else 200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command == "HEAD":
                    return
                cut = hub.cut_after.pop(path, None) if self.command == "GET" else None
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        return Handler
