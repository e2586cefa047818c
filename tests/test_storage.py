"""qwenvl.storage against a real S3 server (moto server mode on loopback, auth enforced)."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import pickle
import socket
import threading
import time
from pathlib import Path

import pytest
from s3server import closed_port_url, s3_env, s3_server  # noqa: F401  (fixtures)

from qwenvl import storage

GOLDEN_MEDIA = Path(__file__).resolve().parent / "golden" / "official-qwen25" / "media"
VIDEO = "videos/clip_4s_24fps_160x120.mp4"


@pytest.fixture(scope="module")
def media_bucket(s3_server):  # noqa: F811
    bucket = s3_server.make_bucket()
    s3_server.upload_dir(GOLDEN_MEDIA, bucket, "media")
    return bucket


def _count_requests(url: str) -> list[str]:
    """Record the S3 operation names the process's filesystem for ``url`` sends from now on."""
    fs = storage.filesystem(url)
    fs.connect()
    calls: list[str] = []
    fs.s3.meta.events.register("before-call.s3", lambda model, **kw: calls.append(model.name))
    return calls


# ---------------------------------------------------------------------------------------------- reads


def test_read_bytes_equals_local_file(s3_env, media_bucket):  # noqa: F811
    for rel in ("images/photo_640x480.jpg", "images/tiny_28x28.png", VIDEO):
        url = f"s3://{media_bucket}/media/{rel}"
        assert storage.read_bytes(url) == (GOLDEN_MEDIA / rel).read_bytes()


def test_read_is_one_get_request(s3_env, media_bucket):  # noqa: F811
    url = f"s3://{media_bucket}/media/images/tiny_28x28.png"
    calls = _count_requests(url)
    storage.read_bytes(url)
    assert calls == ["GetObject"]


def test_exists_and_list_names(s3_env, media_bucket):  # noqa: F811
    base = f"s3://{media_bucket}/media"
    assert storage.exists(f"{base}/images/tiny_28x28.png")
    assert not storage.exists(f"{base}/images/no_such.png")
    assert storage.list_names(base) == {"images", "videos"}
    assert storage.list_names(f"{base}/images/") == {p.name for p in (GOLDEN_MEDIA / "images").iterdir()}
    assert storage.list_names(f"{base}/nothing-here") == set()


def test_existing_lists_each_prefix_once_never_heads(s3_env, media_bucket):  # noqa: F811
    base = f"s3://{media_bucket}/media"
    present = [f"{base}/images/{p.name}" for p in (GOLDEN_MEDIA / "images").iterdir()]
    present += [f"{base}/videos/{p.name}" for p in (GOLDEN_MEDIA / "videos").iterdir()]
    missing = [f"{base}/images/gone.png", f"{base}/videos/gone.mp4", f"{base}/absent/x.jpg"]
    calls = _count_requests(base)
    seen: list[tuple[int, int]] = []
    found = storage.existing(present * 3 + missing, progress=lambda done, total: seen.append((done, total)))
    assert found == set(present)
    assert calls == ["ListObjectsV2"] * 3  # images/, videos/, absent/: one listing each
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_listing_is_paginated(s3_env, s3_server, monkeypatch):  # noqa: F811
    monkeypatch.setattr(storage, "LIST_PAGE_SIZE", 10)  # S3 pages hold 1,000 keys; 10 keeps the test fast
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    for i in range(25):
        client.put_object(Bucket=bucket, Key=f"many/{i:05d}.txt", Body=b"")
    client.put_object(Bucket=bucket, Key="many/sub/x.txt", Body=b"")
    urls = [f"s3://{bucket}/many/{i:05d}.txt" for i in range(0, 30, 2)]
    calls = _count_requests(urls[0])
    found = storage.existing(urls)
    assert found == {u for u in urls if int(u[-9:-4]) < 25}
    assert calls == ["ListObjectsV2"] * 3  # 26 entries, 10 per page
    assert len(storage.list_names(f"s3://{bucket}/many")) == 26 and "sub" in storage.list_names(f"s3://{bucket}/many")


def test_join_normalises_urls():
    assert storage.join("s3://b/data", "images/x.jpg") == "s3://b/data/images/x.jpg"
    assert storage.join("s3://b/data/", "./a/../images/x.jpg") == "s3://b/data/images/x.jpg"
    assert storage.join("s3://b/data", "s3://other/y.jpg") == "s3://other/y.jpg"
    assert storage.join("/local/data", "x.jpg") == "/local/data/x.jpg"
    assert storage.join("s3://b/data", "/abs/x.jpg") == "/abs/x.jpg"
    assert storage.join("s3://b/data/sub", "../../../x.jpg") == "s3://b/x.jpg"  # never above the bucket
    assert storage.join("s3://b/a//b", "c.jpg") == "s3://b/a//b/c.jpg"  # empty segments are real S3 keys


