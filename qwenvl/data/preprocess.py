"""Chat tokens and labels, token for token as the official Qwen2.5-era ``preprocess_qwen_2_visual``.

What the official code does (facts checked against ``golden/official-qwen25``):

* a system turn ``You are a helpful assistant.`` opens every sample; a first turn ``from: gpt`` is
  dropped; roles ``human``/``gpt`` become ``user``/``assistant`` (``role``/``content`` keys are also read);
* each turn is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, tokenized on its own;
* ``user``/``system`` turns are fully masked (-100); every other turn is trained except its first
  three tokens (``<|im_start|>``, role, ``\\n``);
* ``<image>``/``<video>`` in user turns become ``<|vision_start|>`` + N pads + ``<|vision_end|>``,
  consumed in order across turns (N = t*h*w / merge**2); tags elsewhere stay plain text.

Deliberate differences (each is a sample the official code crashes on, silently swaps for its
neighbour, or silently mis-trains): text-only samples work (the official #1337 crash);
tag/media count mismatches, the misspelt ``images`` key, an empty conversation and a conversation
with nothing to train on are *bad samples* with a reason (see ``BadSample``); images and videos in
one sample, and several videos, are all attached.

Odd inputs, decided (tested in ``tests/test_preprocess.py``):

* as official: ``role``/``content`` turns (a leading assistant turn is then *not* dropped: the official
  check reads ``from``); a ``system`` turn inside ``conversations`` (a second masked system turn);
  consecutive human turns; a trailing human turn (kept, masked); an empty ``value`` (an empty answer
  trains ``<|im_end|>\n``); text around tags kept byte for byte (no strip); tags in gpt turns and tags
  split across turns are plain text (so the media count no longer matches: bad sample); special-token
  text such as ``<|im_end|>`` inside a turn is read as that special token, as the official tokenizer does.
* bad sample instead: a speaker other than human/gpt/user/assistant/system (the official code would
  train on e.g. a ``"Human"`` turn as an answer; ``vlsft datasets check`` flags it too); a ``value`` that
  is not a string (official: ``str(value)``, e.g. ``"None"``, is trained); the literal text
  ``<|image_pad|>`` / ``<|video_pad|>`` (a vision token with no pixels: the official run crashes in the
  model); no assistant turn at all (every label -100: no loss).

System prompts and trained turns (decided in issue 12, see :mod:`qwenvl.data.formats`): the system turn is
the sample's own system prompt in the messages/sharegpt formats, else the dataset's ``"system"``, else the
default above; an assistant turn with ``train=False`` (``"loss": false``, ``train_on: last``) is masked whole.

Speed: the tokenizer is never copied; each sample's text segments (the text between special
tokens, which the tokenizer encodes independently anyway) are encoded in one Rust batch call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from qwenvl.data import sample_rules
from qwenvl.problems import UserError
from qwenvl.secrets import mask_urls

IGNORE_INDEX = -100
SYSTEM_MESSAGE = "You are a helpful assistant."
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
_TAG_RE = re.compile(r"(<image>|<video>)")


#: Reason classes of a bad sample (``BadSample.kind``): the trainer counts skipped samples by them and
#: ``vlsft datasets check --deep`` reports its errors with the same ones.
BAD_SAMPLE_KINDS = {
    "not_object": "the record is not a JSON object",
    "bad_media_field": "'image'/'video' is not a path or a list of paths (or is misspelt 'images'/'videos')",
    "bad_conversation": "'conversations' or one of its turns is malformed",
    "tags_media_mismatch": "the <image>/<video> tags in human turns do not match the media items",
    "no_answer": "no assistant turn to train on",
    "no_data_path": "a relative media path in a dataset without data_path",
    "unsupported_media": "media the model family cannot take (videos with Qwen3-VL)",
    "missing_media": "a media file that is not a regular readable file (missing, a folder, a broken symlink)",
    "media_unreadable": "a media file that cannot be decoded (corrupt, truncated, empty, too large)",
    "media_unreachable": "media on a server that cannot be reached",
    "too_long": "more tokens than model_max_length",
    "bad_objects": "the grounding 'objects' field is malformed or does not match its <bbox>/<point>/<ref> placeholders",
}


class BadSample(UserError, ValueError):
    """A sample that cannot be trained on; the message says why and how to fix it, ``kind`` (one of
    :data:`BAD_SAMPLE_KINDS`) is the reason class the skip is counted under."""

    def __init__(self, message: str = "", kind: str = "bad_conversation"):
        super().__init__(mask_urls(message))  # logged per skipped sample: no URL password / signature
        self.kind = kind

    def __reduce__(self):  # keep the kind across processes (DataLoader workers)
        return type(self), (str(self), self.kind)


@dataclass
class Turn:
    role: str
    content: str
    train: bool = True  # False: an assistant turn that is masked (``loss: false``, ``train_on: last``)
    reasoning: str | None = None  # an assistant turn's reasoning field (rendered by the thinking templates)
    tool_calls: list | None = None  # an assistant turn's tool calls (``{"name": ..., "arguments": {...}}``)


def problem_error(problem) -> BadSample:
    """A :mod:`~qwenvl.data.sample_rules` problem ``(severity, kind, code, message, key, hint)`` as the
    exception the trainer skips the sample with."""
    _, kind, _, message, _, hint = problem
    return BadSample(f"{message} (hint: {hint})" if hint else message, kind)


def normalize_conversation(conversations) -> list[Turn]:
    """Official turn handling: key lookup, role mapping, a leading gpt turn dropped. Validity is
    :func:`qwenvl.data.sample_rules.conversation_problems` (the rule ``datasets check --deep`` applies)."""
    problems: list = []
    sample_rules.conversation_problems(conversations, problems)
    bad = sample_rules.first_error(problems)
    if bad is not None:
        raise problem_error(bad)
    return [Turn(role, content) for role, content in sample_rules.turn_pairs(conversations)]


class ChatEncoder:
    """Builds ``input_ids`` and ``labels`` for one sample; holds the tokenizer (never copies it)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        conv = tokenizer.convert_tokens_to_ids
        self.im_start = conv("<|im_start|>")
        self.im_end = conv("<|im_end|>")
        self.vision_start = conv("<|vision_start|>")
        self.vision_end = conv("<|vision_end|>")
        self.image_pad = conv("<|image_pad|>")
        self.video_pad = conv("<|video_pad|>")
        self._rust = getattr(tokenizer, "_tokenizer", None)
        self._nl = self.encode_segments(["\n"])[0]

    def encode_segments(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._rust is not None and hasattr(self._rust, "encode_batch"):
            return [e.ids for e in self._rust.encode_batch(texts, add_special_tokens=False)]
        return list(self.tokenizer(texts, add_special_tokens=False)["input_ids"])

    def encode(self, turns: list[Turn], image_tokens: list[int], video_tokens: list[int],
               system: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and labels (int64 arrays). ``*_tokens``: pad count of each image / video, in order.
        ``system``: the system prompt (default :data:`SYSTEM_MESSAGE`)."""
        # Plan every turn as a list of items: str (text segment) or ("pad", id, n)
        plans: list[tuple[bool, list]] = []
        texts: list[str] = []
        img_i = vid_i = 0
        for turn in [Turn("system", SYSTEM_MESSAGE if system is None else system), *turns]:
            items: list = []
            head = f"{turn.role}\n"
            if turn.role == "user" and (IMAGE_TAG in turn.content or VIDEO_TAG in turn.content):
                pieces = _TAG_RE.split(turn.content)
                buf = head + pieces[0]
                for j in range(1, len(pieces), 2):
                    tag, after = pieces[j], pieces[j + 1]
                    if tag == IMAGE_TAG:
                        if img_i >= len(image_tokens):
                            raise BadSample(f"more <image> tags than images ({len(image_tokens)})", "tags_media_mismatch")
                        pad = (self.image_pad, image_tokens[img_i])
                        img_i += 1
                    else:
                        if vid_i >= len(video_tokens):
                            raise BadSample(f"more <video> tags than videos ({len(video_tokens)})", "tags_media_mismatch")
                        pad = (self.video_pad, video_tokens[vid_i])
                        vid_i += 1
                    items.append(buf)
                    items.append(pad)
                    buf = after
                items.append(buf)
            else:
                items.append(head + turn.content)
            for it in items:
                if isinstance(it, str):
                    texts.append(it)
            plans.append((turn.role in ("user", "system") or not turn.train, items))
        if img_i != len(image_tokens) or vid_i != len(video_tokens):
            raise BadSample(f"{len(image_tokens)} image(s) / {len(video_tokens)} video(s) but "
                            f"{img_i} <image> / {vid_i} <video> tag(s) in human turns: every media item "
                            "needs exactly one tag", "tags_media_mismatch")
        encoded = iter(self.encode_segments(texts))
        ids: list[int] = []
        labels: list[int] = []
        nl = self._nl
        for masked, items in plans:
            turn_ids: list[int] = [self.im_start]
            for it in items:
                if isinstance(it, str):
                    turn_ids.extend(next(encoded))
                else:
                    pad_id, n = it
                    turn_ids.append(self.vision_start)
                    turn_ids.extend([pad_id] * n)
                    turn_ids.append(self.vision_end)
            turn_ids.append(self.im_end)
            turn_ids.extend(nl)
            ids.extend(turn_ids)
            if masked:
                labels.extend([IGNORE_INDEX] * len(turn_ids))
            else:
                labels.extend([IGNORE_INDEX] * 3)
                labels.extend(turn_ids[3:])
        return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
