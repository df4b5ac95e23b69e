"""``to: s3``: an S3-compatible object store (AWS S3, MinIO, Cloudflare R2, Ceph...), through boto3.

- **credentials**: boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
  ``AWS_PROFILE``, web identity/OIDC role in CI, instance roles). None found, or the store
  refuses them on ``HeadBucket``: one ``F502`` before anything is sent. The bucket must
  exist (``F501`` otherwise): creating buckets is an account decision, not a publish step.
- **claim and compare**: objects under ``url``'s prefix are listed; each one at a key the
  model needs is asked for the ``sha256`` that Fuse stored in its metadata
  (``x-amz-meta-sha256``). One without it is someone else's: ``F509``, before anything is
  sent. Files already there are not sent, so a re-run sends 0 bytes and an interrupted
  publish sends only the missing files.
- **upload**: ``upload_file`` with ``ChecksumAlgorithm=SHA256``: files over ``part_size``
  go up as a multipart upload whose every part carries its sha256, checked by the store;
  smaller ones as one PUT whose full-object sha256 the store checks. Model files go first,
  ``SHA256SUMS`` last, so a complete ``SHA256SUMS`` means a complete publish. Leftover
  multipart uploads of earlier interrupted attempts on these keys are aborted.
- **verify**: ``HeadObject`` of every file: size, the ``sha256`` metadata, and for
  single-part objects the store's own SHA-256 checksum, compared with the manifest.

Object stores have no commits: there is no ``parent_commit``-style concurrency check and
no tag. Give each release its own prefix (e.g. ``s3://models/${name}/v3``).
"""
from __future__ import annotations

import base64
import hashlib
import re

from .base import SUMS, Publisher as _Base, RemoteFile, kill_point, matches, parse_sums, retrying

_URL = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?$")
MIN_PART = 5 * 1024 * 1024  # S3's smallest part (except the last one)


def parse_url(url: str) -> tuple[str, str] | None:
    m = _URL.match(url or "")
    if not m:
        return None
    prefix = (m["prefix"] or "").strip("/")
    return m["bucket"], (prefix + "/" if prefix else "")