def test_dot_segments_resolve_before_reaching_s3(s3_env, media_bucket):  # noqa: F811
    """Callers that join URLs themselves (``s3://b/ds/sub/../x``) still find the object."""
    url = f"s3://{media_bucket}/media/videos/../images/./tiny_28x28.png"
    assert storage.read_bytes(url) == (GOLDEN_MEDIA / "images/tiny_28x28.png").read_bytes()
    assert storage.exists(url)
    assert "tiny_28x28.png" in storage.list_names(f"s3://{media_bucket}/media/videos/../images")
    assert storage.existing([url, url.replace("tiny", "gone")]) == {url}


# --------------------------------------------------------------------------------------------- videos


def test_open_local_copy_is_cleaned_up_and_decodes_like_local(s3_env, media_bucket):  # noqa: F811
    import decord

    url = f"s3://{media_bucket}/media/{VIDEO}"
    with storage.open_local_copy(url) as local:
        assert local.endswith(".mp4") and os.path.isfile(local)
        remote_frames = decord.VideoReader(local).get_batch([0, 10, 50]).asnumpy()
    assert not os.path.exists(local)
    assert not os.path.exists(os.path.dirname(local))
    local_frames = decord.VideoReader(str(GOLDEN_MEDIA / VIDEO)).get_batch([0, 10, 50]).asnumpy()
    assert (remote_frames == local_frames).all()
    with pytest.raises(RuntimeError):  # removed on error too
        with storage.open_local_copy(url) as local:
            raise RuntimeError("boom")
    assert not os.path.exists(local)
    with storage.open_local_copy(str(GOLDEN_MEDIA / VIDEO)) as same:  # local files are not copied
        assert same == str(GOLDEN_MEDIA / VIDEO)


def test_open_binary_feeds_pyav_and_decord_from_memory(s3_env, media_bucket):  # noqa: F811
    import av
    import decord

    url = f"s3://{media_bucket}/media/{VIDEO}"
    f = storage.open_binary(url)
    assert isinstance(f, io.BytesIO)
    with av.open(f) as c:
        first = next(c.decode(video=0)).to_ndarray(format="rgb24")
    vr = decord.VideoReader(storage.open_binary(url))
    assert len(vr) == len(decord.VideoReader(str(GOLDEN_MEDIA / VIDEO)))
    assert (vr[0].asnumpy() == first).all()


# --------------------------------------------------------------------------------------------- errors


def test_missing_object_names_the_full_url(s3_env, media_bucket):  # noqa: F811
    url = f"s3://{media_bucket}/media/images/no_such.png"
    with pytest.raises(storage.StorageNotFound) as ei:
        storage.read_bytes(url)
    assert str(ei.value) == f"object not found: {url}"
    assert isinstance(ei.value, FileNotFoundError) and not ei.value.fatal


def test_missing_bucket(s3_env):  # noqa: F811
    url = "s3://vlsft-no-such-bucket/ann/a.json"
    for call in (storage.read_bytes, storage.exists, storage.list_names):
        with pytest.raises(storage.StorageError) as ei:
            call(url)
        err = ei.value
        assert err.kind == "no_bucket" and err.fatal
        assert "'vlsft-no-such-bucket' does not exist" in str(err) and s3_env.url in str(err)
        assert "\n" not in str(err)


@pytest.mark.parametrize(
    ("variable", "value", "code"),
    [
        ("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789", "SignatureDoesNotMatch"),
        ("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN000000000", "InvalidAccessKeyId"),
    ],
)
def test_refused_credentials(s3_env, media_bucket, monkeypatch, variable, value, code):  # noqa: F811
    monkeypatch.setenv(variable, value)
    url = f"s3://{media_bucket}/media/images/tiny_28x28.png"
    for call in (storage.read_bytes, storage.exists, storage.list_names, storage.check_access):
        with pytest.raises(storage.StorageError) as ei:
            call(url)
        assert ei.value.kind == "credentials" and ei.value.fatal
        assert code in str(ei.value) and variable in str(ei.value) and url in str(ei.value)
        assert value not in str(ei.value)


def test_no_credentials_at_all(s3_env, media_bucket, monkeypatch, tmp_path):  # noqa: F811
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(storage.StorageError) as ei:
        storage.read_bytes(f"s3://{media_bucket}/media/images/tiny_28x28.png")
    assert ei.value.kind in ("credentials", "denied") and ei.value.fatal


