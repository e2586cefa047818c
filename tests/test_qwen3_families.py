"""The Qwen3 generations: the official HEAD video arguments, the official ``sft_qwen3_4b.sh`` argument line on image +
video data (2 CPU ranks, tiny Qwen3-VL, real torchrun), Qwen3-VL MoE and Qwen3.5 tiny models and their parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl.data.sample import VisionBudget, resolve_video_budget
from qwenvl.problems import UserError

REPO = Path(__file__).resolve().parents[1]
DICT = REPO / "configs" / "demo" / "Dataset-Dictionary.json"


def test_head_video_arguments_map_per_family():
    # Qwen3 families: HEAD's meaning and defaults (2 fps, T*H*W within 200704..802816)
    vb = resolve_video_budget(VisionBudget(), "qwen3_vl")
    assert vb.head and (vb.video_fps, vb.min_pixels, vb.max_pixels) == (2.0, 200704, 802816)
    assert vb.frame_picker(16, 8.0) == [0, 5, 10, 15]  # n = int(16 / 8 * 2) = 4, clamped to [4, 8]
    vb = resolve_video_budget(VisionBudget(video_fps=8, video_max_pixels=16384), "qwen3_5_moe")
    assert (vb.video_fps, vb.max_pixels) == (8.0, 16384)
    # Qwen2/2.5-VL: the Qwen2.5-era defaults stay; the HEAD names map onto base_interval / per-frame pixels
    vb = resolve_video_budget(VisionBudget(), "qwen2_5_vl")
    assert not vb.head and (vb.base_interval, vb.max_pixels, vb.min_pixels) == (2, 25088, 3136)
    vb = resolve_video_budget(VisionBudget(video_fps=4, video_max_pixels=50176, video_min_pixels=784), "qwen2_vl")
    assert (vb.base_interval, vb.max_pixels, vb.min_pixels) == (0.25, 50176, 784)
    with pytest.raises(UserError, match="video_fps 2 and base_interval 4 disagree"):
        resolve_video_budget(VisionBudget(video_fps=2, base_interval=4), "qwen2_5_vl")
    with pytest.raises(UserError, match="video_fps must be above 0"):
        resolve_video_budget(VisionBudget(video_fps=0), "qwen3_vl")


def test_unknown_official_argument_gets_the_nearest_name(tmp_path):
    p = subprocess.run([sys.executable, "-m", "qwenvl.train", "--output_dir", str(tmp_path), "--video_fsp", "2",
                        "--video_max_frame_pixel_count", "9"], capture_output=True, text=True, timeout=120, cwd=REPO)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr[-2000:]
    assert "--video_fsp (did you mean --video_fps?)" in err[0]
    assert "did you mean --video_max_frame_pixels?" in err[0] and "Traceback" not in p.stderr


@pytest.mark.parametrize("family,experts", [("qwen3_vl_moe", True), ("qwen3_5", False), ("qwen3_5_moe", True)])
def test_new_family_parts_and_freezing(family, experts):
    import torch
    from transformers import AutoModelForImageTextToText

    from qwenvl.families import family as family_record
    from qwenvl.model import apply_freezing, trainable_parameter_names
    from qwenvl.tiny import tiny_config

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(tiny_config(family))
    assert type(model).__name__ == family_record(family).model_class
    counts = apply_freezing(model, tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=False)
    names = trainable_parameter_names(model)
    assert counts["vision"] == counts["llm"] == 0 and counts["merger"] > 0
    assert names and all(".visual.merger." in n or ".visual.deepstack_merger" in n for n in names), names
    apply_freezing(model, tune_mm_vision=False, tune_mm_mlp=False, tune_mm_llm=True)
    names = trainable_parameter_names(model)
    assert not any(".visual." in n for n in names)
    assert any(".mlp.experts." in n for n in names) == experts
    assert any("linear_attn" in n for n in names) == family.startswith("qwen3_5")
    ids = torch.tensor([[151644, 872, 198, 9707, 151645, 198] * 3])
    out = model(input_ids=ids, labels=ids, position_ids=torch.arange(18).expand(3, 1, 18))
    if experts:  # the router auxiliary loss is part of the loss (output_router_logits, router_aux_loss_coef)
        assert out.aux_loss is not None and float(out.aux_loss) > 0
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "experts" not in n)


@pytest.mark.slow
def test_official_sft_qwen3_4b_line_trains_every_sample_two_ranks(tmp_path):
    """scripts/sft_qwen3_4b.sh of the official HEAD (with local paths, 1 epoch, accumulation 1 so that 16 samples
    make steps) plus the HEAD README's video arguments, through real torchrun with 2 CPU ranks and ZeRO-3: every
    image, video and text sample is trained, none skipped."""
    from qwenvl.tiny import ensure_tiny_model

    model = ensure_tiny_model(REPO / ".cache" / "tiny-qwen3_vl", family="qwen3_vl")
    out = tmp_path / "out"
    official = (f"--model_name_or_path {model} --dataset_dict {DICT} --dataset_use shapes,clips,facts "
                "--data_flatten True --tune_mm_vision False --tune_mm_mlp True --tune_mm_llm True --bf16 "
                f"--output_dir {out} --num_train_epochs 1 --per_device_train_batch_size 4 "
                "--per_device_eval_batch_size 8 --gradient_accumulation_steps 1 --max_pixels 50176 --min_pixels 784 "
                "--eval_strategy no --save_strategy steps --save_steps 1000 --save_total_limit 1 --learning_rate 1e-5 "
                "--weight_decay 0 --warmup_ratio 0.03 --max_grad_norm 1 --lr_scheduler_type cosine --logging_steps 1 "
                "--model_max_length 8192 --gradient_checkpointing True --dataloader_num_workers 2 "
                "--run_name qwen3vl --report_to none --deepspeed configs/zero3.json "
                "--video_fps 2 --video_max_pixels 50176 --video_min_pixels 784").split()
    env = {**os.environ, "VLSFT_SAMPLE_LOG": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29713",
           "-m", "qwenvl.train", *official]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480, cwd=REPO)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    logs = [json.loads(x) for r in (0, 1) for x in (out / "logs" / f"samples-rank{r}.jsonl").read_text().splitlines()]
    assert {x["world_size"] for x in logs} == {2}
    ids = [s for x in logs for s in x.get("sample_ids", [])]  # (row segments also count masked dummy images)
    assert not ids or (len(ids) == 16 and len(set(map(str, ids))) == 16), ids  # 8 images + 2 videos + 6 text, once
    assert sum(x["videos"] for x in logs) == 2 and sum(x["images"] for x in logs) == 8
    assert "# samples: 16 trained, 0 skipped as bad, 16 read on 2 rank(s)" in p.stdout.splitlines(), p.stdout[-2000:]
    for r in (0, 1):
        skipped = out / "logs" / f"skipped-samples-rank{r}.jsonl"
        assert not skipped.exists() or not skipped.read_text().strip()
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_vl"


def test_every_family_packs_and_a_family_that_cannot_is_refused_in_one_line():
    """Qwen3.5's Gated DeltaNet layers keep packed samples apart (qwenvl.linear_attention, any device), so no
    shipped family refuses flatten / packing; the rule stays for a family whose record says it cannot."""
    import dataclasses

    from qwenvl.families import FAMILIES

    for fam in FAMILIES.values():
        assert fam.packs and fam.batching_problem(data_flatten=True, data_packing=True) is None
    padded_only = dataclasses.replace(FAMILIES["qwen3_5"], packs=False)
    msg = padded_only.batching_problem(data_flatten=True, data_packing=False)
    assert msg and msg.startswith("data_flatten puts several samples in one row") and "\n" not in msg
    assert padded_only.batching_problem(data_flatten=False, data_packing=True).startswith("data_packing")
    assert padded_only.batching_problem(data_flatten=False, data_packing=False) is None
    assert padded_only.limits() == ["no data.packing / data.flatten (padded rows only)"]
