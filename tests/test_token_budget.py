"""Throughput-sized batches (issue 18 item 5): ``packing_rows`` x ``model_max_length`` tokens per device per step.

The sampler (:mod:`qwenvl.data.length_sampler`): every sample once per epoch, the budget per the estimate, the same
number of steps on every rank (also through accelerate's own sharding), deterministic by seed and epoch. The
estimate (:mod:`qwenvl.data.length_estimate`) against the real built samples; ``print-args`` shows the figure; one
real run through ``qwenvl.train``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from plan_fixtures import make_project
from typer.testing import CliRunner

from qwenvl.data.length_sampler import MARGIN, TokenBudgetBatchSampler
from qwenvl.data.token_budget import budget_lines, budget_problem, tokens_per_step

REPO = Path(__file__).resolve().parents[1]
DICT = REPO / "configs" / "demo" / "Dataset-Dictionary.json"


def mixed_lengths(n: int, seed: int = 0, long_share: float = 0.02, cap: int = 8192) -> np.ndarray:
    """Mostly 50..3000 tokens, a few long ones (some above one row)."""
    rng = np.random.default_rng(seed)
    n_long = int(n * long_share)
    return np.concatenate([rng.integers(50, 3000, n - n_long), rng.integers(3000, int(cap * 1.1), n_long)])


@pytest.mark.parametrize("n, cap, rows, world", [(1000, 8192, 4, 1), (1000, 8192, 2, 3), (5000, 4096, 1, 8),
                                                 (37, 4096, 2, 4)])
def test_every_sample_once_per_epoch_within_the_budget(n, cap, rows, world):
    lengths = mixed_lengths(n, cap=cap)
    s = TokenBudgetBatchSampler(lengths, row_capacity=cap, rows_per_step=rows, world_size=world, seed=3)
    for epoch in range(3):
        steps = s.steps(epoch)
        assert len(steps) == len(s) and len(steps) % world == 0
        assert sorted(i for st in steps for i in st) == list(range(n))  # each sample exactly once
        for st in steps:
            est = lengths[st]
            # no sample above a row: the steps's samples fit its rows below the head-room; a longer one rides alone
            assert np.minimum(est, cap).sum() <= rows * cap
            if (est <= cap * (1 - MARGIN)).all():
                assert est.sum() <= rows * cap * (1 - MARGIN)


def test_budget_is_filled():
    """Realistic lengths: steps come out ~95 % full per the estimate (the head-room is 5 %), not half empty."""
    lengths = mixed_lengths(20_000, seed=1)
    s = TokenBudgetBatchSampler(lengths, row_capacity=8192, rows_per_step=4, world_size=8, seed=0)
    summary = s.summary()
    assert summary["estimated_fill"] >= 0.9
    assert summary["steps_per_rank"] * 8 == summary["steps"] == len(s)
    assert summary["tokens_per_step_budget"] == tokens_per_step(4, 8192) == 32768


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_equal_steps_on_every_rank_through_accelerate(world):
    """accelerate's BatchSamplerShard (what the trainer's DataLoader goes through) hands rank r the steps
    r, r + W, ...: every rank the same number, together every sample once."""
    from accelerate.data_loader import BatchSamplerShard

    lengths = mixed_lengths(999, seed=2)
    s = TokenBudgetBatchSampler(lengths, row_capacity=4096, rows_per_step=2, world_size=world, seed=5)
    s.set_epoch(1)
    per_rank = []
    for rank in range(world):
        shard = BatchSamplerShard(s, num_processes=world, process_index=rank, split_batches=False, even_batches=True)
        got = list(shard)
        assert len(got) == len(shard) == len(s) // world
        assert got == s.rank_steps(rank)
        per_rank.append(got)
    assert sorted(i for steps in per_rank for st in steps for i in st) == list(range(999))


def test_deterministic_by_seed_and_epoch():
    lengths = mixed_lengths(3000, seed=4)
    a = TokenBudgetBatchSampler(lengths, row_capacity=8192, rows_per_step=2, world_size=2, seed=7)
    b = TokenBudgetBatchSampler(lengths, row_capacity=8192, rows_per_step=2, world_size=2, seed=7)
    c = TokenBudgetBatchSampler(lengths, row_capacity=8192, rows_per_step=2, world_size=2, seed=8)
    assert a.steps(0) == b.steps(0) and a.steps(2) == b.steps(2)
    assert a.steps(0) != c.steps(0)
    a.set_epoch(1)
    assert list(a) == b.steps(1) != b.steps(0)
    assert len(a) == len(b) == len(c)  # the step count never depends on the seed or the epoch


def test_composition_changes_between_epochs():
    """Which samples share a step is drawn again each epoch (not only the order of fixed steps)."""
    lengths = mixed_lengths(4000, seed=5)
    s = TokenBudgetBatchSampler(lengths, row_capacity=8192, rows_per_step=2, seed=0)

    def partner(steps):
        out = {}
        for st in steps:
            for i in st:
                out[i] = frozenset(st) - {i}
        return out

    p0, p1 = partner(s.steps(0)), partner(s.steps(1))
    same = sum(p0[i] == p1[i] for i in range(len(lengths)))
    assert same < 0.05 * len(lengths)


def test_fewer_samples_than_steps():
    """3 samples on 4 ranks: 4 steps (one each), one of them empty - the collator makes it a masked dummy."""
    s = TokenBudgetBatchSampler([100, 200, 300], row_capacity=4096, rows_per_step=2, world_size=4)
    steps = s.steps(0)
    assert len(steps) == 4 and sorted(i for st in steps for i in st) == [0, 1, 2]
    assert sum(not st for st in steps) == 1
    # two samples in one row on two ranks: the row is split, so no rank idles
    s = TokenBudgetBatchSampler([100, 200], row_capacity=4096, rows_per_step=2, world_size=2)
    assert sorted(len(st) for st in s.steps(0)) == [1, 1]


def test_budget_problem_and_lines():
    assert budget_problem(packing=True, packing_rows=None) is None
    assert budget_problem(packing=True, packing_rows=2) is None
    assert "packing is off" in budget_problem(packing=False, packing_rows=2)[0]
    assert "at least 1" in budget_problem(packing=True, packing_rows=0)[0]
    assert budget_lines(packing=False, packing_rows=4, model_max_length=8192, per_device=4, accumulation=2,
                        world=8) == []
    (line,) = budget_lines(packing=True, packing_rows=4, model_max_length=8192, per_device=4, accumulation=2, world=8)
    assert line.startswith("tokens per step = 4 rows x 8,192 (model_max_length) = 32,768 per device; x 2 "
                           "accumulation x 8 ranks = 524,288 per optimizer step")
    (line,) = budget_lines(packing=True, packing_rows=None, model_max_length=4096, per_device=8, accumulation=1,
                           world=2)
    assert line.startswith("tokens per step <= 8 samples x 4,096 (model_max_length) = 32,768 per device")


def test_print_args_shows_tokens_per_step(tmp_path):
    from vlsft.cli import app

    path = make_project(tmp_path)  # 4 per device x 4 accumulation x 8 x 2 ranks
    result = CliRunner().invoke(app, ["print-args", "-c", str(path), "data.packing=true", "data.packing_rows=4",
                                      "data.model_max_length=8192"])
    assert result.exit_code == 0, result.output
    assert ("tokens per step = 4 rows x 8,192 (model_max_length) = 32,768 per device; x 4 accumulation x 16 ranks "
            "= 2,097,152 per optimizer step") in result.output
    assert "--packing_rows 4" in result.output
    result = CliRunner().invoke(app, ["print-args", "-c", str(path), "data.packing=true"])
    assert "tokens per step <= 4 samples x 8,192" in result.output  # model_max_length's default
    result = CliRunner().invoke(app, ["print-args", "-c", str(path)])
    assert "tokens per step" not in result.output and "--packing_rows" not in result.output
    result = CliRunner().invoke(app, ["print-args", "-c", str(path), "data.packing=true", "data.packing_rows=0"])
    assert result.exit_code == 2 and "data.packing_rows" in result.output
    result = CliRunner().invoke(app, ["print-args", "-c", str(path), "data.packing_rows=2"])
    assert result.exit_code == 2
    assert "[data.packing_rows] packing_rows sets a token budget for packed rows, but packing is off" in result.output


def _image_dataset(root: Path, tokenizer_dir: Path, n: int = 60, max_pixels: int = 1280 * 28 * 28):
    """A dataset of images of many sizes (not multiples of 28), prose answers, some coordinate lists and text-only
    samples, built through the trainer's own data module."""
    import random

    from PIL import Image
    from transformers import AutoProcessor

    from qwenvl.arguments import DataArguments
    from qwenvl.data.dataset import make_data_module

    rng = random.Random(0)
    words = "the chart shows a value of in and for with left right total year increase".split()
    (root / "img").mkdir(parents=True)
    recs = []
    for i in range(n):
        answer = " ".join(rng.choices(words, k=rng.randint(5, 200)))
        if i % 5 == 0:
            answer = " ".join(f"[{rng.randint(0, 999)}, {rng.randint(0, 999)}]" for _ in range(rng.randint(1, 20)))
        if i % 10 == 9:
            recs.append({"conversations": [{"from": "human", "value": "why?"}, {"from": "gpt", "value": answer}]})
            continue
        w, h = rng.randint(30, 1500), rng.randint(30, 1500)
        Image.new("RGB", (w, h), (i, 0, 0)).save(root / "img" / f"{i}.jpg")
        recs.append({"image": f"{i}.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                             {"from": "gpt", "value": answer}]})
    (root / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    (root / "d.json").write_text(json.dumps({"mix": {"data_path": str(root / "img"),
                                                     "annotation_path": str(root / "a.jsonl")}}))
    proc = AutoProcessor.from_pretrained(tokenizer_dir)
    args = DataArguments(dataset_use="mix", dataset_dict=str(root / "d.json"), max_pixels=max_pixels,
                         min_pixels=3136, model_max_length=100_000)
    return make_data_module(proc.tokenizer, proc.image_processor, args, seed=0)["train_dataset"]


def test_estimates_match_the_built_samples(tmp_path, qwen_tokenizer_dir):
    """Image tokens are exact from the headers (no pixel decoded), text within a few percent: the total over the
    dataset within 3 %, every sample within 30 %."""
    from qwenvl.data.length_estimate import estimate_lengths

    ds = _image_dataset(tmp_path, qwen_tokenizer_dir)
    est, info = estimate_lengths(ds)
    real = np.array([len(ds[i]["input_ids"]) for i in range(len(ds))])
    assert info["samples"] == len(ds) == 60 and info["image_headers"] == 54 and info["images_at_bound"] == 0
    assert abs(est.sum() / real.sum() - 1) < 0.03, (est.sum(), real.sum())
    assert (np.abs(est / real - 1) < 0.3).all(), list(zip(est.tolist(), real.tolist(), strict=True))
    # without headers every image counts its pixel bound: never below the real count
    bound, info = estimate_lengths(ds, headers=False)
    assert info["images_at_bound"] == 54 and (bound >= est).all() and bound.sum() > 1.5 * est.sum()


@pytest.mark.slow
def test_training_run_with_a_token_budget(tmp_path, tiny_model_dir):
    """`qwenvl.train --data_packing True --packing_rows 1` on the demo data (images, a video, text-only), one
    process, two epochs: every sample once per epoch, steps of varying sample counts, the budget logged."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qwenvl.train", "--model_name_or_path", str(tiny_model_dir),
           "--dataset_dict", str(DICT), "--dataset_use", "shapes,facts,clips", "--tune_mm_mlp", "True",
           "--tune_mm_llm", "True", "--output_dir", str(out), "--num_train_epochs", "2", "--data_packing", "True",
           "--packing_rows", "1", "--model_max_length", "128", "--learning_rate", "1e-3", "--logging_steps", "1",
           "--save_strategy", "no", "--report_to", "none", "--max_pixels", "12544", "--min_pixels", "3136",
           "--video_max_frame_pixels", "3136", "--video_min_frame_pixels", "3136", "--video_max_frames", "4",
           "--video_min_frames", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(VLSFT_SAMPLE_LOG="1", WANDB_MODE="disabled")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "token budget: 1 rows x 128 = 128 tokens per device per step (packing_rows)" in p.stderr
    recs = [json.loads(x) for x in (out / "logs" / "samples-rank0.jsonl").read_text().splitlines()]
    per_epoch = len(recs) // 2
    assert len(recs) == 2 * per_epoch and per_epoch >= 3
    for epoch in (recs[:per_epoch], recs[per_epoch:]):
        assert sorted(i for r in epoch for i in r["sample_ids"]) == list(range(16))
    assert len({len(r["sample_ids"]) for r in recs}) > 1  # sized by tokens, not by a sample count
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["max_steps"] == len(recs)
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == len(recs) and all(5 < x < 20 for x in losses)

    # the same flag without packing: one line before anything is trained
    bad = cmd[:cmd.index("--data_packing")] + cmd[cmd.index("--packing_rows"):]
    bad[bad.index("--output_dir") + 1] = str(tmp_path / "bad")
    p = subprocess.run(bad, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert p.returncode == 2
    assert "error: packing_rows sets a token budget for packed rows, but packing is off" in p.stderr


def test_grounding_objects_are_counted_in_either_shape(tmp_path):
    """vlsft's objects list and ms-swift's {ref, bbox} dict: one object per box, each costing OBJECT_TOKENS."""
    from qwenvl.data import formats
    from qwenvl.data.length_estimate import _read_record
    from qwenvl.data.registry import DatasetSource, build_index

    turns = [{"role": "user", "content": "<image>Find <ref-object> and <ref-object>."},
             {"role": "assistant", "content": "<bbox> <bbox>"}]
    recs = [{"messages": turns, "images": ["a.png"],
             "objects": {"ref": ["cat", "dog"], "bbox": [[1, 2, 30, 40], [5, 6, 50, 60]], "bbox_type": "real"}},
            {"messages": [{"role": "user", "content": "<image>Where?"}, {"role": "assistant", "content": "Here."}],
             "images": ["a.png"], "objects": [{"label": "cat", "bbox": [1, 2, 30, 40]}]}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    src = DatasetSource("g", str(tmp_path), str(tmp_path / "a.jsonl"), 100.0, fmt=formats.FormatSpec("messages"))
    build_index([src], seed=0)
    assert all(_read_record(src, i, False).ok for i in range(2))
    assert [_read_record(src, i, False).objects for i in range(2)] == [2, 1]
