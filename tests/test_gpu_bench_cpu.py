"""scripts/gpu_bench.sh in its tiny CPU mode: runs the real bench code (padded vs flattened) end to end."""

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
    by = {r["mode"]: r for r in data["results"]}
    assert set(by) == {"padded", "flatten"}
    for r in by.values():
        assert r["tokens_per_s_per_gpu"] > 0 and r["steps"] == 3
        assert 5 < r["first_loss"] < 20
    # flattening removes (almost all) padding: only the masked dummy video segment is left
    assert by["flatten"]["padding_fraction"] < by["padded"]["padding_fraction"]
    assert by["flatten"]["padding_fraction"] < 0.05


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
