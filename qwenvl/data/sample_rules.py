"""What makes an annotation record a valid sample: the ONE definition (torch-, numpy-free).

Both sides use :func:`record_problems`: the trainer's :class:`~qwenvl.data.sample.SampleBuilder` raises
the first error as a :class:`~qwenvl.data.preprocess.BadSample` (skips the sample), and
``vlsft datasets check --deep`` (:mod:`qwenvl.data.annotation_check`) lists every problem. So the check
reports an error for a record exactly when the trainer would skip it, under the same reason class
(``kind``, see :data:`~qwenvl.data.preprocess.BAD_SAMPLE_KINDS`); ``tests/test_check_vs_builder.py``
pins it with generated records. What only the trainer can know (the model family, the tokens, the
pixels) or what needs the files (existence, decoding) is checked on each side by shared helpers
(:func:`qwenvl.data.vision.local_media_problem`, ``--decode``).

Decided (official = the Qwen2.5-era ``preprocess_qwen_2_visual``, see ``reference/official-finetune.md`` §4.1):

* a first turn ``from: gpt`` is dropped, as official (a warning); the rest must still hold an answer;
  a leading ``role: assistant`` turn is kept and trained (the official check reads ``from``);
* a turn reads ``role``/``content`` when it has both, else ``from``/``value`` (the official order);
* an empty or blank value is trained as is (an empty answer trains ``<|im_end|>``): a warning;
* ``<image>``/``<video>`` in gpt or system turns stay plain text (a warning); only human-turn tags
  count against the media items; a system turn inside the conversation is kept (a warning);
* a ``video`` entry that is a *tuple* of paths is one video given as its frames (only
  :mod:`qwenvl.data.formats` makes them, from a ``videos`` item that is a list; JSON has no tuples, so an
  official record cannot hold one);
* errors (the sample is skipped): not an object; ``image``/``video`` not a path or a list of paths,
  an empty list or an empty path; the misspelt ``images``/``videos`` key alone; no or an empty
  ``conversations``; a turn that is not an object, lacks its keys, has an unknown speaker or a value
  that is not a string, or holds the literal text ``<|image_pad|>``/``<|video_pad|>``; tag counts that
  differ from the media counts; no assistant turn left.
* grounding ``objects`` (:func:`qwenvl.data.grounding.object_problems`, kind ``bad_objects``): misshapen objects,
  x2 < x1 / y2 < y1, zero-area boxes, a missing or wrong ``image`` index, no image, placeholders that do not match
  the objects. Boxes against the image's size are the deep check's (warnings: the builder clamps).

A problem is ``(severity, kind, code, message, key, hint)``: ``kind`` is the reason class, ``code`` a
finer label the check caps its listing by.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

Item = tuple[str, str, str, str, "str | None", "str | None"]

SIDES = {"human": 0, "user": 0, "gpt": 1, "assistant": 1, "system": 2, "tool": 3}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "tool": "tool"}
PAD_TEXTS = ("<|image_pad|>", "<|video_pad|>")
MISSPELT = {"images": "image", "videos": "video"}
#: a record's frames per second of its videos given as frame images (a list or a folder), first found wins:
#: qwen-vl-utils' ``sample_fps``, then ``fps``
FPS_KEYS = ("sample_fps", "fps")
_NONE: list = []  # returned for a clean record (never appended to)
_MISS = object()


def kind_of(value: Any) -> str:
    """``"a string"``, ``"a list"``, ... (JSON words for a Python value)."""
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(value), type(value).__name__)


def is_path(p: Any) -> bool:
    """A usable media entry: a non-blank string."""
    return p.__class__ is str and bool(p) and not p.isspace()


#: the image formats a ``data:`` URL may hold, by their first bytes (what PIL opens; WebP is checked apart)
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def is_data_url(p: Any) -> bool:
    """An inline ``data:`` URL (base64 image bytes in the annotation itself: OpenAI vision JSONL, ms-swift)."""
    return p.__class__ is str and p[:5] == "data:"


#: a string longer than this is shown by its head and length (bare base64 media, a path joined to one)
SHOWN_MAX = 300


def shown(p: Any) -> str:
    """A media entry as a message shows it: a ``data:`` URL (or any string over :data:`SHOWN_MAX` characters: bare
    base64 bytes) by its head and length, never its whole payload; an object or a list as :func:`shown_repr`."""
    if p.__class__ is not str:
        return shown_repr(p) if p.__class__ in (dict, list, tuple) else str(p)
    if (p[:5] == "data:" and len(p) > 48) or len(p) > SHOWN_MAX:
        return f"{p[:40]}... ({len(p):,} characters)"
    return p


def shown_repr(p: Any) -> str:
    """``repr(p)`` with every long string inside (a ``{"bytes": <base64>}`` item's) shortened as :func:`shown`
    shortens it."""
    def short(v: Any, depth: int = 0) -> Any:
        if v.__class__ is str:
            return shown(v) if (v[:5] == "data:" and len(v) > 48) or len(v) > SHOWN_MAX else v
        if v.__class__ in (bytes, bytearray) and len(v) > 48:
            return f"<{len(v):,} bytes>"
        if depth > 3:
            return v
        if v.__class__ is dict:
            return {k: short(x, depth + 1) for k, x in v.items()}
        if v.__class__ in (list, tuple):
            return v.__class__(short(x, depth + 1) for x in v)
        return v

    return repr(short(p))


def data_url_bytes(url: str, kind: str = "image") -> tuple[bytes | None, str | None]:
    """``(bytes, None)`` of a base64 ``data:image/...`` (``kind`` video: ``data:video/...``) URL, or ``(None, why
    not)``. The one reading of inline media: the rule below, the builder (:func:`qwenvl.data.vision.open_image`,
    :func:`~qwenvl.data.vision.decode_video`) and ``--decode`` use it. Image bytes must start as an image format
    PIL reads; video bytes are left to the decoders (``--decode`` opens them, as it opens files)."""
    import base64
    import binascii

    head, comma, payload = url.partition(",")
    params = head[5:].split(";")
    if not comma or params[-1].strip().lower() != "base64":
        return None, "is not a base64 data: URL (data:image/png;base64,...)"
    if not params[0].lower().startswith(kind + "/"):
        return None, f"holds {params[0] or 'no media type'!r}, not {'an image' if kind == 'image' else 'a video'}"
    if any(c in payload for c in " \n\r\t"):
        payload = "".join(payload.split())
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        return None, f"is not valid base64 ({e})"
    if not data:
        return None, "holds no bytes"
    if kind == "video":
        return data, None
    if not is_image_bytes(data):
        return None, "holds no PNG, JPEG, GIF, WebP, BMP or TIFF bytes (by its first bytes)"
    return data, None


def is_image_bytes(data: bytes) -> bool:
    """Whether ``data`` starts as an image format PIL reads (PNG, JPEG, GIF, WebP, BMP, TIFF)."""
    return any(data.startswith(m) for m, _ in _MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _data_url_problem(key: str, p: str, out: list) -> None:
    """An inline ``data:`` URL entry of ``key`` (image or video): base64 bytes of that kind of media."""
    why = data_url_bytes(p, key)[1]
    if why is not None:
        mime = "image/png" if key == "image" else "video/mp4"
        out.append(("error", "media_unreadable", "data_url", f"an inline data: URL {key} {why}: {shown(p)}", key,
                    f"re-encode the {key} as base64 (data:{mime};base64,...) or give a file path"))


def _media_field(key: str, value: Any, out: list) -> int:
    """Problems of an ``image``/``video`` value that is not None; returns its number of entries."""
    if type(value) is str:
        if not value or value.isspace():
            out.append(("error", "bad_media_field", "media_type", f"{key} entry {shown_repr(value)} is not a path", key,
                        "an empty path: drop the key for a sample without media"))
        elif value[:5] == "data:":
            _data_url_problem(key, value, out)
        return 1
    if type(value) is list:
        if not value:
            out.append(("error", "bad_media_field", "media_type", f"'{key}' is an empty list: the trainer skips "
                        "the sample", key, f"drop the '{key}' key for a sample without {key}s"))
        for p in value:
            if p.__class__ is tuple and key == "video":  # a frame list (formats.py makes them): one video
                if not p or not all(is_path(x) for x in p):
                    out.append(("error", "bad_media_field", "media_type", f"a frame-list video must be a non-empty "
                                f"list of image paths, found {shown_repr(list(p))}", key, "list the frame image files in order"))
                for x in p:
                    if x[:5] == "data:" if x.__class__ is str else False:
                        _data_url_problem("image", x, out)
                continue
            if p.__class__ is not str or not p or p.isspace():
                out.append(("error", "bad_media_field", "media_type", f"{key} entry {shown_repr(p)} is not a path", key,
                            "each entry is a file path string, relative to data_path or absolute"))
            elif p[:5] == "data:":
                _data_url_problem(key, p, out)
        return len(value)
    out.append(("error", "bad_media_field", "media_type", f"'{key}' must be a path or a list of paths, found "
                f"{kind_of(value)}", key, None))
    return 0


def turn_fields(turn: dict) -> tuple[Any, Any, str] | None:
    """``(speaker, value, value key)`` of a turn as the official code reads it: ``role``/``content`` when
    the turn has both, else ``from``/``value``; None when it has neither pair."""
    if "role" in turn and "content" in turn:
        return turn["role"], turn["content"], "content"
    if "from" in turn and "value" in turn:
        return turn["from"], turn["value"], "value"
    return None


def drops_first(conv: list) -> bool:
    """The official first-turn rule: a first turn ``from: gpt`` is dropped."""
    first = conv[0]
    return type(first) is dict and first.get("from") == "gpt"


def _missing_keys(turn: dict) -> Item:
    spk = turn.get("from", turn.get("role"))
    if spk is None:
        return ("error", "bad_conversation", "no_speaker", "a turn has neither 'from' nor 'role'", "conversations",
                'write {"from": "human"|"gpt", "value": "..."}')
    vkey = "value" if "from" in turn else "content"
    other = "content" if vkey == "value" else "value"
    hint = f"'from' goes with 'value', 'role' with 'content': rename '{other}' to '{vkey}'" if other in turn else None
    return ("error", "bad_conversation", "no_value", f"a turn has no '{vkey}'", vkey, hint)


def _bad_speaker(turn: dict, spk: Any) -> Item:
    low = spk.strip().lower() if type(spk) is str else None
    hint = (f"write '{low}' (lowercase, no spaces)" if low in SIDES else
            "use 'human' or 'gpt' (or role 'user' / 'assistant')")
    return ("error", "bad_conversation", "bad_speaker", f"unknown speaker {spk!r}",
            "role" if "role" in turn and "content" in turn else ("from" if "from" in turn else "role"), hint)


def conversation_problems(conv: Any, out: list, rec: dict | None = None) -> tuple[int, int, Item | None]:
    """Append the problems of ``conversations`` to ``out``; returns the ``<image>``/``<video>`` tags
    that will be expanded (human turns; ``-1`` when the conversation is unusable) and the ``no_answer``
    error when no assistant turn is left (appended by the caller after the tag checks, the trainer's order).
    Runs a million times in ``datasets check --deep``: the clean path stays inline, problems are worded in helpers."""
    if type(conv) is not list or not conv:
        out.append(_no_conversation(conv, rec))
        return -1, -1, None
    start = 0
    first = conv[0]
    if type(first) is dict and first.get("from") == "gpt":  # drops_first(), inlined: this runs a million times
        start = 1
        out.append(("warning", "gpt_first", "gpt_first", "the first turn is from gpt; the trainer drops it (as the "
                    "official code does)", "conversations", "start with a human turn"))
    n_img = n_vid = 0
    prev = -1
    first_side = -1
    has_answer = broken = False
    for i in range(start, len(conv)):
        turn = conv[i]
        side = val = None
        if type(turn) is dict:
            if "role" in turn and "content" in turn:  # turn_fields(), inlined
                spk, val, vkey = turn["role"], turn["content"], "content"
            else:
                spk, val, vkey = turn.get("from", _MISS), turn.get("value", _MISS), "value"
            side = SIDES.get(spk) if type(spk) is str else None
        if side is None or type(val) is not str:
            out.append(_unreadable_turn(turn))
            broken = True
            first_side = first_side if first_side >= 0 else 3  # no "first turn" warning after a broken one
            continue
        if first_side < 0:
            first_side = side
        if side == 2:
            out.append(("warning", "system_turn", "system_turn", "a system turn inside the conversation is kept as a "
                        "second system turn after the default system prompt (as the official code does)", vkey,
                        'to replace the default, use the messages format or a dataset-level "system"'))
        if side == prev and side < 2:
            out.append(("warning", "no_alternation", "no_alternation", "two turns in a row from the same speaker",
                        "conversations", "alternate human and gpt turns"))
        prev = side
        if side == 1:
            has_answer = True
        if (not val or val.isspace()) and "tool_calls" not in turn:  # a call alone: no text needed
            out.append(_empty_value(side, vkey))
            continue
        if "<" not in val:
            continue
        if "<|" in val and (PAD_TEXTS[0] in val or PAD_TEXTS[1] in val):
            pad = PAD_TEXTS[0] if PAD_TEXTS[0] in val else PAD_TEXTS[1]
            out.append(("error", "bad_conversation", "special_token", f"a turn contains the special token text "
                        f"{pad!r}: it would become a vision token with no pixels behind it", vkey,
                        "write <image>/<video> tags instead"))
            broken = True
        if side == 0:
            n_img += val.count("<image>")
            n_vid += val.count("<video>")
        elif "<image>" in val or "<video>" in val:
            who = ("gpt", "system", "tool")[side - 1]
            out.append(("warning", f"tag_in_{who}", f"tag_in_{who}", f"a {who} turn contains an <image>/<video> "
                        "tag; it is not replaced", vkey, "media tags belong in human turns (elsewhere they stay "
                        "plain text)"))
    if first_side == 1 and not start:
        out.append(("warning", "gpt_first", "gpt_first", "the conversation starts with an assistant turn",
                    "conversations", "start with a user turn (this one is kept and trained: the official code drops "
                    "only a first 'from': 'gpt' turn)"))
    no_answer = None
    if not has_answer and not broken:
        no_answer = ("error", "no_answer", "no_answer", "no assistant turn to train on" + (
            " once the leading gpt turn is dropped" if start else ""), "conversations",
            'add the answer: {"from": "gpt", "value": "..."}')
    return n_img, n_vid, no_answer


def _no_conversation(conv: Any, rec: dict | None) -> Item:
    """``conversations`` missing (perhaps under another name) or not a non-empty list."""
    if conv is None:
        other = next((k for k in ("conversation", "messages", "Conversations", "conversations ", "dialog")
                      if k in rec), None) if rec is not None else None
        hint = (f"rename '{other}' to 'conversations'" if other else
                'add "conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]')
        return ("error", "bad_conversation", "no_conversations", "sample has no 'conversations'", "conversations",
                hint)
    return ("error", "bad_conversation", "bad_conversations", "'conversations' must be a non-empty list of turns",
            "conversations", 'write [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]')


def _unreadable_turn(turn: Any) -> Item:
    """A turn the trainer cannot read: not an object, a speaker or value key missing, an unknown speaker, or a
    value that is not a string (checked in that order)."""
    if type(turn) is not dict:
        return ("error", "bad_conversation", "bad_turn", f"a turn is {kind_of(turn)}, not an object",
                "conversations", 'write {"from": "human", "value": "..."}')
    if "role" in turn and "content" in turn:
        spk, val, vkey = turn["role"], turn["content"], "content"
    else:
        spk, val, vkey = turn.get("from", _MISS), turn.get("value", _MISS), "value"
    if spk is _MISS or val is _MISS:
        return _missing_keys(turn)
    if (SIDES.get(spk) if type(spk) is str else None) is None:
        return _bad_speaker(turn, spk)
    hint = ("write the turn's text as one string, with an <image>/<video> tag where each media item goes"
            if type(val) is list else None)
    return ("error", "bad_conversation", "value_type", f"'{vkey}' must be a string, found {kind_of(val)}", vkey, hint)


def _empty_value(side: int, vkey: str) -> Item:
    if side == 1:
        return ("warning", "empty_value", "empty_answer", "a gpt turn has an empty value: it trains an empty answer "
                "(only <|im_end|>)", vkey, "write the answer, or remove the turn")
    return ("warning", "empty_value", "empty_value", "a turn has an empty value", vkey,
            "write the text or remove the turn")


def _fps_problem(rec: dict, out: list) -> None:
    """The record's frame rate (:data:`FPS_KEYS`) must be a positive number."""
    key = next(k for k in FPS_KEYS if rec.get(k) is not None)
    v = rec[key]
    if type(v) not in (int, float) or not 0 < v < float("inf"):
        out.append(("error", "bad_media_field", "bad_fps", f"'{key}' must be a positive number (frames per second "
                    f"of the video's frame images), found {kind_of(v)} {v!r}", key,
                    "the rate the frames were taken from the video at, e.g. 1 or 2 (2 when not given)"))


def record_problems(rec: Any) -> list[Item]:
    """Every problem of one annotation record, errors in the order the trainer meets them (the first
    error is the reason it skips the sample); an empty list for a clean record. Kept flat: the deep
    check runs it a million times."""
    if type(rec) is not dict:
        return [("error", "not_object", "not_object", f"sample is {kind_of(rec)}, not a JSON object", None,
                 'each sample is {"image": ..., "conversations": [...]}')]
    out: list[Item] = []
    if ("images" in rec and rec["images"] != []) or ("videos" in rec and rec["videos"] != []):
        # an empty list holds no media to lose (a text-only row of a List(Image) column): not a problem
        bad = "images" if "images" in rec and rec["images"] != [] else "videos"
        if MISSPELT[bad] in rec:
            out.append(("warning", "misspelt_media_key", "misspelt_media_key", f"key '{bad}' is ignored: the "
                        f"sample uses '{MISSPELT[bad]}'", bad, f"delete '{bad}'"))
        else:
            out.append(("error", "bad_media_field", "misspelt_media_key", f"key '{bad}' is not read by the trainer: "
                        "the sample would silently train as text-only", bad, f"rename '{bad}' to '{MISSPELT[bad]}'"))
    img = rec.get("image")
    vid = rec.get("video")
    n_images = 0 if img is None else (1 if type(img) is str and img and not img.isspace() and img[:5] != "data:"
                                      else _media_field("image", img, out))
    n_videos = 0 if vid is None else (1 if type(vid) is str and vid and not vid.isspace() and vid[:5] != "data:"
                                      else _media_field("video", vid, out))
    if vid is not None and (rec.get("sample_fps") is not None or rec.get("fps") is not None):
        _fps_problem(rec, out)
    n_img, n_vid, no_answer = conversation_problems(rec.get("conversations"), out, rec)
    if n_img >= 0 and n_img == n_videos and n_vid == 0 and n_images == 0 and n_img:
        # LLaVA-Video-178K / LLaVA-NeXT: the video's place written as <image> (their trainer has no <video>)
        out.append(("error", "tags_media_mismatch", "video_tags", f"{n_img} <image> tag(s) for {n_videos} video(s) "
                    "and no image: LLaVA-Video writes <image> where its video goes", "video",
                    "write <video> in place of <image> in these samples"))
    elif n_img >= 0:
        if n_img != n_images:
            out.append(("error", "tags_media_mismatch", "image_tags", f"{n_img} <image> tag(s) for {n_images} "
                        "image(s)", "image", "put one <image> tag in a human turn per image, in order"))
        if n_vid != n_videos:
            out.append(("error", "tags_media_mismatch", "video_tags", f"{n_vid} <video> tag(s) for {n_videos} "
                        "video(s)", "video", "put one <video> tag in a human turn per video, in order"))
    if no_answer is not None:
        out.append(no_answer)
    if "objects" in rec:  # grounding (qwenvl.data.grounding): structure and placeholders, no image needed
        from qwenvl.data.grounding import object_problems

        object_problems(rec, out, n_images)
    return out or _NONE


# ------------------------------------------------------------------------------------------ the plain fast path
#: keys of an official record that the full rule reads beside image / video / conversations: a record holding one
#: is never judged plain (a new rule in record_problems reading another key must add it here)
PLAIN_AWAY = ("images", "videos", "objects", *FPS_KEYS)


def plain_media(value: Any) -> int:
    """The number of entries of a media value that is plainly fine (absent: 0, a path: 1, a non-empty list of
    paths; no ``data:`` URL), else -1."""
    if value is None:
        return 0
    if value.__class__ is str:
        return 1 if value and not value.isspace() and value[:5] != "data:" else -1
    if value.__class__ is not list or not value:
        return -1
    for p in value:
        if p.__class__ is not str or not p or p.isspace() or p[:5] == "data:":
            return -1
    return len(value)


def plain_tags(conv: Any, rkey: str = "from", ckey: str = "value", user: str = "human",
               assistant: str = "gpt") -> tuple[int, int] | None:
    """``(<image> tags, <video> tags)`` of a plainly clean conversation, else None (undecided: the full rule
    judges it). Plainly clean: a list of at least 2 turns of exactly ``{rkey, ckey}``, speakers alternating from
    ``user`` to ``assistant``, non-blank string values, no ``<|`` anywhere, no ``<image>``/``<video>`` in answers.
    With :func:`plain_media` counts equal to the tags, :func:`record_problems` finds nothing in such a record
    (``tests/test_check_vs_builder.py`` pins it): the deep check's fast path (one Python loop, no problem list)."""
    if conv.__class__ is not list or len(conv) < 2:
        return None
    n_img = n_vid = 0
    speaker = user
    for t in conv:
        if t.__class__ is not dict or len(t) != 2 or t.get(rkey) != speaker:
            return None
        v = t.get(ckey)
        if v.__class__ is not str or not v or v.isspace():
            return None
        if speaker is user:
            if "<" in v:
                if "<|" in v:
                    return None
                n_img += v.count("<image>")
                n_vid += v.count("<video>")
            speaker = assistant
        else:
            if "<" in v and ("<|" in v or "<image>" in v or "<video>" in v):
                return None
            speaker = user
    return n_img, n_vid


def first_error(problems: list[Item]) -> Item | None:
    return next((p for p in problems if p[0] == "error"), None)


def turn_triples(conv: list, untrained: set | frozenset = frozenset()) -> list[tuple[str, str, bool]]:
    """``(role, content, trained)`` of the turns the trainer tokenizes; ``untrained`` holds indices into
    ``conv`` of assistant turns that are masked (``loss: false``, ``train_on: last``)."""
    return [(ROLES[conv[i]["role" if "role" in conv[i] and "content" in conv[i] else "from"]],
             turn_fields(conv[i])[1], i not in untrained)  # type: ignore[index]
            for i in range(1 if drops_first(conv) else 0, len(conv))]


def turn_pairs(conv: list) -> list[tuple[str, str]]:
    """``(role, content)`` of the turns the trainer tokenizes (roles mapped to user/assistant/system),
    for a conversation :func:`conversation_problems` found no error in."""
    out = []
    for i in range(1 if drops_first(conv) else 0, len(conv)):
        spk, val, _ = turn_fields(conv[i])  # type: ignore[misc]
        out.append((ROLES[spk], val))
    return out


def local_media_problem(path: str) -> str | None:
    """Why a local ``path`` is not usable media, or None: media means a regular file this process can read
    (a folder named ``x.png``, a dangling symlink and a symlink loop are not). Shared with the deep check."""
    try:
        st = os.stat(path)  # follows symlinks: a dangling one or a loop raises
    except FileNotFoundError:
        return "not found" if not os.path.islink(path) else "a broken symbolic link (its target does not exist)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
        return f"cannot be accessed ({e.strerror or type(e).__name__})"
    if stat.S_ISDIR(st.st_mode):
        return "a folder, not a file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "not readable (permission denied)"
    return None
