"""Annotation formats: detection per dataset and one normaliser per format (torch-free).

Every format is turned into the one internal conversation the pipeline builds tokens from: an official-shaped
record (``image`` / ``video`` lists, ``conversations`` of ``role``/``content`` turns) plus :class:`Extras` (the
sample's own system prompt, the turns that are not trained). The official format passes through untouched, so
its behaviour (and the deep check's speed) is unchanged.

Formats (``FORMATS``; a dictionary entry's ``"format"`` overrides the detection):

* ``official``: ``conversations`` of ``from``/``value`` (or ``role``/``content``) turns, media in ``image`` /
  ``video``; tags ``<image>``/``<video>`` in human turns. The default system turn stays; a system turn inside the
  conversation is kept as a second (masked) system turn, as the official code does.
* ``messages`` (LLaMA-Factory's sharegpt with OpenAI-style roles, ms-swift): ``messages`` of ``role``/``content``;
  content is a string with ``<image>``/``<video>`` tags, or a list of parts (``{"type": "text", "text": ...}``,
  ``{"type": "image", "image": path}``, ``{"type": "image_url", "image_url": {"url": ...}}``, ``{"type":
  "video", "video": path | [frame paths]}``, or a bare ``{"type": "image"}`` that takes the next ``images``
  item); media in ``images`` / ``videos`` or inline in the parts (not both); a leading ``system`` message or a
  top-level ``system`` replaces the default system prompt; ``"loss": false`` on a turn masks it (OpenAI
  fine-tuning's ``"weight": 0`` too, ``1`` trains it); a ``videos``
  item may be a list of frame image paths (one video). LLaMA-Factory v1: parts keep their text / path in
  ``value`` (``reasoning`` and ``tool_call`` parts too, a call as a JSON string), ``"loss_weight"`` 0 masks a turn
  and 1 trains it (any other weight is an error). ``images: []`` / ``videos: []`` = no media (a text-only row of a
  List(Image) column); a media item may be a base64 ``data:`` URL (decoded in memory, never written to disk), a
  ``{"path"}`` / ``{"bytes", "path"}`` object (bytes win, read as a parquet image struct is) or bare base64 image
  bytes (:func:`bare_base64_image`), as ms-swift reads them. A record with ``images`` / ``videos`` and no tag of
  that kind at all gets one per medium before the text of its first user turn (ms-swift's ``_add_default_tags``,
  TRL's ``prepare_multimodal_messages``; messages and prompt_completion only, a string content only); some tags
  but fewer than the media stays an error.
* ``sharegpt`` (LLaMA-Factory): ``conversations`` of ``from``/``value`` with ``human``/``gpt``/``system``
  speakers and media in ``images`` / ``videos``; otherwise as ``messages``.
* ``internvl`` (InternVL's records; never detected: set by an InternVL meta JSON dictionary or ``"format":
  "internvl"``): official records, except that a single image (a path string) or video without its tag in the first
  turn (after a system turn) gets ``<image>\n`` / ``<video>\n`` put before that turn's text, as InternVL's trainer
  does; an empty ``image`` / ``video`` (``""``, ``[]``) is none. An image list keeps its tags as written (no tag is
  an error, as in InternVL). A first turn ``from: system`` is the sample's system prompt (InternVL's
  ``preprocess``), not a second system turn.
* ``prompt_completion`` (TRL): ``prompt`` and ``completion`` lists of messages, read as the messages of both (media
  in ``images``, or a singular ``image`` as TRL's collators read it); answers inside the prompt are not trained
  (TRL's completion-only loss). The plain-text form is refused in one line (language modelling without a chat
  template).

Thinking and tools (messages and sharegpt; rendered by the Qwen3.5 / 3.6 / 3.8 templates, :mod:`qwenvl.data.chat_qwen35`):
an assistant message's reasoning in ``reasoning_content``, ``reasoning`` or ``thinking`` (``REASONING_KEYS``; or
``<think>...</think>`` at the start of its text, in every format); ``tool_calls`` (OpenAI's shape; JSON-string
arguments parsed), ``tool`` / ``observation`` results and LLaMA-Factory's ``function_call`` messages; a record's
``tools`` (a list or a JSON string of one) and ``chat_template_kwargs`` (``reasoning_effort``, ``enable_thinking``,
``preserve_thinking``; or a top-level ``reasoning_effort``) as ms-swift reads them.

Detection (:func:`detect`) looks at the first ``DETECT_RECORDS`` records: ``messages`` records in the majority
-> ``messages``; ``conversations`` with ``images``/``videos`` and none with ``image``/``video`` -> ``sharegpt``;
other ``conversations`` -> ``official``. Anything else (alpaca, query/response, ...) is an unknown shape, named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from qwenvl.data.sample_rules import (
    FPS_KEYS,
    data_url_bytes,
    is_image_bytes,
    kind_of,
    record_problems,
    shown,
    turn_fields,
)

FORMATS = ("official", "messages", "sharegpt", "prompt_completion", "internvl")
#: formats whose records are official-shaped (read by the official rules, named with the official keys)
OFFICIAL_SHAPED = (None, "official", "internvl")
TRAIN_ON = ("all", "last")
#: the loss on the reasoning inside an assistant turn's think block (dictionary "thinking_loss")
THINKING_LOSS = ("train", "mask")
#: Qwen3.8's reasoning_effort (dictionary "reasoning_effort", per sample "chat_template_kwargs"); none = thinking off
REASONING_EFFORTS = ("xhigh", "medium", "low", "none")
#: an assistant message's reasoning field, in the order they are looked for (OpenAI-style APIs, ms-swift, HF)
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
#: message roles of tool results (OpenAI "tool", LLaMA-Factory "observation", ms-swift "tool_response")
TOOL_ROLES = ("tool", "observation", "tool_response")
#: message roles whose content is a tool call of the assistant (LLaMA-Factory "function_call", ms-swift "tool_call")
CALL_ROLES = ("function_call", "tool_call")
#: the chat template arguments a record may set for itself (``chat_template_kwargs``) and their values
TEMPLATE_KWARGS = {"reasoning_effort": REASONING_EFFORTS, "enable_thinking": (True, False),
                   "preserve_thinking": (True, False)}
DETECT_RECORDS = 200
ACCEPTED = ("official (conversations + image/video), messages (messages of role/content + images/videos), "
            "sharegpt (conversations of from/value + images/videos), prompt_completion (TRL: prompt and completion "
            "message lists + images)")
# top-level keys that look like media: a format that does not read them would silently train text-only
MEDIA_WORDS = ("image", "img", "video", "audio", "frame", "picture", "photo", "media")
# known foreign shapes: key that identifies them -> name
_FOREIGN = (("instruction", "alpaca (instruction/input/output)"), ("query", "query/response"),
            ("prompt", "prompt/response"), ("conversation", "ms-swift's conversation pairs"),
            ("text", "plain text (pre-training)"), ("question", "question/answer"))


@dataclass(frozen=True)
class FormatSpec:
    """How one dataset's records are read. ``name`` None = detect from the first records."""

    name: str | None = None
    messages_key: str = ""  # "" = the format's default (messages / conversations)
    role_key: str = ""
    content_key: str = ""
    user_tags: tuple[str, ...] = ()
    assistant_tags: tuple[str, ...] = ()
    system_tags: tuple[str, ...] = ()
    tool_tags: tuple[str, ...] = ()  # more tool-result roles (LLaMA-Factory's observation_tag)
    call_tags: tuple[str, ...] = ()  # more tool-call roles (LLaMA-Factory's function_tag)
    system_key: str | None = "system"  # top-level system prompt column
    tools_key: str = "tools"  # the record's tool definitions (LLaMA-Factory's columns.tools)
    images_key: str = "images"
    videos_key: str = "videos"
    system: str | None = None  # the dataset's default system prompt (dictionary "system")
    train_on: str = "all"  # "all" assistant turns, or only the "last"
    declared: bool = False  # name came from the dictionary, not from detection
    bbox_format: str = "pixel"  # coordinates of the records' "objects" (qwenvl.data.grounding): pixel|norm1000|norm1
    thinking_loss: str = "train"  # THINKING_LOSS: the loss on reasoning in think blocks
    reasoning_effort: str | None = None  # REASONING_EFFORTS (Qwen3.8); None: the template's default
    frame_fps: float | None = None  # frames per second of videos given as frame images (None: a record's, else 2)

    def with_name(self, name: str) -> FormatSpec:
        return replace(self, name=name)

    def keys(self) -> FormatSpec:
        """This spec with the format's default keys and tags filled in."""
        if self.name == "messages":
            d = dict(messages_key="messages", role_key="role", content_key="content",
                     user_tags=("user",), assistant_tags=("assistant",), system_tags=("system",))
        elif self.name == "prompt_completion":  # TRL: read as the messages of prompt + completion
            d = dict(messages_key="prompt", role_key="role", content_key="content",
                     user_tags=("user",), assistant_tags=("assistant",), system_tags=("system",))
        elif self.name == "sharegpt":
            d = dict(messages_key="conversations", role_key="from", content_key="value",
                     user_tags=("human", "user"), assistant_tags=("gpt", "assistant"), system_tags=("system",))
        elif self.name == "internvl":  # official-shaped: its media keys are the official ones
            return replace(self, messages_key="conversations", images_key="image", videos_key="video")
        else:
            return self
        return replace(self, **{k: getattr(self, k) or v for k, v in d.items()})

    @property
    def reads_media(self) -> tuple[str, ...]:
        if self.name == "prompt_completion" and self.images_key == "images":  # TRL's singular 'image' too
            return (self.images_key, self.videos_key, "image")
        return ("image", "video") if self.name in OFFICIAL_SHAPED else (self.images_key, self.videos_key)


