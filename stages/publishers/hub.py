"""``to: hub``: a Hugging Face Hub model repo, through the ``huggingface_hub`` client.

What it does, in :func:`~stages.publishers.base.sync` order:

- **credentials**: the token ``huggingface_hub`` would use (``HF_OIDC_RESOURCE`` trusted
  publishing, else ``HF_TOKEN``, else the saved login), or, in GitHub Actions with
  ``id-token: write`` and no token, a trusted-publisher token for ``repo_id``. It is checked
  with ``whoami`` before anything else; a missing, rejected or read-only token is ``F502``.
  An exchanged OIDC token is masked (``::add-mask::``) and never printed or recorded.
- **repo**: ``create_repo(exist_ok=True)`` (private unless ``private: false``); the branch
  ``revision`` is created from ``main`` if missing. Its head commit is read once and passed
  as ``parent_commit``: a commit that lands on the branch in between makes the Hub refuse
  ours (``F504``) instead of silently mixing two publishes.
- **tag**: if ``tag`` exists it must point at these exact files (``F503`` otherwise, before
  any upload); a tag is never moved.
- **compare**: ``paths-info`` at the head gives each file's LFS sha256 (= the manifest's
  sha256) or git blob id; matching files are left out. Nothing left: no commit at all.
- **commit**: one ``create_commit`` with the files that differ (and deletions of files an
  earlier publish listed in its ``SHA256SUMS`` that are gone now). The manifest's sha256 is
  handed to the client, so files are not hashed again. LFS objects that an interrupted
  attempt already stored are not sent again (the LFS batch API says so).
- **verify**: ``paths-info`` at the new commit, every file; then the tag on that commit.
"""
from __future__ import annotations

import os
import tempfile

from .base import SUMS, Publisher as _Base, RemoteFile, kill_point, matches, parse_sums, retrying

PATHS_INFO_BATCH = 100


