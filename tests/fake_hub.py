"""A small Hugging Face Hub–compatible HTTP server for the publish tests (stdlib only).

It speaks the part of the Hub's HTTP API that the *real* ``huggingface_hub`` client uses to
publish a model without Xet (``HF_HUB_DISABLE_XET=1``): whoami, repo create/info,
validate-yaml, preupload, the LFS batch API with basic and multipart transfers (+ verify),
the NDJSON commit (with ``parentCommit``), paths-info, refs, branches, tags, resolve
(downloads) and the OIDC token exchange (``/oauth/token``).

It keeps git-like state in memory (commits with a parent and a file table, branches, tags,
an LFS object store per repo) and counts what it received, so a test can assert "0 bytes
uploaded, no commit". Faults are injected per request: an HTTP status with headers (500,
401, 429 + Retry-After), a connection dropped half way through reading the body, or a
callback run before the request is handled (e.g. a concurrent commit).

This encodes our reading of the protocol as of huggingface_hub 1.33; the tests that drive
it through the real client are what keep it honest.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".onnx_data", ".gguf", ".h5", ".msgpack",
                ".npz", ".zip", ".tar.gz", ".model", ".pkl")
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files over 10 MB through LFS
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Entry:
    size: int
    blob: str  # git blob sha1 (of the pointer file for LFS files)
    lfs: str | None = None  # sha256 of the content, for LFS files
    content: bytes | None = None  # regular files only


@dataclass
class Repo:
    id: str
    private: bool
    commits: dict = field(default_factory=dict)  # oid -> {"parent", "files": {path: Entry}, "summary"}
    branches: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    lfs: dict = field(default_factory=dict)  # sha256 -> bytes
    parts: dict = field(default_factory=dict)  # (sha256, n) -> bytes, multipart in flight

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if rev in self.commits:
            return rev
        return None


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    status: int | None = None
    headers: dict = field(default_factory=dict)
    body: dict | None = None
    drop: bool = False  # close the connection after reading half of the body
    times: int = 1  # how many matching requests it hits (-1: all)
    skip: int = 0  # let this many matching requests through first
    before: object = None  # callable(hub) run before handling, then the request proceeds
    lose_answer: bool = False  # handle the request, then close the connection instead of answering


class FakeHub:
    """Start with ``with FakeHub() as hub:``; ``hub.url`` is the endpoint (HF_ENDPOINT)."""

    def __init__(self, tokens: dict | None = None, multipart_chunk: int | None = None):
        # token -> {"name": user, "orgs": [...], "role": "write"|"read"}
        self.tokens = dict(tokens or {"hf_test_write_token_0123456789": {"name": "alice", "orgs": ["acme"],
                                                                          "role": "write"}})
        self.repos: dict[str, Repo] = {}
        self.faults: list[Fault] = []
        self.multipart_chunk = multipart_chunk
        self.oidc = None  # (id token, access token) accepted by /oauth/token
        self.lock = threading.RLock()
        self.reset_stats()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.hub = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = None

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self):
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # -- test controls -----------------------------------------------------------------

    def reset_stats(self):
        with self.lock:
            self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
            self.put_bytes = 0  # body bytes received by LFS PUTs (including dropped ones)
            self.stored: list[str] = []  # LFS oids stored, in order
            self.commit_bytes = 0  # NDJSON commit payload bytes received
            self.commits_made = 0
            self.auth_headers: list[str] = []

    def fail(self, method: str, path_regex: str, status: int | None = None, *, headers=None, body=None,
             drop=False, times=1, skip=0, before=None, lose_answer=False) -> Fault:
        f = Fault(method.upper(), re.compile(path_regex), status, dict(headers or {}), body, drop, times, skip, before,
                  lose_answer)
        self.faults.append(f)
        return f

    def head(self, repo_id: str, branch: str = "main") -> str | None:
        repo = self.repos.get(repo_id)
        return repo.branches.get(branch) if repo else None

    def files(self, repo_id: str, rev: str = "main") -> dict[str, Entry]:
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.resolve(rev)]["files"])

    def read(self, repo_id: str, path: str, rev: str = "main") -> bytes:
        e = self.files(repo_id, rev)[path]
        return self.repos[repo_id].lfs[e.lfs] if e.lfs else e.content

    def commit_directly(self, repo_id: str, path: str, data: bytes, branch: str = "main") -> str:
        """Another client's commit (for concurrency tests)."""
        with self.lock:
            repo = self.repos[repo_id]
            files = dict(repo.commits[repo.branches[branch]]["files"])
            files[path] = Entry(len(data), git_blob_sha1(data), None, data)
            return self._new_commit(repo, branch, files, "someone else's commit", count=False)

    def count(self, method: str, path_part: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and path_part in p)

    # -- state helpers -----------------------------------------------------------------

    def _new_commit(self, repo: Repo, branch: str, files: dict, summary: str, count=True) -> str:
        oid = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        repo.commits[oid] = {"parent": repo.branches.get(branch), "files": files, "summary": summary}
        repo.branches[branch] = oid
        if count:
            self.commits_made += 1
        return oid

    def _create_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, private)
        attrs = Entry(len(GITATTRIBUTES), git_blob_sha1(GITATTRIBUTES), None, GITATTRIBUTES)
        self._new_commit(repo, "main", {".gitattributes": attrs}, "initial commit", count=False)
        self.repos[repo_id] = repo
        return repo

    @staticmethod
    def is_lfs(path: str, size: int) -> bool:
        return path.endswith(LFS_SUFFIXES) or size >= LFS_THRESHOLD


class _Drop(Exception):
    pass


ROUTES = []


def route(method, pattern):
    def deco(fn):
        ROUTES.append((method, re.compile("^" + pattern + "$"), fn))
        return fn
    return deco


REPO = r"/api/models/(?P<ns>[^/]+)/(?P<name>[^/]+)"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1"

    def log_message(self, *a):  # quiet
        pass

    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    # -- plumbing ----------------------------------------------------------------------

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _read_body(self, limit: int | None = None) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                out += self.rfile.read(size)
                self.rfile.readline()
                if limit is not None and len(out) >= limit:
                    break
            return bytes(out)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n if limit is None else min(n, limit))

    def _dispatch(self, method: str):
        hub = self.hub
        path = urlsplit(self.path).path
        self.status = 0
        try:
            fault = self._fault(method, path)
            if fault and fault.before:
                fault.before(hub)
                fault = None
            if fault and fault.lose_answer:
                self._lose = True
                fault = None
            if fault and fault.drop:
                n = int(self.headers.get("Content-Length") or 0)
                got = self._read_body(limit=max(1, n // 2))
                if method == "PUT":
                    with hub.lock:
                        hub.put_bytes += len(got)
                raise _Drop()
            if fault:
                self._read_body()
                self._json(fault.status, fault.body or {"error": f"injected {fault.status}"}, fault.headers)
                return
            for m, pattern, fn in ROUTES:
                if m == method or (m == "GET" and method == "HEAD"):
                    match = pattern.match(path)
                    if match:
                        fn(self, **{k: unquote(v) for k, v in match.groupdict().items()})
                        return
            self._read_body()
            self._json(404, {"error": f"no route {method} {path}"})
        except _Drop:
            self.status = -1
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        finally:
            with hub.lock:
                hub.requests.append((method, path, self.status))

    def _fault(self, method, path) -> Fault | None:
        hub = self.hub
        with hub.lock:
            for f in hub.faults:
                if f.method == method and f.pattern.search(path) and f.times != 0:
                    if f.skip > 0:
                        f.skip -= 1
                        continue
                    if f.times > 0:
                        f.times -= 1
                    return f
        return None

    def _send(self, status: int, body: bytes, headers: dict | None = None, content_type="application/json"):
        if getattr(self, "_lose", False):  # the work is done; the answer never arrives
            self._lose = False
            raise _Drop()
        self.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None):
        headers = dict(headers or {})
        if status >= 400 and isinstance(obj, dict) and "error" in obj:
            headers.setdefault("X-Error-Message", obj["error"])
        self._send(status, json.dumps(obj).encode(), headers)

    def _token(self) -> dict | None:
        auth = self.headers.get("Authorization", "")
        with self.hub.lock:
            self.hub.auth_headers.append(auth)
        if not auth.startswith("Bearer "):
            return None
        return self.hub.tokens.get(auth[7:])

    def _repo(self, ns, name, write=False) -> Repo | None:
        """The repo, or None after answering 401/403/404 as the Hub does."""
        user = self._token()
        repo = self.hub.repos.get(f"{ns}/{name}")
        if self.headers.get("Authorization") and user is None:
            self._json(401, {"error": "Invalid credentials in Authorization header"})
            return None
        if repo is None or (repo.private and not _can_read(user, ns)):
            self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return None
        if write and not _can_write(user, ns):
            self._json(403, {"error": "You don't have the rights to write to this repository"})
            return None
        return repo

    def _rev(self, repo: Repo, rev: str) -> str | None:
        oid = repo.resolve(rev)
        if oid is None:
            self._json(404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"})
        return oid


def _can_read(user, ns) -> bool:
    return bool(user) and (ns == user["name"] or ns in user.get("orgs", []))


def _can_write(user, ns) -> bool:
    return _can_read(user, ns) and user.get("role") == "write"


def _file_json(path: str, e: Entry) -> dict:
    d = {"type": "file", "oid": e.blob, "size": e.size, "path": path}
    if e.lfs:
        d["lfs"] = {"oid": e.lfs, "size": e.size, "pointerSize": len(lfs_pointer(e.lfs, e.size))}
    return d


# --------------------------------------------------------------------------- routes


@route("GET", r"/api/whoami-v2")
def whoami(h: _Handler):
    user = h._token()
    if user is None:
        h._json(401, {"error": "Invalid credentials in Authorization header"})
        return
    h._json(200, {"type": "user", "name": user["name"], "orgs": [{"name": o} for o in user.get("orgs", [])],
                  "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": user["role"]}}})