OFFICIAL = FormatSpec("official")


@dataclass
class Extras:
    """What a normalised sample carries beside its official-shaped record."""

    system: str | None = None  # the sample's own system prompt (replaces the default)
    untrained: set = field(default_factory=set)  # indices of conversation turns with loss: false
    template_kwargs: dict = field(default_factory=dict)  # the sample's own chat_template_kwargs (TEMPLATE_KWARGS)
    tools: list | None = None  # the sample's tool definitions (JSON objects)


_PLAIN = Extras()


# ---------------------------------------------------------------------------------------------- detection
@dataclass
class Detection:
    name: str | None  # None: unknown shape
    found: str = ""  # what was found, for the unknown case
    line: Any = None  # locator of the first record that decided (or of the unknown shape)


def classify(rec: Any) -> str | None:
    """``"messages"``, ``"sharegpt"``, ``"official"``, ``"neutral"`` (conversations without media keys) or None."""
    if type(rec) is not dict:
        return None
    if "messages" in rec:
        return "messages"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    if "conversations" in rec:
        if "image" in rec or "video" in rec:
            return "official"
        if "images" in rec or "videos" in rec:
            return "sharegpt"
        return "neutral"
    return None


def detect(records) -> Detection:
    """The format of a dataset from ``(locator, record)`` pairs of its first records. Records of no known shape
    in the majority make the dataset an unknown shape (a format is never claimed on a minority's evidence)."""
    votes: dict[str, int] = {}
    first: dict[str, Any] = {}
    unknown: tuple[Any, Any] | None = None
    n_unknown = 0
    for loc, rec in records:
        c = classify(rec)
        if c is None:
            if type(rec) is dict:
                n_unknown += 1
                unknown = unknown or (loc, rec)
            continue
        votes[c] = votes.get(c, 0) + 1
        first.setdefault(c, loc)
    conv = votes.get("official", 0) + votes.get("sharegpt", 0) + votes.get("neutral", 0)
    known = sum(votes.values())
    if unknown is not None and n_unknown > known:
        return _unknown(unknown, f"{n_unknown} of the first {n_unknown + known} records are " if known else "")
    if votes.get("prompt_completion", 0) > max(conv, votes.get("messages", 0)):
        return Detection("prompt_completion", line=first["prompt_completion"])
    if votes.get("messages", 0) > conv:
        return Detection("messages", line=first["messages"])
    if conv:
        if votes.get("official") or not votes.get("sharegpt"):
            return Detection("official", line=first.get("official", first.get("neutral")))
        return Detection("sharegpt", line=first["sharegpt"])
    if unknown is None:
        return Detection("official")  # nothing to go by (empty file, broken lines): the official reader decides
    return _unknown(unknown, "")


