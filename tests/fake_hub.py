"""A Hugging Face Hub on 127.0.0.1, serving model folders the way huggingface.co does.

Two servers, as on the real Hub: the endpoint (HF_ENDPOINT) answers the API and
`resolve` URLs; large (LFS) files are redirected to a separate file host, on another
host name as a CDN is (127.0.0.2, also loopback on Linux: huggingface_hub 1.x follows a
redirect that stays on the endpoint's host name, token and all, and stops at one that
leaves it).

- GET /api/models/{repo}[/revision/{rev}][?blobs=true]: model info with `sha` and
  `siblings` (rfilename, size, blobId, lfs {sha256, size, pointerSize}).
- HEAD/GET /{repo}/resolve/{rev}/{file}: X-Repo-Commit; git files 200 with ETag
  (the blob sha1) and the body; LFS files 302 to the file host with
  X-Linked-Etag (sha256) and X-Linked-Size.
- File host GET/HEAD /lfs/{sha256}: Range → 206 + Content-Range, ETag.
- Errors as the Hub sends them: 401 + X-Error-Code RepoNotFound (unknown or
  private without the token), 403 GatedRepo, 404 RevisionNotFound / EntryNotFound.
- The file host answers 400 to a request that carries an Authorization header, as a
  signed-URL store does ("only one auth mechanism allowed"): a client that forwards the
  token across the redirect fails. `FakeHub.authorized` lists the paths that had one.

Faults, set per test on `FakeHub.faults`: drop a connection after N bytes of a
file (once), flip one byte of a file as served, answer 500 to everything.
`FakeHub.log` lists (method, path, Range header) of every request.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")
TOKEN = "hf_fake_token_for_tests"
FILE_HOST = "127.0.0.2"  # the CDN's address: loopback, but not the endpoint's host


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str
    branches: dict[str, str]
    private: bool = False
    gated: bool = False
    digests: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (sha256, git sha1)

    def __post_init__(self) -> None:
        for name, data in self.files.items():
            self.digests[name] = (hashlib.sha256(data).hexdigest(), _git_sha1(data))


@dataclass
class Faults:
    drop_after: dict[str, int] = field(default_factory=dict)  # file name -> bytes to send before dropping, once
    corrupt_at: dict[str, int] = field(default_factory=dict)  # file name -> file offset of a flipped byte
    fail_all: int | None = None  # answer this status to every request
    fail_files: int | None = None  # answer this status to every file host request
    fail_next_files: int = 0  # answer 503 to this many file host requests, then serve again
    stall_after: dict[str, int] = field(default_factory=dict)  # file name -> bytes to send, then go silent, once


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client hanging up mid-answer (as ours does after an error) is not news


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.faults = Faults()
        self.log: list[tuple[str, str, str | None]] = []
        self.authorized: list[tuple[str, str]] = []  # ("api" or "files", path) of requests with a token
        self.bytes_served = 0  # file host body bytes sent
        self.unstall = threading.Event()  # set by close(): stalled answers give up
        self._lock = threading.Lock()
        self._api = _QuietServer(("127.0.0.1", 0), _handler(self, files=False))
        self._cdn = _QuietServer((FILE_HOST, 0), _handler(self, files=True))
        for server in (self._api, self._cdn):
            server.daemon_threads = True
            # poll often: shutdown() waits up to one poll per server, at every test's teardown
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._api.server_address[1]}"

    @property
    def file_host(self) -> str:
        return f"http://{FILE_HOST}:{self._cdn.server_address[1]}"

    def take_fault(self, faults: dict[str, int], name: str, length: int) -> int | None:
        """Bytes to send before a fault armed for `name`, once, when it falls inside this body."""
        with self._lock:
            at = faults.get(name)
            if at is None or at >= length:
                return None
            del faults[name]
            return at

    def add_repo(self, repo_id: str, folder: Path, **kw) -> Repo:
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        commit = hashlib.sha1(repo_id.encode() + b"".join(hashlib.sha1(v).digest() for v in files.values())).hexdigest()
        repo = Repo(files, commit, {"main": commit}, **kw)
        self.repos[repo_id] = repo
        return repo

    def lfs_bytes(self, repo_id: str) -> int:
        return sum(len(v) for k, v in self.repos[repo_id].files.items() if k.endswith(LFS_SUFFIXES))

    def requests_for(self, suffix: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.log if r[1].endswith(suffix)]

    def close(self) -> None:
        self.unstall.set()
        for server in (self._api, self._cdn):
            server.shutdown()
            server.server_close()

    # -- lookups --------------------------------------------------------------------------

    def blob(self, sha256: str) -> tuple[str, bytes] | None:
        for repo in self.repos.values():
            for name, (sha, _) in repo.digests.items():
                if sha == sha256:
                    return name, repo.files[name]
        return None


def _handler(hub: FakeHub, files: bool):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._route(body=False)

        def do_GET(self) -> None:
            self._route(body=True)

        # -- plumbing ----------------------------------------------------------------------

        def _route(self, body: bool) -> None:
            path = urlsplit(self.path).path
            with hub._lock:
                hub.log.append((self.command, path, self.headers.get("Range")))
                if self.headers.get("Authorization"):
                    hub.authorized.append(("files" if files else "api", path))
            if hub.faults.fail_all:
                return self._error(hub.faults.fail_all, "Internal Error", None, body)
            if files:
                if self.headers.get("Authorization"):
                    return self._error(400, "Only one auth mechanism allowed", None, body)
                if hub.faults.fail_files:
                    return self._error(hub.faults.fail_files, "Internal Error", None, body)
                with hub._lock:
                    busy = hub.faults.fail_next_files > 0
                    hub.faults.fail_next_files -= busy
                if busy:
                    return self._error(503, "Slow Down", None, body)
                return self._file_host(path, body)
            if path.startswith("/api/models/"):
                return self._api(path[len("/api/models/"):], body)
            if "/resolve/" in path:
                return self._resolve(path, body)
            self._error(404, "not found", None, body)

        def _error(self, status: int, message: str, code: str | None, body: bool) -> None:
            data = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _repo(self, repo_id: str, body: bool) -> Repo | None:
            repo = hub.repos.get(repo_id)
            authorized = self.headers.get("Authorization") == f"Bearer {TOKEN}"
            if repo is None or (repo.private and not authorized):
                self._error(401, "Repository Not Found", "RepoNotFound", body)
                return None
            if repo.gated and not authorized:
                self._error(403, "Access to model is restricted", "GatedRepo", body)
                return None
            return repo

        def _commit(self, repo: Repo, rev: str, body: bool) -> str | None:
            commit = repo.branches.get(rev) or (rev if rev == repo.commit else None)
            if commit is None:
                self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound", body)
            return commit

        # -- the endpoint ------------------------------------------------------------------

        def _api(self, rest: str, body: bool) -> None:
            parts = [unquote(p) for p in rest.split("/")]
            repo_id, rev = "/".join(parts[:2]), parts[3] if len(parts) >= 4 and parts[2] == "revision" else "main"
            repo = self._repo(repo_id, body)
            if repo is None or (commit := self._commit(repo, rev, body)) is None:
                return
            siblings = []
            for name, data in repo.files.items():
                sha256, sha1 = repo.digests[name]
                s = {"rfilename": name, "size": len(data), "blobId": sha1}
                if name.endswith(LFS_SUFFIXES):
                    s["lfs"] = {"sha256": sha256, "size": len(data), "pointerSize": 134}
                siblings.append(s)
            info = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.private,
                    "gated": "manual" if repo.gated else False, "siblings": siblings, "tags": []}
            self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)

        def _resolve(self, path: str, body: bool) -> None:
            head, _, tail = path.lstrip("/").partition("/resolve/")
            rev, _, name = tail.partition("/")
            repo = self._repo(unquote(head), body)
            if repo is None or (commit := self._commit(repo, unquote(rev), body)) is None:
                return
            data = repo.files.get(unquote(name))
            if data is None:
                return self._error(404, "Entry not found", "EntryNotFound", body)
            sha, sha1 = repo.digests[unquote(name)]
            headers = {"X-Repo-Commit": commit, "ETag": f'"{sha1}"'}
            if name.endswith(LFS_SUFFIXES):
                headers.update({
                    "Location": f"{hub.file_host}/lfs/{sha}?signature=fake",
                    "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                })
                return self._send(302, b"", headers, body)
            self._send(200, data, headers, body)

        # -- the file host -----------------------------------------------------------------

        def _file_host(self, path: str, body: bool) -> None:
            found = hub.blob(path.rsplit("/", 1)[-1])
            if found is None:
                return self._error(404, "no such object", None, body)
            name, data = found
            etag = path.rsplit("/", 1)[-1]
            if name in hub.faults.corrupt_at:
                at = hub.faults.corrupt_at[name]
                data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
            start, end, status = 0, len(data), 200
            headers = {"ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            if rng := self.headers.get("Range"):
                first, _, last = rng.removeprefix("bytes=").partition("-")
                start, end, status = int(first), min(int(last) + 1 if last else len(data), len(data)), 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if not body:
                return
            drop = hub.take_fault(hub.faults.drop_after, name, end - start)
            if drop is not None:
                self.wfile.write(data[start:start + drop])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # mid-body: the client sees a short read
                return
            stall = hub.take_fault(hub.faults.stall_after, name, end - start)
            if stall is not None:
                self.wfile.write(data[start:start + stall])
                self.wfile.flush()
                hub.unstall.wait(10)  # silent until the test ends: the client must time out
                self.close_connection = True
                return
            with memoryview(data) as view:
                for at in range(start, end, 1 << 20):
                    self.wfile.write(view[at:min(end, at + (1 << 20))])
            with hub._lock:
                hub.bytes_served += end - start

        def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler
