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
* Videos: decord, then PyAV (only the sampled frames are converted to RGB), then torchcodec; one-frame
  and odd-frame-count videos repeat the last frame up to the temporal patch; long videos are clamped
  to ``video_max_frames``; odd frame sizes are resized like images; a corrupt file is a bad sample.
* Qwen2-VL (``model_type="qwen2vl"``): same tokens and pixels; the video temporal position is the
  patch index (no time scaling) and ``second_per_grid_ts`` is not passed to the model (see
  :mod:`qwenvl.data.rope` for the one place where we differ from transformers 5.24's rope index).
* Qwen3-VL: images only (its video prompt format uses per-frame timestamps): videos are bad samples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from qwenvl import storage
from qwenvl.data import sample_rules, vision
from qwenvl.data.preprocess import BadSample, ChatEncoder, Turn, problem_error
from qwenvl.data.rope import RopeIndex


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


def _as_list(value) -> list[str]:
    """The entries of a valid ``image``/``video`` value (a path or a list of paths; None: none)."""
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _media_path(data_path: str | None, rel: str, key: str) -> str:
    """``rel`` resolved against ``data_path``; a relative path with no ``data_path`` is a bad sample
    (it would otherwise be looked up in whatever folder the trainer was started from)."""
    if not data_path and not (storage.is_url(rel) or os.path.isabs(rel)):
        raise BadSample(f"{key} path {rel!r} is relative but the dataset has no data_path: set data_path in the "
                        "dataset dictionary, or use absolute paths / URLs", "no_data_path")
    return storage.join(data_path, rel)


@dataclass
class SampleBuilder:
    tokenizer: object
    budget: VisionBudget = field(default_factory=VisionBudget)
    spec: vision.VisionSpec = field(default_factory=vision.VisionSpec)
    model_type: str = "qwen2.5vl"
    model_max_length: int | None = None
    rope: RopeIndex | None = None

    def __post_init__(self):
        self.encoder = ChatEncoder(self.tokenizer)
        if self.rope is None:
            self.rope = RopeIndex.for_model_type(self.model_type)
            self.rope.image_token_id = self.encoder.image_pad
            self.rope.video_token_id = self.encoder.video_pad
            self.rope.merge = self.spec.merge_size

    def build(self, record: dict, data_path: str | None) -> dict:
        import torch

        # validity: the one rule the deep check applies too (qwenvl.data.sample_rules)
        bad = sample_rules.first_error(sample_rules.record_problems(record))
        if bad is not None:
            raise problem_error(bad)
        images = _as_list(record.get("image"))
        videos = _as_list(record.get("video"))
        if videos and self.model_type.replace(".", "").replace("_", "").lower().startswith("qwen3"):
            raise BadSample("videos are not supported for Qwen3-VL by this pipeline yet (its video format uses "
                            "per-frame timestamps); use images, or a Qwen2.5-VL model for video data",
                            "unsupported_media")
        turns = [Turn(role, content) for role, content in sample_rules.turn_pairs(record["conversations"])]
        b, m2 = self.budget, self.spec.merge_size ** 2
        out: dict = {}
        image_tokens: list[int] = []
        if images:
            pil = [vision.open_image(_media_path(data_path, p, "image")) for p in images]
            pv, grid = vision.process_images(pil, self.spec, b.min_pixels, b.max_pixels)
            out["pixel_values"] = torch.from_numpy(pv)
            out["image_grid_thw"] = torch.from_numpy(grid)
            image_tokens = [int(g.prod()) // m2 for g in grid]
        video_tokens: list[int] = []
        if videos:
            pvs, grids, spgs, fidx = [], [], [], []
            for p in videos:
                dv = vision.decode_video(_media_path(data_path, p, "video"), b)
                pv, grid, spg = vision.process_video(dv, self.spec, b.video_min_frame_pixels, b.video_max_frame_pixels)
                pvs.append(pv)
                grids.append(grid)
                spgs.append(spg)
                fidx.append(dv.frame_idx)
            out["pixel_values_videos"] = torch.from_numpy(np.concatenate(pvs))
            out["video_grid_thw"] = torch.from_numpy(np.stack(grids))
            out["second_per_grid_ts"] = torch.tensor(spgs, dtype=torch.float64)
            out["frame_idx"] = fidx
            video_tokens = [int(g.prod()) // m2 for g in grids]
        ids, labels = self.encoder.encode(turns, image_tokens, video_tokens)
        if self.model_max_length is not None and len(ids) > self.model_max_length:
            raise BadSample(f"{len(ids)} tokens > model_max_length {self.model_max_length} (skipped whole: "
                            "vision tokens are never cut; raise model_max_length or lower max_pixels)", "too_long")
        out["input_ids"] = torch.from_numpy(ids)
        out["labels"] = torch.from_numpy(labels)
        out["position_ids"] = self.rope(out["input_ids"], out.get("image_grid_thw"), out.get("video_grid_thw"),
                                        out.get("second_per_grid_ts"))
        return out
