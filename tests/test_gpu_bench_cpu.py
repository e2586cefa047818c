"""scripts/gpu_bench.sh and scripts/gpu_check.sh in their tiny CPU modes: the real bench code (padded, flattened,
packed, LoRA), the real `vlsft train` path and the packed-vs-one-by-one loss, end to end."""

from __future__ import annotations

import json
import os
import subprocess

import pytest


@pytest.mark.slow
def test_gpu_bench_tiny_cpu(repo_root, tmp_path, qwen_tokenizer_dir):
    out = tmp_path / "bench.json"
    env = dict(os.environ, GPU_BENCH_TINY="1")
    p = subprocess.run(["bash", str(repo_root / "scripts" / "gpu_bench.sh"), "--json", str(out)], env=env,
                       capture_output=True, text=True, timeout=300, cwd=repo_root)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "tokens/s/GPU" in p.stdout and "MFU" in p.stdout
    data = json.loads(out.read_text())
    assert data["header"]["device"] == "cpu"
    # the trainer's speed path (issue 18): one vision-attention call per layer, the frozen tower forward-only
    assert data["header"]["speed"] == {"vision_attention": True, "text_attention": True, "forward_only_vision_blocks": 2,
                                       "linear_attention_layers": 0, "chunked_loss": True}  # Qwen2.5-VL: no DeltaNet
    by = {r["mode"]: r for r in data["results"]}
    assert set(by) == {"padded", "flatten"}
    for r in by.values():
        assert r["tokens_per_s_per_gpu"] > 0 and r["steps"] == 3
        assert 5 < r["first_loss"] < 20
    # flattening removes (almost all) padding: only the masked dummy video segment is left
    assert by["flatten"]["padding_fraction"] < by["padded"]["padding_fraction"]
    assert by["flatten"]["padding_fraction"] < 0.05



@pytest.mark.slow
def test_gpu_check_tiny_cpu_every_part(repo_root, tmp_path, qwen_tokenizer_dir):
    """The one-call GPU check script (issue 15) in GPU_CHECK_TINY mode: every part leaves its figures."""
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_TINY="1", GPU_CHECK_WORK=str(tmp_path / "work"))
    p = subprocess.run(["bash", str(repo_root / "scripts" / "gpu_check.sh"), str(out)], env=env,
                       capture_output=True, text=True, timeout=240, cwd=repo_root)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert {f.name for f in out.iterdir()} == {"env.json", "bench.json", "train.json", "equiv.json",
                                                 "bench_lora.json", "gpu_check.json", "gpu_check.log"}
    res = json.loads((out / "gpu_check.json").read_text())
    assert all(v is not False for v in res["checks"].values()), res["checks"]
    assert res["env"]["torch"] and res["env"]["cuda_available"] is False
    # (a) three modes, each with both MFU figures (nominal 1 TFLOP/s peak on CPU); packing removes padding
    by = {r["mode"]: r for r in res["bench"]["results"]}
    assert set(by) == {"padded", "flatten", "packed"}
    assert res["bench"]["header"]["length_mix"] == "realistic"
    for r in by.values():
        assert r["tokens_per_s_per_gpu"] > 0 and r["mfu_llm"] > 0 and r["mfu_whole"] >= r["mfu_llm"]
        assert r["mfu"] == r["mfu_whole"] and 5 < r["first_loss"] < 20
    assert by["packed"]["padding_fraction"] < by["padded"]["padding_fraction"]
    assert by["packed"]["padding_fraction"] < 0.05
    # (b) the real vlsft train ran on one rank with packing and logged its throughput line
    tr = res["train"]
    assert tr["device"] == "cpu" and tr["problems"] == [] and tr["steps"] == 2 and tr["log_lines"] == 2
    assert tr["tokens_per_second_per_device"] > 0 and tr["padding_fraction"] < 0.05
    assert all(5 < x < 20 for x in tr["losses"])
    # (c) packed vs one by one in bf16: within the stated tolerance, over several rows of real samples
    eq = res["equiv"]
    assert eq["dtype"] == "bfloat16" and eq["samples"] == 6 and eq["rows"] >= 2 and eq["trained_tokens"] > 20
    assert eq["tolerance"] == 1e-2 and eq["rel_diff"] <= eq["tolerance"]
    # (d) LoRA on the language model: a small trainable fraction, it still trains
    lo = res["bench_lora"]
    assert lo["header"]["lora"] == {"r": 64} and 0 < lo["header"]["trainable_fraction"] < 0.10
    assert lo["header"]["trainable"] < res["bench"]["header"]["trainable"]
    assert lo["results"][0]["mode"] == "packed" and lo["results"][0]["tokens_per_s_per_gpu"] > 0
    assert "(d) bench with LoRA" in (out / "gpu_check.log").read_text()


