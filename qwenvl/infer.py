"""Shared inference for ``vlsft chat`` and ``vlsft predict``: load a trained model, build the prompt the way
Qwen's own inference examples do (``qwen_vl_utils.process_vision_info``) with the run's pixel limits, generate.

* :func:`load` takes a run's final folder, a ``checkpoint-N``, a merged export (all: ``config.json`` + weights,
  ``AutoModelForImageTextToText``) or a LoRA adapter folder / un-merged export (``adapter_config.json``: base +
  trained parts + adapter, :func:`qwenvl.export.load_adapter_export`). Anything else is a :class:`InferError`,
  and so is a folder without tokenizer files or with processor settings that cannot be read
  (:func:`check_folder`, before the weights load).
* Pixel limits: the saved processor's (``size.shortest_edge`` / ``longest_edge``: the run's ``min_pixels`` /
  ``max_pixels``, written by ``qwenvl.train``). They are passed to ``process_vision_info`` per image; a
  different budget asked for at inference is allowed but reported (:meth:`Inference.budget_warning`).
* :meth:`Inference.prompt_inputs` returns the processor's tensors for a conversation up to the assistant turn
  (``add_generation_prompt``): the same tokens and pixels the training pipeline builds for that prefix
  (tests/test_parity.py).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from qwenvl.problems import UserError
from qwenvl.runpolicy import ADAPTER_CONFIG, MODEL_FILES, TOKENIZER_FILES, list_checkpoints, processor_settings

logger = logging.getLogger(__name__)


class InferError(UserError):
    """A model folder or input that inference cannot use (one line)."""


def model_kind(path: str | os.PathLike) -> str:
    """``full`` (config.json + weights), ``adapter`` (adapter_config.json) or :class:`InferError`."""
    p = Path(path)
    if not p.is_dir():
        raise InferError(f"{p} is not a folder: give a run's output dir, a checkpoint-N folder or an export")
    if (p / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (p / "config.json").is_file() and any((p / w).is_file() for w in MODEL_FILES):
        return "full"
    cps = list_checkpoints(p)
    hint = f" (its newest checkpoint is {cps[-1][1]})" if cps else ""
    raise InferError(f"{p} is not a model folder: no config.json with weights and no adapter_config.json{hint}; "
                     "give a finished run's output dir, a checkpoint-N folder or a `vlsft export` folder")


def check_folder(folder: str | os.PathLike) -> str:
    """:func:`model_kind`, and the tokenizer and readable processor settings inference needs besides the weights:
    :class:`InferError` (one line) before any model is loaded."""
    kind = model_kind(folder)
    p = Path(folder)
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise InferError(f"{p} has no tokenizer ({' / '.join(TOKENIZER_FILES)}): copy them from the base model "
                         "folder (a run's output dir and its checkpoints hold them)")
    saved_pixel_limits(p)  # one line for a processor file that cannot be used
    return kind


def saved_pixel_limits(folder: str | os.PathLike) -> dict:
    """``{"min_pixels", "max_pixels"}`` of the processor saved with the model (empty when none is saved); a
    processor file that cannot be used (not JSON, not an object, a size that is not positive whole numbers) is an
    :class:`InferError` naming it."""
    try:
        found = processor_settings(folder)
    except ValueError as e:
        raise InferError(f"{e}: re-save the processor, or copy preprocessor_config.json from the base model "
                         "folder") from None
    for _name, data in found:
        size = data.get("size") or {}
        if size.get("longest_edge"):  # (processor_settings: both bounds are there, positive whole numbers)
            lo = size.get("shortest_edge") or data.get("min_pixels") or size.get("min_pixels")
            return {"min_pixels": int(lo), "max_pixels": int(size["longest_edge"])}
    return {}


def _vision_factor(folder: str | os.PathLike) -> int:
    """Pixels per side of one merged vision token (patch_size x merge_size: 28 for Qwen2/2.5-VL, 32 for Qwen3)."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = Path(folder) / name
        if f.is_file():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            data = data.get("image_processor") or data
            try:
                return int(data.get("patch_size") or 14) * int(data.get("merge_size") or 2)
            except (TypeError, ValueError):
                continue
    return 28