def _unknown(unknown: tuple[Any, Any], share: str) -> Detection:
    """An unknown shape, named by the first such record (``share``: how many of the sniffed records are)."""
    loc, rec = unknown
    keys = list(rec)
    shape = next((name for key, name in _FOREIGN if key in rec), None)
    found = share + (f"{shape} records" if shape else "records") + f" with keys {', '.join(map(repr, keys[:6]))}" + (
        ", ..." if len(keys) > 6 else "")
    return Detection(None, found, loc)


def foreign_shape(found: str) -> bool:
    """Whether a :class:`Detection`'s ``found`` names a known foreign shape (alpaca, query/response, ...: ``_FOREIGN``),
    which no per-sample hint can fix (the dataset-level line is all there is to say)."""
    return any(f"{name} records with keys" in found for _, name in _FOREIGN)


def unread_media_keys(rec: Any, fmt: FormatSpec) -> list[str]:
    """Top-level keys of ``rec`` that look like media but that ``fmt`` does not read."""
    if type(rec) is not dict:
        return []
    reads = fmt.reads_media
    out = []
    for k in rec:
        low = k.lower() if type(k) is str else ""
        if k in reads or not any(w in low for w in MEDIA_WORDS) or not _looks_like_media(rec[k]):
            continue
        out.append(k)
    return out


_MEDIA_EXT = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".heic", ".mp4", ".avi", ".mov",
              ".mkv", ".webm", ".flv", ".m4v", ".wav", ".mp3", ".flac", ".ogg", ".m4a")


def _looks_like_media(value: Any, depth: int = 0) -> bool:
    """A path / URL with a media file extension, or a list holding one (metadata such as ``image_id`` is not)."""
    if type(value) is str:
        return value.lower().rstrip().endswith(_MEDIA_EXT) or value.startswith(("http://", "https://", "s3://"))
    if type(value) is list and depth < 2:
        return any(_looks_like_media(v, depth + 1) for v in value[:8])
    if type(value) is dict and depth < 2:
        return any(_looks_like_media(v, depth + 1) for v in list(value.values())[:8])
    return False


# ---------------------------------------------------------------------------------------------- normalising
def _err(code: str, message: str, key: str | None, hint: str | None, kind: str = "bad_conversation") -> tuple:
    return ("error", kind, code, message, key, hint)


def _url(value: Any, media: str = "image") -> Any:
    """A media source: a path / URL string (``file://`` stripped), a ``{"url"}`` / ``{"path"}`` object's, a
    Hugging Face ``{"bytes", "path"}`` struct's bytes (they win, as in ``datasets`` and ms-swift) as an in-memory
    ``data:`` URL, a bare base64 image (:func:`bare_base64_image`) as one too; else the value itself."""
    if type(value) is dict:
        data = value.get("bytes")
        if data:
            return _embedded_url(data, media)
        value = value.get("url", value.get("path"))
    if type(value) is str:
        if value.startswith("file://"):
            return value[7:]
        if media == "image" and len(value) > BARE_BASE64_MIN:
            data = bare_base64_image(value)
            if data is not None:
                from qwenvl.data.hf_source import data_url

                return data_url(data, media)
    return value


#: ms-swift reads a string longer than this that is not an existing file as base64 (``vision_utils.load_file``)
BARE_BASE64_MIN = 200
_B64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def bare_base64_image(value: str) -> bytes | None:
    """The bytes of an image given as bare base64 (no ``data:`` prefix, as ms-swift's ``load_file`` accepts), or
    None. Unambiguous: only a string longer than :data:`BARE_BASE64_MIN` characters, all of the base64 alphabet
    (so no ``.`` of a file extension, no ``-`` / ``_`` / space), that decodes to a PNG, JPEG, GIF, WebP, BMP or
    TIFF (by its first bytes) is one; anything else stays a path."""
    import base64
    import binascii

    if len(value) <= BARE_BASE64_MIN or len(value) % 4 or not _B64_CHARS.issuperset(value[:64]):
        return None
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if is_image_bytes(data) else None


def _embedded_url(data: Any, media: str) -> Any:
    """A ``{"bytes": ...}`` item's bytes (raw, or a base64 string as JSON holds them) as a ``data:`` URL, read as
    the parquet / arrow reader reads embedded bytes (:func:`qwenvl.data.hf_source.data_url`); a string that is not
    base64 becomes a ``data:`` URL the sample rule refuses (one line, the payload shortened)."""
    import base64
    import binascii

    from qwenvl.data.hf_source import data_url

    if type(data) in (bytes, bytearray):
        return data_url(bytes(data), media)
    if type(data) is str:
        try:
            return data_url(base64.b64decode("".join(data.split()), validate=True), media)
        except (binascii.Error, ValueError):
            return f"data:{media}/{'png' if media == 'image' else 'mp4'};base64,{data}"
    return {"bytes": data}  # neither: refused as an entry that is not a path


# where a media part keeps its source (LLaMA-Factory v1 parts keep everything in "value")
_IMAGE_PARTS = {"image": ("image", "url", "path", "image_url", "value"), "image_url": ("image_url", "url", "value")}
_VIDEO_PARTS = {"video": ("video", "url", "path", "video_url", "value"), "video_url": ("video_url", "url", "value")}
#: LLaMA-Factory v1 parts that are not text or media: an answer's reasoning and its tool calls (JSON strings)
_TURN_PARTS = ("reasoning", "tool_call")
#: qwen-vl-utils' per-part keys (``fetch_image`` / ``fetch_video``) that vlsft does not apply: the run's
#: ``max_pixels`` / ``video_*`` settings are used; ``datasets check --deep`` says so once per dataset
UNAPPLIED_PART_KEYS = ("min_pixels", "max_pixels", "total_pixels", "resized_height", "resized_width", "nframes",
                       "min_frames", "max_frames", "video_start", "video_end")


