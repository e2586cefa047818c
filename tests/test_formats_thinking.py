"""Thinking data and tools in the annotation formats (qwenvl.data.formats) and their dictionary keys (issue 22 item 2):
what is read, what is a problem, what the dictionary accepts, and what the Qwen3.5 rendering of each dataset is."""

from __future__ import annotations

import json

import pytest

from qwenvl.data import formats
from qwenvl.data.dictionary import load_dictionary
from qwenvl.data.sample import chat_options

MSG = formats.FormatSpec(name="messages", declared=True)
SGPT = formats.FormatSpec(name="sharegpt", declared=True)


def _norm(rec, fmt=MSG):
    internal, extras, problems = formats.sample_problems(rec, fmt)
    return internal, extras, [p for p in problems if p[0] == "error"]


def test_reasoning_fields_tool_calls_and_options_are_read():
    rec = {"tools": json.dumps([{"type": "function", "function": {"name": "f"}}]),
           "chat_template_kwargs": {"reasoning_effort": "low", "preserve_thinking": True},
           "messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "", "reasoning": "r1",
                         "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
                        {"role": "tool", "content": "42"},
                        {"role": "assistant", "content": "a", "thinking": "r2"}]}
    internal, extras, errors = _norm(rec)
    assert not errors
    conv = internal["conversations"]
    assert conv[1] == {"role": "assistant", "content": "", "reasoning_content": "r1",
                       "tool_calls": [{"name": "f", "arguments": {"x": 1}}]}
    assert conv[2] == {"role": "tool", "content": "42"} and conv[3]["reasoning_content"] == "r2"
    assert extras.tools == [{"type": "function", "function": {"name": "f"}}]
    assert extras.template_kwargs == {"reasoning_effort": "low", "preserve_thinking": True}
    opts = chat_options(formats.FormatSpec(name="messages", thinking_loss="mask", reasoning_effort="xhigh"), extras)
    assert (opts.thinking_loss, opts.reasoning_effort, opts.preserve_thinking) == ("mask", "low", True)
    _, extras, _ = _norm({"reasoning_effort": "none", "messages": rec["messages"][:2]})
    opts = chat_options(MSG, extras)
    assert (opts.reasoning_effort, opts.enable_thinking) == (None, False)  # none = thinking off


def test_llamafactory_function_call_and_observation():
    rec = {"tools": '[{"name": "f", "parameters": {}}]', "conversations": [
        {"from": "human", "value": "q"}, {"from": "function_call", "value": '{"name": "f", "arguments": {"x": 1}}'},
        {"from": "observation", "value": "42"}, {"from": "gpt", "value": "it is 42"}]}
    internal, extras, errors = _norm(rec, SGPT)
    assert not errors
    assert internal["conversations"][1] == {"role": "assistant", "content": "",
                                            "tool_calls": [{"name": "f", "arguments": {"x": 1}}]}
    assert internal["conversations"][2]["role"] == "tool" and extras.tools[0]["name"] == "f"


@pytest.mark.parametrize("rec, code", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": 3}]},
     "bad_reasoning"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": {}}]},
     "bad_tool_call"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
     "bad_tool_call"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "{not json"}]}]},
     "bad_tool_call"),
    ({"chat_template_kwargs": {"reasoning_effort": "high"}, "messages": [{"role": "user", "content": "q"}]},
     "bad_template_kwargs"),
    ({"chat_template_kwargs": "low", "messages": [{"role": "user", "content": "q"}]}, "bad_template_kwargs"),
    ({"tools": {"name": "f"}, "messages": [{"role": "user", "content": "q"}]}, "bad_tools"),
])
def test_malformed_thinking_and_tool_data_is_a_named_problem(rec, code):
    _, _, errors = _norm(rec)
    assert errors and errors[0][2] == code, errors


def test_an_unread_template_argument_is_a_warning():
    _, extras, problems = formats.sample_problems({"chat_template_kwargs": {"add_vision_id": True}, "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, MSG)
    assert [p[2] for p in problems] == ["template_kwarg_unread"] and extras.template_kwargs == {}


def test_an_empty_answer_with_a_tool_call_is_no_warning():
    _, _, problems = formats.sample_problems({"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {}}]},
        {"role": "tool", "content": "x"}, {"role": "tool", "content": "y"}, {"role": "assistant", "content": "a"}]},
        MSG)
    assert problems == []


@pytest.mark.parametrize("answer", [{}, {"content": None}], ids=["no-content", "null-content"])
def test_an_openai_answer_that_only_calls_tools_needs_no_content(answer):
    """OpenAI's function-calling data (and TRL's) leave 'content' out, or null, on an answer that only calls tools:
    read as an empty text, the same turn as with "content": ""."""
    call = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    def rec(extra):
        return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": call, **extra},
                             {"role": "tool", "tool_call_id": "call_1", "content": "42"},
                             {"role": "assistant", "content": "42."}]}
    got, _, errors = _norm(rec(answer))
    want, _, _ = _norm(rec({"content": ""}))
    assert errors == [] and got == want
    # without a call (or reasoning) a missing / null content is still an error
    for bad in ({"role": "assistant"}, {"role": "assistant", "content": None}):
        _, _, errors = _norm({"messages": [{"role": "user", "content": "q"}, bad]})
        assert errors and errors[0][2] in ("no_value", "value_type"), errors


def test_convert_refuses_what_the_official_format_cannot_say():
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "r"}]}
    assert formats.to_official(rec, MSG)[2].startswith("reasoning fields, tools")
    inline = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r</think>a"}]}
    assert formats.to_official(inline, MSG)[0]["conversations"][1]["value"] == "<think>r</think>a"


def test_dictionary_keys_thinking_loss_and_reasoning_effort(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    good = {"a": {"annotation_path": "a.jsonl", "thinking_loss": "mask", "reasoning_effort": "low"}}
    (tmp_path / "d.json").write_text(json.dumps(good))
    d = load_dictionary(tmp_path / "d.json")
    assert d.ok, d.problems
    spec = d.datasets["a"].format_spec
    assert (spec.thinking_loss, spec.reasoning_effort) == ("mask", "low")
    bad = {"a": {"annotation_path": "a.jsonl", "thinking_loss": "Mask", "reasoning_effort": "high"}}
    (tmp_path / "d.json").write_text(json.dumps(bad))
    msgs = [(p.key, p.message, p.hint) for p in load_dictionary(tmp_path / "d.json").errors]
    assert ("thinking_loss", "'thinking_loss' of dataset 'a' must be one of train, mask, found \"Mask\"",
            'write "mask"') in msgs
    assert any(k == "reasoning_effort" and "xhigh, medium, low, none" in m for k, m, _ in msgs), msgs