def test_peak_flops_table_and_step_flops():
    from qwenvl import mfu

    assert mfu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert mfu.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert mfu.peak_flops("NVIDIA H200") == 989e12
    assert mfu.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert mfu.peak_flops("NVIDIA L40S") == 362e12
    assert mfu.peak_flops("cpu") is None and mfu.peak_flops(None) is None
    # 6 N T for the dense part, plus the causal attention term
    f = mfu.step_flops(n_llm=10, n_vision=0, n_layers=2, hidden=4, text_tokens=3, vision_patches=0, sum_len_sq=9)
    assert f == 6 * 10 * 3 + 6 * 2 * 4 * 9


def test_peak_table_names_that_share_a_prefix():
    from qwenvl import mfu

    assert mfu.peak_flops("NVIDIA H200 NVL") == 835e12 and mfu.peak_flops("NVIDIA H20") == 148e12
    assert mfu.peak_flops("NVIDIA B200") == 2250e12 and mfu.peak_flops("NVIDIA GB200") == 2500e12
    assert mfu.peak_flops("NVIDIA GeForce RTX 4090") == 165e12
    assert mfu.peak_flops("NVIDIA L4") == 121e12 and mfu.peak_flops("NVIDIA L40") == 181e12
    assert mfu.peak_flops("NVIDIA A10G") == 70e12 and mfu.peak_flops("NVIDIA A100 80GB PCIe") == 312e12


def test_flops_of_a_3b_shape_match_a_hand_calculation():
    """Qwen2.5-VL-3B (meta device, no memory): parameter counts per part written out by hand from the
    published shape, and step FLOPs for everything trained and for the default recipe (vision frozen)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from benchmarks.gpu_bench import config_3b
    from qwenvl import mfu
    from qwenvl.model import apply_freezing

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config_3b())
    layer = (2048 * 2048 + 2048) + 2 * (2048 * 256 + 256) + 2048 * 2048 + 3 * 2048 * 11008 + 2 * 2048
    n_llm = 36 * layer + 2048 + 151936 * 2048  # + final norm + tied lm_head (its matmul; no embedding lookup)
    block = (1280 * 3840 + 3840) + (1280 * 1280 + 1280) + 2 * (1280 * 3420 + 3420) + (3420 * 1280 + 1280) + 2 * 1280
    n_vision = 32 * block + 3 * 2 * 14 * 14 * 1280  # + patch embedding (conv without bias)
    n_merger = 1280 + (5120 * 5120 + 5120) + (5120 * 2048 + 2048)
    assert n_llm + n_vision + n_merger == 3_754_622_976  # Qwen2.5-VL-3B: 3.75 B parameters
    apply_freezing(model, tune_mm_vision=True, tune_mm_mlp=True, tune_mm_llm=True)
    fp = mfu.flop_params(model)
    assert (fp["n_llm"], fp["n_vision"], fp["n_merger"]) == (n_llm, n_vision, n_merger)
    assert (fp["n_layers"], fp["hidden"], fp["merge_size"]) == (36, 2048, 2)
    # one sample: a 448x448 image (32x32 = 1024 patches -> 256 merged tokens) inside 1000 text tokens
    batch = {"text_tokens": 1000, "vision_patches": 1024, "sum_len_sq": 1000**2}
    attention = 6 * 36 * 2048 * 1000**2  # causal: 2 matmuls x 2 FLOPs x L^2 d / 2, x3 forward+backward
    everything = 6 * n_llm * 1000 + 6 * n_vision * 1024 + 6 * n_merger * 256 + attention
    assert mfu.step_flops(**fp, **batch) == pytest.approx(everything, rel=1e-12)
    # 18.5 (LLM) + 3.9 (tower) + 0.06 (merger) + 0.44 (attention) = ~22.9 TFLOPs for this 1000-token sample
    assert everything == pytest.approx(2.290e13, rel=1e-3)
    apply_freezing(model, tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=True)
    fp = mfu.flop_params(model)
    frozen_tower = 6 * n_llm * 1000 + 2 * n_vision * 1024 + 4 * n_merger * 256 + attention
    assert mfu.step_flops(**fp, **batch) == pytest.approx(frozen_tower, rel=1e-12)
    apply_freezing(model, tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=False)
    fp = mfu.flop_params(model)  # only the merger: gradients still cross the language model
    assert mfu.step_flops(**fp, **batch) == pytest.approx(
        4 * n_llm * 1000 + 2 * n_vision * 1024 + 4 * n_merger * 256 + attention, rel=1e-12)