def _parts(parts: list, ckey: str, out: list, inline: dict) -> str | None:
    """The text of a content part list with ``<image>``/``<video>`` where its media go; inline media appended
    to ``inline["image"|"video"]`` (a bare part counts in ``inline["bare_*"]``). None after an error."""
    text = []
    for part in parts:
        if type(part) is str:
            text.append(part)
            continue
        if type(part) is not dict or type(part.get("type")) is not str:
            out.append(_err("bad_part", f"a content part is {kind_of(part)}" + (
                " without a 'type'" if type(part) is dict else ""), ckey,
                'write {"type": "text", "text": ...} or {"type": "image", "image": "path"}'))
            return None
        kind = part["type"]
        if kind == "text":
            tkey = "text" if "text" in part or "value" not in part else "value"  # LLaMA-Factory v1: "value"
            t = part.get(tkey)
            if type(t) is not str:
                out.append(_err("bad_part", f"a text part's '{tkey}' must be a string, found {kind_of(t)}", ckey,
                                None))
                return None
            text.append(t)
            continue
        if kind in _TURN_PARTS:
            if not _turn_part(kind, part, ckey, out, inline):
                return None
            continue
        table = _IMAGE_PARTS if kind in _IMAGE_PARTS else _VIDEO_PARTS if kind in _VIDEO_PARTS else None
        if table is None:
            out.append(_err("bad_part", f"content part type {kind!r} is not read (accepted: text, image, image_url, "
                            "video, video_url, reasoning, tool_call)", ckey,
                            "audio and files are not supported; drop the part"))
            return None
        media = "image" if table is _IMAGE_PARTS else "video"
        src = next((part[k] for k in table[kind] if k in part), None)
        inline["unapplied"].update(k for k in UNAPPLIED_PART_KEYS if part.get(k) is not None)
        fps_key = next((k for k in FPS_KEYS if part.get(k) is not None), None) if media == "video" else None
        if fps_key is not None:  # qwen-vl-utils: the video part's own frame rate (read as the record's key)
            inline["fps"].append((fps_key, part[fps_key]))
        src = _url(src, media)
        if src is None:
            inline["bare_" + media] += 1
        else:
            if type(src) is str and src[:5] == "data:":  # base64 bytes in the record: decoded in memory
                why = data_url_bytes(src, media)[1]
                if why is not None:
                    out.append(_err("data_url", f"an inline data: URL {media} {why}: {shown(src)}", ckey,
                                    f"re-encode the {media} as base64 (data:{media}/...;base64,...) or give a file "
                                    "path", "media_unreadable"))
                    return None
            if media == "video" and type(src) is list:
                src = tuple(src)
            inline[media].append(src)
        text.append("<image>" if media == "image" else "<video>")
    return "".join(text)


def _turn_part(kind: str, part: dict, ckey: str, out: list, inline: dict) -> bool:
    """A LLaMA-Factory v1 ``reasoning`` / ``tool_call`` part (``value``: the reasoning text / a JSON call) into
    ``inline["reasoning"|"calls"]`` (the current message's); False after an error."""
    value = part.get("value", part.get("text"))
    if type(value) is not str:
        out.append(_err("bad_part", f"a {kind} part's 'value' must be a string, found {kind_of(value)}", ckey, None))
        return False
    if kind == "reasoning":
        inline["reasoning"].append(value)
        return True
    try:
        inline["calls"].append(json.loads(value))
    except ValueError:
        out.append(_err("bad_tool_call", f"a tool_call part's 'value' is not JSON: {value[:60]!r}", ckey,
                        'write {"type": "tool_call", "value": "{\\"name\\": \\"f\\", \\"arguments\\": {...}}"}'))
        return False
    return True


def _media_list(value: Any, video: bool) -> Any:
    """An ``images``/``videos`` value as the internal ``image``/``video`` value: frame lists become tuples, and an
    item that is a ``{"path"}`` / ``{"bytes", "path"}`` object (a Hugging Face ``Image(decode=False)`` column
    written to JSON, as ms-swift reads it) or bare base64 image bytes is read by :func:`_url`."""
    media = "video" if video else "image"
    if type(value) is list:
        return [tuple(v) if type(v) is list and video else _item(v, media) for v in value]
    return _item(value, media)


def _item(v: Any, media: str) -> Any:
    if type(v) is dict:  # an object that names no media stays itself: refused as an entry that is not a path
        return _url(v, media) if v.get("bytes") or "path" in v or "url" in v else v
    if type(v) is str and len(v) > BARE_BASE64_MIN and v[:5] != "data:":
        return _url(v, media)
    return v


def normalise(rec: Any, fmt: FormatSpec | None) -> tuple[Any, Extras, list]:
    """``(internal record, extras, problems)`` of one record read as ``fmt`` (None / official: unchanged).

    The problems are the format's own (speakers, parts, ``loss``, system prompts); the internal record then
    goes through :func:`qwenvl.data.sample_rules.record_problems` (tags vs media, paths, answers)."""
    if fmt is None or fmt.name in (None, "official") or type(rec) is not dict:
        if fmt is not None and fmt.train_on == "last" and type(rec) is dict:
            return rec, _last_only(rec.get("conversations"), Extras()), []
        return rec, _PLAIN, []
    if fmt.name == "prompt_completion":
        return _prompt_completion(rec, fmt)
    if fmt.name == "internvl":
        return _internvl(rec, fmt)
    f = fmt.keys()
    out: list = []
    msgs = _message_list(rec, f, out)
    sys_prompt = rec.get(f.system_key) if f.system_key else None
    if msgs is not None and sys_prompt is not None and type(sys_prompt) is not str:
        out.append(_err("bad_system", f"'{f.system_key}' must be a string, found {kind_of(sys_prompt)}",
                        f.system_key, None))
        msgs = None
    if msgs is None:
        return None, _PLAIN, out
    extras = Extras()
    inline = {"image": [], "video": [], "bare_image": 0, "bare_video": 0, "reasoning": [], "calls": [],
              "fps": [], "unapplied": set()}
    turns = _read_turns(msgs, f, out, inline, extras, sys_prompt)
    if turns is None or not _sample_options(rec, extras, out, f.tools_key):
        return None, _PLAIN, out
    if not turns:
        out.append(_err("no_answer", "no assistant turn to train on (only a system prompt)", f.messages_key, None,
                        "no_answer"))
        return None, _PLAIN, out
    internal: dict = {"conversations": turns}
    if "objects" in rec:  # grounding (qwenvl.data.grounding): the same field in every format
        internal["objects"] = rec["objects"]
    for key in FPS_KEYS:  # the frame rate of videos given as frame images (qwenvl.data.sample.frame_fps)
        if key in rec:
            internal[key] = rec[key]
    if not _part_fps(inline, internal, out, f.messages_key):
        return None, _PLAIN, out
    if not _media_fields(rec, f, inline, internal, out):
        return None, _PLAIN, out
    if fmt.name == "messages" and not inline["image"] and not inline["video"]:
        _default_tags(internal, inline.get("first_user"), extras.system)
    if fmt.train_on == "last":
        _last_only(turns, extras)
    answers = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
    if answers and extras.untrained.issuperset(answers):
        key = next((k for k in _WEIGHT_KEYS if any(type(m) is dict and k in m and "loss" not in m for m in msgs)),
                   "loss")
        out.append(_err("all_masked", f"every assistant turn has '{key}': {'0' if key != 'loss' else 'false'}: "
                        "nothing to train on", key, f"set '{key}': {'1' if key != 'loss' else 'true'} (or drop the "
                        "key) on at least one answer", "no_answer"))
        return None, _PLAIN, out
    return internal, extras, out


