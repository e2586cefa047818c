"""The model-family registry (qwenvl/families.py): one record per config.json model_type, the only place a type
string is compared; an unknown type is one line, never a fallback; adding a family is one record."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwenvl import families
from qwenvl.families import FAMILIES, Family, ModelTypeError, family, family_at, read_model_type

REPO = Path(__file__).resolve().parents[1]
DEMO_DICT = REPO / "configs" / "demo" / "Dataset-Dictionary.json"


def test_every_record_is_complete_and_spelled_as_config_json():
    assert set(FAMILIES) == {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"}
    for key, fam in FAMILIES.items():
        assert fam.model_type == key and family(key) is fam and family(fam) is fam
        assert fam.model_class.endswith("ForConditionalGeneration") and fam.config_class.endswith("Config")
        assert fam.processor["patch_size"] in (14, 16) and fam.processor["merge_size"] == 2
        assert fam.head == fam.qwen3_tokenizer == fam.exif  # the HEAD families bring the Qwen3 tokenizer and EXIF
        assert (fam.video_processor is not None) == fam.head
    assert [f.model_type for f in FAMILIES.values() if f.linear_attention] == ["qwen3_5", "qwen3_5_moe"]
    assert [f.model_type for f in FAMILIES.values() if f.moe] == ["qwen3_vl_moe", "qwen3_5_moe"]
    assert [f.model_type for f in FAMILIES.values() if not f.zero3] == ["qwen3_vl_moe"]
    assert family("qwen2_5_vl").keeps_second_per_grid_ts and not family("qwen2_vl").keeps_second_per_grid_ts
    with pytest.raises(TypeError):  # records are read-only, their mappings too
        family("qwen3_vl").processor["patch_size"] = 14
    with pytest.raises(dataclasses.FrozenInstanceError):
        family("qwen3_vl").exif = False  # type: ignore[misc]


@pytest.mark.parametrize("value", ["qwen2.5vl", "qwen3vl", "llava", "", None, "Qwen2_5_VL"])
def test_unknown_type_is_one_line_never_a_fallback(value):
    with pytest.raises(ModelTypeError) as e:
        family(value)
    msg = str(e.value)
    assert "\n" not in msg and repr(value) in msg and "supported: qwen2_vl, qwen2_5_vl" in msg


def test_a_record_with_an_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="grounding 'pixels' is not one of"):
        dataclasses.replace(family("qwen2_5_vl"), grounding="pixels")


def test_model_type_from_folders_and_adapters(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe"}))
    assert read_model_type(model) == "qwen3_5_moe" and family_at(model) is family("qwen3_5_moe")
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model)}))
    assert family_at(adapter) is family("qwen3_5_moe")  # a LoRA folder: its base model's family
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelTypeError, match="base_model_name_or_path"):
        family_at(adapter)
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni"}))
    with pytest.raises(ModelTypeError, match="'qwen2_5_omni' is not supported"):
        family_at(model)
    with pytest.raises(ModelTypeError, match="no config.json"):
        read_model_type(tmp_path / "missing")


# a comparison of a model-type string: == / != / startswith / membership in a literal tuple, list or set
_COMPARISON = re.compile(
    r"""(==|!=)\s*["']qwen|["']qwen[\w.]*["']\s*(==|!=)|startswith\(\s*\(?\s*["']qwen"""
    r"""|\bin\s*[(\[{]\s*["']qwen|[(\[{]\s*["']qwen[\w.]*["']\s*,\s*["']qwen""", re.IGNORECASE)
# a folding of a type string before comparing it (the old spellings' normalisations)
_FOLDING = re.compile(r"""model_type\s*\.\s*(replace|lower|startswith)\(""")


def test_no_model_type_string_is_compared_outside_the_registry():
    """families.py is the only place a type string is compared (the test fails on any new ``== "qwen3..."``)."""
    found = []
    for root in (REPO / "src" / "vlsft", REPO / "qwenvl", REPO / "benchmarks", REPO / "scripts"):
        for path in sorted(root.rglob("*.py")):
            if path == REPO / "qwenvl" / "families.py":
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#", 1)[0]
                if _COMPARISON.search(code) or _FOLDING.search(code):
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "compare families through qwenvl.families, not type strings:\n" + "\n".join(found)


def test_the_grep_catches_what_it_must():
    for bad in ('if model_type == "qwen3_vl":', 'x = t.startswith("qwen3")', 'if mt in ("qwen2vl",):',
                'MOE = ("qwen3_vl_moe", "qwen3_5_moe")', 'return model_type.replace("_", "")'):
        assert _COMPARISON.search(bad) or _FOLDING.search(bad), bad
    assert not _COMPARISON.search('def f(model_type: str = "qwen2_5_vl"):')


def test_the_front_door_imports_no_trainer_module():
    """print-args / prechecks read the torch-free spec (families, lora_rules), never qwenvl.model / qwenvl.lora."""
    import ast

    for rel in ("src/vlsft/plan.py", "src/vlsft/schema.py", "src/vlsft/cmd_plan.py", "qwenvl/prechecks.py",
                "src/vlsft/environment.py", "src/vlsft/config.py"):
        tree = ast.parse((REPO / rel).read_text(encoding="utf-8"))
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not mods & {"qwenvl.model", "qwenvl.lora", "qwenvl.train", "qwenvl.trainer", "torch"}, (rel, mods)


@pytest.fixture()
def test_family(monkeypatch):
    """A test-only family: ONE record (a Qwen2.5-era layout with Qwen3-VL's 0-1000 JSON boxes and Qwen2-VL's
    temporal rule) - everything below picks it up from the registry alone."""
    rec = dataclasses.replace(family("qwen2_5_vl"), model_type="qwen_test_vl", title="Test-VL",
                              grounding="json-1000", video_time="patch-index", zero3=False)
    monkeypatch.setitem(families.FAMILIES, rec.model_type, rec)
    return rec


def test_adding_a_family_is_one_record(test_family, qwen_tokenizer_dir, tmp_path):
    from PIL import Image
    from transformers import AutoTokenizer

    from qwenvl.data import formats
    from qwenvl.data.rope import RopeIndex
    from qwenvl.data.sample import SampleBuilder, VisionBudget
    from qwenvl.prechecks import family_problems
    from vlsft.cli import app

    # the data layer: layout, grounding convention and video rule come from the record
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    Image.new("RGB", (1920, 1080), (10, 20, 30)).save(tmp_path / "a.png")
    rec = {"image": "a.png", "objects": [{"label": "cat", "bbox": [480, 270, 1440, 810]}],
           "conversations": [{"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": "<bbox>"}]}
    b = SampleBuilder(tok, VisionBudget(max_pixels=100352, min_pixels=3136), model_type="qwen_test_vl")
    assert b.family is test_family and not b.head
    text = tok.decode(b.build(rec, str(tmp_path), formats.OFFICIAL)["input_ids"].tolist())
    assert "<|im_start|>system\n" in text and "<|im_start|>assistant\n[250, 250, 750, 750]<|im_end|>" in text
    rope = RopeIndex.for_family("qwen_test_vl")
    assert (rope.scale_video_time, rope.split_video_frames) == (False, False)
    # the rules: print-args and the trainer ask the record
    found = family_problems("qwen_test_vl", data_flatten=True, data_packing=False, zero_stage=3)
    assert [k for k, _, _ in found] == ["distributed.deepspeed"] and "qwen_test_vl cannot" in found[0][1]
    # the front door: a model folder of that type plans, with the record's name and limits
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen_test_vl"}))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{name_or_path: {model}, tune_mm_mlp: true}}\ndata: {{dictionary: {DEMO_DICT}}}\n"
                   f"distributed: {{deepspeed: zero2}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    r = CliRunner().invoke(app, ["print-args", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    line = [x for x in r.output.splitlines() if x.startswith("# Model family")]
    assert line and line[0].startswith("# Model family: Test-VL (config.json model_type qwen_test_vl;") \
        and "boxes json-1000" in line[0] and "no ZeRO-3" in line[0], r.output
    # and without the record the same folder is one clear refusal
    del families.FAMILIES["qwen_test_vl"]
    r = CliRunner().invoke(app, ["print-args", "--config", str(cfg)])
    assert r.exit_code != 0 and "model_type 'qwen_test_vl' is not supported" in r.output


def test_tiny_models_are_written_from_the_records():
    from qwenvl.tiny import preprocessor_config, tiny_config

    for fam in FAMILIES.values():
        cfg = tiny_config(fam.model_type)
        assert type(cfg).__name__ == fam.config_class and cfg.model_type == fam.model_type
        assert preprocessor_config(fam.model_type) == json.loads(json.dumps(dict(fam.processor)))
    assert isinstance(family("qwen2_vl"), Family)
