"""Freezing, model-class detection and optimizer groups on tiny random models (no hub)."""

from __future__ import annotations

import itertools
import json

import pytest

torch = pytest.importorskip("torch")

from qwenvl import model as qm  # noqa: E402
from qwenvl.tiny import tiny_config  # noqa: E402

FLAGS = list(itertools.product([False, True], repeat=3))  # (vision, mlp, llm)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def tiny(request):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    return request.param, AutoModelForImageTextToText.from_config(tiny_config(request.param))


def expected_trainable(model, vision: bool, mlp: bool, llm: bool) -> set[str]:
    """The trainable names written out from the flags by hand, by name prefix."""
    names: set[str] = set()
    for n, _ in model.named_parameters():
        is_merger = n.startswith("model.visual.merger.") or n.startswith("model.visual.deepstack_merger_list.")
        is_vision = n.startswith("model.visual.") and not is_merger
        is_llm = n.startswith("model.language_model.") or n == "lm_head.weight"
        assert is_merger + is_vision + is_llm == 1, n
        if (is_vision and vision) or (is_merger and mlp) or (is_llm and llm):
            names.add(n)
    return names


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "v{}m{}l{}".format(*map(int, f)))
def test_trainable_names_all_flag_combinations(tiny, flags):
    family, model = tiny
    vision, mlp, llm = flags
    qm.apply_freezing(model, tune_mm_vision=vision, tune_mm_mlp=mlp, tune_mm_llm=llm)
    got = set(qm.trainable_parameter_names(model))
    assert got == expected_trainable(model, vision, mlp, llm)
    # lm_head: untied (qwen2_vl) is its own parameter and must follow tune_mm_llm; tied ones share the embedding.
    head = model.lm_head.weight
    assert head.requires_grad is llm
    if family == "qwen2_vl":
        assert not model.config.tie_word_embeddings
        assert head is not model.model.language_model.embed_tokens.weight
        assert ("lm_head.weight" in got) is llm
    else:
        assert head is model.model.language_model.embed_tokens.weight
    # every parameter, tied duplicates included, agrees with its part
    parts = qm.part_of_parameters(model)
    want = {"vision": vision, "merger": mlp, "llm": llm}
    for n, p in model.named_parameters(remove_duplicate=False):
        assert p.requires_grad is want[parts[n]], n


def test_qwen2_5_vl_trainable_names_listing(tiny):
    """The literal listing for one combination, so a reader sees what 'merger only' means."""
    family, model = tiny
    qm.apply_freezing(model, tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=False)
    got = qm.trainable_parameter_names(model)
    if family == "qwen2_5_vl":
        assert got == [
            "model.visual.merger.ln_q.weight",
            "model.visual.merger.mlp.0.weight", "model.visual.merger.mlp.0.bias",
            "model.visual.merger.mlp.2.weight", "model.visual.merger.mlp.2.bias",
        ]
    elif family == "qwen3_vl":
        assert any(n.startswith("model.visual.deepstack_merger_list.") for n in got)
        assert all(".merger." in n or "deepstack_merger_list" in n for n in got)


def test_param_groups_lrs_independent_and_decay(tiny):
    family, model = tiny
    qm.apply_freezing(model, tune_mm_vision=True, tune_mm_mlp=True, tune_mm_llm=True)
    ids = {id(p): n for n, p in model.named_parameters()}
    # vision_tower_lr alone takes effect (the official code ignores it without mm_projector_lr)
    groups = qm.parameter_groups(model, learning_rate=1e-5, weight_decay=0.1, vision_tower_lr=3e-6)
    by = {g["name"]: g for g in groups}
    assert by["vision"]["lr"] == 3e-6 and by["merger"]["lr"] == 1e-5 and by["llm"]["lr"] == 1e-5
    groups = qm.parameter_groups(model, learning_rate=1e-5, weight_decay=0.1, mm_projector_lr=7e-5)
    by = {g["name"]: g for g in groups}
    assert by["vision"]["lr"] == 1e-5 and by["merger"]["lr"] == 7e-5
    # an explicit 0 is a learning rate, not "unset"
    by = {g["name"]: g for g in qm.parameter_groups(model, learning_rate=1e-5, weight_decay=0.1, mm_projector_lr=0.0)}
    assert by["merger"]["lr"] == 0.0 and by["llm"]["lr"] == 1e-5
    # every trainable parameter exactly once; no decay exactly on biases and norm weights
    seen = [ids[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(qm.trainable_parameter_names(model))
    for g in groups:
        for p in g["params"]:
            n = ids[id(p)]
            is_nd = n.endswith(".bias") or "norm" in n or ".ln_q." in n
            assert (g["weight_decay"] == 0.0) is is_nd, (n, g["name"])
    # frozen parameters never reach the optimizer
    qm.apply_freezing(model, tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=False)
    groups = qm.parameter_groups(model, learning_rate=1e-5, weight_decay=0.0)
    assert {g["name"].split(".")[0] for g in groups} == {"merger"}


def test_model_type_from_config_not_path(tmp_path):
    # a folder whose name says qwen2.5 but whose config says qwen2_vl -> Qwen2-VL class
    d = tmp_path / "Qwen2.5-VL-looks-like"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    assert qm.read_model_type(d) == "qwen2_vl"
    assert qm.model_class("qwen2_vl").__name__ == "Qwen2VLForConditionalGeneration"
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_vl_moe"}))  # supported since issue 14
    assert qm.read_model_type(d) == "qwen3_vl_moe"
    (d / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(qm.ModelTypeError, match="not supported"):
        qm.read_model_type(d)
    with pytest.raises(qm.ModelTypeError, match="no config.json"):
        qm.read_model_type(tmp_path / "missing")
