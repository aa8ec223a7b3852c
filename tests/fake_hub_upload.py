"""The upload side of a Hugging Face Hub on 127.0.0.1: what huggingface_hub's upload API talks to.

Kept apart from tests/fake_hub.py (the download side): the same two-server shape, the
endpoint (HF_ENDPOINT) for the API and a file host for the LFS bytes.

- POST /api/validate-yaml: README.md's front matter must be a YAML mapping (else 400).
- GET /api/whoami-v2: the user "me" of org "my-org", and the token's role (write or read).
- POST /api/repos/create {name, organization, private | visibility}: 200 {url}, 409 when it exists.
- POST /api/models/{repo}/branch/{branch}: 200, 409 when it exists.
- GET /api/models/{repo}[/revision/{rev}]: repo info ({sha, siblings}) for the client's no-op commits.
- POST /api/models/{repo}/preupload/{rev}: "lfs" for *.gguf, "regular" otherwise, with each
  existing file's oid (sha256 for LFS, git sha1 for regular files).
- POST /{repo}.git/info/lfs/objects/batch: transfer "basic"; objects already stored get no
  actions (the client skips them: how an interrupted upload resumes); with
  `multipart_chunk` set, larger objects get multipart part URLs and a completion URL.
- PUT {file host}/upload/{oid}[/{part}]: the bytes (Content-Length or chunked); the sha256
  is checked before an object is stored. POST /api/lfs/verify/{oid}: 200 once stored.
- POST /api/models/{repo}/commit/{rev}: the ndjson commit; every lfsFile must be stored
  with its size; one new commit, atomically, or nothing.
- POST /api/models/{repo}/paths-info/{rev}: size, oid and lfs {oid, size} of each path.

Auth as the Hub: no or an unknown token -> 401; READ_TOKEN (read-only) writing, or writing
outside the namespaces "me" and "my-org" -> 403; a private repo is invisible (401) to others.
Faults on `UploadHub.faults`: drop an upload connection after N bytes (per oid, a count of
times), answer a status to the next N requests of a kind (create, preupload, batch, put,
commit, paths-info). `UploadHub.log` lists (method, path) of every request and
`batch_transfers` the transfers each batch request offered.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, unquote, urlsplit

from fake_hub import _QuietServer  # a client hanging up mid-request is the point of some tests

WRITE_TOKEN = "hf_fake_write_token"
READ_TOKEN = "hf_fake_read_token"
NAMESPACES = ("me", "my-org")  # where WRITE_TOKEN may create repositories


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]  # the whole tree after this commit


@dataclass
class HubRepo:
    private: bool
    branches: dict[str, list[Commit]] = field(default_factory=lambda: {"main": [Commit("0" * 40, "initial", {})]})

    def head(self, rev: str) -> Commit | None:
        """A branch's last commit, or the commit `rev` names."""
        commits = self.branches.get(rev)
        if commits:
            return commits[-1]
        return next((c for cs in self.branches.values() for c in cs if c.oid == rev), None)


@dataclass
class UploadFaults:
    drop_upload: dict[str, list[int]] = field(default_factory=dict)  # oid -> [bytes to read before dropping, times]
    status: dict[str, list[int]] = field(default_factory=dict)  # kind -> [status, times]


class UploadHub:
    def __init__(self, multipart_chunk: int | None = None) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> bytes, stored once verified
        self.parts: dict[str, dict[int, bytes]] = {}
        self.faults = UploadFaults()
        self.multipart_chunk = multipart_chunk
        self.log: list[tuple[str, str]] = []
        self.batch_transfers: list[list[str]] = []
        self.validated: list[str] = []  # README.md contents sent to /api/validate-yaml
        self.put_bytes = 0  # LFS bytes received by the file host
        self._lock = threading.Lock()
        self._api = _QuietServer(("127.0.0.1", 0), _handler(self, files=False))
        self._files = _QuietServer(("127.0.0.1", 0), _handler(self, files=True))
        for server in (self._api, self._files):
            threading.Thread(target=server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._api.server_address[1]}"

    @property
    def file_host(self) -> str:
        return f"http://127.0.0.1:{self._files.server_address[1]}"

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        head = self.repos[repo_id].head(branch)
        return dict(head.files) if head else {}

    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        return self.repos[repo_id].branches.get(branch, [])

    def take(self, kind: str) -> int | None:
        """A status armed for this kind of request, once per armed time."""
        with self._lock:
            armed = self.faults.status.get(kind)
            if not armed or armed[1] <= 0:
                return None
            armed[1] -= 1
            return armed[0]

    def take_drop(self, oid: str) -> int | None:
        with self._lock:
            armed = self.faults.drop_upload.get(oid)
            if not armed or armed[1] <= 0:
                return None
            armed[1] -= 1
            return armed[0]

    def close(self) -> None:
        for server in (self._api, self._files):
            server.shutdown()
            server.server_close()


