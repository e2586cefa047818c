"""A real S3-compatible server for tests: moto's server mode on a loopback port, in a subprocess.

One server per test session (module-level singleton, stopped at exit). Authentication is
*enforced* (moto accepts any key by default): an IAM user with an ``s3:*`` policy is created,
then ``/moto-api/reset-auth`` turns checking on, so wrong credentials really fail.

Use in a test module::

    from s3server import s3_server, s3_env  # noqa: F401  (pytest fixtures)

    def test_x(s3_server, s3_env):           # s3_env: os.environ points at the server
        s3_server.make_bucket("my-bucket")
        s3_server.upload_dir(local_dir, "my-bucket", "prefix")

``s3_server.env`` is the environment (endpoint, credentials, region, NO_PROXY) for subprocesses.
Never reset moto's state (``/moto-api/reset`` would delete the IAM user): use unique bucket names.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REGION = "us-east-1"


class MotoS3Server:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.access_key_id = ""
        self.secret_access_key = ""

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        env = dict(os.environ)
        env["NO_PROXY"] = "127.0.0.1,localhost"
        env["no_proxy"] = env["NO_PROXY"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 30
        for line in self.proc.stderr:
            m = re.search(r"Running on (http://127\.0\.0\.1:\d+)", line)
            if m:
                self.url = m.group(1)
                threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # drain
                break
            if time.monotonic() > deadline:
                break
        if not self.url:
            self.stop()
            raise RuntimeError("moto server did not start")
        self._enforce_auth()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _enforce_auth(self) -> None:
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="vlsft-test")
        iam.put_user_policy(
            UserName="vlsft-test",
            PolicyName="s3-all",
            PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
            ),
        )
        key = iam.create_access_key(UserName="vlsft-test")["AccessKey"]
        self.access_key_id = key["AccessKeyId"]
        self.secret_access_key = key["SecretAccessKey"]
        req = urllib.request.Request(
            self.url + "/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200

    # ---- environment -------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Variables that point a process at this server with valid credentials."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": REGION,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def subprocess_env(self, base: dict[str, str] | None = None, **overrides: str) -> dict[str, str]:
        """``base`` (default os.environ) + this server's variables; AWS_PROFILE etc. removed."""
        env = dict(os.environ if base is None else base)
        for name in (
            "AWS_PROFILE",
            "AWS_ENDPOINT_URL_S3",
            "AWS_SESSION_TOKEN",
            "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "http_proxy",
            "https_proxy",
        ):
            env.pop(name, None)
        env.update(self.env)
        env.update(overrides)
        return env

    # ---- data --------------------------------------------------------------------------
    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name if none given) and return its name."""
        name = name or f"vlsft-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def put(self, bucket: str, key: str, data: bytes) -> str:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)
        return f"s3://{bucket}/{key}"

    def upload_dir(self, local: str | os.PathLike, bucket: str, prefix: str = "") -> list[str]:
        """Upload every file under ``local`` to ``s3://bucket/prefix/<relative path>``; return the URLs."""
        client = self.client()
        root = Path(local)
        urls = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            key = "/".join(x for x in (prefix.strip("/"), path.relative_to(root).as_posix()) if x)
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            urls.append(f"s3://{bucket}/{key}")
        return urls


_SERVER: MotoS3Server | None = None


def get_server() -> MotoS3Server:
    """The session's server, started on first use and stopped when the interpreter exits."""
    global _SERVER
    if _SERVER is None:
        server = MotoS3Server()
        server.start()
        atexit.register(server.stop)
        _SERVER = server
    return _SERVER