@route("POST", r"/api/repos/create")
def create_repo(h: _Handler):
    body = json.loads(h._read_body() or b"{}")
    user = h._token()
    if user is None:
        h._json(401, {"error": "Invalid credentials in Authorization header"})
        return
    ns = body.get("organization") or user["name"]
    repo_id = f"{ns}/{body['name']}"
    url = f"{h.hub.url}/{repo_id}"
    if not _can_write(user, ns):
        h._json(403, {"error": f"You don't have the rights to create a model under the namespace {ns}"})
        return
    with h.hub.lock:
        if repo_id in h.hub.repos:
            h._json(409, {"error": "You already created this model repo", "url": url})
            return
        private = body.get("visibility", "private" if body.get("private") else "public") == "private"
        h.hub._create_repo(repo_id, private)
    h._json(200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex})


@route("POST", r"/api/validate-yaml")
def validate_yaml(h: _Handler):
    body = json.loads(h._read_body() or b"{}")
    content = body.get("content", "")
    if not content.startswith("---\n"):
        h._json(200, {"warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
        return
    h._json(200, {"errors": [], "warnings": []})


@route("GET", REPO + r"(?:/revision/(?P<rev>[^/]+))?")
def repo_info(h: _Handler, ns, name, rev=None):
    repo = h._repo(ns, name)
    if repo is None:
        return
    oid = h._rev(repo, rev or "main")
    if oid is None:
        return
    files = repo.commits[oid]["files"]
    h._json(200, {"id": repo.id, "modelId": repo.id, "sha": oid, "private": repo.private, "disabled": False,
                  "gated": False, "siblings": [{"rfilename": p} for p in sorted(files)]})


@route("POST", REPO + r"/preupload/(?P<rev>[^/]+)")
def preupload(h: _Handler, ns, name, rev):
    body = json.loads(h._read_body() or b"{}")
    repo = h._repo(ns, name, write=True)
    if repo is None:
        return
    oid = repo.resolve(rev)
    files = repo.commits[oid]["files"] if oid else {}
    out = []
    for f in body.get("files", []):
        lfs = FakeHub.is_lfs(f["path"], f["size"])
        remote = files.get(f["path"])
        remote_oid = None
        if remote is not None:
            remote_oid = remote.lfs if (lfs and remote.lfs) else (remote.blob if not lfs and not remote.lfs else None)
        out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                    "oid": remote_oid})
    h._json(200, {"files": out, "commitOid": oid})


@route("POST", r"/(?P<ns>[^/]+)/(?P<name>[^/]+)\.git/info/lfs/objects/batch")
def lfs_batch(h: _Handler, ns, name):
    body = json.loads(h._read_body() or b"{}")
    repo = h._repo(ns, name, write=True)
    if repo is None:
        return
    objects = []
    base = f"{h.hub.url}/_lfs/{ns}/{name}"
    chunk = h.hub.multipart_chunk
    for o in body.get("objects", []):
        item = {"oid": o["oid"], "size": o["size"], "authenticated": True}
        if o["oid"] not in repo.lfs:
            if chunk and o["size"] > chunk and "multipart" in body.get("transfers", []):
                n = -(-o["size"] // chunk)
                header = {"chunk_size": str(chunk)}
                header.update({str(i + 1): f"{base}/{o['oid']}/part/{i + 1}" for i in range(n)})
                upload = {"href": f"{base}/{o['oid']}/complete", "header": header}
            else:
                upload = {"href": f"{base}/{o['oid']}", "header": {}}
            item["actions"] = {"upload": upload, "verify": {"href": f"{base}/verify", "header": {}}}
        objects.append(item)
    h._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
            content_type="application/vnd.git-lfs+json")


