"""`vlsft train` reading everything from S3 (tiny model, CPU, 2 ranks), and no secret in what it writes.

The dictionary is itself on S3 and names only s3:// URLs (annotations, images, a video); no copy of
the data exists on local disk. The endpoint comes only from the run YAML's storage block, the keys from ${VAR}
references; the secret key is a real, moto-generated one (auth is enforced), so the ranks (and
their forked DataLoader workers) really use it — and it must appear in no file of output_dir (saved
run config, logs, trainer state), not in the offline W&B run files and not in the command's output.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from s3server import STORAGE_YAML, s3_server, upload_dataset  # noqa: F401  (fixture)

VLSFT = str(Path(sys.executable).parent / "vlsft")


def _all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_train_reads_everything_from_s3_and_leaks_no_secret(s3_server, cli_env, tiny_model_dir, tmp_path):  # noqa: F811
    ds = upload_dataset(s3_server, tmp_path / "data")
    import shutil

    shutil.rmtree(tmp_path / "data" / "local")  # the only data left is on S3
    out = tmp_path / "out"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"""# tiny S3 training run (test)
model: {{name_or_path: {tiny_model_dir}, tune_mm_mlp: true, tune_mm_llm: true}}
data:
  dictionary: {ds["s3_dict"]}
  max_pixels: 12544
  min_pixels: 784
  video_max_frames: 4
  video_min_frames: 2
  video_max_frame_pixels: 3136
  video_min_frame_pixels: 784
  model_max_length: 1024
  num_workers: 1
training: {{per_device_train_batch_size: 1, gradient_accumulation_steps: 1, max_steps: 2, logging_steps: 1,
           save_steps: 1000, learning_rate: 1.0e-4}}
distributed: {{nproc_per_node: 2, deepspeed: none, master_port: 29757}}
output: {{dir: {out}}}
wandb: {{mode: offline, project: vlsft-s3-test}}
{STORAGE_YAML}"""
    )
    env = s3_server.subprocess_env(cli_env)
    env.pop("AWS_ENDPOINT_URL")  # the endpoint reaches the ranks only through the YAML's storage block
    env["S3_TEST_ENDPOINT"] = s3_server.url
    env["WANDB_DIR"] = str(tmp_path / "wandb")  # offline W&B run files: scanned for secrets too
    (tmp_path / "wandb").mkdir()
    env["WANDB_API_KEY"] = "wandb-" + secrets.token_hex(20)
    secret, key_id = s3_server.secret_access_key, s3_server.access_key_id
    proc = subprocess.run(
        [VLSFT, "train", "--config", str(cfg)], env=env, capture_output=True, text=True, timeout=420, cwd=tmp_path
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert any((out / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")), sorted(
        p.name for p in out.iterdir()
    )
    assert "world size 2" in log or "world_size 2" in log or "world size: 2" in log, log[-3000:]

    assert f'"annotation_path": "{ds["annotation_path"]}"' in log  # the ranks read the S3 annotations
    assert "skipped sample" not in log and "warning: could not copy" not in log, log[-4000:]

    wandb_files = _all_files(tmp_path / "wandb")
    assert any(p.name.endswith(".wandb") for p in wandb_files), "no offline W&B run was written"
    files = _all_files(out) + _all_files(tmp_path / "data") + wandb_files
    saved = {p.relative_to(out).as_posix() for p in files if p.is_relative_to(out)}
    assert {"vlsft/run.yaml", "vlsft/launch.sh", "vlsft/Dataset-Dictionary.json", "trainer_state.json"} <= saved
    assert "${AWS_SECRET_ACCESS_KEY}" in (out / "vlsft" / "run.yaml").read_text()  # a reference, not the value
    for blob, where in [(log.encode(), "command output")] + [(p.read_bytes(), str(p)) for p in files]:
        assert secret.encode() not in blob, f"secret access key found in {where}"
        assert key_id.encode() not in blob, f"access key id found in {where}"
        assert env["WANDB_API_KEY"].encode() not in blob, f"W&B API key found in {where}"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"AWS_SECRET_ACCESS_KEY": "wrong-secret-0123456789abcdef"}, "SignatureDoesNotMatch"),
        ({"S3_TEST_ENDPOINT": "http://127.0.0.1:9"}, "cannot reach S3 at http://127.0.0.1:9"),
    ],
)
def test_train_fails_fast_with_one_line(s3_server, cli_env, tmp_path, override, expected):  # noqa: F811
    """Refused credentials / unreachable endpoint: `vlsft train` stops before launching, one line, exit 2."""
    import time

    ds = upload_dataset(s3_server, tmp_path / "data")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"""model: {{name_or_path: {tmp_path / "no-model"}, tune_mm_llm: true}}
data: {{dictionary: {ds["s3_dict"]}}}
distributed: {{nproc_per_node: 2, deepspeed: none}}
output: {{dir: {tmp_path / "out"}}}
storage: {{endpoint_url: "${{S3_TEST_ENDPOINT}}"}}
"""
    )
    env = s3_server.subprocess_env(cli_env)
    env.pop("AWS_ENDPOINT_URL")
    env["S3_TEST_ENDPOINT"] = s3_server.url
    env.update(override)
    t0 = time.monotonic()
    proc = subprocess.run([VLSFT, "train", "--config", str(cfg)], env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert any(expected in line for line in errors), proc.stderr
    assert "Traceback" not in proc.stderr and "torchrun" not in proc.stdout
    assert not (tmp_path / "out").exists()
    assert elapsed < 15


@pytest.mark.slow
def test_trainer_alone_reports_storage_errors_in_one_line(s3_server, cli_env, tiny_model_dir, tmp_path):  # noqa: F811
    """`python -m qwenvl.train` (no vlsft front door) with a wrong secret: one error line, exit 2, no traceback."""
    ds = upload_dataset(s3_server, tmp_path / "data")
    env = s3_server.subprocess_env(cli_env, AWS_SECRET_ACCESS_KEY="wrong-secret-0123456789abcdef")
    argv = [sys.executable, "-m", "qwenvl.train", "--model_name_or_path", str(tiny_model_dir),
            "--dataset_dict", ds["s3_dict"], "--dataset_use", "demo", "--output_dir", str(tmp_path / "out"),
            "--max_steps", "1", "--report_to", "none", "--tune_mm_llm", "True"]  # fmt: skip
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "SignatureDoesNotMatch" in proc.stderr and ds["s3_dict"] in proc.stderr
    assert env["AWS_SECRET_ACCESS_KEY"] not in proc.stderr
