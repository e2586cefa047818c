"""Trust, round 3: run YAMLs that print-args accepted though they cannot do what they say, refused at the front
door in one line (file:line, the key, the remedy), exit 2, through the real CLI (`vlsft print-args --config`):
a LoRA target_modules pattern that matches no module of the model (or one of a fully trained part), lora.quantize
with LoRA off, data.video_fps with a disagreeing data.base_interval, eval_strategy without eval data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VLSFT = str(Path(sys.executable).with_name("vlsft"))
DICT = REPO / "configs" / "demo" / "Dataset-Dictionary.json"


def _run(tmp_path: Path, model: Path | str, *, model_extra: str = "", data_extra: str = "", tail: str = "",
         tune: str = "tune_mm_mlp: true\n  tune_mm_llm: true") -> subprocess.CompletedProcess:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""model:
  name_or_path: {model}
  {tune}
{model_extra}
data:
  dictionary: {DICT}
{data_extra}
output:
  dir: {tmp_path / "out"}
distributed: {{deepspeed: none}}
wandb: {{mode: disabled}}
{tail}
""")
    return subprocess.run([VLSFT, "print-args", "--config", str(cfg)], capture_output=True, text=True, timeout=60,
                          cwd=REPO)


def _one_error(p: subprocess.CompletedProcess, tmp_path: Path, *needles: str) -> str:
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr)
    assert "Traceback" not in p.stderr
    errors = [x for x in p.stderr.splitlines() if ": error:" in x or x.startswith("error:")]
    assert len(errors) == 1, p.stderr
    assert errors[0].startswith(f"{tmp_path / 'run.yaml'}:"), errors[0]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


LORA = "  lora:\n    enabled: true\n    target_modules: '{}'"
ONLY_LLM_OFF = "tune_mm_mlp: true"


def test_target_modules_matching_nothing_is_refused_with_names_that_exist(tmp_path, tiny_model_dir):
    p = _run(tmp_path, tiny_model_dir, model_extra=LORA.format(".*qproj"), tune=ONLY_LLM_OFF)
    line = _one_error(p, tmp_path, "[model.lora.target_modules]", "'.*qproj'", "matches no linear layer",
                      "did you mean 'q_proj'", "model.language_model.layers.0.")
    assert "total" not in p.stdout  # no "total 0 of N" report
    assert ":6:" in line  # the line of target_modules


def test_target_modules_not_anchored_suggests_the_whole_name_pattern(tmp_path, tiny_model_dir):
    p = _run(tmp_path, tiny_model_dir, model_extra=LORA.format("q_proj"), tune=ONLY_LLM_OFF)
    _one_error(p, tmp_path, "matched against the whole module name", "did you mean '.*q_proj'")


def test_target_modules_on_a_fully_trained_part_is_refused(tmp_path, tiny_model_dir):
    p = _run(tmp_path, tiny_model_dir, model_extra=LORA.format(".*merger.*"), tune=ONLY_LLM_OFF)
    _one_error(p, tmp_path, "[model.lora.target_modules]", "model.visual.merger.", "tune_mm_mlp")


def test_target_modules_that_match_report_their_adapters(tmp_path, tiny_model_dir):
    p = _run(tmp_path, tiny_model_dir, model_extra=LORA.format(r".*self_attn\.(q|v)_proj"), tune=ONLY_LLM_OFF)
    assert p.returncode == 0, p.stderr
    llm = [x for x in p.stdout.splitlines() if x.startswith("#   llm")]
    assert llm and "LoRA adapters" in llm[0], p.stdout


def test_target_modules_without_weights_yet_says_nothing(tmp_path):
    """model.build_tiny before the build: no weights to resolve the pattern against, so no refusal."""
    p = _run(tmp_path, tmp_path / "tiny", model_extra=LORA.format(".*qproj") + "\n  build_tiny: true",
             tune=ONLY_LLM_OFF)
    assert p.returncode == 0, p.stderr
    assert "target_modules" not in p.stderr


@pytest.mark.parametrize("lora", ["  lora: {quantize: 4bit}", "  lora:\n    enabled: false\n    quantize: 8bit"])
def test_quantize_with_lora_off_is_refused(tmp_path, tiny_model_dir, lora):
    p = _run(tmp_path, tiny_model_dir, model_extra=lora)
    _one_error(p, tmp_path, "[model.lora.quantize]", "model.lora.enabled is false", "full fine-tune",
               "model.lora.enabled: true", "remove model.lora.quantize")


def test_quantize_none_with_lora_off_is_fine(tmp_path, tiny_model_dir):
    p = _run(tmp_path, tiny_model_dir, model_extra="  lora: {enabled: false, quantize: none}")
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("model", ["tiny-qwen2_5_vl", "tiny-qwen3_vl"])
def test_video_fps_with_a_disagreeing_base_interval_is_refused(tmp_path, tiny_model_dir, model):
    folder = tiny_model_dir.parent / model
    if not (folder / "config.json").is_file():
        from qwenvl.tiny import ensure_tiny_model

        ensure_tiny_model(folder, family=model.removeprefix("tiny-"))
    p = _run(tmp_path, folder, data_extra="  video_fps: 1\n  base_interval: 0.25")
    _one_error(p, tmp_path, "[data.video_fps]", "data.video_fps 1 and data.base_interval 0.25 disagree",
               "set only one of them")


def test_video_fps_with_the_same_base_interval_is_fine(tmp_path, tiny_model_dir):
    p = _run(tmp_path, tiny_model_dir, data_extra="  video_fps: 4\n  base_interval: 0.25")
    assert p.returncode == 0, p.stderr
    p = _run(tmp_path, tiny_model_dir, data_extra="  video_fps: 4")
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("strategy", ["steps", "epoch"])
def test_eval_strategy_without_eval_data_is_refused(tmp_path, tiny_model_dir, strategy):
    p = _run(tmp_path, tiny_model_dir, tail=f"training: {{eval_strategy: {strategy}}}")
    _one_error(p, tmp_path, "[training.eval_strategy]", f"eval_strategy {strategy} needs eval data",
               "data.eval_split", "data.eval", "eval_strategy: no")


def test_eval_strategy_with_eval_data_is_fine(tmp_path, tiny_model_dir):
    p = _run(tmp_path, tiny_model_dir, data_extra="  eval_split: 0.2", tail="training: {eval_strategy: steps}")
    assert p.returncode == 0, p.stderr
    p = _run(tmp_path, tiny_model_dir, tail="training: {eval_strategy: 'no'}")
    assert p.returncode == 0, p.stderr