class Publisher(_Base):
    kind = "hub"

    def __init__(self, params: dict, **kw):
        super().__init__(params, **kw)
        self.repo_id = params["repo_id"]
        self.revision = params.get("revision") or "main"
        self.tag = params.get("tag")
        self.private = params.get("private")
        self.endpoint = (params.get("endpoint") or "").rstrip("/") or None
        self.message = params.get("message")
        self.description = params.get("description") or ""
        self.api = None
        self.token = None
        self.head = None
        self.url = None
        self.commit = None
        self.tag_commit = None
        self.commits_made = 0
        self.oidc = False

    def describe(self) -> str:
        return f"hub {self.repo_id}@{self.revision}"

    # -- client plumbing ---------------------------------------------------------------

    def _call(self, what, fn, *a, **kw):
        import httpx

        return retrying(self, what, lambda: fn(*a, **kw), status_of=_status,
                        retry_after_of=_retry_after, transient=(httpx.TransportError,))

    def _fail(self, what: str, e: Exception, code="F505", fix=None):
        status = _status(e)
        if status in (401, 403):
            return self.error("F502", f"the Hub refused {what} for {self.repo_id} ({status}): {_first_line(e)}",
                              fix="give a token with write access to that namespace (HF_TOKEN, a fine-grained "
                                  "token scoped to the repo, or trusted publishing via HF_OIDC_RESOURCE)")
        return self.error(code, f"{what} on {self.repo_id} failed: {_first_line(e)}",
                          fix=fix or "run again: what is already on the Hub is not sent again")

    # -- steps -------------------------------------------------------------------------

    def authenticate(self):
        import huggingface_hub
        from huggingface_hub import HfApi, constants
        from huggingface_hub.errors import HfHubHTTPError

        if constants.HF_HUB_OFFLINE:
            raise self.error("F501", "HF_HUB_OFFLINE is set: the Hub cannot be reached to publish",
                             fix="unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) for the publish step")
        env_token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
        resource = os.environ.get("HF_OIDC_RESOURCE")
        if resource:  # trusted publishing, exchanged at this step's endpoint
            token = self._oidc_exchange(resource, os.environ.get("HF_OIDC_ID_TOKEN") or None)
        else:
            token = huggingface_hub.get_token()  # HF_TOKEN, else the saved login
            if token is None and _github_oidc_available():
                token = self._oidc_exchange(self.repo_id, None)
        if not token:
            raise self.error("F502", f"no Hugging Face token to publish {self.repo_id}",
                             fix="set HF_TOKEN (a write token; in GitHub Actions from a secret), or use trusted "
                                 "publishing: 'permissions: id-token: write' and HF_OIDC_RESOURCE=" + self.repo_id)
        self.token = token
        self.secrets.add(token)
        if (self.oidc or token != env_token) and os.environ.get("GITHUB_ACTIONS") == "true":
            print(f"::add-mask::{token}", flush=True)  # a token GitHub does not know about: hide it in logs
        self.api = HfApi(endpoint=self.endpoint, token=token)
        if self.oidc:
            return  # a repo-scoped exchanged token; create_repo/commit report a refusal as F502
        try:
            me = self._call("whoami", self.api.whoami)
        except HfHubHTTPError as e:
            if _status(e) in (401, 403):
                raise self.error("F502", "the Hub rejected the token (invalid or expired)",
                                 fix="create a new write token and set HF_TOKEN to it") from None
            raise self._fail("whoami", e) from None
        except Exception as e:  # network
            raise self._fail("whoami", e) from None
        role = (((me.get("auth") or {}).get("accessToken") or {}).get("role"))
        if role == "read":
            raise self.error("F502", f"the token of '{me.get('name')}' is read-only: it cannot publish",
                             fix="use a write token, or a fine-grained token with write access to " + self.repo_id)

    def _oidc_exchange(self, resource: str, id_token: str | None) -> str:
        from huggingface_hub import constants

        try:
            from huggingface_hub._oidc import oidc_login
        except ImportError:
            raise self.error("F502", "this huggingface_hub has no trusted publishing (OIDC) support",
                             fix="install huggingface_hub>=1.19, or set HF_TOKEN") from None
        try:
            result = oidc_login(resource=resource, subject_token=id_token, endpoint=self.endpoint or constants.ENDPOINT)
        except Exception as e:
            raise self.error("F502", f"trusted publishing token exchange for {resource} failed: {_first_line(e)}",
                             fix="add this workflow as a trusted publisher of the repo on the Hub and give the job "
                                 "'permissions: id-token: write', or set HF_TOKEN instead") from None
        self.oidc = True
        return result["access_token"]

    def open(self):
        from huggingface_hub.errors import RevisionNotFoundError

        private = True if self.private is None else self.private
        try:
            url = self._call("create_repo", self.api.create_repo, self.repo_id, private=private, exist_ok=True)
        except Exception as e:
            raise self._fail("create_repo", e) from None
        self.url = str(url).rstrip("/")
        try:
            info = self._call("repo_info", self.api.repo_info, self.repo_id, revision=self.revision)
        except RevisionNotFoundError as e:
            if self.revision == "main":
                raise self._fail("repo_info", e) from None
            self.log(f"{self.describe()}: branch '{self.revision}' does not exist; creating it from main")
            try:
                self._call("create_branch", self.api.create_branch, self.repo_id, branch=self.revision, exist_ok=True)
                info = self._call("repo_info", self.api.repo_info, self.repo_id, revision=self.revision)
            except Exception as e:
                raise self._fail("create_branch", e) from None
        except Exception as e:
            raise self._fail("repo_info", e) from None
        self.head = info.sha
        if self.private is not None and info.private is not None and bool(info.private) != bool(self.private):
            self.warn("F508", f"{self.repo_id} exists and is {'private' if info.private else 'public'}, but the "
                              f"pipeline says private: {str(self.private).lower()}; Fuse does not change visibility",
                      fix="change it in the repo settings on the Hub, or the pipeline")

    def _paths_info(self, paths: list[str], revision: str) -> dict[str, RemoteFile]:
        out = {}
        for i in range(0, len(paths), PATHS_INFO_BATCH):
            batch = paths[i:i + PATHS_INFO_BATCH]
            try:
                items = self._call("paths-info", self.api.get_paths_info, self.repo_id, batch, revision=revision)
            except Exception as e:
                raise self._fail("paths-info", e) from None
            for it in items:
                if getattr(it, "blob_id", None) is None or not hasattr(it, "size"):
                    continue  # a folder
                lfs = getattr(it, "lfs", None)
                out[it.path] = RemoteFile(size=it.size, sha256=lfs.sha256 if lfs else None,
                                          blob_id=None if lfs else it.blob_id)
        return out

    def check_release(self, files):
        if not self.tag:
            return
        try:
            refs = self._call("refs", self.api.list_repo_refs, self.repo_id)
        except Exception as e:
            raise self._fail("list refs", e) from None
        tag = next((t for t in refs.tags if t.name == self.tag), None)
        if tag is None:
            return
        held = self._paths_info([f.path for f in files], tag.target_commit)
        differ = [f.path for f in files if not matches(f, held.get(f.path))]
        if differ:
            raise self.error("F503", f"tag '{self.tag}' of {self.repo_id} already points at commit "
                                     f"{tag.target_commit[:12]} with different content ({len(differ)} file(s) differ, "
                                     f"e.g. {differ[0]}); a published tag is never moved",
                             key="tag", fix="give this model a new tag (e.g. bump the version), or delete the old "
                                            "tag on the Hub if it was a mistake")
        self.tag_commit = tag.target_commit
        self.log(f"{self.describe()}: tag '{self.tag}' already points at these files ({tag.target_commit[:12]})")

    def remote(self, files):
        return self._paths_info([f.path for f in files], self.head)

    def previous(self, remote, files):
        ours = next((f for f in files if f.path == SUMS), None)
        held = remote.get(SUMS)
        if held is None or (ours is not None and matches(ours, held)):
            return set()  # no earlier publish, or the same file list as now
        from huggingface_hub import hf_hub_download

        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = self._call("download SHA256SUMS", hf_hub_download, self.repo_id, SUMS, revision=self.head,
                                  token=self.token, endpoint=self.endpoint, cache_dir=tmp)
                text = open(path, encoding="utf-8").read()
            except Exception as e:
                raise self._fail("reading the earlier SHA256SUMS", e) from None
        return set(parse_sums(text)) | {SUMS}

    def push(self, upload, delete, files):
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.errors import HfHubHTTPError

        ops = []
        for f in upload:
            op = CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(f.source))
            op.upload_info.sha256 = bytes.fromhex(f.sha256)  # from the manifest: not hashed again
            ops.append(op)
        ops += [CommitOperationDelete(path_in_repo=p) for p in delete]
        message = self.message or "Publish with Fuse"
        kill_point("hub:before-commit")
        try:
            info = self.api.create_commit(self.repo_id, ops, commit_message=message,
                                          commit_description=self.description, revision=self.revision,
                                          parent_commit=self.head)
        except HfHubHTTPError as e:
            if _status(e) in (409, 412):
                raise self.error("F504", f"branch '{self.revision}' of {self.repo_id} moved while publishing "
                                         f"(it was at {self.head[:12]}): someone else committed", key="revision",
                                 fix="check what changed on the Hub, then run again: Fuse compares again and "
                                     "sends only what differs") from None
            if self._landed(files):
                return
            raise self._fail("commit", e) from None
        except Exception as e:  # network errors, an LFS upload that gave up after its retries
            if self._landed(files):
                return
            raise self._fail("upload", e) from None
        self.commit = info.oid
        if self.commit != self.head:
            self.commits_made += 1
        self.head = self.commit
        kill_point("hub:committed")

    def _landed(self, files) -> bool:
        """After a failed commit call: did the commit land anyway (a lost response)?"""
        try:
            info = self.api.repo_info(self.repo_id, revision=self.revision)
        except Exception:
            return False
        if info.sha == self.head:
            return False
        held = self._paths_info([f.path for f in files], info.sha)
        if all(matches(f, held.get(f.path)) for f in files):
            self.log(f"{self.describe()}: the commit landed although its answer was lost ({info.sha[:12]})")
            self.commit = self.head = info.sha
            self.commits_made += 1
            return True
        return False

    def verify(self, files):
        self.commit = self.commit or self.head
        held = self._paths_info([f.path for f in files], self.commit)
        problems = []
        for f in files:
            r = held.get(f.path)
            if r is None:
                problems.append(f"{f.path}: missing at {self.commit[:12]}")
            elif not matches(f, r):
                problems.append(f"{f.path}: size {r.size}, sha256 {r.sha256 or r.blob_id} at {self.commit[:12]}")
        return problems

    def seal(self, files):
        tag = None
        if self.tag:
            if self.tag_commit is None:
                kill_point("hub:before-tag")
                try:
                    self._call("create_tag", self.api.create_tag, self.repo_id, tag=self.tag, revision=self.commit,
                               tag_message=f"Published by Fuse: {len(files)} files verified")
                except Exception as e:
                    if _status(e) == 409:  # created in between by someone else: same content?
                        self.check_release(files)
                    else:
                        raise self._fail("create_tag", e) from None
                self.tag_commit = self.tag_commit or self.commit
            tag = self.tag
        return {"repo_id": self.repo_id, "url": self.url, "revision": self.revision, "commit": self.commit,
                "commit_url": f"{self.url}/commit/{self.commit}", "tag": tag, "tag_commit": self.tag_commit,
                "commits": self.commits_made}


def _status(e: BaseException) -> int | None:
    resp = getattr(e, "response", None)
    return getattr(resp, "status_code", None)


def _retry_after(e: BaseException) -> float | None:
    resp = getattr(e, "response", None)
    value = resp.headers.get("Retry-After") if resp is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _github_oidc_available() -> bool:
    return (os.environ.get("GITHUB_ACTIONS") == "true" and bool(os.environ.get("ACTIONS_ID_TOKEN_REQUEST_URL"))
            and bool(os.environ.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN")))
