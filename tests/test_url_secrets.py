"""Secrets in media URLs (Trust, round 3): a password in the userinfo (``http://user:pass@host/``) or a credential
in the query (a presigned URL's ``X-Amz-Signature``, ``token``, ``sig`` ...) never reaches stdout, stderr, a
report or a log line; the host is ``host[:port]``, never ``user:pass@host``; the deep check sends the userinfo
as HTTP Basic authentication (as the trainer's fsspec/aiohttp reads such a URL)."""

from __future__ import annotations

import base64
import http.server
import json
import logging
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from qwenvl.data.preprocess import BadSample
from qwenvl.problems import Problem, UserError
from qwenvl.secrets import mask_url, mask_urls, url_host
from qwenvl.storage import StorageError

PASSWORD = "s3cretPass"
SIG, CRED, TOKEN = "SIGabc123", "CREDxyz789", "TOKzzz456"
SECRETS = (PASSWORD, SIG, CRED, TOKEN)


@pytest.mark.parametrize("url, shown", [
    ("http://user:pass@host:8000/a.png", "http://***@host:8000/a.png"),
    ("https://user@host/a.png", "https://***@host/a.png"),
    ("https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2024%2Fus"
     "&X-Amz-Date=20240101T000000Z&X-Amz-Security-Token=tok&X-Amz-Signature=deadbeef",
     "https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
     "&X-Amz-Date=20240101T000000Z&X-Amz-Security-Token=***&X-Amz-Signature=***"),
    ("https://h/x.png?sig=abc&sv=2020&Token=t&access_token=a&key=k&api_key=z",
     "https://h/x.png?sig=***&sv=2020&Token=***&access_token=***&key=***&api_key=***"),
    ("https://h/x.png#access_token=abc", "https://h/x.png#access_token=***"),
    ("https://h/x.png?w=10&h=20", "https://h/x.png?w=10&h=20"),
    ("s3://bucket/a/b.png", "s3://bucket/a/b.png"),
    ("/data/a?b.png", "/data/a?b.png"),
    ("relative/x.png", "relative/x.png"),
    ("http://u:p@[::1/x.png", "http://***"),  # cannot be parsed: nothing of it is shown
])
def test_mask_url(url, shown):
    assert mask_url(url) == shown


def test_mask_urls_in_text_errors_problems_and_host():
    text = f"media file not found: http://u:{PASSWORD}@h/x.png (HTTP 404); see https://h/y?sig={SIG}, then"
    assert mask_urls(text) == "media file not found: http://***@h/x.png (HTTP 404); see https://h/y?sig=***, then"
    url = f"http://u:{PASSWORD}@h:81/x.png?token={TOKEN}"
    for shown in (str(StorageError(f"cannot read {url}")), str(BadSample(f"image not found: {url}")),
                  UserError(f"cannot read {url}").lines()[0], Problem("error", f"at {url}", hint=f"try {url}").render()):
        assert not any(s in shown for s in SECRETS), shown
        assert "http://***@h:81/x.png?token=***" in shown
    assert url_host(url) == "h:81"


class _AuthHandler(http.server.BaseHTTPRequestHandler):
    want = "Basic " + base64.b64encode(f"user:{PASSWORD}".encode()).decode()

    def do_HEAD(self):  # noqa: N802 - http.server's name
        if self.headers.get("Authorization") != self.want:
            self.send_response(401)
        else:
            self.send_response(200 if self.path == "/ok.png" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _img(path: str) -> dict:
    return {"image": path, "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]}


def test_deep_check_never_prints_url_secrets_and_names_the_host(tmp_path: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AuthHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port, dead = server.server_address[1], _dead_port()
    auth = f"user:{PASSWORD}@127.0.0.1"
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        _img(f"http://{auth}:{port}/ok.png"),
        _img(f"http://{auth}:{port}/gone.png?X-Amz-Credential={CRED}&X-Amz-Signature={SIG}"),
        _img(f"http://{auth}:{dead}/x.png?token={TOKEN}"),
    ]))
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"t": {"annotation_path": "t.jsonl"}}))
    try:
        runs = [subprocess.run([sys.executable, "-m", "vlsft", "datasets", "check", str(d), "--deep", *extra],
                               capture_output=True, text=True, timeout=120) for extra in ((), ("--json",))]
    finally:
        server.shutdown()
    for r in runs:
        out = r.stdout + r.stderr
        assert r.returncode == 1 and "Traceback" not in out, out
        assert not any(s in out for s in SECRETS), out
        assert "user:" not in out and "user@127.0.0.1" not in out, out
    probs = json.loads(runs[1].stdout)["problems"]
    # ok.png: found (the userinfo went as Basic authentication, not into the host name)
    assert [p["line"] for p in probs] == [2, 3], probs
    assert probs[0]["message"] == (f"media file not found: http://***@127.0.0.1:{port}/gone.png"
                                   "?X-Amz-Credential=***&X-Amz-Signature=*** (HTTP 404)")
    assert probs[1]["message"].startswith(f"cannot reach 127.0.0.1:{dead} for http://***@127.0.0.1:{dead}/x.png?token=*** ("), probs
    assert f"cannot reach 127.0.0.1:{dead} for" in runs[0].stdout


