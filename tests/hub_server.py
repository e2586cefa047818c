"""A Hugging Face hub on loopback for tests: the few endpoints ``huggingface_hub.snapshot_download`` (2.x) calls.

* ``GET /api/models/{id}/revision/{rev}`` (``HfApi.repo_info``): ``{"id", "sha", "siblings"}`` - the commit;
* ``GET /api/models/{id}/tree/{commit}?recursive=True`` (``HfApi.list_repo_tree``): the files, one page (no
  ``Link`` header): ``{"type": "file", "path", "size", "oid"}``;
* ``HEAD`` / ``GET /{id}/resolve/{rev}/{path}`` (``hf_hub_download``): the file with ``X-Repo-Commit``, ``ETag``
  (the git blob id, as the hub sends for a non-LFS file) and ``Content-Length``;
* errors as the hub words them (``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``), and
  401 + ``RepoNotFound`` without the right ``Authorization: Bearer`` token when the server is given one.

(huggingface_hub also asks ``GET /api/agent-harnesses`` once a day for its user-agent header, best effort; it
gets a 404 here.) Every request is recorded (method, path, whether it carried the right token) so a test can assert that nothing
reached the hub. Use as a context manager::

    with LoopbackHub(token="hf_x") as hub:
        hub.add("Qwen/Qwen2.5-VL-7B-Instruct", tiny_model_dir)
        env["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    folder: Path
    commit: str
    refs: dict[str, str]  # branch / tag -> commit
    files: dict[str, tuple[int, str]] = field(default_factory=dict)  # path -> (size, git blob id)


def _blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class LoopbackHub:
    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, carried the right token)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LoopbackHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add(self, repo_id: str, folder: Path, branches: tuple[str, ...] = ("main",), repo_type: str = "model") -> str:
        """Serve ``folder`` as ``repo_id`` (a model, or a ``repo_type="dataset"`` repository) at one commit (derived
        from its files), reachable by ``branches``."""
        files = {p.relative_to(folder).as_posix(): (p.stat().st_size, _blob_id(p))
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        commit = hashlib.sha1(json.dumps(files, sort_keys=True).encode()).hexdigest()
        self.repos[("" if repo_type == "model" else "datasets/") + repo_id.lower()] = Repo(folder, commit, dict.fromkeys(branches, commit), files)
        return commit


def _handler(hub: LoopbackHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._route(body=False)

        def do_GET(self) -> None:
            self._route(body=True)

        # ---------------------------------------------------------------------------------------- routing
        def _route(self, body: bool) -> None:
            path = urlsplit(self.path).path
            authorized = hub.token is None or self.headers.get("Authorization") == f"Bearer {hub.token}"
            hub.requests.append((self.command, path, authorized))
            parts = [unquote(p) for p in path.strip("/").split("/")]
            api = parts[:1] == ["api"] and parts[1:2] in (["models"], ["datasets"])
            dataset = parts[1:2] == ["datasets"] if api else parts[:1] == ["datasets"]
            if dataset and not api:
                parts = parts[1:]
            if len(parts) < (6 if api else 5):
                return self._error(404, "RepoNotFound", body)
            repo_id = "/".join(parts[2:4] if api else parts[0:2])
            repo = hub.repos.get(("datasets/" if dataset else "") + repo_id.lower())
            if repo is None or not authorized:
                return self._error(401 if not authorized else 404, "RepoNotFound", body)
            kind, revision, rest = (parts[4], parts[5], parts[6:]) if api else (parts[2], parts[3], parts[4:])
            commit = revision if revision == repo.commit else repo.refs.get(revision)
            if commit is None:
                return self._error(404, "RevisionNotFound", body)
            if api and kind == "revision":
                return self._json({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                                   "siblings": [{"rfilename": f} for f in repo.files]}, body)
            if api and kind == "tree":
                return self._json([{"type": "file", "path": f, "size": size, "oid": oid}
                                   for f, (size, oid) in repo.files.items()], body)
            if not api and kind == "resolve":
                return self._file(repo, "/".join(rest), body)
            return self._error(404, "EntryNotFound", body)

        # ---------------------------------------------------------------------------------------- answers
        def _send(self, status: int, headers: dict[str, str], data: bytes, body: bool) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _json(self, obj, body: bool) -> None:
            self._send(200, {"Content-Type": "application/json"}, json.dumps(obj).encode(), body)

        def _error(self, status: int, code: str, body: bool, commit: str | None = None) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Code": code}
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, headers, json.dumps({"error": code}).encode(), body)

        def _file(self, repo: Repo, name: str, body: bool) -> None:
            if name not in repo.files:
                return self._error(404, "EntryNotFound", body, commit=repo.commit)
            size, oid = repo.files[name]
            data = (repo.folder / name).read_bytes() if body else b""
            self.send_response(200)
            for k, v in {"X-Repo-Commit": repo.commit, "ETag": f'"{oid}"', "Content-Length": str(size),
                         "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}.items():
                self.send_header(k, v)
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler
