"""Every run YAML shipped in configs/ validates, opens with a comment naming vlsft, and plans the recipe batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlsft.config import load_run_config
from vlsft.plan import plan_from_file

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))
RECIPES = {  # name -> (per-device, accumulation, deepspeed)
    "qwen2.5-vl-3b": (4, 4, "zero3"),
    "qwen2.5-vl-7b": (4, 4, "zero3"),
    "qwen2.5-vl-32b": (2, 8, "zero3"),
    "qwen2.5-vl-72b": (1, 16, "zero3_offload"),
}


def test_all_recipes_are_shipped():
    assert {p.stem for p in SHIPPED} >= set(RECIPES)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_yaml_validates_and_says_what_it_runs(path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "vlsft" in first, f"{path.name} must open with a comment naming vlsft"
    assert f"--config configs/{path.name}" in path.read_text(), f"{path.name} must show its exact command"
    cfg = load_run_config(path)
    assert cfg.model.tune_mm_mlp or cfg.model.tune_mm_llm or cfg.model.tune_mm_vision


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_plan(name: str, tmp_path: Path):
    per_device, accum, deepspeed = RECIPES[name]
    path = REPO / "configs" / f"{name}.yaml"
    cfg = load_run_config(path)
    size = name.rsplit("-", 1)[1].upper()
    assert cfg.model.name_or_path.endswith(f"Qwen2.5-VL-{size}-Instruct")
    assert (cfg.model.tune_mm_vision, cfg.model.tune_mm_mlp, cfg.model.tune_mm_llm) == (False, True, True)
    assert cfg.training.learning_rate == 2e-5 and cfg.data.max_pixels == 100352 and cfg.data.min_pixels == 784
    assert cfg.data.flatten and cfg.training.bf16 and cfg.training.gradient_checkpointing
    assert cfg.data.model_max_length == 8192 and cfg.training.lr_scheduler_type == "cosine"
    assert (cfg.training.save_steps, cfg.training.save_total_limit, cfg.training.warmup_ratio) == (1000, 1, 0.03)
    demo_dict = REPO / "configs" / "demo" / "Dataset-Dictionary.json"
    if not demo_dict.exists():
        pytest.skip("demo dataset dictionary not shipped yet")
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_5_vl"}')  # a model folder's family
    plan = plan_from_file(path, [f"data.dictionary={demo_dict}", f"model.name_or_path={tmp_path}",
                                 f"output.dir={tmp_path / 'out'}"], {})
    args = dict(zip(plan.trainer_args[::2], plan.trainer_args[1::2], strict=True))
    assert args["--per_device_train_batch_size"] == str(per_device)
    assert args["--gradient_accumulation_steps"] == str(accum)
    assert plan.effective_batch_size == 128 and plan.world_size == 8
    assert args["--deepspeed"] == str(REPO / "configs" / f"{deepspeed}.json")
    assert Path(args["--deepspeed"]).is_file()
    assert plan.warnings == []
