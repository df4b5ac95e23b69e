"""``publish: {to: s3}`` with the real boto3 client against moto's S3 server on 127.0.0.1,
and a pipeline that publishes to the Hub, S3 and a directory in one run.

A dropped connection is injected in botocore's send hook (the exception a reset socket
raises), since moto's server cannot be told to drop one; the store sees a part that never
arrives, as it would.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest

pytest.importorskip("moto")
pytest.importorskip("boto3")

from stages.findings import FuseError  # noqa: E402
from stages.publishers import s3  # noqa: E402
from stages.publishers.base import LocalFile, sync  # noqa: E402

MB = 1024 * 1024
SECRET_KEY = "s3-SECRET-key-0123456789abcdef"


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def store(moto_url, monkeypatch, tmp_path):
    import boto3

    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never look for an instance role
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    client = boto3.client("s3", endpoint_url=moto_url)
    bucket = f"models-{tmp_path.name.lower().replace('_', '-')[-40:]}".strip("-")
    client.create_bucket(Bucket=bucket)
    client.bucket = bucket
    client.url = moto_url
    return client


class Counting(s3.Publisher):
    """The real publisher, with a tap on what boto3 sends (and a place to inject faults)."""

    max_attempts = 2
    fault = None  # callable(event_name, request) run before each request is sent

    def make_client(self, session):
        client = super().make_client(session)
        self.sent: list[tuple[str, str, int]] = []  # (operation, key, body bytes)
        client.meta.events.register("before-send.s3", self._tap)
        return client

    def _tap(self, request, event_name, **kw):
        op = event_name.rsplit(".", 1)[-1]
        key = request.url.split("?")[0].split(f"/{self.bucket}/", 1)[-1]
        if request.method in ("PUT", "POST"):
            self.sent.append((op, key, int(request.headers.get("Content-Length") or 0)))
        if self.fault:
            return self.fault(op, request)

    def uploaded(self) -> dict[str, int]:
        out = {}
        for op, key, n in self.sent:
            if op in ("PutObject", "UploadPart"):
                out[key] = out.get(key, 0) + n
        return out


def make_files(root: Path) -> list[LocalFile]:
    root.mkdir(parents=True, exist_ok=True)
    content = {"model-00001-of-00002.safetensors": os.urandom(2 * MB),
               "model-00002-of-00002.safetensors": os.urandom(11 * MB),  # > part size: multipart
               "config.json": b'{"model_type": "llama"}', "README.md": b"---\nlicense: mit\n---\n# m\n"}
    sums = "".join(f"{hashlib.sha256(d).hexdigest()}  {p}\n" for p, d in sorted(content.items())).encode()
    content["SHA256SUMS"] = sums
    files = []
    for path, data in content.items():
        (root / path).write_bytes(data)
        files.append(LocalFile(path, root / path, len(data), hashlib.sha256(data).hexdigest()))
    return files


def publisher(store, prefix="tiny/v1", **params) -> Counting:
    params = {"url": f"s3://{store.bucket}/{prefix}", "endpoint": store.url, "part_size": 5 * MB, **params}
    return Counting(params, log=lambda m: None)


def test_first_publish_then_rerun_sends_nothing_and_everything_verifies(store, tmp_path):
    files = make_files(tmp_path / "m")
    pub = publisher(store)
    out = sync(pub, files)
    assert len(out.uploaded) == 5 and out.bytes_uploaded == sum(f.size for f in files)
    big = "tiny/v1/model-00002-of-00002.safetensors"
    assert [op for op, key, _ in pub.sent if key == big].count("UploadPart") == 3  # 5 + 5 + 1 MB parts
    assert pub.uploaded() == {f"tiny/v1/{f.path}": f.size for f in files}
    assert [key for op, key, _ in pub.sent if op == "PutObject"][-1] == "tiny/v1/SHA256SUMS"  # the last one
    for f in files:
        head = store.head_object(Bucket=store.bucket, Key=f"tiny/v1/{f.path}", ChecksumMode="ENABLED")
        assert head["Metadata"]["sha256"] == f.sha256 and head["ContentLength"] == f.size
        if f.size < 5 * MB:  # single PUT: the store computed the full-object SHA-256 itself
            assert base64.b64decode(head["ChecksumSHA256"]).hex() == f.sha256
        body = store.get_object(Bucket=store.bucket, Key=f"tiny/v1/{f.path}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == f.sha256

    again = publisher(store)
    out = sync(again, files)
    assert out.uploaded == [] and again.uploaded() == {} and again.sent == []  # 0 bytes, no write at all


def test_dropped_connection_mid_upload_then_rerun_sends_only_the_missing_files(store, tmp_path):
    from botocore.exceptions import ConnectionClosedError

    files = make_files(tmp_path / "m")
    pub = publisher(store)
    calls = []

    def drop_part_2(op, request):
        if op == "UploadPart" and "partNumber=2" in request.url:
            calls.append(request.url)
            raise ConnectionClosedError(endpoint_url=request.url)

    pub.fault = drop_part_2
    with pytest.raises(FuseError) as e:
        sync(pub, files)
    assert e.value.finding.code == "F505" and "model-00002" in e.value.finding.message
    assert len(calls) >= 2  # boto3 retried, then gave up
    listed = {o["Key"] for o in store.list_objects_v2(Bucket=store.bucket).get("Contents", [])}
    assert listed == {"tiny/v1/model-00001-of-00002.safetensors"}  # the first file made it, nothing else

    again = publisher(store)
    out = sync(again, files)
    sent = again.uploaded()
    assert "tiny/v1/model-00001-of-00002.safetensors" not in sent  # not sent twice
    assert sent == {f"tiny/v1/{f.path}": f.size for f in files if not f.path.startswith("model-00001")}
    assert {f.path for f in out.uploaded} == {f.path for f in files} - {"model-00001-of-00002.safetensors"}
    assert store.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []  # nothing left dangling


def test_changed_file_is_resent_and_files_of_the_earlier_publish_are_removed(store, tmp_path):
    files = make_files(tmp_path / "m")
    sync(publisher(store), files)
    # the next model: one shard changed, the other gone; an unrelated object must stay
    store.put_object(Bucket=store.bucket, Key="tiny/v1/notes-by-someone.txt", Body=b"keep me")
    root = tmp_path / "m"
    (root / "model-00001-of-00001.safetensors").write_bytes(b"new" * 1000)
    new = [f for f in files if f.path in ("config.json", "README.md")]
    new.append(LocalFile("model-00001-of-00001.safetensors", root / "model-00001-of-00001.safetensors", 3000,
                         hashlib.sha256(b"new" * 1000).hexdigest()))
    sums = "".join(f"{f.sha256}  {f.path}\n" for f in sorted(new, key=lambda f: f.path)).encode()
    (root / "SHA256SUMS").write_bytes(sums)
    new.append(LocalFile("SHA256SUMS", root / "SHA256SUMS", len(sums), hashlib.sha256(sums).hexdigest()))
    pub = publisher(store)
    out = sync(pub, new)
    assert sorted(out.deleted) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert set(pub.uploaded()) == {"tiny/v1/model-00001-of-00001.safetensors", "tiny/v1/SHA256SUMS"}
    listed = {o["Key"] for o in store.list_objects_v2(Bucket=store.bucket)["Contents"]}
    assert listed == {f"tiny/v1/{f.path}" for f in new} | {"tiny/v1/notes-by-someone.txt"}


def test_missing_or_rejected_credentials_are_one_error_before_any_upload(store, tmp_path, monkeypatch):
    from botocore.awsrequest import AWSResponse

    files = make_files(tmp_path / "m")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(FuseError) as e:
        sync(publisher(store), files)
    assert e.value.finding.code == "F502" and "no credentials" in e.value.finding.message

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)

    class Raw:
        def stream(self, **kw):
            yield b""

        def read(self, *a, **kw):
            return b""

    pub = publisher(store)
    pub.fault = lambda op, request: AWSResponse(request.url, 403, {}, Raw()) if op == "HeadBucket" else None
    with pytest.raises(FuseError) as e:
        sync(pub, files)
    f = e.value.finding
    assert f.code == "F502" and "refused HeadBucket" in f.message and SECRET_KEY not in json.dumps(f.to_dict())
    assert [s for s in pub.sent if s[0] != "HeadBucket"] == []

    with pytest.raises(FuseError) as e:
        sync(Counting({"url": "s3://no-such-bucket-fuse-test/x", "endpoint": store.url}, log=lambda m: None), files)
    assert e.value.finding.code == "F501" and "does not exist" in e.value.finding.message


# --------------------------------------------------------------------------- several targets in one pipeline


from test_publish_hub import REPO, hub, inputs, make_project  # noqa: E402,F401 - shared fixtures


def test_one_pipeline_publishes_to_hub_s3_and_dir(hub, store, inputs, tmp_path):
    import stages

    p = make_project(tmp_path / "proj", inputs, hub.url, tag="v1")
    text = p.read_text() + (f"  - publish: {{id: to-s3, to: s3, url: 's3://{store.bucket}/tiny', "
                            f"endpoint: '{store.url}', part_size: 5MB}}\n"
                            f"  - publish: {{id: local, to: dir, path: dist}}\n")
    p.write_text(text)
    lines = []
    summary = stages.run(p, log=lines.append)
    assert summary == {"merge": "done", "publish": "done", "to-s3": "done", "local": "done"}
    m = json.loads((p.parent / "runs/w/manifest.json").read_text())["stages"]
    assert m["publish"]["metrics"]["commit"] == hub.head(REPO) and m["publish"]["metrics"]["tag"] == "v1"
    assert m["to-s3"]["metrics"]["url"] == f"s3://{store.bucket}/tiny" and m["to-s3"]["metrics"]["verified"] > 5
    assert m["local"]["metrics"]["files_copied"] == m["local"]["metrics"]["files"]
    # the same model files everywhere; the Hub's card loads its repo id, the others the model's name
    local = {l.split("  ")[1]: l.split("  ")[0] for l in (p.parent / "dist/SHA256SUMS").read_text().splitlines()}
    s3_sums = store.get_object(Bucket=store.bucket, Key="tiny/SHA256SUMS")["Body"].read().decode()

    def but_card(text):  # each target's card names where its model is loaded from
        return [line for line in text.splitlines() if not line.endswith("  README.md")]

    assert but_card(s3_sums) == but_card((p.parent / "dist/SHA256SUMS").read_text())
    hub_sums = hub.read(REPO, "SHA256SUMS").decode()
    assert {k: v for k, v in local.items() if k != "README.md" and k != "SHA256SUMS"}.items() <= \
        {l.split("  ")[1]: l.split("  ")[0] for l in hub_sums.splitlines()}.items()
    assert f'from_pretrained("{REPO}")' in hub.read(REPO, "README.md").decode()
    assert SECRET_KEY not in (p.parent / "runs/w/manifest.json").read_text() + "\n".join(lines)
    # and again: every step is fresh
    summary = stages.run(p, log=lines.append)
    assert set(summary.values()) == {"skipped"}


# --------------------------------------------------------------------------- kills

SLOW = os.environ.get("FUSE_SLOW") == "1"
KILLS = ["s3:before:model-00002-of-00002.safetensors", "s3:mid-upload@20", "s3:before:SHA256SUMS", "s3:pushed"]
KILLS_SLOW = KILLS + [f"s3:before:{p}" for p in ("config.json", "model-00001-of-00002.safetensors", "README.md")] \
    + [f"s3:mid-upload@{n}" for n in (1, 5, 30, 45)]


def _objects(store, prefix: str) -> dict[str, tuple[bytes, str | None]]:
    out = {}
    for o in store.list_objects_v2(Bucket=store.bucket, Prefix=prefix).get("Contents", []):
        got = store.get_object(Bucket=store.bucket, Key=o["Key"])
        out[o["Key"][len(prefix):]] = (got["Body"].read(), got.get("Metadata", {}).get("sha256"))
    return out


@pytest.mark.parametrize("point", KILLS_SLOW if SLOW else KILLS)
def test_kill_during_an_s3_publish_then_rerun_is_identical(store, tmp_path, point):
    """Issue 12, 8: the publishing process dies (kill -9) before a file, in the middle of a
    multipart upload, before SHA256SUMS, after the uploads; the re-run ends as an uninterrupted
    publish, aborts the dangling multipart upload and leaves the store's other objects alone."""
    from test_publish_dir import run_publisher

    files = make_files(tmp_path / "m")
    run = uuid.uuid4().hex[:8]  # the bucket may be shared with another test: a prefix of its own

    def params(prefix):
        return {"url": f"s3://{store.bucket}/{prefix}", "endpoint": store.url, "part_size": 5 * MB}

    assert run_publisher("s3", params(f"{run}/ref"), files, tmp_path / "ref.json").returncode == 0
    store.put_object(Bucket=store.bucket, Key=f"{run}/tiny/v1/notes-by-someone.txt", Body=b"keep me")
    r = run_publisher("s3", params(f"{run}/tiny/v1"), files, tmp_path / "spec.json", kill=point)
    assert r.returncode == 137, r.stderr
    if point == "s3:mid-upload@20":  # the kill landed inside the 11 MB file's multipart upload
        assert [u for u in store.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
                if u["Key"].startswith(run)]
    r = run_publisher("s3", params(f"{run}/tiny/v1"), files, tmp_path / "spec.json")
    assert r.returncode == 0, r.stderr
    got = _objects(store, f"{run}/tiny/v1/")
    assert got.pop("notes-by-someone.txt") == (b"keep me", None)
    assert got == _objects(store, f"{run}/ref/")
    assert {p: hashlib.sha256(d).hexdigest() for p, (d, _) in got.items()} == {f.path: f.sha256 for f in files}
    assert [u for u in store.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
            if u["Key"].startswith(run)] == []


def test_someone_elses_object_where_the_model_goes_is_F509_before_any_upload(store, tmp_path):
    """Issue 12, 1 for S3: an overwrite keeps no history, so an object Fuse did not write (no sha256
    metadata of Fuse's) at a key the model needs stops the publish; others are left alone."""
    files = make_files(tmp_path / "m")
    store.put_object(Bucket=store.bucket, Key="own/v1/config.json", Body=b'{"theirs": true}')
    store.put_object(Bucket=store.bucket, Key="own/v1/notes.txt", Body=b"keep me")
    pub = publisher(store, prefix="own/v1")
    with pytest.raises(FuseError) as e:
        sync(pub, files)
    f = e.value.finding
    assert f.code == "F509" and "config.json" in f.message and "config.json" in f.fix
    assert pub.uploaded() == {}  # nothing sent
    assert store.get_object(Bucket=store.bucket, Key="own/v1/config.json")["Body"].read() == b'{"theirs": true}'
    store.delete_object(Bucket=store.bucket, Key="own/v1/config.json")
    sync(publisher(store, prefix="own/v1"), files)
    assert store.get_object(Bucket=store.bucket, Key="own/v1/notes.txt")["Body"].read() == b"keep me"
