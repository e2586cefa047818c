"""Chat tokens and labels as the published Qwen3.5 / Qwen3.6 / Qwen3.8 chat templates render them.

The texts are ``qwenvl/chat_templates/*.jinja`` (:mod:`qwenvl.templates`); ``tests/test_golden_chat_templates.py``
renders many conversations through transformers' ``apply_chat_template`` with them and compares these tokens. What
the templates do, and we do (no training template of Qwen's exists for these models: the chat template is the
authority, with the generation prompt left out):

* no default system prompt; a system message only at the start (elsewhere the template raises: a bad sample); every
  message's text is ``|trim``-med as a whole (text around ``<image>``/``<video>`` inside it is kept); an image is
  ``<|vision_start|>`` + pads + ``<|vision_end|>``, a video one such block per temporal patch after its
  ``<X.Y seconds>`` stamp, as the processor expands the template's placeholder;
* an assistant turn is ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}`` when it comes after the last user query
  (Qwen3.5; Qwen3.6 also with ``preserve_thinking``), or always (Qwen3.8 unless ``preserve_thinking`` is false);
  earlier turns of Qwen3.5/3.6 are the answer alone - their reasoning is not in the text. A turn without reasoning
  gets the empty block ``<think>\\n\\n</think>\\n\\n`` where the template writes one;
* reasoning comes from the turn's reasoning field, else from ``<think>...</think>`` at the start of its text (the
  Qwen3.5/3.6 rule: the text up to the last ``</think>``). Qwen3.8's template reads only the field (an inline block
  would be rendered after an empty one); vlsft moves an inline block into the field for it too, so both source
  forms train the same tokens;
* Qwen3.8: ``reasoning_effort`` xhigh (default) / low put the template's sentence before the system text (or in a
  system message of its own), medium puts none; ``none`` (``enable_thinking`` false) leaves it out;
* tools: the definitions in the system message, calls as ``<tool_call>`` ``<function=...>`` ``<parameter=...>``
  blocks after the answer, results as ``<tool_response>`` blocks in a user message (JSON-string arguments are
  parsed first, as vLLM does before the template runs).

Labels: every assistant turn is trained from its answer through ``<|im_end|>\\n`` (``<|im_start|>assistant\\n`` not);
its think block is trained only when it holds reasoning and the dataset's ``thinking_loss`` is ``train`` (an empty
block is never trained); masked turns (``loss: false``, ``train_on: last``), system, user and tool messages are not.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

import numpy as np

from qwenvl.data.chat_head import timestamp_text
from qwenvl.data.preprocess import IGNORE_INDEX, IMAGE_TAG, BadSample, ChatEncoder, Turn
from qwenvl.templates import CHAT_TEMPLATES, RENDERINGS

_TAG_RE = re.compile(r"(<image>|<video>)")
_PLACEHOLDER = {IMAGE_TAG: "<|vision_start|><|image_pad|><|vision_end|>",
                "<video>": "<|vision_start|><|video_pad|><|vision_end|>"}


def _literal(pattern: str, text: str) -> str:
    """A string literal of the template text (the sentences come from the pinned text itself)."""
    found = re.search(pattern, text, re.S)
    if found is None:
        raise RuntimeError(f"the pinned chat template lost {pattern!r}")
    return ast.literal_eval(found.group(1))


def _template_texts(name: str) -> dict:
    text = CHAT_TEMPLATES[name]
    out = {"tools_head": _literal(r'\{\{- ("# Tools(?:[^"\\]|\\.)*") \}\}', text),
           "tools_tail": _literal(r"\{\{- ('\\n\\nIf you choose(?:[^'\\]|\\.)*') \}\}", text)}
    if RENDERINGS[name].effort:
        for effort in ("xhigh", "low"):
            out[effort] = _literal(rf"== '{effort}' %}}\s*{{%- set reasoning_instructions = ('(?:[^'\\]|\\.)*')",
                                   text)
    return out


@dataclass(frozen=True)
class ChatOptions:
    """What one sample is rendered with: the template's keyword arguments and the dataset's loss policy."""

    thinking_loss: str = "train"  # train | mask: the loss on the reasoning inside think blocks
    reasoning_effort: str | None = None  # Qwen3.8: xhigh | medium | low (None: the template's default, xhigh)
    enable_thinking: bool | None = None  # False: no effort sentence (Qwen3.8); the generation prompt otherwise
    preserve_thinking: bool | None = None  # Qwen3.6 / 3.8: keep earlier turns' reasoning (None: the default)
    tools: tuple | None = None  # tool definitions (JSON objects)


def split_reasoning(content: str) -> tuple[str | None, str]:
    """``(reasoning, answer)`` of an assistant text as the Qwen3.5/3.6 templates split it: no ``</think>``, no
    reasoning; else the text before the last ``</think>`` (after its last ``<think>``) and the rest."""
    if "</think>" not in content:
        return None, content
    head = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return head, content.split("</think>")[-1].lstrip("\n")


def _tojson(value) -> str:
    return json.dumps(value, ensure_ascii=False)  # transformers' tojson filter


def _jinja_string(value) -> str:
    """jinja's ``|string`` of a JSON value (Python's str: True, None, 1.5)."""
    return value if isinstance(value, str) else str(value)


class TemplateChatEncoder(ChatEncoder):
    """:class:`~qwenvl.data.preprocess.ChatEncoder` rendering one of the Qwen3.5-line templates (module docstring)."""

    def __init__(self, tokenizer, rendering: str):
        super().__init__(tokenizer)
        self.rendering = RENDERINGS[rendering]
        self.texts = _template_texts(rendering)
        text = CHAT_TEMPLATES[rendering]
        self.reads_preserve = "preserve_thinking" in text  # Qwen3.6 / 3.8
        self.json_arguments = "args_value | string if args_value is string" in text  # Qwen3.6 / 3.8

    # ------------------------------------------------------------------------------------------ the text
    def encode_template(self, turns: list[Turn], image_tokens: list[int], videos: list[tuple[list[float], int]],
                        opts: ChatOptions = ChatOptions()) -> tuple[np.ndarray, np.ndarray]:
        """``turns``: an optional leading system turn, then user / assistant / tool turns (``Turn.tool_calls``);
        ``image_tokens``: pads per image; ``videos``: ``(timestamps per temporal patch, pads per patch)``."""
        if any(t.role == "system" for t in turns[1:]):
            raise BadSample(f"a system message after the first turn: the {self.rendering.title} chat template takes "
                            "one only at the start", "bad_conversation")
        last_query = self._last_query(turns)
        media = _Media(self, image_tokens, videos)
        plans = [self._header(turns[0] if turns and turns[0].role == "system" else None, opts)]
        for i, turn in enumerate(turns):
            if turn.role == "user":
                plans.append([("<|im_start|>user\n", False), *media.parts(turn.content, False), ("<|im_end|>\n", False)])
            elif turn.role == "assistant":
                plans.append(self._assistant(turn, i > last_query, opts))
            elif turn.role == "tool":
                plans.append(self._tool(turns, i))
        media.finish()
        return self._encode(plans)

    def _last_query(self, turns: list[Turn]) -> int:
        """The template's ``ns.last_query_index``: the last user message that is not only a tool response."""
        for i in range(len(turns) - 1, -1, -1):
            if turns[i].role != "user":
                continue
            text = _TAG_RE.sub(lambda m: _PLACEHOLDER[m.group(0)], turns[i].content).strip()
            if not (text.startswith("<tool_response>") and text.endswith("</tool_response>")):
                return i
        raise BadSample(f"no user message: the {self.rendering.title} chat template needs a user query",
                        "bad_conversation")

    def _header(self, system: Turn | None, opts: ChatOptions) -> list:
        """The system message: the effort sentence (Qwen3.8), the tool definitions, the system text."""
        effort = self._effort_sentence(opts)
        content = system.content.strip() if system is not None else ""
        if opts.tools:
            text = "<|im_start|>system\n" + (effort + "\n\n" if effort else "") + self.texts["tools_head"]
            text += "".join("\n" + _tojson(t) for t in opts.tools) + "\n</tools>" + self.texts["tools_tail"]
            return [(text + ("\n\n" + content if content else "") + "<|im_end|>\n", False)]
        if effort:
            return [("<|im_start|>system\n" + effort + ("\n\n" + content if content else "") + "<|im_end|>\n", False)]
        if system is not None and (content or not self.rendering.effort):
            return [("<|im_start|>system\n" + content + "<|im_end|>\n", False)]
        return []

    def _effort_sentence(self, opts: ChatOptions) -> str:
        if not self.rendering.effort or opts.enable_thinking is False:
            return ""
        effort = opts.reasoning_effort or "xhigh"
        if effort not in ("xhigh", "medium", "low"):
            raise BadSample(f"reasoning_effort {effort!r}: the {self.rendering.title} chat template takes xhigh, "
                            "medium or low", "bad_conversation")
        return self.texts.get(effort, "")

    def _keeps_reasoning(self, after_query: bool, opts: ChatOptions) -> bool:
        if after_query:
            return True
        if self.rendering.keeps_history:
            return opts.preserve_thinking is not False
        return opts.preserve_thinking is True and self.reads_preserve

    def _assistant(self, turn: Turn, after_query: bool, opts: ChatOptions) -> list:
        content = turn.content.strip()
        reasoning = turn.reasoning
        if reasoning is None:
            reasoning, content = split_reasoning(content)
        reasoning = (reasoning or "").strip()
        train = turn.train
        items: list = [("<|im_start|>assistant\n", False)]
        if self._keeps_reasoning(after_query, opts):
            think = train and bool(reasoning) and opts.thinking_loss == "train"
            items += [("<think>\n" + reasoning + "\n</think>\n\n", think)]
        items.append((content + self._tool_calls(turn.tool_calls, content), train))
        items.append(("<|im_end|>\n", train))
        return items

    def _tool_calls(self, calls: list | None, content: str) -> str:
        out = ""
        for j, call in enumerate(calls or ()):
            if "function" in call:
                call = call["function"]
            opener = ("\n\n" if content.strip() else "") if j == 0 else "\n"
            out += opener + "<tool_call>\n<function=" + call["name"] + ">\n"
            args = call.get("arguments")
            if isinstance(args, dict):
                for name, value in args.items():
                    out += "<parameter=" + name + ">\n" + self._argument(value) + "\n</parameter>\n"
            out += "</function>\n</tool_call>"
        return out

    def _argument(self, value) -> str:
        if self.json_arguments:  # Qwen3.6 / 3.8: strings as they are, the rest as JSON
            return value if isinstance(value, str) else _tojson(value)
        return _tojson(value) if isinstance(value, dict | list) else _jinja_string(value)  # Qwen3.5

    def _tool(self, turns: list[Turn], i: int) -> list:
        text = "<|im_start|>user" if i > 0 and turns[i - 1].role != "tool" else ""
        text += "\n<tool_response>\n" + turns[i].content.strip() + "\n</tool_response>"
        if i == len(turns) - 1 or turns[i + 1].role != "tool":
            text += "<|im_end|>\n"
        return [(text, False)]

    # ------------------------------------------------------------------------------------------ the tokens
    def _encode(self, plans: list[list]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and labels of the planned items: text runs are encoded together (the tokenizer sees the text
        between two vision pads as one piece, as it sees the rendered string) and each token takes the training
        flag of the item its first character comes from."""
        runs: list = []  # [(text, [(start, flag), ...])] and ("pad", id, n)
        for item, flag in (it for plan in plans for it in plan):
            if isinstance(item, tuple):
                runs.append(item)
                continue
            if runs and isinstance(runs[-1], list):
                runs[-1][1].append((len(runs[-1][0]), flag))
                runs[-1][0] += item
            else:
                runs.append([item, [(0, flag)]])
        texts = [r[0] for r in runs if isinstance(r, list)]
        encoded = iter(self._encode_with_offsets(texts))
        ids: list[int] = []
        labels: list[int] = []
        for run in runs:
            if isinstance(run, tuple):
                ids.extend([run[1]] * run[2])
                labels.extend([IGNORE_INDEX] * run[2])
                continue
            tokens, offsets = next(encoded)
            marks = run[1]
            for tok, (start, _end) in zip(tokens, offsets, strict=True):
                flag = next(f for s, f in reversed(marks) if s <= start)
                ids.append(tok)
                labels.append(tok if flag else IGNORE_INDEX)
        return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)

    def _encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        if not texts:
            return []
        if self._rust is not None and hasattr(self._rust, "encode_batch"):
            return [(e.ids, e.offsets) for e in self._rust.encode_batch(texts, add_special_tokens=False)]
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))


class _Media:
    """The media of one sample, handed out in tag order to the user turns."""

    def __init__(self, enc: TemplateChatEncoder, image_tokens: list[int], videos: list[tuple[list[float], int]]):
        self.enc, self.images, self.videos = enc, image_tokens, videos
        self.img_i = self.vid_i = 0

    def parts(self, content: str, flag: bool) -> list:
        """The items of a user text: ``|trim`` as a whole, each tag expanded where it stands."""
        pieces = _TAG_RE.split(content)
        pieces[0] = pieces[0].lstrip()
        pieces[-1] = pieces[-1].rstrip()
        out: list = []
        for j, piece in enumerate(pieces):
            if j % 2 == 0:
                if piece:
                    out.append((piece, flag))
            elif piece == IMAGE_TAG:
                if self.img_i >= len(self.images):
                    raise BadSample(f"more <image> tags than images ({len(self.images)})", "tags_media_mismatch")
                out += [("<|vision_start|>", flag), (("pad", self.enc.image_pad, self.images[self.img_i]), flag),
                        ("<|vision_end|>", flag)]
                self.img_i += 1
            else:
                if self.vid_i >= len(self.videos):
                    raise BadSample(f"more <video> tags than videos ({len(self.videos)})", "tags_media_mismatch")
                stamps, per_patch = self.videos[self.vid_i]
                for t in stamps:
                    out += [(timestamp_text(t) + "<|vision_start|>", flag),
                            (("pad", self.enc.video_pad, per_patch), flag), ("<|vision_end|>", flag)]
                self.vid_i += 1
        return out

    def finish(self) -> None:
        if self.img_i != len(self.images) or self.vid_i != len(self.videos):
            raise BadSample(f"{len(self.images)} image(s) / {len(self.videos)} video(s) but {self.img_i} <image> / "
                            f"{self.vid_i} <video> tag(s) in human turns: every media item needs exactly one tag",
                            "tags_media_mismatch")