@route("PUT", r"/_lfs/(?P<ns>[^/]+)/(?P<name>[^/]+)/(?P<oid>[0-9a-f]{64})")
def lfs_put(h: _Handler, ns, name, oid):
    data = h._read_body()
    hub = h.hub
    with hub.lock:
        hub.put_bytes += len(data)
        if hashlib.sha256(data).hexdigest() != oid:
            h._json(400, {"error": "sha256 of the uploaded content does not match the oid"})
            return
        hub.repos[f"{ns}/{name}"].lfs[oid] = data
        hub.stored.append(oid)
    h._send(200, b"", content_type="text/plain")


@route("PUT", r"/_lfs/(?P<ns>[^/]+)/(?P<name>[^/]+)/(?P<oid>[0-9a-f]{64})/part/(?P<n>\d+)")
def lfs_put_part(h: _Handler, ns, name, oid, n):
    data = h._read_body()
    hub = h.hub
    with hub.lock:
        hub.put_bytes += len(data)
        hub.repos[f"{ns}/{name}"].parts[(oid, int(n))] = data
    h._send(200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'}, content_type="text/plain")


@route("POST", r"/_lfs/(?P<ns>[^/]+)/(?P<name>[^/]+)/(?P<oid>[0-9a-f]{64})/complete")
def lfs_complete(h: _Handler, ns, name, oid):
    body = json.loads(h._read_body() or b"{}")
    hub = h.hub
    with hub.lock:
        repo = hub.repos[f"{ns}/{name}"]
        parts = [repo.parts.get((oid, p["partNumber"])) for p in body.get("parts", [])]
        if any(p is None for p in parts):
            h._json(400, {"error": "missing part"})
            return
        data = b"".join(parts)
        if hashlib.sha256(data).hexdigest() != oid:
            h._json(400, {"error": "sha256 of the assembled parts does not match the oid"})
            return
        repo.lfs[oid] = data
        hub.stored.append(oid)
        for p in body["parts"]:
            repo.parts.pop((oid, p["partNumber"]), None)
    h._json(200, {"success": True})


@route("POST", r"/_lfs/(?P<ns>[^/]+)/(?P<name>[^/]+)/verify")
def lfs_verify(h: _Handler, ns, name):
    body = json.loads(h._read_body() or b"{}")
    repo = h.hub.repos.get(f"{ns}/{name}")
    data = repo.lfs.get(body.get("oid")) if repo else None
    if data is None or len(data) != body.get("size"):
        h._json(404, {"error": "object not found"})
        return
    h._json(200, {"success": True})


@route("POST", REPO + r"/commit/(?P<rev>[^/]+)")
def commit(h: _Handler, ns, name, rev):
    raw = h._read_body()
    hub = h.hub
    with hub.lock:
        hub.commit_bytes += len(raw)
    repo = h._repo(ns, name, write=True)
    if repo is None:
        return
    lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
    header = next((x["value"] for x in lines if x["key"] == "header"), {})
    with hub.lock:
        if rev not in repo.branches:
            h._json(404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"})
            return
        head = repo.branches[rev]
        if header.get("parentCommit") and header["parentCommit"] != head:
            h._json(412, {"error": "A commit has happened since. Please refresh and try again."})
            return
        files = dict(repo.commits[head]["files"])
        for item in lines:
            key, v = item["key"], item["value"]
            if key == "file":
                data = base64.b64decode(v["content"])
                files[v["path"]] = Entry(len(data), git_blob_sha1(data), None, data)
            elif key == "lfsFile":
                if v["oid"] not in repo.lfs:
                    h._json(422, {"error": f"Your push was rejected because an LFS pointer pointed to a file that "
                                           f"does not exist ({v['path']})"})
                    return
                size = len(repo.lfs[v["oid"]])
                files[v["path"]] = Entry(size, git_blob_sha1(lfs_pointer(v["oid"], size)), v["oid"])
            elif key == "deletedFile":
                files.pop(v["path"], None)
            elif key == "deletedFolder":
                for p in [p for p in files if p.startswith(v["path"].rstrip("/") + "/")]:
                    files.pop(p)
        oid = hub._new_commit(repo, rev, files, header.get("summary", ""))
    h._json(200, {"success": True, "commitOid": oid, "commitUrl": f"{hub.url}/{repo.id}/commit/{oid}",
                  "hookOutput": "", "pullRequestUrl": None})


@route("POST", REPO + r"/paths-info/(?P<rev>[^/]+)")
def paths_info(h: _Handler, ns, name, rev):
    form = parse_qs(h._read_body().decode())
    repo = h._repo(ns, name)
    if repo is None:
        return
    oid = h._rev(repo, rev)
    if oid is None:
        return
    files = repo.commits[oid]["files"]
    out = []
    for p in form.get("paths", []):
        if p in files:
            out.append(_file_json(p, files[p]))
        elif any(f.startswith(p.rstrip("/") + "/") for f in files):
            out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "path": p})
    h._json(200, out)