def pixel_limits_problem(folder: str | os.PathLike, min_pixels: int | None, max_pixels: int | None) -> str | None:
    """Why images cannot be resized between these limits (the asked ones, else the run's), or None. qwen-vl-utils
    would stop on an ``assert`` (min defaults to 4 merged tokens there when neither names one)."""
    run = saved_pixel_limits(folder) if (min_pixels is None or max_pixels is None) else {}
    lo = min_pixels if min_pixels is not None else run.get("min_pixels")
    hi = max_pixels if max_pixels is not None else run.get("max_pixels")
    if hi is None:
        return None
    lo_name = "--min-pixels" if min_pixels is not None else "the run's min_pixels"
    hi_name = "--max-pixels" if max_pixels is not None else "the run's max_pixels"
    if lo is None:
        lo, lo_name = 4 * _vision_factor(folder) ** 2, "the smallest image size (4 vision tokens)"
    if hi < lo:
        fix = "raise --max-pixels" + (" or lower --min-pixels" if min_pixels is not None or lo_name.startswith("the run")
                                      else "")
        return f"{hi_name} {hi} is below {lo_name} {lo}: images are resized to between the two; {fix}"
    return None


def video_problem(ref: str) -> str | None:
    """Why ``ref`` (a --video) cannot be read as a video (missing, not a media container, no video stream), checked
    with PyAV before any model is loaded; None for URLs and readable videos."""
    if "://" in ref:
        return None
    p = Path(ref).expanduser()
    if not p.is_file():
        return f"media file {ref} not found"
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(str(p)) as container:
            fmt = container.format.name or ""
            if fmt.endswith("_pipe") or fmt == "image2":  # FFmpeg's still-image demuxers
                return f"{ref} is an image ({fmt.removesuffix('_pipe')}), not a video: use --image for it"
            if not container.streams.video:
                return f"{ref} is not a video: it holds no video stream; give a video file (e.g. .mp4, .webm)"
    except (av.error.FFmpegError, OSError, ValueError) as e:
        why = str(e).split(":")[0].split("] ")[-1].strip() if str(e) else type(e).__name__
        return f"{ref} is not a video ({why}); give a video file (e.g. .mp4, .webm) or use --image for an image"
    return None


def check_inputs(folder: str | os.PathLike, *, min_pixels: int | None = None, max_pixels: int | None = None,
                 videos: list[str] = ()) -> None:
    """:class:`InferError` (one line) for pixel limits or videos that cannot work, before any model is loaded."""
    found = pixel_limits_problem(folder, min_pixels, max_pixels)
    if found:
        raise InferError(found)
    for v in videos:
        found = video_problem(v)
        if found:
            raise InferError(found)


def position_limit(model) -> int | None:
    """The language model's positions (``max_position_embeddings`` of the text config), None when unknown."""
    cfg = getattr(model, "config", None)
    for c in (getattr(cfg, "text_config", None), cfg):
        n = getattr(c, "max_position_embeddings", None) if c is not None else None
        if isinstance(n, int) and n > 0:
            return n
    return None