def _part_fps(inline: dict, internal: dict, out: list, ckey: str) -> bool:
    """qwen-vl-utils' per-part keys: a video part's ``fps`` / ``sample_fps`` is the sample's frame rate of videos
    given as frame images (in place of a record-level one); the keys vlsft does not apply are one warning (shown
    once per dataset by ``datasets check --deep``). False after an error (two parts at different rates)."""
    rates = {json.dumps(v) for _k, v in inline["fps"]}
    if len(rates) > 1:
        out.append(_err("bad_fps", f"the video parts give different frame rates ({', '.join(sorted(rates))}): vlsft "
                        "reads one rate per sample", ckey, "give each video in a sample of its own, or one 'fps'",
                        "bad_media_field"))
        return False
    if inline["fps"]:
        for key in FPS_KEYS:
            internal.pop(key, None)
        key, value = inline["fps"][0]
        internal[key] = value
    if inline["unapplied"]:
        keys = ", ".join(f"'{k}'" for k in UNAPPLIED_PART_KEYS if k in inline["unapplied"])
        out.append(("warning", "part_keys_not_applied", "part_keys_not_applied", f"qwen-vl-utils' per-part key(s) "
                    f"{keys} on an image/video part are not applied: the run's max_pixels / min_pixels and video "
                    "settings are used" + ("; the whole video is read" if inline["unapplied"] & {"video_start",
                                                                                            "video_end"} else ""),
                    ckey, "resize or trim the media beforehand, or set the run's limits (a video part's 'fps' "
                    "is read)"))
    return True


def _internvl(rec: dict, fmt: FormatSpec) -> tuple[Any, Extras, list]:
    """An InternVL record read as InternVL's ``preprocess`` functions read it: :func:`internvl_record`'s implicit
    tags, and a first turn ``from: system`` (a string) that is the sample's system prompt in place of the default
    one (not a second system turn, as in the official format)."""
    out = internvl_record(rec)
    conv = out.get("conversations")
    first = conv[0] if type(conv) is list and conv and type(conv[0]) is dict else None
    fields = turn_fields(first) if first is not None else None
    system = None
    if fields is not None and fields[0] == "system" and type(fields[1]) is str:
        system, out["conversations"] = fields[1], conv[1:]
    internal, extras, problems = normalise(out, replace(fmt, name="official"))
    if system is not None:
        extras = replace(extras, system=system) if extras is not _PLAIN else Extras(system=system)
    return internal, extras, problems


def _default_tags(internal: dict, first_user: tuple[int, bool] | None, system: str | None) -> None:
    """ms-swift's ``_add_default_tags`` and TRL's ``prepare_multimodal_messages``: listed images (videos) of a record
    with no ``<image>`` (``<video>``) tag at all get one tag each put before the text of the first user turn, when
    its content is a string (``first_user``: its index and whether it was; with parts both tools leave it as it
    is). Tags go first, videos' before images' (ms-swift adds the image tags, then the video tags in front).
    A record with some tags but fewer than its media stays an error (which media goes where is not said)."""
    if first_user is None or not first_user[1]:
        return
    turns = internal["conversations"]
    text = "\n".join([system or "", *(t["content"] for t in turns if type(t.get("content")) is str)])
    for key, tag in (("image", "<image>"), ("video", "<video>")):
        media = internal.get(key)
        n = len(media) if type(media) is list else 1 if type(media) is str else 0
        if n and tag not in text:
            turn = turns[first_user[0]]
            turns[first_user[0]] = {**turn, "content": tag * n + turn["content"]}


def internvl_record(rec: dict) -> dict:
    """InternVL's record as the official format reads it (a new dict; ``rec`` is left as it is): a single image
    (a path string) or video whose tag is missing from the first turn (a system turn aside) gets ``<image>\n`` /
    ``<video>\n`` put before that turn's text, as InternVL's trainer does; an empty ``image`` / ``video`` (``""``, ``[]``, null) is
    none (InternVL reads such a record as text-only). A tag elsewhere does not count: InternVL looks at the first
    turn only, so the record then holds one tag too many, an error here as it is a skipped sample there."""
    out = {k: v for k, v in rec.items() if not (k in ("image", "video") and v in ("", [], None))}
    conv = out.get("conversations")
    if type(conv) is not list:
        return out
    first = next((i for i, t in enumerate(conv) if type(t) is dict and t.get("from", t.get("role")) != "system"),
                 None)
    for key, tag in (("image", "<image>"), ("video", "<video>")):
        turn = conv[first] if first is not None and type(out.get(key)) is str else None
        text_key = "value" if turn is not None and "value" in turn else "content"
        if turn is not None and type(turn.get(text_key)) is str and tag not in turn[text_key]:
            conv = [*conv[:first], {**turn, text_key: f"{tag}\n{turn[text_key]}"}, *conv[first + 1:]]
    out["conversations"] = conv
    return out