@route("GET", REPO + r"/tree/(?P<rev>[^/]+)")
def tree(h: _Handler, ns, name, rev):
    """The recursive listing snapshot_download reads (one page: no Link header)."""
    repo = h._repo(ns, name)
    if repo is None:
        return
    oid = h._rev(repo, unquote(rev))
    if oid is None:
        return
    h._json(200, [_file_json(p, e) for p, e in sorted(repo.commits[oid]["files"].items())])


@route("GET", REPO + r"/refs")
def refs(h: _Handler, ns, name):
    repo = h._repo(ns, name)
    if repo is None:
        return
    h._json(200, {
        "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in sorted(repo.branches.items())],
        "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c} for t, c in sorted(repo.tags.items())],
        "converts": [], "pullRequests": []})


@route("POST", REPO + r"/branch/(?P<branch>[^/]+)")
def create_branch(h: _Handler, ns, name, branch):
    body = json.loads(h._read_body() or b"{}")
    repo = h._repo(ns, name, write=True)
    if repo is None:
        return
    with h.hub.lock:
        if branch in repo.branches:
            h._json(409, {"error": "Reference already exists"})
            return
        start = h._rev(repo, body.get("startingPoint") or "main")
        if start is None:
            return
        repo.branches[branch] = start
    h._json(200, {})


@route("POST", REPO + r"/tag/(?P<rev>[^/]+)")
def create_tag(h: _Handler, ns, name, rev):
    body = json.loads(h._read_body() or b"{}")
    repo = h._repo(ns, name, write=True)
    if repo is None:
        return
    with h.hub.lock:
        oid = h._rev(repo, rev)
        if oid is None:
            return
        if body["tag"] in repo.tags:
            h._json(409, {"error": "Tag already exists"})
            return
        repo.tags[body["tag"]] = oid
    h._json(200, {})


@route("DELETE", REPO + r"/tag/(?P<tag>[^/]+)")
def delete_tag(h: _Handler, ns, name, tag):
    h._read_body()
    repo = h._repo(ns, name, write=True)
    if repo is None:
        return
    with h.hub.lock:
        repo.tags.pop(tag, None)
    h._json(200, {})


@route("GET", r"/(?P<ns>[^/_][^/]*)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
def resolve(h: _Handler, ns, name, rev, path):
    repo = h._repo(ns, name)
    if repo is None:
        return
    oid = h._rev(repo, rev)
    if oid is None:
        return
    e = repo.commits[oid]["files"].get(path)
    if e is None:
        h._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": oid})
        return
    data = repo.lfs[e.lfs] if e.lfs else e.content
    headers = {"X-Repo-Commit": oid, "ETag": f'"{e.blob}"'}
    if e.lfs:
        headers.update({"X-Linked-Etag": f'"{e.lfs}"', "X-Linked-Size": e.size})
    h._send(200, data, headers, content_type="application/octet-stream")


@route("POST", r"/oauth/token")
def oauth_token(h: _Handler):
    body = json.loads(h._read_body() or b"{}")
    hub = h.hub
    if not hub.oidc or body.get("subject_token") != hub.oidc[0]:
        h._json(401, {"error": "invalid OIDC id token"})
        return
    ns = body.get("resource", "").split("/")[0]
    hub.tokens[hub.oidc[1]] = {"name": "oidc-bot", "orgs": [ns], "role": "write"}
    h._json(200, {"access_token": hub.oidc[1], "token_type": "bearer", "expires_in": 3600,
                  "issued_token_type": "urn:ietf:params:oauth:token-type:access_token"})