def _handler(hub: UploadHub, files: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        # -- plumbing -------------------------------------------------------------------

        def _send(self, status: int, body: object = None, headers: dict[str, str] | None = None) -> None:
            data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers)

        def _body(self, limit: int | None = None) -> bytes | None:
            """The request body; with `limit`, read that much and return None (the caller drops the connection)."""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
                    if limit is not None and len(out) >= limit:
                        return None
            n = int(self.headers.get("Content-Length") or 0)
            if limit is not None and limit < n:
                self.rfile.read(limit)
                return None
            return self.rfile.read(n)

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            return auth[7:] if auth.startswith("Bearer ") else None

        def _may_read(self, repo_id: str) -> bool:
            repo = hub.repos.get(repo_id)
            return repo is not None and (not repo.private or self._token() == WRITE_TOKEN)

        def _write_refused(self, repo_id: str) -> bool:
            """Answer 401/403 as the Hub does when this request may not write to `repo_id`."""
            token = self._token()
            if token not in (WRITE_TOKEN, READ_TOKEN):
                self._error(401, "Invalid credentials in Authorization header")
                return True
            if token == READ_TOKEN or repo_id.split("/")[0] not in NAMESPACES:
                self._error(403, f"You don't have the rights to write to {repo_id}")
                return True
            return False

        def _dispatch(self, method: str) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.log.append((method, path))
            try:
                (self._files_route if files else self._api_route)(method, path)
            except (ConnectionError, OSError):
                pass  # the client went away

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        # -- the API --------------------------------------------------------------------

        def _api_route(self, method: str, path: str) -> None:
            parts = path.strip("/").split("/")
            if method == "GET" and path == "/api/whoami-v2":
                token = self._token()
                if token not in (WRITE_TOKEN, READ_TOKEN):
                    return self._error(401, "Invalid credentials in Authorization header")
                role = "write" if token == WRITE_TOKEN else "read"
                return self._send(200, {"type": "user", "name": "me", "orgs": [{"name": "my-org"}],
                                        "auth": {"type": "access_token", "accessToken": {"role": role}}})
            if method == "POST" and path == "/api/validate-yaml":  # upload_folder checks README.md's front matter
                return self._validate_yaml(json.loads(self._body()))
            if method == "POST" and path == "/api/repos/create":
                return self._create(json.loads(self._body() or b"{}"))
            if method == "POST" and parts[:2] == ["api", "lfs"] and len(parts) == 4 and parts[2] == "verify":
                self._body()
                return self._send(200 if parts[3] in hub.lfs else 404, {})
            if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
                return self._batch(path[1:-len(".git/info/lfs/objects/batch")], json.loads(self._body()))
            if parts[:2] != ["api", "models"] or len(parts) < 4:
                self._body()
                return self._error(404, f"no route for {method} {path}")
            repo_id, action, rest = "/".join(parts[2:4]), parts[4] if len(parts) > 4 else "", "/".join(parts[5:])
            if method == "GET":
                return self._info(repo_id, rest if action == "revision" else "main")
            body = self._body()
            if not self._may_read(repo_id):
                return self._error(401, "Repository not found", "RepoNotFound")
            if action not in ("preupload", "commit", "paths-info", "branch"):
                return self._error(404, f"no route for {method} {path}")
            status = hub.take(action)
            if status is not None:
                return self._error(status, f"fake {status}")
            if action == "paths-info":
                return self._paths_info(repo_id, rest, body)
            if self._write_refused(repo_id):
                return
            if action == "branch":
                return self._branch(repo_id, rest)
            if rest not in hub.repos[repo_id].branches:
                return self._error(404, f"Invalid rev id: {rest}", "RevisionNotFound")
            if action == "preupload":
                return self._preupload(repo_id, rest, json.loads(body))
            return self._commit(repo_id, rest, body)

        def _create(self, req: dict) -> None:
            repo_id = f"{req.get('organization') or 'me'}/{req['name']}" if "/" not in req["name"] else req["name"]
            status = hub.take("create")
            if status is not None:
                return self._error(status, f"fake {status}")
            if self._write_refused(repo_id):
                return
            if repo_id in hub.repos:  # the Hub's 409 carries the url, which exist_ok=True returns
                return self._send(409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"},
                                  {"X-Error-Message": "You already created this model repo"})
            # huggingface_hub < 2 sends {"private": true}, 2.x {"visibility": "private"}; the Hub takes both
            hub.repos[repo_id] = HubRepo(private=bool(req.get("private")) or req.get("visibility") == "private")
            self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

        def _validate_yaml(self, req: dict) -> None:
            import yaml

            content = req.get("content", "")
            hub.validated.append(content)
            try:
                meta = yaml.safe_load(content.split("---\n")[1]) if content.startswith("---\n") else {}
            except yaml.YAMLError as exc:
                return self._send(400, {"errors": [{"message": f"invalid YAML: {exc}"}]})
            if not isinstance(meta, dict):
                return self._send(400, {"errors": [{"message": "the metadata is not a mapping"}]})
            self._send(200, {"warnings": []})

        def _branch(self, repo_id: str, branch: str) -> None:
            repo = hub.repos[repo_id]
            if branch in repo.branches:
                return self._error(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = list(repo.branches["main"])
            self._send(200, {})

        def _info(self, repo_id: str, rev: str) -> None:
            if not self._may_read(repo_id):
                return self._error(401, "Repository not found", "RepoNotFound")
            head = hub.repos[repo_id].head(rev)
            if head is None:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            self._send(200, {"id": repo_id, "sha": head.oid, "private": hub.repos[repo_id].private,
                             "siblings": [{"rfilename": name} for name in head.files]})

        def _remote_oid(self, data: bytes, name: str) -> str:
            return hashlib.sha256(data).hexdigest() if name.endswith(".gguf") else git_sha1(data)

        def _preupload(self, repo_id: str, rev: str, req: dict) -> None:
            have = hub.repos[repo_id].head(rev).files
            out = []
            for f in req["files"]:
                entry = {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".gguf") else "regular",
                         "shouldIgnore": False}
                if f["path"] in have:
                    entry["oid"] = self._remote_oid(have[f["path"]], f["path"])
                out.append(entry)
            self._send(200, {"files": out, "commitOid": hub.repos[repo_id].head(rev).oid})

        def _batch(self, repo_id: str, req: dict) -> None:
            hub.batch_transfers.append(list(req.get("transfers", [])))
            status = hub.take("batch")
            if status is not None:
                return self._error(status, f"fake {status}")
            if repo_id not in hub.repos:
                return self._error(401, "Repository not found", "RepoNotFound")
            if self._write_refused(repo_id):
                return
            objects = []
            for obj in req["objects"]:
                oid, size = obj["oid"], obj["size"]
                if oid in hub.lfs:
                    objects.append({"oid": oid, "size": size})  # already stored: nothing to upload
                    continue
                upload = {"href": f"{hub.file_host}/upload/{oid}"}
                chunk = hub.multipart_chunk
                if chunk and size > chunk:
                    n = -(-size // chunk)
                    upload["header"] = {"chunk_size": str(chunk),
                                        **{f"{i:05d}": f"{hub.file_host}/upload/{oid}/{i}" for i in range(1, n + 1)}}
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                    "upload": upload, "verify": {"href": f"{hub.endpoint}/api/lfs/verify/{oid}"}}})
            self._send(200, {"transfer": "basic", "objects": objects})

        def _commit(self, repo_id: str, rev: str, body: bytes) -> None:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            head = hub.repos[repo_id].head(rev)
            tree, message = dict(head.files), ""
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    message = value.get("summary", "")
                elif key == "file":
                    tree[value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    data = hub.lfs.get(value["oid"])
                    if data is None or len(data) != value["size"]:
                        return self._error(422, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                    tree[value["path"]] = data
                elif key in ("deletedFile", "deletedFolder"):
                    tree.pop(value["path"], None)
            oid = hashlib.sha1(json.dumps(sorted((k, git_sha1(v)) for k, v in tree.items())).encode()
                               + head.oid.encode()).hexdigest()
            hub.repos[repo_id].branches[rev].append(Commit(oid, message, tree))
            self._send(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                             "pullRequestUrl": None})

        def _paths_info(self, repo_id: str, rev: str, body: bytes) -> None:
            head = hub.repos[repo_id].head(rev)
            if head is None:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            form = parse_qs(body.decode())
            out = []
            for name in form.get("paths", []):
                if name in head.files:
                    data = head.files[name]
                    entry = {"type": "file", "path": name, "size": len(data), "oid": git_sha1(data)}
                    if name.endswith(".gguf"):
                        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                    out.append(entry)
            self._send(200, out)

        # -- the file host --------------------------------------------------------------

        def _files_route(self, method: str, path: str) -> None:
            parts = path.strip("/").split("/")
            if parts[0] != "upload" or method not in ("PUT", "POST"):
                self._body()
                return self._error(404, "no such upload")
            oid = parts[1]
            status = hub.take("put")
            if status is not None:
                self._body()
                return self._error(status, f"fake {status}")
            drop = hub.take_drop(oid) if method == "PUT" else None
            data = self._body(limit=drop)
            if data is None:  # the fault: hang up mid-body, no answer
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if method == "PUT" and len(parts) == 3:  # one part of a multipart upload
                hub.parts.setdefault(oid, {})[int(parts[2])] = data
                hub.put_bytes += len(data)
                return self._send(200, {}, {"ETag": hashlib.md5(data).hexdigest()})
            if method == "POST":  # multipart completion: the parts, in order
                done = json.loads(data)
                got = hub.parts.pop(oid, {})
                data = b"".join(got[p["partNumber"]] for p in sorted(done["parts"], key=lambda p: p["partNumber"]))
            else:
                hub.put_bytes += len(data)
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, "sha256 of the upload does not match its oid")
            hub.lfs[oid] = data
            self._send(200, {})

    return Handler
