"""One owner for every default: the trainer dataclasses (qwenvl/arguments.py), the keymap (src/vlsft/keymap.py)
that routes run YAML keys to trainer flags, and everything derived from them."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from qwenvl.arguments import DataArguments, ExtraTrainingArguments, ModelArguments, budget_fields
from vlsft.config import SECTIONS
from vlsft.keymap import KEYS, OWNED_ELSEWHERE, by_yaml, owned_by, owned_by_yaml
from vlsft.schema import SUBSECTIONS, section_model
from vlsft.training_args import OWNED_BY_YAML

# YAML keys with no trainer flag of their own (vlsft-only, or solved into another flag by the plan).
YAML_ONLY = {"model.build_tiny", "model.revision", "training.global_batch_size", "training.extra"}


def test_owned_keys_take_type_default_and_help_from_the_trainer_dataclass():
    """By construction: the schema field is made from the dataclass field (same object as default)."""
    owned = [k for k in KEYS if k.owner is not None]
    assert len(owned) >= 18
    for key in owned:
        f = next(f for f in dataclasses.fields(key.owner) if f.name == key.flag)
        info = section_model(key.section).model_fields[key.name]
        assert info.default is f.default, key
        assert info.annotation == typing.get_type_hints(key.owner)[key.flag], key
        assert info.description.startswith(f.metadata["help"]), key


def test_every_trainer_argument_of_ours_has_a_yaml_key_or_is_official_only():
    official_only = {"dataset_use", "dataset_dict", "model_name_or_path",  # rows without owner: plan-resolved
                     "warmup_ratio", "cache_dir"}
    flags = {k.flag for k in KEYS}
    for dc in (ModelArguments, DataArguments, ExtraTrainingArguments):
        for f in dataclasses.fields(dc):
            assert f.name in flags or f.name in official_only, f"trainer argument {f.name} has no run YAML key"


def test_every_yaml_key_is_routed_or_declared_yaml_only():
    routed = {k.yaml for k in KEYS if k.yaml}
    for section in ("model", "data", "training", "output"):
        for name in SECTIONS[section].model_fields:
            dotted = f"{section}.{name}"
            if dotted in SUBSECTIONS:
                continue
            assert dotted in routed or dotted in YAML_ONLY, f"{dotted} reaches no trainer flag"
    for dotted, sub in SUBSECTIONS.items():  # sub-sections (model.lora) too
        for name in sub.model_fields:
            assert f"{dotted}.{name}" in routed, f"{dotted}.{name} reaches no trainer flag"
    for key in KEYS:  # and every row names a real YAML key
        if key.yaml:
            assert key.name in section_model(key.section).model_fields, key


def test_vision_budget_is_the_budget_fields_of_data_arguments():
    from qwenvl.data.sample import VisionBudget

    names = [f.name for f in dataclasses.fields(VisionBudget)]
    assert tuple(names) == budget_fields() and "max_pixels" in names and "model_max_length" not in names
    defaults = DataArguments()
    assert all(getattr(VisionBudget(), n) == getattr(defaults, n) for n in names)
    assert VisionBudget.from_args(DataArguments(max_pixels=1234)).max_pixels == 1234


def test_owned_by_yaml_is_derived_from_the_map():
    assert OWNED_BY_YAML == owned_by_yaml()
    for key in KEYS:
        if key.yaml:
            assert key.flag in OWNED_BY_YAML
    assert set(OWNED_ELSEWHERE) <= set(OWNED_BY_YAML)
    assert "save_strategy" not in OWNED_BY_YAML  # a fixed flag, not a YAML key: extra may change it


def test_plan_argv_follows_the_map(tmp_path):
    from plan_fixtures import make_project
    from test_plan import pairs

    from vlsft.plan import plan_from_file

    plan = plan_from_file(make_project(tmp_path), ["model.attn_implementation=sdpa", "data.max_pixels=50176", "training.extra.optim=sgd"], {})
    flags = [t[2:] for t in plan.trainer_args if t.startswith("--")]
    routed = [k.flag for k in KEYS]
    assert [f for f in flags if f in routed] == [f for f in routed if f in flags]  # the map's order
    args = pairs(plan.trainer_args)
    assert args["max_pixels"] == "50176" and args["optim"] == "sgd" and args["save_strategy"] == "steps"
    for key in owned_by(DataArguments):  # every YAML data key reaches its trainer flag (unset: the family default)
        default = next(f.default for f in dataclasses.fields(DataArguments) if f.name == key.flag)
        assert (key.flag in args) == (default is not None), key
    plan = plan_from_file(make_project(tmp_path), ["data.video_fps=2", "data.video_max_pixels=802816"], {})
    assert pairs(plan.trainer_args)["video_fps"] == "2" and pairs(plan.trainer_args)["video_max_pixels"] == "802816"


def test_yaml_defaults_that_mirror_transformers_match_it():
    """Keys whose trainer side is transformers.TrainingArguments (not ours): same defaults, except where the
    run YAML deliberately differs (listed)."""
    import transformers

    deliberate = {"data_seed": "YAML seeds the data order (42) so every rank draws the same subsets",
                  "report_to": "computed from the wandb section", "deepspeed": "zero3 by default",
                  "output_dir": "required", "run_name": "derived by transformers from output_dir",
                  "gradient_accumulation_steps": "solved from global_batch_size",
                  "save_strategy": "fixed flag", "gradient_checkpointing": "a bool (transformers 5: None = off)",
                  "warmup_steps": "YAML takes a ratio (0.0 = transformers' 0)",
                  "eval_strategy": "computed: steps when data.eval / data.eval_split is set, else no",
                  "per_device_eval_batch_size": "computed: per_device_train_batch_size when evaluating"}
    hf = {f.name: f.default for f in dataclasses.fields(transformers.TrainingArguments)}
    checked = 0
    for key in KEYS:
        if key.owner is not None or key.yaml is None or key.flag not in hf or key.flag in deliberate:
            continue
        default = SECTIONS[key.section].model_fields[key.name].default
        assert default == hf[key.flag], f"{key.yaml} default {default!r} != transformers {hf[key.flag]!r}"
        checked += 1
    assert checked >= 10


def test_by_yaml_lookup():
    assert by_yaml("data.packing").flag == "data_packing"
    with pytest.raises(KeyError):
        by_yaml("data.nope")


def test_nested_keys_split_at_the_last_dot_and_walk_the_config(tmp_path):
    """model.lora.r: section model.lora, name r; the plan walks the path; lora flags appear only when enabled."""
    from plan_fixtures import make_project
    from test_plan import pairs

    from vlsft.keymap import walk
    from vlsft.plan import plan_from_file

    key = by_yaml("model.lora.r")
    assert (key.section, key.name, key.flag) == ("model.lora", "r", "lora_r")
    assert by_yaml("data.max_pixels").section == "data"
    off = plan_from_file(make_project(tmp_path), [], {})
    assert not [t for t in off.trainer_args if t.startswith("--lora")]
    on = plan_from_file(make_project(tmp_path), ["model.lora.enabled=true", "model.lora.r=16",
                                                  "model.lora.targets=[merger, llm]", "model.tune_mm_llm=false",
                                                  "model.tune_mm_mlp=false"], {})
    args = pairs(on.trainer_args)
    assert (args["lora_enable"], args["lora_r"], args["lora_targets"]) == ("True", "16", "merger,llm")
    assert walk(on.config, "model.lora.r") == 16