def test_unreachable_endpoint_fails_within_seconds(s3_env, monkeypatch):  # noqa: F811
    dead = closed_port_url()
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    for call in (storage.read_bytes, storage.exists, storage.list_names):
        t0 = time.monotonic()
        with pytest.raises(storage.StorageError) as ei:
            call("s3://any-bucket/ann/a.json")
        elapsed = time.monotonic() - t0
        assert ei.value.kind == "unreachable" and ei.value.fatal
        assert dead in str(ei.value) and "AWS_ENDPOINT_URL" in str(ei.value)
        assert elapsed < 8, elapsed


def test_silent_endpoint_is_bounded_by_timeouts(s3_env, monkeypatch):  # noqa: F811
    """A server that accepts and never answers: read timeout x attempts, not 7 minutes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{srv.getsockname()[1]}")
        monkeypatch.setenv("VLSFT_S3_READ_TIMEOUT", "0.5")
        monkeypatch.setenv("VLSFT_S3_MAX_ATTEMPTS", "2")
        t0 = time.monotonic()
        with pytest.raises(storage.StorageError) as ei:
            storage.read_bytes("s3://any-bucket/a.json")
        elapsed = time.monotonic() - t0
        assert ei.value.kind == "unreachable"
        assert elapsed < 6, elapsed
        assert len(conns) == 2  # exactly the configured attempts, no s3fs retry loop on top
    finally:
        stop.set()
        t.join()
        for c in conns:
            c.close()
        srv.close()


# ------------------------------------------------------------------------------------- configuration


def test_service_specific_endpoint_wins(s3_env, media_bucket, monkeypatch):  # noqa: F811
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed_port_url())
    assert storage.exists(f"s3://{media_bucket}/media/images/tiny_28x28.png")


def test_profile_from_shared_files(s3_env, media_bucket, monkeypatch, tmp_path):  # noqa: F811
    """AWS_PROFILE + credentials file + endpoint_url in the config file: no AWS_* secrets in env."""
    (tmp_path / "credentials").write_text(
        f"[ceph]\naws_access_key_id = {s3_env.access_key_id}\naws_secret_access_key = {s3_env.secret_access_key}\n"
    )
    (tmp_path / "config").write_text(f"[profile ceph]\nendpoint_url = {s3_env.url}\nregion = us-east-1\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "ceph")
    url = f"s3://{media_bucket}/media/images/tiny_28x28.png"
    assert storage.read_bytes(url) == (GOLDEN_MEDIA / "images/tiny_28x28.png").read_bytes()
    monkeypatch.setenv("AWS_PROFILE", "nope")
    with pytest.raises(storage.StorageError) as ei:
        storage.read_bytes(url)
    assert ei.value.kind == "config" and "'nope'" in str(ei.value)


def test_configure_from_env(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "VLSFT_S3_ADDRESSING_STYLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://rgw.internal:7480")
    cfg = storage.configure_from_env()
    assert cfg["endpoint_url"] == "http://rgw.internal:7480" and cfg["endpoint_source"] == "AWS_ENDPOINT_URL"
    assert cfg["addressing_style"] == "path"  # pinned for custom endpoints (Ceph RGW)
    assert cfg["s3fs_kwargs"]["client_kwargs"] == {"region_name": "eu-west-3"}
    assert cfg["s3fs_kwargs"]["config_kwargs"]["retries"] == {"mode": "standard", "total_max_attempts": 3}
    monkeypatch.setenv("VLSFT_S3_ADDRESSING_STYLE", "virtual")
    assert storage.configure_from_env()["s3fs_kwargs"]["config_kwargs"]["s3"] == {"addressing_style": "virtual"}
    monkeypatch.setenv("VLSFT_S3_ADDRESSING_STYLE", "sideways")
    with pytest.raises(storage.StorageError, match="VLSFT_S3_ADDRESSING_STYLE='sideways'"):
        storage.configure_from_env()


# ------------------------------------------------------------------------------- processes, secrets


def _child_read(url: str, q) -> None:
    try:
        q.put(len(storage.read_bytes(url)))
    except BaseException as exc:  # noqa: BLE001
        q.put(repr(exc))


def test_forked_children_get_their_own_filesystem(s3_env, media_bucket):  # noqa: F811
    url = f"s3://{media_bucket}/media/images/tiny_28x28.png"
    parent_fs = storage.filesystem(url)
    assert storage.read_bytes(url)  # the parent has a live instance and event loop
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_child_read, args=(url, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    size = (GOLDEN_MEDIA / "images/tiny_28x28.png").stat().st_size
    assert results == [size, size]
    assert storage.filesystem(url) is parent_fs and storage.read_bytes(url)


def test_secrets_never_reach_the_filesystem_object(s3_env, media_bucket):  # noqa: F811
    url = f"s3://{media_bucket}/media/images/tiny_28x28.png"
    storage.read_bytes(url)
    fs = storage.filesystem(url)
    for blob in (pickle.dumps(fs), fs.to_json().encode(), repr(fs.storage_options).encode(), repr(vars(fs)).encode()):
        assert s3_env.secret_access_key.encode() not in blob
        assert s3_env.access_key_id.encode() not in blob


def test_redact(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-VALUE-xyz")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE123")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-key-987")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # not a secret
    text = "key=AKIAEXAMPLE123 secret=s3cr3t-VALUE-xyz wandb=wandb-key-987 parallel=false"
    assert storage.redact(text) == "key=*** secret=*** wandb=*** parallel=false"
    env = {
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_ENDPOINT_URL": "http://e",
        "MY_PASSWORD": "p",
        "TOKENIZERS_PARALLELISM": "1",
    }
    assert storage.redact_env(env) == {
        "AWS_SECRET_ACCESS_KEY": "***",
        "AWS_ENDPOINT_URL": "http://e",
        "MY_PASSWORD": "***",
        "TOKENIZERS_PARALLELISM": "1",
    }


def test_local_paths_need_no_s3(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hi")
    assert storage.read_bytes(str(tmp_path / "a.txt")) == b"hi"
    assert storage.exists(str(tmp_path / "a.txt")) and not storage.exists(str(tmp_path / "b.txt"))
    assert storage.existing([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]) == {str(tmp_path / "a.txt")}
    assert storage.list_names(str(tmp_path / "missing")) == set()


def test_environment_context_applies_and_restores(s3_env, media_bucket, monkeypatch):  # noqa: F811
    """What a front-door command does with the run YAML's storage block before reading s3:// files."""
    dead = closed_port_url()
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    url = f"s3://{media_bucket}/media/images/tiny_28x28.png"
    with storage.environment({"AWS_ENDPOINT_URL": s3_env.url, "VLSFT_S3_ADDRESSING_STYLE": "path"}):
        assert storage.exists(url)
    assert os.environ["AWS_ENDPOINT_URL"] == dead and "VLSFT_S3_ADDRESSING_STYLE" not in os.environ
    with pytest.raises(storage.StorageError, match="cannot reach S3"):
        storage.exists(url)


