"""The front door on S3: `vlsft datasets check --deep` (and preview) against a real moto server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3server import closed_port_url, s3_server, upload_dataset  # noqa: F401  (fixture)

VLSFT = str(Path(sys.executable).parent / "vlsft")


def run_vlsft(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([VLSFT, *args], env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "error:" in line]


@pytest.fixture(scope="module")
def s3_dataset(s3_server, tmp_path_factory):  # noqa: F811
    return upload_dataset(s3_server, tmp_path_factory.mktemp("s3ds"))


@pytest.fixture()
def env(s3_server, cli_env):  # noqa: F811
    return s3_server.subprocess_env(cli_env)


@pytest.mark.parametrize("which", ["s3_local_dict", "s3_dict", "s3_sub_dict"])
def test_check_deep_all_s3_passes(s3_dataset, env, which):
    """A local dictionary with s3:// data_path/annotation_path, and dictionaries stored on S3 (one with ../)."""
    proc, _ = run_vlsft(["datasets", "check", "--deep", "--json", s3_dataset[which]], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["problems"] == []
    (row,) = report["datasets"]
    assert (row["actual_length"], row["images"], row["videos"], row["text_only"]) == (6, 4, 1, 1)
    proc, _ = run_vlsft(["datasets", "check", "--deep", s3_dataset[which]], env)
    assert proc.returncode == 0 and "OK deep check" in proc.stdout


def test_check_deep_reports_missing_object_precisely(s3_server, env, tmp_path):  # noqa: F811
    ds = upload_dataset(s3_server, tmp_path)
    s3_server.client().delete_object(Bucket=ds["bucket"], Key="ds/media/images/text_56x56.png")
    proc, _ = run_vlsft(["datasets", "check", "--deep", ds["s3_local_dict"]], env)
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    url = f"s3://{ds['bucket']}/ds/media/images/text_56x56.png"
    assert line.startswith(f"{ds['annotation_path']}:2: error:")  # sample img2 is line 2 of train.jsonl
    assert f"media file not found: {url}" in line
    proc, _ = run_vlsft(["datasets", "check", "--deep", "--json", ds["s3_local_dict"]], env)
    (problem,) = json.loads(proc.stdout)["problems"]
    assert problem["file"] == ds["annotation_path"] and problem["line"] == 2 and url in problem["message"]


@pytest.mark.parametrize(
    ("which", "override", "expected"),
    [
        ("s3_local_dict", {"AWS_SECRET_ACCESS_KEY": "wrong-secret-0123456789abcdef"}, "SignatureDoesNotMatch"),
        ("s3_dict", {"AWS_SECRET_ACCESS_KEY": "wrong-secret-0123456789abcdef"}, "SignatureDoesNotMatch"),
        ("s3_local_dict", {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN0000000000"}, "InvalidAccessKeyId"),
        ("s3_dict", {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN0000000000"}, "InvalidAccessKeyId"),
    ],
)
def test_refused_credentials_one_line(s3_dataset, env, which, override, expected):
    env.update(override)
    proc, elapsed = run_vlsft(["datasets", "check", "--deep", s3_dataset[which]], env)
    assert proc.returncode != 0
    (line,) = error_lines(proc)
    assert expected in line and next(iter(override)) in line
    assert next(iter(override.values())) not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 15


def test_unknown_bucket_one_line(env, tmp_path):
    d = {"x": {"data_path": "s3://vlsft-no-such-bucket/media", "annotation_path": "s3://vlsft-no-such-bucket/a.jsonl"}}
    (tmp_path / "d.json").write_text(json.dumps(d))
    for target in (str(tmp_path / "d.json"), "s3://vlsft-no-such-bucket/dict.json"):
        proc, elapsed = run_vlsft(["datasets", "check", "--deep", target], env)
        assert proc.returncode != 0
        (line,) = error_lines(proc)
        assert "bucket 'vlsft-no-such-bucket' does not exist" in line
        assert "Traceback" not in proc.stderr and elapsed < 15


def test_unreachable_endpoint_one_line_within_seconds(s3_dataset, env):
    dead = closed_port_url()
    env["AWS_ENDPOINT_URL"] = dead
    for target in (s3_dataset["s3_local_dict"], s3_dataset["s3_dict"]):
        proc, elapsed = run_vlsft(["datasets", "check", "--deep", target], env)
        assert proc.returncode != 0
        (line,) = error_lines(proc)
        assert f"cannot reach S3 at {dead} (AWS_ENDPOINT_URL)" in line
        assert "Traceback" not in proc.stderr
        assert elapsed < 10, elapsed


def test_print_args_uses_the_run_yaml_storage_block(s3_server, s3_dataset, cli_env, tiny_model_dir, tmp_path):  # noqa: F811
    """Endpoint only in the YAML, keys under other variable names: the plan still reads the S3 dictionary."""
    env = dict(cli_env)
    for name in list(env):
        if name.startswith("AWS_"):
            del env[name]
    env["NO_PROXY"] = "127.0.0.1,localhost"
    env["CEPH_KEY_ID"] = s3_server.access_key_id
    env["CEPH_SECRET"] = s3_server.secret_access_key
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"""model: {{name_or_path: {tiny_model_dir}, tune_mm_llm: true}}
data: {{dictionary: {s3_dataset["s3_dict"]}}}
training: {{per_device_train_batch_size: 1, max_steps: 2}}
distributed: {{nproc_per_node: 2, deepspeed: none}}
output: {{dir: {tmp_path / "out"}}}
storage:
  endpoint_url: {s3_server.url}
  region: us-east-1
  access_key_id: "${{CEPH_KEY_ID}}"
  secret_access_key: "${{CEPH_SECRET}}"
"""
    )
    proc, _ = run_vlsft(["print-args", "--config", str(cfg), "--json"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["samples_per_epoch"] == 6
    assert plan["env"]["AWS_ENDPOINT_URL"] == s3_server.url
    assert plan["env"]["AWS_SECRET_ACCESS_KEY"] == "***"
    assert s3_server.secret_access_key not in proc.stdout + proc.stderr


def test_samples_built_from_s3_equal_local(s3_server, s3_dataset, qwen_tokenizer_dir, monkeypatch):  # noqa: F811
    """The trainer's/preview's code path (AnnotationStore + SampleBuilder) gives identical tensors from S3."""
    import torch
    from transformers import AutoTokenizer

    from qwenvl import storage
    from qwenvl.data.sample import SampleBuilder, VisionBudget
    from qwenvl.data.store import AnnotationStore

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    storage.reset()
    local_root = Path(s3_dataset["local_dict"]).parent
    remote = AnnotationStore.from_file(s3_dataset["annotation_path"])
    local = AnnotationStore.from_file(str(local_root / "ann" / "train.jsonl"))
    assert len(remote) == len(local) == 6
    tok = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))
    builder = SampleBuilder(tok, VisionBudget(max_pixels=12544, video_max_frames=4, video_max_frame_pixels=3136))
    for i in range(len(local)):
        assert remote[i] == local[i]
        a = builder.build(remote[i], s3_dataset["data_path"])
        b = builder.build(local[i], str(local_root / "media"))
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), (i, key)
            else:
                assert a[key] == b[key], (i, key)


def test_dataloader_workers_read_s3(s3_server, s3_dataset, tiny_model_dir, monkeypatch):  # noqa: F811
    """The trainer's data module over an S3 dictionary, 2 forked DataLoader workers: every sample arrives."""
    import torch
    from transformers import AutoProcessor

    from qwenvl import storage
    from qwenvl.data.arguments import DataArguments
    from qwenvl.data.dataset import make_data_module

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    storage.reset()
    proc = AutoProcessor.from_pretrained(str(tiny_model_dir))
    args = DataArguments(
        dataset_use="demo",
        dataset_dict=s3_dataset["s3_dict"],
        max_pixels=12544,
        video_max_frames=4,
        video_max_frame_pixels=3136,
    )
    module = make_data_module(proc.tokenizer, proc.image_processor, args, seed=1)
    ds = module["train_dataset"]
    assert storage.read_bytes(s3_dataset["annotation_path"])  # the parent holds a live S3 client before forking
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=2, multiprocessing_context="fork", collate_fn=lambda x: x
    )
    items = list(loader)
    assert len(items) == 6
    assert [it.get("bad_sample") for it in items] == [None] * 6
    assert sum("pixel_values_videos" in it for it in items) == 1


def _preview_yaml(path: Path, model_dir: Path, dictionary: str, storage: str = "") -> Path:
    path.write_text(
        f"""model: {{name_or_path: {model_dir}, tune_mm_llm: true}}
data: {{dictionary: {dictionary}, max_pixels: 12544, video_max_frames: 4, video_max_frame_pixels: 3136}}
output: {{dir: {path.parent / "out"}}}
{storage}"""
    )
    return path


@pytest.mark.slow
def test_preview_of_s3_sample_equals_local(s3_dataset, env, tiny_model_dir, tmp_path):
    """`vlsft datasets preview --json` of the S3 video sample equals the same sample on local disk.

    (Every sample, images included, is compared at the library level in test_samples_built_from_s3_equal_local.)
    The endpoint is given only by the run YAML's storage block.
    """
    endpoint = env.pop("AWS_ENDPOINT_URL")
    s3_cfg = _preview_yaml(
        tmp_path / "s3.yaml", tiny_model_dir, s3_dataset["s3_dict"], f"storage: {{endpoint_url: {endpoint}}}\n"
    )
    local_cfg = _preview_yaml(tmp_path / "local.yaml", tiny_model_dir, s3_dataset["local_dict"])
    procs = [
        subprocess.Popen(
            [VLSFT, "datasets", "preview", "--config", str(cfg), "--dataset", "demo", "--index", "2", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cfg in (s3_cfg, local_cfg)
    ]
    docs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + err
        docs.append(json.loads(out))
    remote, local = docs
    assert remote.pop("where").startswith(s3_dataset["annotation_path"])
    local.pop("where")
    assert remote == local
    assert remote["video_grid_thw"] and remote["pixel_values_videos"]["sum"] != 0