def _prompt_completion(rec: dict, fmt: FormatSpec) -> tuple[Any, Extras, list]:
    """A TRL prompt-completion record (conversational: ``prompt`` and ``completion`` lists of messages, media in
    ``images``) read as the messages of prompt + completion; as TRL's SFT trains the completion only, answers inside
    the prompt are not trained. The standard (plain-text) form is language modelling without a chat template,
    which vlsft does not train: one line."""
    prompt, completion = rec.get("prompt"), rec.get("completion")
    hint = ('write "prompt": [{"role": "user", "content": "..."}], "completion": [{"role": "assistant", '
            '"content": "..."}] (TRL\'s conversational form)')
    if type(prompt) is str and type(completion) is str:
        return None, _PLAIN, [_err("plain_prompt", "a plain-text prompt/completion is trained without a chat "
                                   "template, which vlsft does not do", "prompt", hint)]
    for key, value in (("prompt", prompt), ("completion", completion)):
        if type(value) is not list or not value:
            return None, _PLAIN, [_err("bad_conversations", f"'{key}' must be a non-empty list of messages, found "
                                       f"{'an empty list' if value == [] else kind_of(value)}", key, hint)]
    if "image" in rec and fmt.images_key == "images":  # TRL's collators: a singular 'image' column is [image]
        if rec.get("images") is not None:
            return None, _PLAIN, [_err("mixed_media", "the record has both 'image' and 'images'", "image",
                                       "name the images in one of them", "bad_media_field")]
        image = rec["image"]
        if type(image) is list:
            return None, _PLAIN, [_err("bad_media", "'image' holds one image (TRL reads it as [image]), found a list",
                                       "image", "name several images in 'images'", "bad_media_field")]
        rec = {k: v for k, v in rec.items() if k != "image"}
        if image is not None:
            rec["images"] = [image]
    internal, extras, out = normalise({**rec, "prompt": prompt + completion},
                                      replace(fmt, name="messages", messages_key="prompt"))
    if internal is None:
        return internal, extras, out
    turns = internal["conversations"]
    first = len(turns) - len(completion)  # the completion's turns are the last ones
    if not any(t["role"] == "assistant" for t in turns[first:]):
        return None, _PLAIN, out + [_err("no_answer", "the completion holds no assistant message to train on",
                                         "completion", hint, "no_answer")]
    extras.untrained.update(i for i in range(first) if turns[i]["role"] == "assistant")
    return internal, extras, out


def _message_list(rec: dict, f, out: list) -> list | None:
    """The record's non-empty list of messages, or None after an error."""
    mkey, rkey, ckey = f.messages_key, f.role_key, f.content_key
    msgs = rec.get(mkey)
    if type(msgs) is list and msgs:
        return msgs
    if msgs is None:
        other = next((k for k in ("messages", "conversations", "conversation", "dialog") if k in rec and k != mkey),
                     None)
        out.append(_err("no_conversations", f"sample has no '{mkey}'", mkey,
                        f"rename '{other}' to '{mkey}'" if other else
                        f'add "{mkey}": [{{"{rkey}": "{f.user_tags[0]}", "{ckey}": ...}}, ...]'))
    else:
        out.append(_err("bad_conversations", f"'{mkey}' must be a non-empty list of turns", mkey, None))
    return None


def _read_turns(msgs: list, f, out: list, inline: dict, extras: Extras, sys_prompt) -> list | None:
    """The internal turns of the messages (a leading system turn becomes ``extras.system``), or None after an
    error."""
    turns: list = []
    for i, m in enumerate(msgs):
        read = _read_message(m, f, out, inline)
        if read is None:
            return None
        role, content, loss = read
        if role == "system" and not turns and i == 0:
            if sys_prompt is not None and sys_prompt != content:
                out.append(_err("two_systems", f"the sample has a top-level '{f.system_key}' and a different system "
                                "turn", f.system_key, "keep one system prompt"))
                return None
            sys_prompt = content
            continue
        ckey, rkey = f.content_key, f.role_key
        if (inline["reasoning"] or inline["calls"]) and role != "assistant":
            out.append(_err("bad_part", f"a {role} turn holds a reasoning / tool_call part: only answers have them",
                            ckey, "move the part into the assistant turn"))
            return None
        call_role = m.get(rkey) in CALL_ROLES or m.get(rkey) in f.call_tags
        turn = _internal_turn(m, role, content, out, inline["calls"] or (m.get(ckey) if call_role else None))
        if turn is None:
            return None
        prev = turns[-1] if turns else None
        if (call_role and prev is not None and prev["role"] == "assistant" and "reasoning_content" not in turn
                and not inline["reasoning"] and (loss is False) == (len(turns) - 1 in extras.untrained)):
            # ms-swift: an answer's text then its tool_call messages (or several calls in a row) are ONE answer
            prev["tool_calls"] = prev.get("tool_calls", []) + turn.get("tool_calls", [])
            continue
        if role == "user" and "first_user" not in inline:  # (for _default_tags)
            inline["first_user"] = (len(turns), type(m.get(ckey)) is str)
        if loss is False and role == "assistant":
            extras.untrained.add(len(turns))
        if inline["reasoning"] and "reasoning_content" not in turn:
            turn["reasoning_content"] = "\n".join(inline["reasoning"])
        turns.append(turn)
    extras.system = sys_prompt
    return turns


def _role_of(m: dict, f, out: list) -> tuple[str, Any] | None:
    """``(internal role, content)`` of a message, or None after an error."""
    rkey, ckey = f.role_key, f.content_key
    role, content = m.get(rkey), m.get(ckey)
    if content is None and role in f.assistant_tags and (m.get("tool_calls") or any(m.get(k) for k in REASONING_KEYS)):
        content = ""  # OpenAI: an answer that only calls tools has no content, or null
    elif role is None or ckey not in m:
        missing = rkey if role is None else ckey
        out.append(_err("no_speaker" if role is None else "no_value", f"a turn has no '{missing}'", missing,
                        f"turns of this dataset are {{\"{rkey}\": ..., \"{ckey}\": ...}}"))
        return None
    if role in f.user_tags:
        return "user", content
    if role in f.assistant_tags:
        return "assistant", content
    if role in f.system_tags:
        return "system", content
    if role in TOOL_ROLES or role in f.tool_tags:  # a tool result
        return "tool", content
    if role in CALL_ROLES or role in f.call_tags:  # a call given as the message's content (_internal_turn)
        return "assistant", ""
    allowed = ", ".join(repr(t) for t in dict.fromkeys((*f.user_tags, *f.assistant_tags, *f.system_tags, *TOOL_ROLES,
                                                        *f.tool_tags, *CALL_ROLES, *f.call_tags)))
    what = "function turns are read as 'tool' results and 'function_call' calls" if role in (
        "function", "ipython") else ""
    out.append(_err("bad_speaker", f"unknown {rkey} {role!r}" + (f" ({what})" if what else ""), rkey,
                    f"use {allowed}"))
    return None