@dataclass
class Inference:
    model: object
    processor: object
    folder: Path
    min_pixels: int | None = None
    max_pixels: int | None = None
    run_limits: dict = field(default_factory=dict)
    exif: bool = False  # Qwen3 families: EXIF orientation applied, as their training pipeline does
    # chat template arguments of every prompt (qwenvl.templates.generation_kwargs: reasoning_effort, enable_thinking)
    template_kwargs: dict = field(default_factory=dict)

    def budget_warning(self) -> str | None:
        """One line when the inference pixel budget is not the run's (None when they agree or are unknown)."""
        if not self.run_limits:
            return None
        diffs = [f"{k} {getattr(self, k)} (the run trained with {self.run_limits[k]})"
                 for k in ("min_pixels", "max_pixels") if getattr(self, k) not in (None, self.run_limits[k])]
        if not diffs:
            return None
        return ("warning: inference pixel budget differs from training: " + ", ".join(diffs)
                + "; images are resized differently than in training, so answers can differ")

    def messages(self, prompt: str, *, images: list[str] = (), videos: list[str | list[str]] = (),
                 system: str | None = None, frame_fps: float | None = None) -> list[dict]:
        """A Qwen chat conversation: optional system turn, one user turn with the media first, then the text, which
        starts with a newline after media as in the official training format (``<image>\nQuestion``). A video is a
        file, a folder of frame images or a list of frame images; frames are taken at ``frame_fps`` (default: the
        2 per second training uses)."""
        from qwenvl.data.vision import FRAME_FPS, MediaError, folder_frames

        content: list[dict] = []
        for img in images:
            content.append(self.image_part(img))
        for vid in videos:
            try:
                frames = list(vid) if isinstance(vid, (list, tuple)) else folder_frames(vid)
            except MediaError as e:
                raise InferError(str(e)) from None
            if frames is None:
                content.append({"type": "video", "video": _media_ref(vid)})
            else:
                content.append({"type": "video", "video": [_media_ref(f) for f in frames],
                                "sample_fps": frame_fps or FRAME_FPS})
        if (images or videos) and not prompt.startswith("\n"):
            prompt = "\n" + prompt  # the official training format: "<image>\nQuestion" (a newline after the media)
        content.append({"type": "text", "text": prompt})
        msgs = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        return msgs + [{"role": "user", "content": content}]

    @staticmethod
    def reply_turn(reply: str) -> dict:
        """The assistant turn a generated reply adds to a chat history: the text after ``</think>`` as the answer and
        the reasoning before it in ``reasoning_content``, as training reads a turn (Qwen3.8's template keeps it in
        the history, Qwen3.5 / 3.6 drop it; a reply without ``</think>`` stays as it is)."""
        from qwenvl.data.chat_qwen35 import split_reasoning

        reasoning, answer = split_reasoning(reply)
        if reasoning is None:
            return {"role": "assistant", "content": [{"type": "text", "text": reply}]}
        return {"role": "assistant", "content": [{"type": "text", "text": answer}], "reasoning_content": reasoning}

    def image_part(self, ref: str) -> dict:
        """A chat content part for one image, opened and converted to RGB exactly as the training pipeline does
        (:func:`qwenvl.data.vision.open_image`: an RGBA image loses its alpha; qwen-vl-utils' own loader would
        paste it on white, which the model never saw in training); qwen-vl-utils then resizes it."""
        from qwenvl.data.vision import open_image

        _media_ref(ref)  # one line for a missing file
        try:
            image = open_image(ref, exif=self.exif)
        except Exception as e:  # noqa: BLE001 - an unreadable image is the user's input
            raise InferError(f"cannot read the image {ref}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                             ) from e
        limits = {k: v for k, v in (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels)) if v}
        return {"type": "image", "image": image, **limits}

    def prompt_inputs(self, messages: list[dict]):
        """The processor's tensors (``input_ids``, ``pixel_values``, grids, ...) for ``messages`` up to the
        assistant turn; media are loaded and resized by ``qwen_vl_utils.process_vision_info``."""
        from qwen_vl_utils import process_vision_info

        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  **self.template_kwargs)
        try:
            images, videos = process_vision_info(messages)
        except Exception as e:  # noqa: BLE001 - qwen-vl-utils' readers fail in many ways on a bad file: user input
            refs = [str(part.get("video") or "").removeprefix("file://") for m in messages for part in m["content"]
                    if isinstance(part, dict) and part.get("type") == "video"]
            what = f" {', '.join(refs)}" if refs else ""
            raise InferError(f"cannot read the media{what}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        inputs = self.processor(text=[text], images=images, videos=videos, padding=True, return_tensors="pt")
        limit = position_limit(self.model)
        n = int(inputs["input_ids"].shape[1])
        if limit is not None and n >= limit:
            raise InferError(f"the prompt is {n:,} tokens but the model has {limit:,} positions "
                             "(max_position_embeddings of its text config), leaving no room for an answer: shorten "
                             "the prompt (or the conversation), or use fewer or smaller images/videos (--max-pixels)")
        return inputs

    def answer_budget(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """``max_new_tokens`` capped so prompt + answer stay within the model's positions (a warning says so); a
        prompt that leaves no room is an :class:`InferError` (one line)."""
        limit = position_limit(self.model)
        if limit is None:
            return max_new_tokens
        room = limit - prompt_tokens
        if room <= 0:
            raise InferError(f"the prompt is {prompt_tokens:,} tokens but the model has {limit:,} positions "
                             "(max_position_embeddings of its text config), leaving no room for an answer: shorten "
                             "the prompt, or use fewer or smaller images/videos (--max-pixels)")
        if max_new_tokens > room:
            logger.warning("answers are cut at %d tokens: the prompt takes %d of the model's %d positions", room,
                           prompt_tokens, limit)
            return room
        return max_new_tokens

    def generate_batch(self, conversations: list[list[dict]], *, max_new_tokens: int = 64) -> list[str]:
        """Greedy answers for several conversations in one ``generate`` call (left padding)."""
        import torch
        from qwen_vl_utils import process_vision_info

        texts = [self.processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True,
                                                    **self.template_kwargs) for m in conversations]
        flat = [turn for m in conversations for turn in m]
        try:
            images, videos = process_vision_info(flat)
        except (OSError, ValueError) as e:
            raise InferError(f"cannot read the media: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        tok = self.processor.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            inputs = self.processor(text=texts, images=images, videos=videos, padding=True,
                                    return_tensors="pt").to(self.model.device)
        finally:
            tok.padding_side = side
        width = inputs["input_ids"].shape[1]
        max_new_tokens = self.answer_budget(int(width), int(max_new_tokens))
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return [tok.decode(row[width:], skip_special_tokens=True) for row in out]

    def show_prompt(self, inputs) -> str:
        """The prompt tokens as text, runs of vision pads collapsed (``<|image_pad|>×64``)."""
        tok = self.processor.tokenizer
        ids = inputs["input_ids"][0].tolist()
        pads = {tok.convert_tokens_to_ids(t): t for t in ("<|image_pad|>", "<|video_pad|>")}
        out, i = [], 0
        while i < len(ids):
            if ids[i] in pads:
                j = i
                while j < len(ids) and ids[j] == ids[i]:
                    j += 1
                out.append(f"{pads[ids[i]]}×{j - i}")
                i = j
                continue
            j = i
            while j < len(ids) and ids[j] not in pads:
                j += 1
            out.append(tok.decode(ids[i:j]))
            i = j
        return "".join(out)

    def generate(self, inputs, *, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 stream=None) -> str:
        """Generate the answer; ``stream(text_piece)`` is called as tokens arrive. Greedy when temperature is 0."""
        import threading

        import torch
        from transformers import TextIteratorStreamer

        inputs = inputs.to(self.model.device)
        max_new_tokens = self.answer_budget(int(inputs["input_ids"].shape[1]), int(max_new_tokens))
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            kwargs.update(temperature=float(temperature), top_p=float(top_p))
        tok = self.processor.tokenizer
        if stream is None:
            with torch.no_grad():
                out = self.model.generate(**inputs, **kwargs)
            return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def work():
            try:
                with torch.no_grad():
                    self.model.generate(**inputs, **kwargs, streamer=streamer)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
                streamer.end()

        t = threading.Thread(target=work, daemon=True)
        t.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            stream(piece)
        t.join()
        if errors:
            raise errors[0]
        return "".join(pieces)


def _media_ref(ref: str) -> str:
    """A media reference as qwen-vl-utils takes it: URLs and inline ``data:`` URLs as they are, a local file as a
    ``file://`` URL (one line when it does not exist)."""
    if "://" in ref or ref[:5] == "data:":
        return ref
    p = Path(ref).expanduser()
    if not p.is_file():
        raise InferError(f"media file {ref} not found")
    return "file://" + str(p.resolve())


def _adapter_base(folder: Path) -> str:
    return json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]


