"""Tool data as LLaMA-Factory and ms-swift write it: ``columns.tools`` (any column name) and ``tags.observation_tag``
/ ``function_tag`` of a dataset_info.json entry, ms-swift's ``tool_call`` / ``tool_response`` roles (calls that
follow an answer belong to it), and an entry's own ``data_path`` (LLaMA-Factory's --media_dir)."""

from __future__ import annotations

import json

from qwenvl.data import formats
from qwenvl.data.annotation_check import scan
from qwenvl.data.dictionary import load_dictionary

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}


def _entry(tmp_path, entry: dict, records: list, name="glaive"):
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "dataset_info.json").write_text(json.dumps({name: {"file_name": "data.json", **entry}}, indent=2))
    d = load_dictionary(tmp_path / "dataset_info.json")
    return d, (d.entries[name] if d.ok else None)


def _read(spec, rec):
    fmt = spec.format_spec
    internal, extras, problems = formats.sample_problems(rec, fmt)
    return internal, extras, [p for p in problems if p[0] == "error"]


def test_llamafactory_tools_column_under_any_name(tmp_path):
    """glaive_toolcall_en_demo's entry maps columns.tools; the tool definitions are read from that column."""
    rec = {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                             {"from": "function_call", "value": json.dumps(CALL)},
                             {"from": "observation", "value": "20C"}, {"from": "gpt", "value": "20C."}],
           "functions": json.dumps(TOOLS)}
    d, spec = _entry(tmp_path, {"formatting": "sharegpt", "columns": {"messages": "conversations",
                                                                      "tools": "functions"}}, [rec])
    assert d.ok, [p.render() for p in d.problems]
    internal, extras, errors = _read(spec, rec)
    assert errors == [] and extras.tools == TOOLS
    assert internal["conversations"][1] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    bad = {**rec, "functions": "{not json"}
    (err,) = _read(spec, bad)[2]
    assert err[4] == "functions" and "'functions' must be a list of tool definitions" in err[3]


def test_llamafactory_observation_and_function_tags(tmp_path):
    rec = {"conversations": [{"from": "human", "value": "Weather?"}, {"from": "fc", "value": json.dumps(CALL)},
                             {"from": "obs", "value": "20C"}, {"from": "gpt", "value": "20C."}], "tools": TOOLS}
    d, spec = _entry(tmp_path, {"formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"},
                                "tags": {"observation_tag": "obs", "function_tag": "fc"}}, [rec])
    assert d.ok, [p.render() for p in d.problems]
    internal, _, errors = _read(spec, rec)
    assert errors == []
    assert [t["role"] for t in internal["conversations"]] == ["user", "assistant", "tool", "assistant"]
    assert internal["conversations"][1]["tool_calls"] == [CALL]
    res = scan(str(tmp_path / "data.json"), str(tmp_path), fmt=spec.format_spec, workers=1)
    assert [p.render() for p in res.problems if p.is_error] == []


def test_an_entrys_own_data_path_replaces_the_default_media_dir(tmp_path):
    (tmp_path / "media").mkdir()
    rec = {"conversations": [{"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "Red."}],
           "images": ["1.png"]}
    cols = {"columns": {"messages": "conversations", "images": "images"}}
    d, spec = _entry(tmp_path, {"formatting": "sharegpt", "data_path": "media", **cols}, [rec])
    assert d.ok, [p.render() for p in d.problems]  # was: "key 'data_path' appears twice"
    assert spec.data_path == str(tmp_path / "media")
    d, spec = _entry(tmp_path, {"formatting": "sharegpt", **cols}, [rec])
    assert spec.data_path == str(tmp_path)  # LLaMA-Factory's default: the folder of dataset_info.json


def test_ms_swift_agent_roles():
    """ms-swift's agent data: tool_call messages after an answer are that answer's calls (one assistant turn, as
    ms-swift renders it), tool_response messages are tool results; the same record in OpenAI's shape reads the
    same."""
    msgs = [{"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": "I will look both up."},
            {"role": "tool_call", "content": json.dumps(CALL)},
            {"role": "tool_call", "content": json.dumps({**CALL, "arguments": {"city": "Rome"}})},
            {"role": "tool_response", "content": "20C"}, {"role": "tool_response", "content": "25C"},
            {"role": "assistant", "content": "Paris 20C, Rome 25C."}]
    oai = [msgs[0], {"role": "assistant", "content": "I will look both up.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": c})}}
        for c in ("Paris", "Rome")]}, {"role": "tool", "content": "20C"}, {"role": "tool", "content": "25C"}, msgs[-1]]
    fmt = formats.FormatSpec(name="messages", declared=True)
    got, _, errors = formats.sample_problems({"messages": msgs, "tools": TOOLS}, fmt)
    want, _, _ = formats.sample_problems({"messages": oai, "tools": TOOLS}, fmt)
    assert [p for p in errors if p[0] == "error"] == [] and got == want
    assert len(got["conversations"]) == 5 and len(got["conversations"][1]["tool_calls"]) == 2
    # a call with nothing before it is an answer of its own; a masked answer keeps its calls apart from a trained one
    alone, _, _ = formats.sample_problems({"messages": [msgs[0], *msgs[2:]]}, fmt)
    assert alone["conversations"][1] == {"role": "assistant", "content": "", "tool_calls": [CALL, {**CALL, "arguments":
                                                                                                 {"city": "Rome"}}]}
    masked = [msgs[0], {**msgs[1], "loss": False}, *msgs[2:]]
    got, extras, _ = formats.sample_problems({"messages": masked}, fmt)
    assert got["conversations"][1]["content"] == "I will look both up." and "tool_calls" not in got["conversations"][1]
    assert extras.untrained == {1}


def test_a_too_long_text_only_sample_is_not_told_to_lower_max_pixels(qwen_tokenizer_dir):
    import pytest
    from transformers import AutoTokenizer

    from qwenvl.data.preprocess import BadSample
    from qwenvl.data.sample import SampleBuilder, VisionBudget

    b = SampleBuilder(AutoTokenizer.from_pretrained(qwen_tokenizer_dir), VisionBudget(max_pixels=50176, min_pixels=784),
                      model_max_length=20)
    with pytest.raises(BadSample) as info:
        b.build({"conversations": [{"from": "human", "value": "hello " * 50}, {"from": "gpt", "value": "a"}]}, None)
    assert info.value.kind == "too_long" and "max_pixels" not in str(info.value) and "shorten" in str(info.value)