def test_trainer_bad_sample_log_masks_the_url(caplog):
    from qwenvl.data.dataset import SupervisedDataset  # the trainer's dataset (imports torch)

    class Src:
        name = "t"

    with caplog.at_level(logging.WARNING):
        rec = SupervisedDataset._bad(Src(), "t.jsonl:1", 0, OSError(f"cannot read http://u:{PASSWORD}@h/x?sig={SIG}"),
                                   "media_unreadable")
    assert not any(s in caplog.text + rec["bad_sample"] for s in SECRETS), caplog.text
    assert "http://***@h/x?sig=***" in rec["bad_sample"]


# ---- credentials in s3:// URLs and in the endpoint (bad-input audit, round 3) ------------------------------------
AK, SK = "AKIAIOSFODNN7SECRETX", "wJalrXUtnFEMIK7MDENG/bPxRfiCYSECRETKEY"  # an AWS secret key may hold '/'
REPO = Path(__file__).resolve().parents[1]
MINIMAL = str(REPO / "docs" / "examples" / "minimal.yaml")


@pytest.mark.parametrize("url", [f"s3://{AK}:{SK}@bucket/k.json", f"s3://{AK}:{SK.replace('/', '')}@bucket/k.json",
                                 f"s3://{AK}@bucket/k.json"])
def test_an_s3_url_with_credentials_is_refused_before_any_client_sees_it(url):
    from qwenvl import storage

    assert mask_url(url) == "s3://***@bucket/k.json"
    with pytest.raises(StorageError) as info:
        storage.filesystem(url)
    assert info.value.kind == "config" and AK not in str(info.value) and "does not carry credentials" in str(info.value)
    storage.filesystem("s3://bucket/user@example.com/a.jpg")  # an '@' in a key is no credential: no refusal


def _no_secret(r):
    text = r.stdout + r.stderr
    assert AK not in text and SK not in text and SK.split("/")[0] not in text, text
    assert "Traceback" not in text, text


def test_credentials_in_urls_never_reach_any_output(tmp_path, monkeypatch):
    from cli_inprocess import vlsft

    url = f"s3://{AK}:{SK}@bucket/dict.json"
    (tmp_path / "d.json").write_text(json.dumps({"a": {"annotation_path": f"s3://{AK}:{SK}@bucket/a.jsonl"}}))
    for args in (["datasets", "check", url], ["datasets", "check", url, "--json"], ["datasets", "use", url],
                 ["datasets", "check", "--deep", str(tmp_path / "d.json")],
                 ["print-args", "--config", MINIMAL, f"data.dictionary={url}"],
                 ["print-args", "--config", MINIMAL, f"storage.endpoint_url=https://{AK}:{SK}@rgw.example.com"]):
        r = vlsft(*args)
        assert r.returncode != 0, (args, r.stdout)
        _no_secret(r)
    # a ${VAR} endpoint whose value carries credentials, an HF mirror with them: masked in the plan and its JSON
    monkeypatch.setenv("EP", f"https://{AK}:{SK}@rgw.example.com")
    monkeypatch.setenv("HF_ENDPOINT", f"https://u:{SK}@hf-mirror.example.com")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for extra in ([], ["--json"]):
        r = vlsft("print-args", "--config", MINIMAL, "storage.endpoint_url=${EP}", *extra)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "https://***@rgw.example.com" in r.stdout
        _no_secret(r)
        r = vlsft("print-args", "--config", MINIMAL, "model.name_or_path=Qwen/Qwen2.5-VL-7B-Instruct", *extra)
        _no_secret(r)
