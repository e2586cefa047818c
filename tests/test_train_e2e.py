"""End to end through the real CLI: `vlsft train` -> torchrun -> qwenvl.train, 2 ranks, DeepSpeed ZeRO-3, CPU.

The suite's shared 8-step run (conftest ``e2e_run``, runs.py) over the bundled demo data (images, a video,
text-only samples) feeds most assertions; a resumed continuation (on a copy of the run), a refused fresh start, a
crashing rank and one single-process run without DeepSpeed (W&B offline, and one half of the batch x accumulation
invariance; the trainer alone runs the other half) are separate, small runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from plan_fixtures import DEMO_DICT as DICT
from plan_fixtures import write_run_yaml
from runs import VLSFT, cli_env, copy_run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([VLSFT, "train", *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


@pytest.fixture(scope="module")
def env():
    return cli_env()


@pytest.fixture()
def run(e2e_run):
    return e2e_run


def sample_log(out: Path, rank: int) -> list[dict]:
    return [json.loads(x) for x in (out / "logs" / f"samples-rank{rank}.jsonl").read_text().splitlines()]


def test_world_two_ranks_disjoint_samples_and_mixed_batches(run):
    r0, r1 = sample_log(run["out"], 0), sample_log(run["out"], 1)
    assert {x["world_size"] for x in r0 + r1} == {2}
    assert {x["rank"] for x in r0} == {0} and {x["rank"] for x in r1} == {1}
    s0 = [s for x in r0 for s in x["samples"]]
    s1 = [s for x in r1 for s in x["samples"]]
    assert len(s0) == len(s1) == 8
    assert s0 != s1 and set(s0) != set(s1)
    # at some step one rank's batch was text-only while the other's had an image or a video (ZeRO-3 trap)
    def text_only(x):
        return x["images"] == 0 and x["videos"] == 0
    mixed = [a["micro_step"] for a, b in zip(r0, r1, strict=True) if text_only(a) != text_only(b)]
    assert mixed, "the demo data and seed no longer produce a text-only vs image step"
    assert any(x["videos"] for x in r0 + r1), "no video sample was trained"


def test_known_third_party_warnings_shown_once(run):
    from qwenvl.noise import KNOWN

    text = run["proc"].stdout + run["proc"].stderr
    import re

    for _category, pattern in KNOWN[:1]:  # the ZeRO-3 collectives warn on every call without the filter
        hits = re.findall(pattern, text)
        assert len(hits) <= 2, (pattern, len(hits))  # once (reduce_scatter and all_gather: one line each)
    assert text.count("FutureWarning") <= 4


def test_loss_falls_and_logs_throughput(run):
    state = json.loads((run["out"] / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    logs = [h for h in state["log_history"] if "loss" in h]
    assert len(logs) == 8
    assert logs[-1]["loss"] < logs[0]["loss"] - 1.0, [h["loss"] for h in logs]
    for key in ("grad_norm", "samples_per_second", "tokens_per_second", "padding_fraction", "skipped_samples",
                "lr/llm", "lr/merger"):
        assert key in logs[0], key
    assert logs[0]["skipped_samples"] == 0


def _generate(folder: Path) -> int:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is two plus two?"}]}]
    x = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                 return_tensors="pt")
    out = model.generate(**x, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    return out.shape[1] - x["input_ids"].shape[1]


def test_final_and_intermediate_dirs_reload_and_generate(run):
    out = run["out"]
    for folder in (out, out / "checkpoint-4"):
        for f in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "processor_config.json"):
            assert (folder / f).is_file(), folder / f
        assert _generate(folder) == 3
    # the saved processor carries the run's pixel limits
    pc = json.loads((out / "processor_config.json").read_text())
    assert pc["image_processor"]["size"] == {"longest_edge": 12544, "shortest_edge": 3136}


def test_standard_key_names(run):
    from safetensors import safe_open

    for folder in (run["out"], run["out"] / "checkpoint-4"):
        keys = list(safe_open(str(folder / "model.safetensors"), "pt").keys())
        assert not [k for k in keys if k.startswith("model.model.")]
        assert any(k.startswith("model.layers.") for k in keys) and any(k.startswith("visual.") for k in keys)


def test_frozen_unchanged_trainable_changed(run, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(run["out"] / "model.safetensors"))
    assert set(before) == set(after)
    frozen = [k for k in before if k.startswith("visual.") and ".merger." not in k]
    trainable = [k for k in before if k not in frozen]
    assert frozen and trainable
    for k in frozen:  # trained in bf16: the frozen weights are the bf16 cast of the originals, bit for bit
        assert torch.equal(after[k], before[k].to(after[k].dtype)), k
    changed = [k for k in trainable if not torch.equal(after[k], before[k].to(after[k].dtype))]
    assert len(changed) == len(trainable), sorted(set(trainable) - set(changed))


def test_speed_path_is_on_in_the_real_run(run):
    """issue 18: the trainer (ZeRO-3, 2 ranks) runs the vision attention in one call per layer, the frozen tower
    forward-only and the chunked loss head; the saved config keeps the loaded attention implementation."""
    text = run["proc"].stdout + run["proc"].stderr
    assert "vision attention one call per layer True" in text
    assert "forward-only frozen vision blocks 2" in text  # the tiny tower's 2 blocks (tune_mm_vision false)
    assert "chunked loss head True" in text
    saved = (run["out"] / "config.json").read_text()
    assert "vlsft_" not in saved


def test_run_files_saved(run):
    d = run["out"] / "vlsft"
    assert "output:" in (d / "run.yaml").read_text()
    assert json.loads((d / "Dataset-Dictionary.json").read_text()) == json.loads(DICT.read_text())
    assert (d / "dataset_use.txt").read_text().strip() == "shapes,clips,facts"
    assert "-m qwenvl.train" in (d / "launch.sh").read_text()
    assert "torchrun" in run["proc"].stdout and "effective batch" in run["proc"].stdout


def test_fresh_run_into_used_dir_is_refused(run, env):
    before = sorted(p.name for p in run["out"].iterdir())
    p = run_cli(["--config", str(run["cfg"]), "output.resume=never"], env, timeout=60)
    assert p.returncode == 2
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "already holds a run" in errors[0] and "Traceback" not in p.stderr
    assert sorted(p.name for p in run["out"].iterdir()) == before


def test_resume_auto_skips_incomplete_and_continues(run, env, tmp_path):
    out = copy_run(run, tmp_path)  # the shared run stays as it is
    import shutil

    broken = out / "checkpoint-10"  # a half-written checkpoint: newest by number, no trainer_state.json
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    cut = out / "checkpoint-9"  # what a crash or a full disk leaves: whole weights, trainer_state.json cut short
    shutil.copytree(out / "checkpoint-8", cut, ignore=shutil.ignore_patterns("global_step*"))
    state_text = (cut / "trainer_state.json").read_text()
    (cut / "trainer_state.json").write_text(state_text[: len(state_text) // 2])
    p = run_cli(["--config", str(run["cfg"]), f"output.dir={out}", "training.max_steps=10",
                 "distributed.master_port=29643"], env)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "continuing from" in p.stdout and "checkpoint-8" in p.stdout
    assert "checkpoint-9" in p.stdout + p.stderr and "truncated" in p.stdout + p.stderr  # skipped, and why
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 10
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps == list(range(1, 11))  # 1-8 from the first run, 9-10 after resuming; nothing repeated
    r0 = sample_log(out, 0)
    assert [x["global_step"] for x in r0[8:]] == [8, 9]


def test_crashing_rank_ends_the_job(run, env, tmp_path):
    e = dict(env, VLSFT_TEST_CRASH_RANK="1", VLSFT_SAMPLE_LOG="0")
    t0 = time.time()
    p = run_cli(["--config", str(run["cfg"]), f"output.dir={tmp_path / 'crash'}",
                 "distributed.master_port=29645"], e, timeout=240)
    assert p.returncode != 0
    assert time.time() - t0 < 180
    assert "training exited with status" in p.stderr


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_model_dir, env):
    """`vlsft train` with one process, no DeepSpeed and W&B offline: 2 steps of per-device batch 2 x accumulation 1
    over shapes, facts, clips (the invariance test's other half is the trainer alone at 1 x 2 on the same data).
    No port in the YAML while 29500 is taken (another run on this machine): torchrun --standalone takes a free one."""
    import contextlib
    import socket

    d = tmp_path_factory.mktemp("one-process")
    out = d / "out"
    cfg = write_run_yaml(d / "run.yaml", tiny_model_dir, out, data={"use": ["shapes", "facts", "clips"]},
                         training={"max_steps": 2, "save_steps": 4, "per_device_train_batch_size": 2,
                                   "learning_rate": 1.0e-3},
                         output={"run_name": "e2e", "resume": "auto"})
    e = {k: v for k, v in env.items() if not k.startswith("WANDB_")}
    with socket.socket() as busy:
        with contextlib.suppress(OSError):  # already taken by someone else: busy all the same
            busy.bind(("", 29500))
            busy.listen()
        p = run_cli(["--config", str(cfg), "wandb.mode=offline", "wandb.project=vlsft-test",
                     "training.report_to=wandb", "distributed.nproc_per_node=1", "distributed.deepspeed=none",
                     "training.bf16=false"], e)
    assert p.returncode == 0, p.stderr[-3000:]
    assert " --standalone " in (out / "vlsft" / "launch.sh").read_text()
    return {"out": out, "proc": p}


def test_batch_times_accumulation_invariance(one_process_run, tmp_path, tiny_model_dir, env):
    """Per-device 2 x accumulation 1 (the one-process `vlsft train` run) and 1 x 2 (the trainer alone, same
    settings; single process, no DeepSpeed): same first-step loss and grad norm."""
    def first_step(out: Path) -> tuple[float, float]:
        log = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h][0]
        return log["loss"], log["grad_norm"]

    out = tmp_path / "bs1ga2"
    cmd = [sys.executable, "-m", "qwenvl.train", "--model_name_or_path", str(tiny_model_dir),
           "--dataset_dict", str(DICT), "--dataset_use", "shapes,facts,clips", "--tune_mm_vision", "False",
           "--tune_mm_mlp", "True", "--tune_mm_llm", "True", "--attn_implementation", "sdpa",
           "--model_max_length", "512", "--output_dir", str(out), "--max_steps", "1",
           "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
           "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
           "--max_pixels", "12544", "--min_pixels", "3136", "--video_max_frame_pixels", "3136",
           "--video_min_frame_pixels", "3136", "--video_max_frames", "4", "--video_min_frames", "2"]
    e = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    (l1, g1), (l2, g2) = first_step(one_process_run["out"]), first_step(out)
    assert l1 == pytest.approx(l2, rel=1e-4)
    assert g1 == pytest.approx(g2, rel=1e-3)


def test_wandb_offline_single_process_without_deepspeed(one_process_run):
    """W&B from the run YAML (offline): rank 0 logs into <output>/wandb with the run name, the resolved run
    config and the per-dataset sample counts; also covers distributed.deepspeed=none with one process."""
    runs = list((one_process_run["out"] / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    blob = runs[0].read_bytes()
    assert b"total_samples" in blob and b'"name_or_path"' in blob and b"e2e" in blob