def test_transient_errors_are_retried_with_backoff(s3_env, monkeypatch):  # noqa: F811
    """An endpoint that answers 503 SlowDown once, then the object: one retry, then success."""
    import http.server

    hits: list[str] = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            if len(hits) == 1:
                body = b'<?xml version="1.0"?><Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>'
                self.send_response(503)
            else:
                body = b"payload"
                self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        assert storage.read_bytes("s3://flaky-bucket/k.bin") == b"payload"
        assert hits == ["/flaky-bucket/k.bin"] * 2  # path-style addressing, one retry
        hits.clear()
        monkeypatch.setenv("VLSFT_S3_MAX_ATTEMPTS", "1")
        with pytest.raises(storage.StorageError, match="SlowDown"):
            storage.read_bytes("s3://flaky-bucket/k.bin")
        assert len(hits) == 1
    finally:
        server.shutdown()
        server.server_close()
        t.join()


def test_existing_lists_prefixes_concurrently(s3_env, monkeypatch):  # noqa: F811
    """Listings are latency-bound: 8 prefixes behind a 0.5 s-per-request endpoint take far less than 8 x 0.5 s."""
    import http.server
    import urllib.parse

    class SlowLister(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            time.sleep(0.5)
            prefix = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("prefix", [""])[0]
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>'
                '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Name>slow</Name><Prefix>{prefix}</Prefix><KeyCount>1</KeyCount><MaxKeys>1000</MaxKeys>"
                f"<Delimiter>/</Delimiter><IsTruncated>false</IsTruncated>"
                f"<Contents><Key>{prefix}a.jpg</Key><Size>1</Size></Contents></ListBucketResult>"
            ).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowLister)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        paths = [f"s3://slow/p{i}/{name}" for i in range(8) for name in ("a.jpg", "b.jpg")]
        seen: list[tuple[int, int]] = []
        t0 = time.monotonic()
        found = storage.existing(paths, progress=lambda done, total: seen.append((done, total)))
        elapsed = time.monotonic() - t0
        assert found == {f"s3://slow/p{i}/a.jpg" for i in range(8)}
        assert seen == [(i, 8) for i in range(1, 9)]
        assert elapsed < 3.0, elapsed  # sequential would be >= 4 s
    finally:
        server.shutdown()
        server.server_close()
        t.join()


def test_existing_on_missing_bucket_raises_once(s3_env):  # noqa: F811
    paths = [f"s3://vlsft-no-such-bucket/p{i}/x.jpg" for i in range(5)]
    with pytest.raises(storage.StorageError) as ei:
        storage.existing(paths)
    assert ei.value.kind == "no_bucket"
