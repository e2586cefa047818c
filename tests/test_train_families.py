"""Qwen2-VL (untied lm_head) and Qwen3-VL (16-px patches, deepstack) train through the same trainer.

One process, no DeepSpeed, 2 steps on the bundled image + text-only demo data: the family is read from
config.json (the folder name says nothing), the run finishes, logs a finite loss and the final folder holds
the model with its own processor settings (Qwen3-VL: patch_size 16).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DICT = REPO / "configs" / "demo" / "Dataset-Dictionary.json"


@pytest.mark.slow
@pytest.mark.parametrize("family,patch", [("qwen2_vl", 14), ("qwen3_vl", 16)])
def test_family_trains(tmp_path, family, patch, cli_env):
    from qwenvl.tiny import ensure_tiny_model

    model = ensure_tiny_model(REPO / ".cache" / f"tiny-{family}", family=family)
    neutral = tmp_path / "some-model"  # the folder name must not decide the model class
    neutral.symlink_to(model, target_is_directory=True)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qwenvl.train", "--model_name_or_path", str(neutral),
           "--dataset_dict", str(DICT), "--dataset_use", "shapes,facts", "--tune_mm_mlp", "True",
           "--tune_mm_llm", "True", "--output_dir", str(out), "--max_steps", "2",
           "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps", "1",
           "--save_strategy", "no", "--report_to", "none", "--max_pixels", "12544", "--min_pixels", "3136"]
    env = {k: v for k, v in cli_env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(out).image_processor.patch_size == patch