def _read_message(m: Any, f, out: list, inline: dict) -> tuple[str, str, Any] | None:
    """``(role, text, loss)`` of one message (list content flattened into text + inline media), or None."""
    mkey, rkey, ckey = f.messages_key, f.role_key, f.content_key
    if type(m) is not dict:
        out.append(_err("bad_turn", f"a turn is {kind_of(m)}, not an object", mkey,
                        f'write {{"{rkey}": "{f.user_tags[0]}", "{ckey}": "..."}}'))
        return None
    inline["reasoning"], inline["calls"] = [], []  # this message's reasoning / tool_call parts (LLaMA-Factory v1)
    got = _role_of(m, f, out)
    if got is None:
        return None
    role, content = got
    if type(content) is list:
        content = _parts(content, ckey, out, inline)
        if content is None:
            return None
        if role != "user" and ("<image>" in content or "<video>" in content) and any(
                type(p) is dict and p.get("type") in ("image", "image_url", "video", "video_url") for p in m[ckey]):
            out.append(_err("media_not_user", f"an {role} turn holds an image/video part: only user turns take "
                            "media", ckey, "move the media into the user turn before it"))
            return None
    elif type(content) is not str:
        out.append(_err("value_type", f"'{ckey}' must be a string or a list of parts, found {kind_of(content)}",
                        ckey, None))
        return None
    loss = _loss_of(m, role, out)
    return None if loss is _BAD else (role, content, loss)


_BAD = object()


_WEIGHT_KEYS = ("loss_weight", "weight")  # LLaMA-Factory v1's and OpenAI fine-tuning's: 0 masked, 1 trained


def _loss_of(m: dict, role: str, out: list) -> Any:
    """A message's ``loss`` (ms-swift: true / false), LLaMA-Factory v1's ``loss_weight`` or OpenAI fine-tuning's
    ``weight`` (0: not trained, 1: trained) as True / False / None (not said); ``_BAD`` after an error."""
    key = "loss" if "loss" in m else next((k for k in _WEIGHT_KEYS if k in m), "loss")
    loss = m.get(key)
    if key != "loss" and loss is not None:
        if type(loss) not in (int, float) or loss not in (0, 1):
            out.append(_err("bad_loss", f"'{key}' must be 0 (not trained) or 1 (trained), found "
                            f"{kind_of(loss)} {loss!r}", key, "a turn is trained or masked, weighted losses are not "
                            "read: write 0 or 1"))
            return _BAD
        loss = loss == 1
    if loss is not None and type(loss) is not bool:
        out.append(_err("bad_loss", f"'loss' must be true, false or null, found {kind_of(loss)} {loss!r}",
                        "loss", "write true to train the turn, false to mask it"))
        return _BAD
    if loss is True and role != "assistant":
        out.append(("warning", "loss_not_assistant", "loss_not_assistant", f"'{key}': {json.dumps(m[key])} on a {role} turn "
                    "is ignored: only assistant turns are trained", key, None))
    return loss


def _media_fields(rec: dict, f, inline: dict, internal: dict, out: list) -> bool:
    """The record's images / videos into ``internal``: inline parts or the format's media keys (never both)."""
    for media, key in (("image", f.images_key), ("video", f.videos_key)):
        listed = rec.get(key)
        if listed == []:  # a text-only row of a List(Image) column (HF datasets, LLaMA-Factory): no media
            listed = None
        if inline[media]:
            if listed is not None or inline["bare_" + media]:
                out.append(_err("mixed_media", f"{media}s are given both inline in the parts and in '{key}'", key,
                                f"name each {media} in one place", "bad_media_field"))
                return False
            internal[media] = inline[media]
        elif listed is not None:
            internal[media] = _media_list(listed, media == "video")
    return True


def _internal_turn(m: dict, role: str, content: str, out: list, call: Any = None) -> dict | None:
    """The internal turn of a message: role and text, and an assistant's reasoning (``REASONING_KEYS``) and
    ``tool_calls`` (``call``: the content of a LLaMA-Factory ``function_call`` message, a JSON call or list of
    calls); None after an error."""
    turn: dict = {"role": role, "content": content}
    if role != "assistant":
        return turn
    key = next((k for k in REASONING_KEYS if m.get(k) is not None), None)
    if key is not None:
        if type(m[key]) is not str:
            out.append(_err("bad_reasoning", f"'{key}' must be a string, found {kind_of(m[key])}", key,
                            "write the reasoning as one string (or put it in the text as <think>...</think>)"))
            return None
        turn["reasoning_content"] = m[key]
    if call is not None:
        try:
            call = json.loads(call) if type(call) is str else call
        except ValueError:
            pass
    raw = m.get("tool_calls") if call is None else (call if type(call) is list else [call])
    if raw is not None:
        calls = parse_tool_calls(raw, out)
        if calls is None:
            return None
        if calls:
            turn["tool_calls"] = calls
    return turn


def parse_tool_calls(value: Any, out: list) -> list | None:
    """OpenAI-style ``tool_calls`` as ``[{"name": ..., "arguments": {...}}]`` (JSON-string arguments parsed, as
    vLLM does before the chat template runs); None after an error."""
    hint = 'write [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]'
    if type(value) is not list:
        out.append(_err("bad_tool_call", f"'tool_calls' must be a list, found {kind_of(value)}", "tool_calls", hint))
        return None
    calls = []
    for call in value:
        call = call.get("function", call) if type(call) is dict else call
        args = call.get("arguments") if type(call) is dict else None
        if type(args) is str:
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                pass  # not JSON: refused below
        if type(call) is not dict or type(call.get("name")) is not str or type(args) not in (dict, type(None)):
            out.append(_err("bad_tool_call", "a tool call needs a string 'name' and JSON-object 'arguments', found "
                            f"{json.dumps(call, ensure_ascii=False)[:80]}", "tool_calls", hint))
            return None
        calls.append({"name": call["name"]} if args is None else {"name": call["name"], "arguments": args})
    return calls