class Publisher(_Base):
    kind = "s3"
    max_attempts = 5  # boto3's own retries of one request (standard mode: throttling, 5xx, resets)

    def __init__(self, params: dict, **kw):
        super().__init__(params, **kw)
        self.url = params["url"].rstrip("/")
        parsed = parse_url(params["url"])
        if parsed is None:
            raise self.error("F501", f"'{params['url']}' is not an s3://bucket/prefix URL", key="url",
                             fix="write url: s3://my-bucket/models/my-model")
        self.bucket, self.prefix = parsed
        self.endpoint = params.get("endpoint")
        self.region = params.get("region")
        self.part_size = max(int(params.get("part_size") or 64 * 1024 * 1024), MIN_PART)
        self.client = None
        self.sent_files = []

    def describe(self) -> str:
        return f"s3 {self.url}"

    def key(self, path: str) -> str:
        return self.prefix + path

    def _call(self, what, fn, *a, **kw):
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import ConnectionClosedError

        return retrying(self, what, lambda: fn(*a, **kw), status_of=_status, retry_after_of=lambda e: None,
                        transient=(BotoConnectionError, ConnectionClosedError))

    def _fail(self, what: str, e: Exception):
        status = _status(e)
        if status in (401, 403):
            return self.error("F502", f"the store refused {what} on {self.url} ({status} {_code(e)})",
                              fix="check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                                  "the CI role) and that they may write to this bucket")
        return self.error("F505", f"{what} on {self.url} failed: {_first_line(e)}",
                          fix="run again: files already in the store are not sent again")

    # -- steps -------------------------------------------------------------------------

    def authenticate(self):
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        session = boto3.Session(region_name=self.region)
        creds = session.get_credentials()
        if creds is None:
            raise self.error("F502", f"no credentials to publish to {self.url}",
                             fix="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (from CI secrets), AWS_PROFILE, "
                                 "or give the job a role (e.g. aws-actions/configure-aws-credentials with OIDC)")
        frozen = creds.get_frozen_credentials()
        self.secrets |= {s for s in (frozen.secret_key, frozen.token) if s}
        self.client = self.make_client(session)
        try:
            self._call("HeadBucket", self.client.head_bucket, Bucket=self.bucket)
        except ClientError as e:
            if _status(e) == 404:
                raise self.error("F501", f"bucket '{self.bucket}' does not exist" +
                                 (f" at {self.endpoint}" if self.endpoint else ""), key="url",
                                 fix="create the bucket first (Fuse does not create buckets), or fix url") from None
            raise self._fail("HeadBucket", e) from None
        except BotoCoreError as e:
            raise self._fail("HeadBucket", e) from None

    def make_client(self, session):
        from botocore.config import Config

        return session.client("s3", endpoint_url=self.endpoint,
                              config=Config(retries={"mode": "standard", "max_attempts": self.max_attempts},
                                            request_checksum_calculation="when_required",
                                            response_checksum_validation="when_required"))

    def claim(self, files):
        """An object at a key this publish writes must be Fuse's: every object Fuse uploads carries
        its ``sha256`` metadata. Someone else's object there is ``F509`` before anything is sent
        (an S3 overwrite keeps no history)."""
        sizes = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    sizes[obj["Key"][len(self.prefix):]] = obj["Size"]
        except Exception as e:
            raise self._fail("ListObjectsV2", e) from None
        self.listing = sizes
        self.heads = {f.path: self._head(f.path) for f in files if f.path in sizes}
        foreign = [p for p, h in self.heads.items() if not h.get("Metadata", {}).get("sha256")]
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise self.error("F509", f"{self.url} already holds {foreign[0]}{more}, which Fuse did not publish (no "
                                     f"sha256 metadata of Fuse's), where Fuse must write the model", key="url",
                             fix=f"move or delete {', '.join(foreign[:5])}, or publish to another prefix")

    def remote(self, files):
        out = {}
        for f in files:
            head = self.heads.get(f.path)
            if head is not None:
                out[f.path] = RemoteFile(size=head["ContentLength"], sha256=head.get("Metadata", {}).get("sha256"))
        return out

    def _head(self, path: str) -> dict:
        try:
            return self._call("HeadObject", self.client.head_object, Bucket=self.bucket, Key=self.key(path),
                              ChecksumMode="ENABLED")
        except Exception as e:
            raise self._fail(f"HeadObject {path}", e) from None

    def previous(self, remote, files):
        ours = next((f for f in files if f.path == SUMS), None)
        held = remote.get(SUMS) if SUMS in self.listing else None
        if SUMS not in self.listing or (ours is not None and matches(ours, held)):
            return set()
        try:
            body = self._call("GetObject", self.client.get_object, Bucket=self.bucket, Key=self.key(SUMS))["Body"]
            text = body.read().decode("utf-8", "replace")
        except Exception as e:
            raise self._fail("reading the earlier SHA256SUMS", e) from None
        return (set(parse_sums(text)) | {SUMS}) & set(self.listing)

    def push(self, upload, delete, files):
        from boto3.s3.transfer import TransferConfig

        self._abort_stale_uploads({self.key(f.path) for f in upload})
        config = TransferConfig(multipart_threshold=self.part_size, multipart_chunksize=self.part_size,
                                max_concurrency=4)
        for f in upload:
            kill_point(f"s3:before:{f.path}")
            extra = {"Metadata": {"sha256": f.sha256}, "ChecksumAlgorithm": "SHA256"}
            try:
                self.client.upload_file(str(f.source), self.bucket, self.key(f.path), ExtraArgs=extra, Config=config,
                                        Callback=lambda n: kill_point("s3:mid-upload"))
            except Exception as e:
                raise self._fail(f"uploading {f.path}", e) from None
            self.sent_files.append(f)
        if delete:
            try:
                self._call("DeleteObjects", self.client.delete_objects, Bucket=self.bucket,
                           Delete={"Objects": [{"Key": self.key(p)} for p in delete], "Quiet": True})
            except Exception as e:
                raise self._fail("DeleteObjects", e) from None
        kill_point("s3:pushed")

    def _abort_stale_uploads(self, keys: set[str]):
        """Multipart uploads an interrupted attempt left on these keys: they would only cost storage."""
        try:
            resp = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix)
            for up in resp.get("Uploads", []):
                if up["Key"] in keys:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
        except Exception as e:  # best effort: some S3-compatible stores do not list uploads
            self.log(f"{self.describe()}: could not list unfinished multipart uploads ({_first_line(e)})")

    def verify(self, files):
        """Size and sha256 metadata of every object; and the store's own SHA-256 checksum for
        objects sent now (single PUT: the full-object sha256; multipart: the sha256 over the
        parts' sha256s, recomputed here from the file)."""
        sent = {f.path for f in self.sent_files}
        problems = []
        for f in files:
            h = self._head(f.path)
            meta = h.get("Metadata", {}).get("sha256")
            checksum = (h.get("ChecksumSHA256") or "").split("-")[0]
            multipart = bool(re.search(r"-\d+\"?$", h.get("ETag", "")))
            if h["ContentLength"] != f.size:
                problems.append(f"{f.path}: {h['ContentLength']} bytes, expected {f.size}")
            elif meta != f.sha256:
                problems.append(f"{f.path}: sha256 metadata {meta}, expected {f.sha256}")
            elif checksum and f.path in sent:
                expected = self._composite(f) if multipart else bytes.fromhex(f.sha256)
                if base64.b64decode(checksum) != expected:
                    problems.append(f"{f.path}: the store's SHA-256 checksum differs from the file's")
        return problems

    def _composite(self, f) -> bytes:
        """S3's multipart checksum: sha256 over the concatenated sha256 of each part."""
        from s3transfer.utils import ChunksizeAdjuster

        part = ChunksizeAdjuster().adjust_chunksize(self.part_size, f.size)
        outer = hashlib.sha256()
        with open(f.source, "rb") as fh:
            while chunk := fh.read(part):
                outer.update(hashlib.sha256(chunk).digest())
        return outer.digest()

    def seal(self, files):
        return {"url": self.url, "bucket": self.bucket, "prefix": self.prefix, "endpoint": self.endpoint}


def _status(e: BaseException) -> int | None:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        return resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def _code(e: BaseException) -> str:
    resp = getattr(e, "response", None)
    return (resp.get("Error", {}).get("Code") or "") if isinstance(resp, dict) else ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