def closed_port_url() -> str:
    """An http://127.0.0.1:PORT URL where nothing listens (connection refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def s3_server() -> MotoS3Server:
    return get_server()


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    """Point this process's environment at the moto server (and reset qwenvl.storage's caches)."""
    from qwenvl import storage

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    for name in (
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL_S3",
        "AWS_SESSION_TOKEN",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "VLSFT_S3_ADDRESSING_STYLE",
    ):
        monkeypatch.delenv(name, raising=False)
    storage.reset()
    yield s3_server
    storage.reset()


# ---------------------------------------------------------------------------------------------------
# a small, clean dataset (golden media) mirrored locally and on S3

GOLDEN_MEDIA = Path(__file__).resolve().parent / "golden" / "official-qwen25" / "media"

SAMPLES = [
    {
        "id": "img1",
        "image": "images/grad_224x224.png",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe this image."},
            {"from": "gpt", "value": "A colour gradient with two shapes."},
        ],
    },
    {
        "id": "img2",
        "image": ["images/tiny_28x28.png", "images/text_56x56.png"],
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\nCompare them."},
            {"from": "gpt", "value": "A checkerboard and a small text tile."},
        ],
    },
    {
        "id": "vid1",
        "video": "videos/clip_4s_24fps_160x120.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\nWhat moves?"},
            {"from": "gpt", "value": "A small block moves across the frame."},
        ],
    },
    {"id": "txt1", "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello."}]},
    {
        "id": "img3",
        "image": "images/small_150x100.jpg",
        "conversations": [
            {"from": "human", "value": "What is written? <image>"},
            {"from": "gpt", "value": "A short caption."},
        ],
    },
    {
        "id": "img4",
        "image": "images/gray_120x90.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nIs this colour?"},
            {"from": "gpt", "value": "No, it is grey."},
        ],
    },
]
MEDIA_FILES = [
    "images/grad_224x224.png",
    "images/tiny_28x28.png",
    "images/text_56x56.png",
    "images/small_150x100.jpg",
    "images/gray_120x90.jpg",
    "videos/clip_4s_24fps_160x120.mp4",
]


def write_local_dataset(root: Path) -> Path:
    """``root/media/...``, ``root/ann/train.jsonl``, ``root/dict.json`` (relative paths); returns the dict."""
    import shutil

    for rel in MEDIA_FILES:
        dst = root / "media" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(GOLDEN_MEDIA / rel, dst)
    (root / "ann").mkdir(parents=True, exist_ok=True)
    (root / "ann" / "train.jsonl").write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    d = {"demo": {"data_path": "media", "annotation_path": "ann/train.jsonl", "length": len(SAMPLES)}}
    (root / "dict.json").write_text(json.dumps(d, indent=2) + "\n")
    return root / "dict.json"


def upload_dataset(server: MotoS3Server, root: Path, bucket: str | None = None) -> dict[str, str]:
    """Write the dataset under ``root/local`` and upload it to ``s3://bucket/ds/``.

    Also writes ``root/s3dict.json``, a *local* dictionary whose data_path and annotation_path are
    absolute ``s3://`` URLs, and uploads ``ds/dict.json`` (relative paths, resolved against its URL)
    and ``ds/sub/dict.json`` (``../`` relative paths).
    Returns {"bucket", "local_dict", "s3_local_dict", "s3_dict", "data_path", "annotation_path"}.
    """
    bucket = bucket or server.make_bucket()
    local_dict = write_local_dataset(root / "local")
    server.upload_dir(root / "local", bucket, "ds")
    base = f"s3://{bucket}/ds"
    d = {"demo": {"data_path": f"{base}/media", "annotation_path": f"{base}/ann/train.jsonl", "length": len(SAMPLES)}}
    (root / "s3dict.json").write_text(json.dumps(d, indent=2) + "\n")
    sub = {"demo": {"data_path": "../media", "annotation_path": "../ann/train.jsonl", "length": len(SAMPLES)}}
    server.put(bucket, "ds/sub/dict.json", json.dumps(sub).encode())
    return {
        "bucket": bucket,
        "local_dict": str(local_dict),
        "s3_local_dict": str(root / "s3dict.json"),
        "s3_dict": f"{base}/dict.json",
        "s3_sub_dict": f"{base}/sub/dict.json",  # on S3, with ../ relative paths
        "data_path": f"{base}/media",
        "annotation_path": f"{base}/ann/train.jsonl",
    }

# The `storage:` block of the run YAMLs the S3 tests write: endpoint from the test server, secrets as references.
STORAGE_YAML = """storage:
  endpoint_url: "${S3_TEST_ENDPOINT}"
  region: us-east-1
  addressing_style: path
  access_key_id: "${AWS_ACCESS_KEY_ID}"
  secret_access_key: "${AWS_SECRET_ACCESS_KEY}"
"""
