"""Secrets set in the environment never appear in `vlsft print-args` (text or --json) or its errors.

The S3 secret here is a real one (moto generated it for an IAM user; auth is enforced), and the
dataset dictionary lives on S3, so print-args really uses the secret while it must never show it.
(The saved run config and the training log are checked in test_s3_train.py.)
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from s3server import STORAGE_YAML, s3_server, upload_dataset  # noqa: F401  (fixture)

from qwenvl import storage

VLSFT = str(Path(sys.executable).parent / "vlsft")


def write_run_yaml(path: Path, model_dir: Path, dictionary: str, out_dir: Path, extra: str = "") -> Path:
    path.write_text(
        f"""# S3 secrets test run
model: {{name_or_path: {model_dir}, tune_mm_mlp: true, tune_mm_llm: true}}
data: {{dictionary: {dictionary}}}
training: {{per_device_train_batch_size: 1, max_steps: 2}}
distributed: {{nproc_per_node: 2, deepspeed: none}}
output: {{dir: {out_dir}}}
wandb: {{mode: offline, project: vlsft-s3-test}}
{STORAGE_YAML}{extra}"""
    )
    return path


@pytest.fixture(scope="module")
def s3_dataset(s3_server, tmp_path_factory):  # noqa: F811
    return upload_dataset(s3_server, tmp_path_factory.mktemp("s3secrets"))


@pytest.fixture()
def secret_env(s3_server, cli_env):  # noqa: F811
    env = s3_server.subprocess_env(cli_env)
    env["S3_TEST_ENDPOINT"] = s3_server.url
    env["WANDB_API_KEY"] = "wandb-" + secrets.token_hex(20)
    return env


def _secrets(env: dict[str, str]) -> list[str]:
    return [env["AWS_SECRET_ACCESS_KEY"], env["AWS_ACCESS_KEY_ID"], env["WANDB_API_KEY"]]


@pytest.mark.parametrize("as_json", [False, True])
def test_print_args_never_shows_secrets(s3_dataset, secret_env, tiny_model_dir, tmp_path, as_json):
    cfg = write_run_yaml(tmp_path / "run.yaml", tiny_model_dir, s3_dataset["s3_local_dict"], tmp_path / "out")
    proc = subprocess.run(
        [VLSFT, "print-args", "--config", str(cfg), *(["--json"] if as_json else [])],
        env=secret_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    for value in _secrets(secret_env):
        assert value not in out
    if as_json:
        plan = json.loads(proc.stdout)
        assert plan["samples_per_epoch"] == 6  # the annotation file was really read from S3
        assert plan["env"]["AWS_SECRET_ACCESS_KEY"] == "***" and plan["env"]["AWS_ACCESS_KEY_ID"] == "***"
        assert plan["env"]["AWS_ENDPOINT_URL"] == secret_env["S3_TEST_ENDPOINT"]
        assert plan["env"]["VLSFT_S3_ADDRESSING_STYLE"] == "path"
    else:
        assert "AWS_SECRET_ACCESS_KEY=***" in out


def test_print_args_errors_never_show_secrets(s3_dataset, secret_env, tiny_model_dir, tmp_path):
    cfg = write_run_yaml(tmp_path / "run.yaml", tiny_model_dir, s3_dataset["s3_local_dict"], tmp_path / "out")
    secret_env["AWS_SECRET_ACCESS_KEY"] = "wrong-" + secrets.token_hex(16)  # S3 refuses it: an error path
    for extra in (["training.nope=1"], []):  # a config error; S3 refusing the key while counting records
        proc = subprocess.run(
            [VLSFT, "print-args", "--config", str(cfg), *extra],
            env=secret_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode != 0
        for value in _secrets(secret_env):
            assert value not in proc.stdout + proc.stderr
    assert "SignatureDoesNotMatch" in proc.stderr


def test_literal_secret_in_yaml_is_rejected_without_echo(s3_dataset, secret_env, tiny_model_dir, tmp_path):
    literal = "LITERAL" + secrets.token_hex(12)
    cfg = write_run_yaml(
        tmp_path / "run.yaml",
        tiny_model_dir,
        s3_dataset["s3_local_dict"],
        tmp_path / "out",
        extra=f"  session_token: {literal}\n",
    )
    proc = subprocess.run(
        [VLSFT, "print-args", "--config", str(cfg)], env=secret_env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert literal not in proc.stdout + proc.stderr
    assert "session_token" in proc.stderr


def test_redact_masks_every_secret_env_value(secret_env):
    text = " ".join(_secrets(secret_env)) + " endpoint " + secret_env["S3_TEST_ENDPOINT"]
    assert storage.redact(text, secret_env) == "*** *** *** endpoint " + secret_env["S3_TEST_ENDPOINT"]
