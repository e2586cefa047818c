"""Chat tokens and labels for Qwen3-VL (and Qwen3-VL MoE) as the official trainer's HEAD builds them.

HEAD = ``QwenLM/Qwen3-VL`` ``qwen-vl-finetune`` at 9658872 (2026-01-30); checked token for token against
``tests/golden/official-qwen3vl-head`` (``tests/test_golden_qwen3vl_head.py``). What HEAD does, and we do:

* no system prompt (the Qwen3-VL chat template adds none); each turn is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``;
* a human turn is split at ``<image>`` / ``<video>``; every text piece is ``.strip()``-ped and dropped when empty
  (so ``"<image>\\nDescribe"`` gives ``<|vision_end|>Describe``); gpt text is verbatim;
* an image becomes ``<|vision_start|>`` + pads + ``<|vision_end|>``; a video becomes, for each temporal patch,
  ``<X.Y seconds>`` + ``<|vision_start|>`` + pads (h*w / merge**2) + ``<|vision_end|>`` (the timestamp text is
  ordinary tokens, tokenized together with the text around it, as the processor's rendered string is);
* labels: each assistant turn is trained from its content through ``<|im_end|>\\n``.

Deliberate differences (the shared validity rule of :mod:`qwenvl.data.sample_rules` decides which records are
samples, for every family alike, so ``datasets check --deep`` and the trainer agree):

* a first ``gpt`` turn is dropped (HEAD keeps and trains it: ``gf_01``, ``gf_03``);
* a ``system`` turn stays a masked system turn (HEAD turns it into a trained assistant turn: ``q_01``);
* labels follow the turn structure: HEAD trains from every ``assistant`` *token* (77091) to the next
  ``<|im_end|>`` + 1, so user text holding that token is trained (``q_08``) and a literal ``<|im_end|>`` inside an
  answer cuts its span; ours trains exactly the assistant turns;
* ``role``/``content`` turns are read (HEAD: ``KeyError``, ``q_02``); a conversation with no answer is a bad
  sample (HEAD trains nothing, ``q_16``).
"""

from __future__ import annotations

import re

import numpy as np

from qwenvl.data.preprocess import IGNORE_INDEX, IMAGE_TAG, BadSample, ChatEncoder, Turn

_TAG_RE = re.compile(r"(<image>|<video>)")


def timestamp_text(seconds: float) -> str:
    """HEAD's prompt text for a temporal patch: ``<0.3 seconds>``."""
    return f"<{seconds:.1f} seconds>"


class HeadChatEncoder(ChatEncoder):
    """:class:`~qwenvl.data.preprocess.ChatEncoder` with HEAD's layout (see the module docstring)."""

    def encode_head(self, turns: list[Turn], image_tokens: list[int], videos: list[tuple[list[float], int]]
                    ) -> tuple[np.ndarray, np.ndarray]:
        """``image_tokens``: pads per image; ``videos``: ``(timestamps per temporal patch, pads per patch)``."""
        # each turn: a list of items, str (text) or int (one special token) or ("pad", id, n)
        plans: list[tuple[bool, list]] = []
        img_i = vid_i = 0
        for turn in turns:
            items: list = [self.im_start, f"{turn.role}\n"]
            if turn.role == "user":
                pieces = _TAG_RE.split(turn.content)
                for j, piece in enumerate(pieces):
                    if j % 2 == 0:
                        if piece.strip():
                            items.append(piece.strip())
                    elif piece == IMAGE_TAG:
                        if img_i >= len(image_tokens):
                            raise BadSample(f"more <image> tags than images ({len(image_tokens)})",
                                            "tags_media_mismatch")
                        items += [self.vision_start, ("pad", self.image_pad, image_tokens[img_i]), self.vision_end]
                        img_i += 1
                    else:
                        if vid_i >= len(videos):
                            raise BadSample(f"more <video> tags than videos ({len(videos)})", "tags_media_mismatch")
                        stamps, per_patch = videos[vid_i]
                        for t in stamps:
                            items += [timestamp_text(t), self.vision_start, ("pad", self.video_pad, per_patch),
                                      self.vision_end]
                        vid_i += 1
            else:
                items.append(turn.content)
            items += [self.im_end, "\n"]
            plans.append((turn.role != "assistant" or not turn.train, _merge_text(items)))  # loss: false masked
        if img_i != len(image_tokens) or vid_i != len(videos):
            raise BadSample(f"{len(image_tokens)} image(s) / {len(videos)} video(s) but {img_i} <image> / {vid_i} "
                            "<video> tag(s) in human turns: every media item needs exactly one tag",
                            "tags_media_mismatch")
        encoded = iter(self.encode_segments([it for _, items in plans for it in items if isinstance(it, str)]))
        ids: list[int] = []
        labels: list[int] = []
        for masked, items in plans:
            turn_ids: list[int] = []
            for it in items:
                if isinstance(it, str):
                    turn_ids.extend(next(encoded))
                elif isinstance(it, int):
                    turn_ids.append(it)
                else:
                    turn_ids.extend([it[1]] * it[2])
            ids.extend(turn_ids)
            if masked:
                labels.extend([IGNORE_INDEX] * len(turn_ids))
            else:  # <|im_start|> assistant \n are not trained
                labels.extend([IGNORE_INDEX] * 3)
                labels.extend(turn_ids[3:])
        return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)


def _merge_text(items: list) -> list:
    """Adjacent text items joined (the tokenizer sees the text between two special tokens as one piece)."""
    out: list = []
    for it in items:
        if isinstance(it, str) and out and isinstance(out[-1], str):
            out[-1] += it
        elif not (isinstance(it, str) and not it):
            out.append(it)
    return out
