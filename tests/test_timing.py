"""The time-per-epoch estimate (qwenvl/timing.py): the language model's matmul parameters read from safetensors
headers equal the trainer's FLOPs count of the loaded model; tokens/s from the stated MFU assumption; sample tokens
from the records; print-args --gpu shows the line; the trainer reads the planned figure it compares with."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qwenvl import timing
from qwenvl.lora_rules import weight_shapes


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_llm_matmul_params_equal_the_flop_count_of_the_loaded_model(family, tiny_model_dir, repo_root):
    from transformers import AutoModelForImageTextToText

    from qwenvl.mfu import flop_params
    from qwenvl.tiny import ensure_tiny_model

    folder = tiny_model_dir if family == "qwen2_5_vl" else ensure_tiny_model(repo_root / ".cache" / f"tiny-{family}",
                                                                              family=family)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert timing.llm_matmul_params(weight_shapes(folder)) == flop_params(model)["n_llm"]


def test_rate_from_the_assumption_or_a_measurement(monkeypatch):
    rate, source = timing.tokens_per_second("NVIDIA H100 80GB HBM3", 3_000_000_000, True)
    assert rate == pytest.approx(timing.ASSUMED_MFU * 989e12 / (6 * 3e9)) and "not measured" in source
    frozen, _ = timing.tokens_per_second("H100", 3_000_000_000, False)
    assert frozen == pytest.approx(rate * 6 / 4)
    assert timing.tokens_per_second(None, 1, True)[0] is None
    assert timing.tokens_per_second("Some GPU 9000", 1, True) == (None, "unknown GPU kind 'Some GPU 9000'")
    monkeypatch.setitem(timing.MEASURED, "H100", 12_345.0)
    assert timing.tokens_per_second("NVIDIA H100", 3, True) == (12_345.0, "measured on H100 (benchmarks/RESULTS.md)")


def test_sample_tokens_from_the_records(tmp_path):
    ann = tmp_path / "a.jsonl"
    rows = [{"image": ["x.png", "y.png"], "conversations": [{"from": "human", "value": "<image><image>abc 123"},
                                                           {"from": "gpt", "value": "de"}]}] * 3
    ann.write_text("\n".join(json.dumps(r) for r in rows))
    # text: "abc 123" -> 3 digits + 4 bytes / 3, "de" -> 2 / 3, with 2 x 5 markup tokens; + 2 images x 100
    got = timing.mean_sample_tokens(str(ann), image_tokens=100, video_tokens=1000)
    text = 3 + (len(b"<image><image>abc 123") - 3) / 3 + 5 + 2 / 3 + 5
    assert got == int(text) + 200
    assert timing.mean_sample_tokens(str(tmp_path / "missing.jsonl"), image_tokens=1, video_tokens=1) is None
    assert timing.epoch_line(3.6e9, 8, 1000.0, "x").startswith("# time per epoch ~ 125 h 00 min: 3,600,000,000 tokens")


def test_print_args_time_line_and_the_trainer_reads_the_plan(monkeypatch):
    from qwenvl.trainer import _planned_rate
    from vlsft.cli import app

    r = CliRunner().invoke(app, ["print-args", "--config", "configs/demo.yaml", "--gpu", "A100"])
    assert r.exit_code == 0 and "# time per epoch ~ " in r.output and "A100's bf16 peak" in r.output, r.output
    assert "time per epoch" not in CliRunner().invoke(app, ["print-args", "--config", "configs/demo.yaml"]).output
    monkeypatch.setenv(timing.PLANNED_ENV, "2500.5")
    assert _planned_rate() == 2500.5
    monkeypatch.setenv(timing.PLANNED_ENV, "junk")
    assert _planned_rate() is None
