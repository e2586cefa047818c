"""One annotation record -> one model-ready sample (tokens, labels, 3-D positions, pixels).

``SampleBuilder.build(record, data_path)`` is the exact code path of the trainer's dataset and of
``vlsft datasets preview``. It raises :class:`~qwenvl.data.preprocess.BadSample` (or
:class:`~qwenvl.data.vision.MediaError`) with a one-line reason for a sample that cannot be used.

Returned dict (torch tensors, unbatched)::

    input_ids (L,) int64, labels (L,) int64 (-100 = not trained), position_ids (3, L) int64,
    pixel_values (P, 1176) float32 + image_grid_thw (n_img, 3) int64          [only with images]
    pixel_values_videos (Q, 1176) float32 + video_grid_thw (n_vid, 3) int64
    + second_per_grid_ts (n_vid,) float32                                         [only with videos]

plus ``frame_idx`` (list of lists, per video; diagnostics only).

Media, decided (tested in ``tests/test_preprocess.py``; official = the Qwen2.5-era trainer):

* Paths: absolute paths and URLs win over ``data_path``; spaces/unicode are fine; a *relative* path
  with no ``data_path`` is a bad sample (it would otherwise be looked up in the trainer's cwd;
  the official code raises ``TypeError`` and silently uses the next sample).
* Images: as official, PIL ``.convert("RGB")`` for every mode (CMYK, ``I;16``, LA, P with
  transparency: alpha dropped, not composited), EXIF orientation ignored, first frame of an animated
  GIF; images below ``min_pixels`` are upscaled (a 1x1 image becomes 28x28). Aspect ratio > 200, a
  truncated/corrupt file or a non-image are bad samples (:class:`~qwenvl.data.vision.MediaError`);
  so are images above PIL's decompression-bomb limit (~179 MP). A huge image is decoded in full
  before the resize (an 8000x8000 JPEG takes ~2 s): draft decoding would change the pixels.
* Videos given as frame images (a list, or a folder of them: :func:`qwenvl.data.vision.read_video`) are taken at
  the record's ``sample_fps`` / ``fps``, else the dataset's ``frame_fps``, else 2 per second (:func:`frame_fps`).
* Videos: decord, then PyAV (only the sampled frames are converted to RGB), then torchcodec; one-frame
  and odd-frame-count videos repeat the last frame up to the temporal patch; long videos are clamped
  to ``video_max_frames``; odd frame sizes are resized like images; a corrupt file is a bad sample.
* Qwen2-VL (``model_type="qwen2_vl"``): same tokens and pixels; the video temporal position is the
  patch index (no time scaling) and ``second_per_grid_ts`` is not passed to the model (see
  :mod:`qwenvl.data.rope` for the one place where we differ from transformers 5.24's rope index).
* Qwen3.5 / 3.6 / 3.8 (model_type qwen3_5, qwen3_5_moe): the media as for Qwen3-VL below; the chat as the model's
  published chat template renders it (:mod:`qwenvl.data.chat_qwen35`: thinking, tools; which template is
  :func:`resolve_rendering`'s answer), checked against ``apply_chat_template`` in tests/test_golden_chat_templates.py.
* Qwen3-VL, Qwen3-VL MoE (the "HEAD" families): as the official trainer's HEAD builds them (checked
  against ``tests/golden/official-qwen3vl-head``): chat layout of :mod:`qwenvl.data.chat_head` (no system prompt,
  text around tags stripped, a timestamp before each temporal patch of a video), images with their EXIF
  orientation applied and resized by the torchvision processor, videos sampled at ``video_fps`` with
  ``video_min_pixels``/``video_max_pixels`` bounding all frames together (:func:`resolve_video_budget`), one
  position block per temporal patch (:mod:`qwenvl.data.rope`). No ``second_per_grid_ts`` (the model ignores it).
  A video with one frame or a side below 32 pixels is a bad sample, as HEAD refuses it.

Where HEAD differs for Qwen2.5-VL, the Qwen2.5-era behaviour stays (``tests/golden/official-qwen25`` pins it):
HEAD uses *every* frame of a video for Qwen2.5-VL (its processor does not sample), sets ``second_per_grid_ts`` to
``2 / video_fps`` whatever the file's frame rate, strips text around tags, keeps and trains a first gpt turn, and
fails on two videos; we sample ``video_max_frames`` at most, time patches by the sampled rate, keep text byte for
byte and take several videos.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import numpy as np

from qwenvl import storage, templates
from qwenvl.data import formats, grounding, sample_rules, vision
from qwenvl.data.chat_head import HeadChatEncoder
from qwenvl.data.chat_qwen35 import ChatOptions, TemplateChatEncoder
from qwenvl.data.preprocess import BadSample, ChatEncoder, Turn, problem_error
from qwenvl.data.rope import RopeIndex
from qwenvl.families import Family, family
from qwenvl.problems import UserError

#: HEAD's DataArguments defaults for the video arguments it adds
HEAD_VIDEO_DEFAULTS = {"video_fps": 2.0, "video_max_pixels": 1024 * 28 * 28, "video_min_pixels": 256 * 28 * 28}


def _budget_class():
    """VisionBudget: the ``budget`` fields of :class:`qwenvl.arguments.DataArguments` (names, types and
    defaults come from there, so the trainer, the run YAML and this class cannot disagree)."""
    from dataclasses import fields, make_dataclass

    from qwenvl.arguments import DataArguments, budget_fields

    names = budget_fields()
    spec = [(f.name, f.type, field(default=f.default)) for f in fields(DataArguments) if f.name in names]

    def from_args(cls, args):
        return cls(**{k: getattr(args, k) for k in names})

    cls = make_dataclass("VisionBudget", spec, namespace={"from_args": classmethod(from_args),
                         "__doc__": "The official DataArguments that shape pixels (names as in the official "
                         "trainer).", "__module__": __name__})
    return cls


VisionBudget = _budget_class()


@dataclass(frozen=True)
class VideoBudget:
    """The video limits one family uses, resolved from both spellings (:func:`resolve_video_budget`)."""

    head: bool  # HEAD sampling and T x H x W pixel bounds (Qwen3 families), else Qwen2.5-era per frame
    min_pixels: int  # HEAD: all frames together; Qwen2.5-era: per frame
    max_pixels: int
    video_fps: float
    base_interval: float
    video_min_frames: int
    video_max_frames: int

    def frame_picker(self, total: int, fps: float) -> list[int]:
        if self.head:
            return vision.head_frame_indices(total, fps, self.video_fps, self.video_min_frames, self.video_max_frames)
        return vision.sample_frame_indices(total, fps, self.base_interval, self.video_min_frames,
                                           self.video_max_frames)


def resolve_video_budget(budget, model_type: str | Family) -> VideoBudget:
    """One family's video limits from the Qwen2.5-era names and the official HEAD names.

    ============================  ===================================  ======================================
    HEAD name                     Qwen3 families (HEAD meaning)        Qwen2 / Qwen2.5-VL (Qwen2.5-era)
    ============================  ===================================  ======================================
    ``video_fps`` (unset: 2)      frames per second, HEAD's sampling   ``base_interval = 1 / video_fps``
    ``video_max_pixels``          T x H x W of all sampled frames       ``video_max_frame_pixels`` (per frame)
    (unset: 802816)                                                    (HEAD's Qwen2.5-VL processor: per frame)
    ``video_min_pixels``          T x H x W of all sampled frames       ``video_min_frame_pixels`` (per frame)
    (unset: 200704)
    ============================  ===================================  ======================================

    Both spellings given with different values is a :class:`~qwenvl.problems.UserError` (Qwen2/2.5-VL); for the
    Qwen3 families the Qwen2.5-era names are not used (``base_interval`` alone still sets ``video_fps``)."""
    from qwenvl.arguments import DataArguments, owner_field

    def default(name):
        return owner_field(DataArguments, name).default

    fps, vmax, vmin = (getattr(budget, k, None) for k in ("video_fps", "video_max_pixels", "video_min_pixels"))
    if fps is not None and not fps > 0:
        raise UserError(f"video_fps must be above 0, got {fps}: frames sampled per second (official default 2)")
    fam = family(model_type)
    if fam.head:
        if fps is None and budget.base_interval != default("base_interval"):
            fps = 1.0 / float(budget.base_interval)
        return VideoBudget(True, int(vmin if vmin is not None else HEAD_VIDEO_DEFAULTS["video_min_pixels"]),
                           int(vmax if vmax is not None else HEAD_VIDEO_DEFAULTS["video_max_pixels"]),
                           float(fps if fps is not None else HEAD_VIDEO_DEFAULTS["video_fps"]),
                           float(budget.base_interval), int(budget.video_min_frames), int(budget.video_max_frames))
    interval = float(budget.base_interval)
    pairs = (("video_fps", fps, "base_interval", interval, lambda v: 1.0 / float(v)),
             ("video_max_pixels", vmax, "video_max_frame_pixels", budget.video_max_frame_pixels, int),
             ("video_min_pixels", vmin, "video_min_frame_pixels", budget.video_min_frame_pixels, int))
    got = {}
    for head_name, head_val, old_name, old_val, conv in pairs:
        if head_val is None:
            got[old_name] = old_val
            continue
        mapped = conv(head_val)
        if old_val != default(old_name) and abs(float(old_val) - float(mapped)) > 1e-9 * abs(float(mapped)):
            raise UserError(f"{head_name} {head_val:g} and {old_name} {old_val:g} disagree: for {fam.title} "
                            f"{head_name} means {old_name} = {mapped:g}; set only one of them")
        got[old_name] = mapped
    return VideoBudget(False, int(got["video_min_frame_pixels"]), int(got["video_max_frame_pixels"]),
                       1.0 / got["base_interval"], got["base_interval"], int(budget.video_min_frames),
                       int(budget.video_max_frames))


def _as_list(value) -> list[str]:
    """The entries of a valid ``image``/``video`` value (a path or a list of paths; None: none)."""
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _media_path(data_path: str | None, rel: str, key: str) -> str:
    """``rel`` resolved against ``data_path``; a relative path with no ``data_path`` is a bad sample
    (it would otherwise be looked up in whatever folder the trainer was started from). An inline ``data:`` URL
    stays as it is: :func:`qwenvl.data.vision.open_image` decodes it in memory."""
    if rel[:5] == "data:":
        return rel
    if not data_path and not (storage.is_url(rel) or os.path.isabs(rel)):
        raise BadSample(f"{key} path {rel!r} is relative but the dataset has no data_path: set data_path in the "
                        "dataset dictionary, or use absolute paths / URLs", "no_data_path")
    return storage.join(data_path, rel)


FRAME_LIST_FPS = vision.FRAME_FPS  # a video given as frame images, unless said: 2 frames per second (qwen-vl-utils)


def frame_fps(record: dict, fmt: formats.FormatSpec | None) -> float:
    """Frames per second of the sample's videos given as frame images (a list or a folder): the record's
    ``sample_fps`` / ``fps``, else the dataset's ``frame_fps``, else FRAME_LIST_FPS (a video file keeps its own)."""
    for key in sample_rules.FPS_KEYS:
        value = record.get(key)
        if value is not None:
            return float(value)
    value = getattr(fmt, "frame_fps", None)
    return float(value) if value is not None else FRAME_LIST_FPS


def resolve_rendering(fam: Family, explicit: str | None, template_text: str | None) -> str:
    """The rendering of a model of family ``fam``: ``explicit`` (run YAML ``model.chat_template``) when the family
    can use it, else the one its tokenizer's template is (:func:`qwenvl.templates.rendering_of`), else the
    family's own."""
    try:
        return templates.resolve(fam.chat_template, explicit, template_text)[0]
    except ValueError as e:
        raise UserError(f"{fam.title}: {e}") from None


def chat_options(fmt: formats.FormatSpec | None, extras: formats.Extras) -> ChatOptions:
    """The sample's chat template arguments: the dataset's (``thinking_loss``, ``reasoning_effort``), then the
    record's own ``chat_template_kwargs``; a ``reasoning_effort`` of ``none`` is ``enable_thinking`` false."""
    kw = extras.template_kwargs
    effort = kw.get("reasoning_effort", fmt.reasoning_effort if fmt is not None else None)
    enable = kw.get("enable_thinking")
    if effort == "none":
        effort, enable = None, False
    return ChatOptions(thinking_loss=fmt.thinking_loss if fmt is not None else "train", reasoning_effort=effort,
                       enable_thinking=enable, preserve_thinking=kw.get("preserve_thinking"),
                       tools=tuple(extras.tools) if extras.tools else None)


def _turns(conv: list, extras: formats.Extras) -> list[Turn]:
    """The turns the trainer tokenizes, with each assistant turn's reasoning field and tool calls."""
    start = 1 if sample_rules.drops_first(conv) else 0
    out = []
    for i, (role, content, train) in enumerate(sample_rules.turn_triples(conv, extras.untrained), start):
        turn, problems = conv[i], []
        reasoning = next((turn[k] for k in formats.REASONING_KEYS if turn.get(k) is not None), None)
        if reasoning is not None and not isinstance(reasoning, str):
            raise BadSample(f"an assistant turn's reasoning is {sample_rules.kind_of(reasoning)}, not a string",
                            "bad_conversation")
        calls = turn.get("tool_calls")
        if calls is not None and (calls := formats.parse_tool_calls(calls, problems)) is None:
            raise problem_error(problems[0])
        out.append(Turn(role, content, train, reasoning, calls or None))
    return out


@dataclass
class SampleBuilder:
    tokenizer: object
    budget: VisionBudget = field(default_factory=VisionBudget)
    spec: vision.VisionSpec = field(default_factory=vision.VisionSpec)
    model_type: str = "qwen2_5_vl"  # config.json's spelling (qwenvl.families); a Family works too
    model_max_length: int | None = None
    rope: RopeIndex | None = None
    # the chat template samples are rendered as (qwenvl.templates.RENDERINGS): None = the tokenizer's own template
    # when it is one the family can use, else the family's (qwenvl.families.Family.chat_template)
    rendering: str | None = None

    def __post_init__(self):
        self.family = family(self.model_type)
        self.model_type = self.family.model_type
        self.head = self.family.head
        self.rendering = resolve_rendering(self.family, self.rendering, getattr(self.tokenizer, "chat_template", None))
        if templates.RENDERINGS[self.rendering].thinking:
            self.encoder = TemplateChatEncoder(self.tokenizer, self.rendering)
        else:
            self.encoder = HeadChatEncoder(self.tokenizer) if self.head else ChatEncoder(self.tokenizer)
        self.video_budget = resolve_video_budget(self.budget, self.family)
        if self.rope is None:
            self.rope = RopeIndex.for_family(self.family)
            self.rope.image_token_id = self.encoder.image_pad
            self.rope.video_token_id = self.encoder.video_pad
            self.rope.merge = self.spec.merge_size

    def _render_objects(self, objs: list, turns: list[Turn], pil: list, grids: list, fmt) -> list[Turn]:
        """Turns with ``<ref>``/``<bbox>``/``<point>``/``<objects>`` rendered in the family's convention
        (:mod:`qwenvl.data.grounding`): original size from the image, resized size from its grid."""
        p = self.spec.patch_size
        sizes = [(im.size, (int(g[2]) * p, int(g[1]) * p)) for im, g in zip(pil, grids, strict=True)]
        convention = self.family.grounding
        rendered = grounding.rendered_objects(objs, sizes, fmt.bbox_format if fmt is not None else "pixel",
                                              convention)
        texts = grounding.render_texts([t.content for t in turns], rendered, convention)
        return [replace(t, content=text) for t, text in zip(turns, texts, strict=True)]

    def _videos(self, videos: list, data_path: str | None, out: dict, fps: float = FRAME_LIST_FPS
                ) -> tuple[list[int], list]:
        """Decode and process the sample's videos into ``out`` (``fps``: the rate of those given as frame images);
        ``(pads per video, HEAD (timestamps, pads per temporal patch) per video)``."""
        import torch

        vb, m2, head = self.video_budget, self.spec.merge_size ** 2, self.head
        pvs, grids, spgs, fidx, head_videos = [], [], [], [], []
        for p in videos:
            if isinstance(p, tuple):  # a video given as its frame images (messages / sharegpt formats)
                dv = vision.frames_video([_media_path(data_path, f, "video frame") for f in p], vb.video_max_frames,
                                         fps)
            else:  # a video file, or a folder of frame images (LLaVA-Video, ShareGPTVideo, InternVL)
                dv = vision.read_video(_media_path(data_path, p, "video"), vb, fps)
            if head:
                pv, grid, stamps = vision.process_video_head(dv, self.spec, vb.min_pixels, vb.max_pixels)
                head_videos.append((stamps, int(grid[1] * grid[2]) // m2))
            else:
                pv, grid, spg = vision.process_video(dv, self.spec, vb.min_pixels, vb.max_pixels)
                spgs.append(spg)
            pvs.append(pv)
            grids.append(grid)
            fidx.append(dv.frame_idx)
        out["pixel_values_videos"] = torch.from_numpy(np.concatenate(pvs))
        out["video_grid_thw"] = torch.from_numpy(np.stack(grids))
        if not head:
            out["second_per_grid_ts"] = torch.tensor(spgs, dtype=torch.float64)
        else:
            out["video_timestamps"] = [s for s, _ in head_videos]
        out["frame_idx"] = fidx
        return [int(g.prod()) // m2 for g in grids], head_videos

    def _chat_tokens(self, turns: list[Turn], system: str | None, image_tokens: list[int], video_tokens: list[int],
                     head_videos: list, opts: ChatOptions) -> tuple[np.ndarray, np.ndarray]:
        """``input_ids`` and ``labels`` in the sample's rendering (module docstring; qwenvl.data.chat_qwen35)."""
        lead = [Turn("system", system)] if system is not None else []
        if isinstance(self.encoder, TemplateChatEncoder):
            return self.encoder.encode_template(lead + turns, image_tokens, head_videos, opts)
        if opts.tools or any(t.role == "tool" or t.tool_calls for t in turns):
            raise BadSample(f"tool definitions, calls or results: vlsft renders them for the Qwen3.5 / 3.6 / 3.8 chat "
                            f"templates only, not {templates.RENDERINGS[self.rendering].title}'s",
                            "bad_conversation")
        if self.head:
            return self.encoder.encode_head(lead + turns, image_tokens, head_videos)
        return self.encoder.encode(turns, image_tokens, video_tokens, system)

    def build(self, record: dict, data_path: str | None, fmt: formats.FormatSpec | None = None) -> dict:
        """``fmt``: the dataset's annotation format (:mod:`qwenvl.data.formats`; None = official)."""
        import torch

        # validity: the one rule the deep check applies too (qwenvl.data.formats + sample_rules)
        record, extras, problems = formats.sample_problems(record, fmt)
        bad = sample_rules.first_error(problems)
        if bad is not None:
            raise problem_error(bad)
        images = _as_list(record.get("image"))
        videos = _as_list(record.get("video"))
        turns = _turns(record["conversations"], extras)
        system = extras.system if extras.system is not None else (fmt.system if fmt is not None else None)
        b, m2, head = self.budget, self.spec.merge_size ** 2, self.head
        out: dict = {}
        image_tokens: list[int] = []
        if images:
            pil = [vision.open_image(_media_path(data_path, p, "image"), exif=self.family.exif) for p in images]
            pv, grid = vision.process_images(pil, self.spec, b.min_pixels, b.max_pixels,
                                             backend="torchvision" if head else "pil")
            out["pixel_values"] = torch.from_numpy(pv)
            out["image_grid_thw"] = torch.from_numpy(grid)
            image_tokens = [int(g.prod()) // m2 for g in grid]
        video_tokens, head_videos = self._videos(videos, data_path, out, frame_fps(record, fmt)) if videos else ([], [])
        if record.get("objects") and images:  # grounding: placeholders rendered with each image's own resize
            turns = self._render_objects(record["objects"], turns, pil, out["image_grid_thw"].tolist(), fmt)
        ids, labels = self._chat_tokens(turns, system, image_tokens, video_tokens, head_videos,
                                        chat_options(fmt, extras))
        if self.model_max_length is not None and len(ids) > self.model_max_length:
            fix = ("vision tokens are never cut; raise model_max_length or lower max_pixels" if images or videos
                   else "text is never cut; raise model_max_length or shorten the sample")
            raise BadSample(f"{len(ids)} tokens > model_max_length {self.model_max_length} (skipped whole: {fix})",
                            "too_long")
        out["input_ids"] = torch.from_numpy(ids)
        out["labels"] = torch.from_numpy(labels)
        out["position_ids"] = self.rope(out["input_ids"], out.get("image_grid_thw"), out.get("video_grid_thw"),
                                        out.get("second_per_grid_ts"))
        return out