def _sample_options(rec: dict, extras: Extras, out: list, tools_key: str = "tools") -> bool:
    """A record's own chat template arguments (``chat_template_kwargs``, as ms-swift reads them; a top-level
    ``reasoning_effort``) and tool definitions (``tools``, or the column ``tools_key`` names: a list of JSON
    objects, or a JSON string of one as LLaMA-Factory writes it); False after an error."""
    kwargs = rec.get("chat_template_kwargs")
    kwargs = dict(kwargs) if type(kwargs) is dict else {} if kwargs is None else kwargs
    if rec.get("reasoning_effort") is not None and type(kwargs) is dict:
        kwargs.setdefault("reasoning_effort", rec["reasoning_effort"])
    if type(kwargs) is not dict:
        out.append(_err("bad_template_kwargs", f"'chat_template_kwargs' must be an object, found {kind_of(kwargs)}",
                        "chat_template_kwargs", 'write {"reasoning_effort": "low"}'))
        return False
    for key, value in kwargs.items():
        allowed = TEMPLATE_KWARGS.get(key)
        if allowed is None:
            out.append(("warning", "template_kwarg_unread", "template_kwarg_unread", f"chat_template_kwargs '{key}' "
                        "is not read by vlsft", "chat_template_kwargs", f"read: {', '.join(TEMPLATE_KWARGS)}"))
        elif value not in allowed or type(value) is not type(allowed[0]):
            out.append(_err("bad_template_kwargs", f"{key} must be one of {', '.join(map(str, allowed))}, found "
                            f"{value!r}", key, None))
            return False
        else:
            extras.template_kwargs[key] = value
    tools = rec.get(tools_key)
    if type(tools) is str:
        try:
            tools = json.loads(tools) if tools.strip() else None
        except ValueError:
            pass
    if tools is not None and (type(tools) is not list or not all(type(t) is dict for t in tools)):
        out.append(_err("bad_tools", f"'{tools_key}' must be a list of tool definitions, found {kind_of(tools)}",
                        tools_key,
                        'write [{"type": "function", "function": {"name": ..., "parameters": {...}}}]'))
        return False
    extras.tools = tools or None
    return True


def sample_problems(rec: Any, fmt: FormatSpec | None) -> tuple[Any, Extras, list]:
    """``(internal record, extras, problems)``: the format's problems, then the sample rule's
    (:func:`qwenvl.data.sample_rules.record_problems`) on the internal record, named with the dataset's keys.
    The ONE verdict of the trainer's builder and of ``datasets check --deep``."""
    internal, extras, problems = normalise(rec, fmt)
    if internal is None and problems:
        return None, extras, problems
    rule = record_problems(internal)
    if fmt is None or fmt.name in OFFICIAL_SHAPED:
        return internal, extras, (problems + rule) if problems else rule
    return internal, extras, problems + remap(rule, fmt)


def _last_only(conv: Any, extras: Extras) -> Extras:
    """``train_on: last``: every assistant turn but the last is masked."""
    if type(conv) is not list:
        return extras
    last = -1
    for i, t in enumerate(conv):
        if type(t) is dict and (t.get("role") == "assistant" or t.get("from") == "gpt"):
            last = i
    for i, t in enumerate(conv):
        if i != last and type(t) is dict and (t.get("role") == "assistant" or t.get("from") == "gpt"):
            extras.untrained.add(i)
    return extras


def remap(problems: list, fmt: FormatSpec | None) -> list:
    """Problems of an internal record named with the dataset's own keys (``images`` for ``image``, ...)."""
    if fmt is None or fmt.name in OFFICIAL_SHAPED or not problems:
        return problems
    f = fmt.keys()
    names = {"conversations": f.messages_key, "image": f.images_key, "video": f.videos_key,
             "content": f.content_key, "value": f.content_key}
    return [(s, k, c, _own_words(m, names), names.get(key, key), _own_words(h, names))
            for s, k, c, m, key, h in problems]


def _own_words(text: str | None, names: dict) -> str | None:
    """A rule's message or hint with the quoted internal keys (``'image'``) in the dataset's words."""
    if not text or "'" not in text:
        return text
    for ours, theirs in names.items():
        if ours != theirs:
            text = text.replace(f"'{ours}'", f"'{theirs}'")
    return text


def settle(declared: FormatSpec | None, records) -> FormatSpec:
    """The dataset's FormatSpec with its name settled: declared, else detected from ``(locator, record)`` pairs
    (an unknown shape reads as official: its samples are then bad samples with the official reasons)."""
    spec = declared or FormatSpec()
    if spec.name is None:
        spec = spec.with_name(detect(records).name or "official")
    return spec


def store_head(store, n: int = DETECT_RECORDS) -> list[tuple[int, Any]]:
    """``(index, record)`` of the first ``n`` records of an :class:`~qwenvl.data.store.AnnotationStore`."""
    out = []
    for i in range(min(n, len(store))):
        try:
            out.append((i, store[i]))
        except ValueError:  # a broken line: a bad sample of its own
            pass
    return out


def to_official(rec: Any, fmt: FormatSpec | None) -> tuple[dict | None, str | None, str]:
    """``(official record, its system prompt, why not)`` for ``vlsft datasets convert``: the record the official
    format reads into the same tokens (its system prompt goes to the dictionary entry); None with the reason
    when the record is a bad sample or says what the official format cannot (``loss: false``, frame lists)."""
    internal, extras, problems = sample_problems(rec, fmt)
    bad = next((p for p in problems if p[0] == "error"), None)
    if bad is not None:
        return None, None, f"bad sample: {bad[3]}"
    if fmt is None or fmt.name in OFFICIAL_SHAPED:  # InternVL's implicit tags are written out, its system turn
        return internal, extras.system, ""  # becomes the dataset's (or the sample's) system prompt
    if extras.untrained and fmt.train_on != "last":
        return None, None, "a turn is masked ('loss': false, or a weight of 0), which the official format cannot say"
    video = internal.get("video")
    if type(video) is list and any(type(v) is tuple for v in video):
        return None, None, "a video given as frame images, which the official format cannot say"
    if extras.tools or extras.template_kwargs or any("reasoning_content" in t or "tool_calls" in t
                                                     for t in internal["conversations"]):
        return None, None, "reasoning fields, tools or chat_template_kwargs, which the official format cannot say"
    conv = []
    for i, t in enumerate(internal["conversations"]):
        if i == 0 and t["role"] == "assistant":  # kept and trained as here (a first 'from: gpt' would be dropped)
            conv.append({"role": "assistant", "content": t["content"]})
        else:
            conv.append({"from": {"user": "human", "assistant": "gpt"}.get(t["role"], t["role"]), "value": t["content"]})
    out: dict = {}
    for key in ("image", "video"):
        if internal.get(key) is not None:
            out[key] = internal[key]
    out["conversations"] = conv
    if internal.get("objects") is not None:  # grounding: kept (the dictionary entry keeps its bbox_format)
        out["objects"] = internal["objects"]
    return out, extras.system, ""
