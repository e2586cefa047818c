"""benchmarks/gpu_bench.py's token-budget sweep and --compile (issue 18 items 5 and 6) in the tiny CPU mode.

The GPU figures are pending (benchmarks/RESULTS.md); this proves the code paths: each budget point is a packed step
sized as the trainer's ``packing_rows`` sizes it, and the per-layer ``torch.compile`` wiring traces the real layers
(the ``eager`` backend keeps it fast on CPU; on the GPU the default is inductor) with the same first loss.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

pytestmark = pytest.mark.slow


def bench(repo_root, out, *args: str) -> dict:
    env = dict(os.environ, GPU_BENCH_TINY="1")
    p = subprocess.run(["bash", str(repo_root / "scripts" / "gpu_bench.sh"), "--json", str(out), *args], env=env,
                       capture_output=True, text=True, timeout=300, cwd=repo_root)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


def test_token_budget_sweep_and_compiled_layers(repo_root, tmp_path, qwen_tokenizer_dir):
    data = bench(repo_root, tmp_path / "budgets.json", "--modes", "packed", "--token-budgets", "96,256",
                 "--steps", "2", "--warmup", "1", "--length-mix", "realistic")
    assert data["header"]["token_budgets"] == [96, 256] and data["header"]["compiled"] is None
    plain, *points = data["results"]
    assert plain["mode"] == "packed" and "token_budget" not in plain
    assert [p["token_budget"] for p in points] == [96, 256]
    for p in points:
        assert p["mode"] == "packed" and p["steps"] == 2 and p["tokens_per_s_per_gpu"] > 0
        assert p["row_capacity"] == p["token_budget"] and p["packing_rows"] == 1  # below --pack-length: one row
        assert p["tokens_per_step"] <= p["token_budget"]
        assert p["padding_fraction"] < 0.2 and 5 < p["first_loss"] < 20
    assert points[1]["samples_per_step"] > points[0]["samples_per_step"]  # a larger budget holds more samples

    compiled = bench(repo_root, tmp_path / "compiled.json", "--modes", "packed", "--compile", "--compile-backend",
                     "eager", "--steps", "1", "--warmup", "0", "--length-mix", "realistic")
    assert compiled["header"]["compiled"] == {"backend": "eager", "decoder_layers": 2, "vision_blocks": 2}
    (r,) = compiled["results"]
    assert r["compiled_graphs"] > 0
    assert r["first_loss"] == pytest.approx(plain["first_loss"], abs=1e-4)  # the same first step, compiled
