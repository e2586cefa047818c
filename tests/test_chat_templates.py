"""The published chat templates kept as data (qwenvl/chat_templates, qwenvl.templates): their bytes and how a
template text or a model folder is recognised."""

from __future__ import annotations

import hashlib
import json

import pytest

from qwenvl import templates
from qwenvl.families import FAMILIES


@pytest.mark.parametrize("name", sorted(templates.CHAT_TEMPLATES))
def test_each_kept_template_is_the_published_text(name):
    text = templates.CHAT_TEMPLATES[name]
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == templates.SHA256[name]
    assert templates.rendering_of(text) == name
    assert name in templates.RENDERINGS


def test_every_family_names_a_kept_template_and_its_choices():
    for fam in FAMILIES.values():
        assert fam.chat_template in templates.CHAT_TEMPLATES
        assert fam.chat_template in templates.choices(fam.chat_template)
    assert FAMILIES["qwen3_5"].chat_template == FAMILIES["qwen3_5_moe"].chat_template == "qwen3.5"
    assert templates.choices("qwen3.5") == ("qwen3.5", "qwen3.6", "qwen3.8")
    assert templates.choices("qwen3-vl") == ("qwen3-vl",)


def test_an_edited_template_is_known_by_its_features():
    t = templates.CHAT_TEMPLATES
    assert templates.rendering_of(t["qwen3.5"] + "\n") == "qwen3.5"  # a trailing newline (the 0.8B variant has one)
    assert templates.rendering_of(t["qwen3.6"].replace("<think>\\n' }}", "<think>\\n'}}")) == "qwen3.6"
    assert templates.rendering_of(t["qwen3.8"] + " ") == "qwen3.8"
    assert templates.rendering_of(t["qwen3-vl"] + " ") is None  # only the Qwen3.5 line is recognised by features
    assert templates.rendering_of("{{ messages }}") is None and templates.rendering_of(None) is None


def test_a_folder_template_is_read_as_transformers_picks_it(tmp_path):
    assert templates.folder_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": templates.CHAT_TEMPLATES["qwen3.6"]}]}))
    assert templates.rendering_of(templates.folder_template(tmp_path)) == "qwen3.6"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": templates.CHAT_TEMPLATES["qwen3.5"]}))
    assert templates.rendering_of(templates.folder_template(tmp_path)) == "qwen3.5"
    (tmp_path / "chat_template.jinja").write_bytes(templates.CHAT_TEMPLATES["qwen3.8"].encode())
    assert templates.rendering_of(templates.folder_template(tmp_path)) == "qwen3.8"  # the .jinja file wins
    (tmp_path / "chat_template.jinja").write_bytes(b"\xff")
    assert templates.folder_template(tmp_path) is None