def load(folder: str | os.PathLike, *, min_pixels: int | None = None, max_pixels: int | None = None,
         device: str | None = None) -> Inference:
    """Load a model folder for inference (GPU when available, else CPU). Pixel limits default to the run's."""
    import torch
    import transformers
    from transformers import AutoProcessor

    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar between the prompt and the answer
    transformers.utils.logging.set_verbosity_error()
    folder = Path(folder)
    kind = check_folder(folder)  # a tokenizer and readable processor settings, before the weights load
    run_limits = saved_pixel_limits(folder)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    if kind == "adapter":
        from qwenvl.export import load_adapter_export

        model = load_adapter_export(folder, dtype=dtype)
    else:
        from qwenvl.model import load_model

        model = load_model(str(folder), dtype=dtype, attn_implementation="sdpa")
    from qwenvl.attention import install

    install(model)  # the vision tower's attention in one call per layer (the trainer's kernel)
    model.to(dev).eval()
    try:
        processor = AutoProcessor.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise InferError(f"{folder} has no usable processor ({str(e).splitlines()[0]}): it was not saved by "
                         "vlsft train / vlsft export") from e
    engine = Inference(model=model, processor=processor, folder=folder,
                       min_pixels=min_pixels if min_pixels is not None else run_limits.get("min_pixels"),
                       max_pixels=max_pixels if max_pixels is not None else run_limits.get("max_pixels"),
                       run_limits=run_limits)
    try:
        from qwenvl.families import family_at

        engine.exif = family_at(folder if kind == "full" else _adapter_base(folder)).exif
    except Exception:  # noqa: BLE001 - only the EXIF choice depends on it
        engine.exif = False
    ip = getattr(processor, "image_processor", None)
    if ip is not None and getattr(ip, "size", None) is not None and engine.max_pixels and engine.min_pixels:
        # the processor resizes again after qwen-vl-utils: it must use the same limits, or it undoes them
        ip.size = {"shortest_edge": int(engine.min_pixels), "longest_edge": int(engine.max_pixels)}
    return engine
