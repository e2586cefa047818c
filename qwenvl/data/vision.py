"""Image and video loading + processing, pixel-identical to the official Qwen2.5-era pipeline.

* Images: PIL ``open`` -> ``.convert("RGB")`` (an RGBA image just loses its alpha, as in the official
  code; transformers 5.x would composite it onto white) -> transformers' PIL-backend
  ``Qwen2VLImageProcessorPil`` with ``min_pixels``/``max_pixels`` as the resize bounds. The PIL
  backend reproduces the official (4.51 slow processor) ``pixel_values`` exactly; the torchvision
  backend's resize differs by up to 7e-4 relative, so it is never used here.
* Videos: decord first, then PyAV (and torchcodec when it imports). Frames are sampled as the
  official code does: ``n = round(duration / base_interval)`` (Python's round-half-even),
  clamped to ``[video_min_frames, video_max_frames]``; indices = ``unique(linspace(0, T-1, n))``
  truncated to int; each frame is resized within the per-frame pixel bounds by the same PIL
  processor, then pairs of frames form temporal patches (an odd count repeats the last frame).
  ``second_per_grid_ts = temporal_patch_size / (n_sampled / duration)``.
* Videos given as frame images, a list of them or a folder of them (:func:`read_video`, :func:`frames_video`):
  every frame, evenly thinned to ``video_max_frames``, taken at the rate the sample gives (``fps``, else the
  dictionary's ``frame_fps``, else :data:`FRAME_FPS`, qwen-vl-utils' default for frame lists); a folder's frames
  are its image files in natural order (:func:`qwenvl.data.media_exist.frame_files`).

No tokenizer or processor is deep-copied per sample (the official code spends ~335 ms/sample on
that); processors are built once per bounds and cached.

Qwen3-VL (and the families that share its vision code: Qwen3-VL MoE, Qwen3.5) follow the official trainer's HEAD
(``QwenLM/Qwen3-VL`` ``qwen-vl-finetune``, checked against ``tests/golden/official-qwen3vl-head``), see
:func:`head_frame_indices`, :func:`process_video_head`, and ``exif``/``backend`` of :func:`open_image` /
:func:`process_images`: EXIF orientation applied, torchvision resize (the fast processors HEAD loads), frames
sampled at ``video_fps`` and ``video_min_pixels``/``video_max_pixels`` bounding all sampled frames together
(T x H x W), per-temporal-patch timestamps for the prompt.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from qwenvl import storage
from qwenvl.data.media_exist import frame_files, is_frame_folder
from qwenvl.data.preprocess import BadSample
from qwenvl.data.sample_rules import data_url_bytes, local_media_problem, shown
from qwenvl.secrets import mask_url, mask_urls

log = logging.getLogger(__name__)


class MediaError(BadSample):
    """A media file that cannot be read or processed (the sample is skipped and counted).

    ``kind``: ``missing_media`` (not a regular readable file: absent, a folder, a broken symlink or a
    symlink loop, unreadable), ``media_unreachable`` (a URL whose server cannot be reached) or
    ``media_unreadable`` (the default: corrupt, truncated, empty, over the decompression-bomb limit)."""

    def __init__(self, message: str = "", kind: str = "media_unreadable"):
        super().__init__(message, kind)


def _missing(path: str, what: str) -> MediaError | None:
    why = local_media_problem(path)
    if why is None:
        return None
    path = shown(path)  # a bare-base64 frame read as a path: its head and length, not the whole payload
    return MediaError(f"{what} not found: {path}" if why == "not found" else
                      f"{what} {path} {why}" if why.startswith("cannot") else f"{what} {path} is {why}",
                      "missing_media")


@dataclass(frozen=True)
class VisionSpec:
    """What the image processor contributes: patching geometry and normalisation."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_processor(cls, image_processor) -> VisionSpec:
        """Read the geometry from any Qwen image processor (PIL or torchvision backend, or None)."""
        if image_processor is None:
            return cls()
        image_processor = getattr(image_processor, "image_processor", image_processor)  # a full Processor
        get = lambda k, d: getattr(image_processor, k, None) or d  # noqa: E731
        return cls(
            patch_size=int(get("patch_size", 14)),
            temporal_patch_size=int(get("temporal_patch_size", 2)),
            merge_size=int(get("merge_size", 2)),
            image_mean=tuple(float(x) for x in get("image_mean", cls.image_mean)),
            image_std=tuple(float(x) for x in get("image_std", cls.image_std)),
        )

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size


@lru_cache(maxsize=16)
def _tv_processor(spec: VisionSpec, min_pixels: int, max_pixels: int):
    """transformers' torchvision-backed ``Qwen2VLImageProcessor`` (what HEAD's ``AutoProcessor`` loads)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=spec.patch_size,
        temporal_patch_size=spec.temporal_patch_size, merge_size=spec.merge_size,
        image_mean=list(spec.image_mean), image_std=list(spec.image_std),
    )


@lru_cache(maxsize=16)
def _pil_processor(spec: VisionSpec, min_pixels: int, max_pixels: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=spec.patch_size,
        temporal_patch_size=spec.temporal_patch_size, merge_size=spec.merge_size,
        image_mean=list(spec.image_mean), image_std=list(spec.image_std),
    )


def open_image(path: str, exif: bool = False) -> Image.Image:
    """Open an image (local path or URL) and convert it to RGB the way the official code does (``exif=True``:
    apply the EXIF orientation first, as HEAD's ``load_image`` does for Qwen3-VL)."""
    try:
        if path[:5] == "data:":  # an inline base64 image (OpenAI vision JSONL, ms-swift): decoded in memory
            data, why = data_url_bytes(path)
            if data is None:
                raise MediaError(f"an inline data: URL image {why}: {shown(path)}")
            img = Image.open(io.BytesIO(data))
        elif storage.is_url(path):
            img = Image.open(io.BytesIO(storage.read_bytes(path)))
        else:
            bad = _missing(path, "image")
            if bad is not None:
                raise bad
            img = Image.open(path)
        if exif:
            from PIL import ImageOps

            img = ImageOps.exif_transpose(img)
        return img.convert("RGB")
    except MediaError:
        raise
    except storage.StorageError as e:
        if e.fatal and not storage.is_http_url(path):  # bucket/credentials/endpoint: no other sample can be read
            raise
        if isinstance(e, FileNotFoundError):
            raise MediaError(f"image not found: {path}", "missing_media") from e
        raise MediaError(str(e), "media_unreachable" if e.kind == "unreachable" else "media_unreadable") from e
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise MediaError(f"image not found: {path}", "missing_media") from e
    except Exception as e:  # PIL raises many types for corrupt files
        raise MediaError(f"cannot read image {shown(path)}: {type(e).__name__}: {e}") from e


def process_images(images: list[Image.Image], spec: VisionSpec, min_pixels: int, max_pixels: int,
                   backend: str = "pil") -> tuple[np.ndarray, np.ndarray]:
    """RGB PIL images -> (pixel_values float32 (patches, patch_dim), grid_thw int64 (n, 3)); ``backend``:
    ``pil`` (the Qwen2.5-era slow processor, exactly) or ``torchvision`` (HEAD's fast processor)."""
    make = _tv_processor if backend == "torchvision" else _pil_processor
    proc = make(spec, int(min_pixels), int(max_pixels))
    try:
        out = proc.preprocess(images, return_tensors=None)
    except ValueError as e:  # e.g. aspect ratio above 200
        raise MediaError(f"image processor refused the image: {e}") from e
    return np.asarray(out["pixel_values"], dtype=np.float32), np.asarray(out["image_grid_thw"], dtype=np.int64)


# --------------------------------------------------------------------------------------- videos
@dataclass
class DecodedVideo:
    frames: np.ndarray  # (n, H, W, 3) uint8
    frame_idx: list[int]
    total_frames: int
    avg_fps: float
    backend: str

    @property
    def duration(self) -> float:
        return self.total_frames / self.avg_fps


def sample_frame_indices(total_frames: int, avg_fps: float, base_interval: float,
                         min_frames: int, max_frames: int) -> list[int]:
    """The official frame selection (see module docstring)."""
    duration = total_frames / avg_fps
    n = round(duration / base_interval)  # Python round: half to even
    n = min(max(n, min_frames), max_frames)
    return [int(i) for i in np.unique(np.linspace(0, total_frames - 1, n, dtype=int))]


def head_frame_indices(total_frames: int, avg_fps: float, video_fps: float, min_frames: int, max_frames: int
                       ) -> list[int]:
    """HEAD's Qwen3-VL frame selection: ``n = int(total / fps * video_fps)`` clamped to ``[min_frames,
    max_frames]`` and then to ``total``; indices ``round(linspace(0, total - 1, n))`` (numpy, half to even)."""
    n = int(total_frames / avg_fps * video_fps)
    n = min(max(n, min_frames), max_frames, total_frames)
    return [int(i) for i in np.linspace(0, total_frames - 1, n).round().astype(int)]


def _picker(args):
    """``(total, fps) -> indices`` for a budget: ``args.frame_picker`` when it has one (HEAD), else the
    Qwen2.5-era :func:`sample_frame_indices`."""
    pick = getattr(args, "frame_picker", None)
    if pick is not None:
        return pick
    return lambda total, fps: sample_frame_indices(total, fps, args.base_interval, args.video_min_frames,
                                                   args.video_max_frames)


def _source(path: str, data: bytes | None = None):
    """What a decoder opens: the local path, or a fresh stream over the URL's bytes (read once per video)."""
    if data is not None:
        return io.BytesIO(data)
    if storage.is_url(path):
        return io.BytesIO(storage.read_bytes(path))
    return path


def _decode_decord(path: str, args, data: bytes | None = None) -> DecodedVideo:
    import decord

    vr = decord.VideoReader(_source(path, data), num_threads=1)
    total, fps = len(vr), float(vr.get_avg_fps())
    idx = _picker(args)(total, fps)
    frames = vr.get_batch(idx).asnumpy()
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise MediaError(f"decord returned frames of shape {frames.shape} for {path}")
    return DecodedVideo(frames, idx, total, fps, "decord")


def _decode_pyav(path: str, args, data: bytes | None = None) -> DecodedVideo:
    """Decode with PyAV, converting only the sampled frames (never the whole video: a long video's
    RGB frames would not fit in memory). The frame count comes from the container; when it is
    missing or wrong, a counting pass fixes it and a second pass picks the frames."""
    import av

    def one_pass(wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
        kept: dict[int, np.ndarray] = {}
        count = 0
        with av.open(_source(path, data)) as container:
            for count, frame in enumerate(container.decode(container.streams.video[0]), start=1):
                if count - 1 in wanted:
                    kept[count - 1] = frame.to_ndarray(format="rgb24")
        return kept, count

    pick = _picker(args)

    with av.open(_source(path, data)) as container:
        stream = container.streams.video[0]
        declared = int(stream.frames or 0)
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
    if fps <= 0:
        raise MediaError(f"no frame rate in {path}")
    guess = pick(declared, fps) if declared > 0 else []
    kept, total = one_pass(set(guess))
    if total == 0:
        raise MediaError(f"no decodable frames in {path}")
    idx = pick(total, fps)
    if any(i not in kept for i in idx):  # the container's frame count was missing or wrong
        kept, total2 = one_pass(set(idx))
        if total2 != total or any(i not in kept for i in idx):
            raise MediaError(f"PyAV decoded a different number of frames on a second pass over {path}")
    return DecodedVideo(np.stack([kept[i] for i in idx]), idx, total, fps, "pyav")


def _decode_torchcodec(path: str, args, data: bytes | None = None) -> DecodedVideo:
    from torchcodec.decoders import VideoDecoder  # type: ignore[import-not-found]

    dec = VideoDecoder(data if data is not None else path)
    total = int(dec.metadata.num_frames)
    fps = float(dec.metadata.average_fps)
    idx = _picker(args)(total, fps)
    batch = dec.get_frames_at(indices=idx).data  # (n, C, H, W) uint8
    return DecodedVideo(batch.permute(0, 2, 3, 1).numpy(), idx, total, fps, "torchcodec")


def decode_video(path: str, args) -> DecodedVideo:
    """Decode the sampled frames of a video: decord, then PyAV, then torchcodec."""
    data = None
    if path[:5] == "data:":  # inline base64 bytes (HF datasets' embedded videos): decoded in memory
        data, why = data_url_bytes(path, "video")
        if data is None:
            raise MediaError(f"an inline data: URL video {why}: {shown(path)}")
    elif storage.is_url(path):
        try:
            data = storage.read_bytes(path)  # once, shared by every backend (not one download per try)
        except storage.StorageError as e:
            if e.fatal and not storage.is_http_url(path):
                raise
            if isinstance(e, FileNotFoundError):
                raise MediaError(f"video not found: {path}", "missing_media") from e
            raise MediaError(str(e), "media_unreachable" if e.kind == "unreachable" else "media_unreadable") from e
    else:
        bad = _missing(path, "video")
        if bad is not None:
            raise bad
    errors = []
    for name, fn in (("decord", _decode_decord), ("pyav", _decode_pyav), ("torchcodec", _decode_torchcodec)):
        try:
            return fn(path, args, data)
        except ImportError as e:
            errors.append(f"{name}: not installed ({e})")
        except Exception as e:  # decoders raise assorted types
            errors.append(f"{name}: {type(e).__name__}: {e}")
            log.debug("video backend %s failed on %s: %s", name, mask_url(shown(path)), mask_urls(str(e)))
    raise MediaError(f"cannot decode video {shown(path)} ({'; '.join(errors)})")


FRAME_FPS = 2.0  # frames per second of a video given as frame images, unless said (qwen-vl-utils' sample_fps default)


def frames_video(paths: list[str], max_frames: int, fps: float = FRAME_FPS) -> DecodedVideo:
    """A video given as its frame images (full paths, in order): every frame (evenly thinned to ``max_frames``),
    each converted to RGB and, when sizes differ, resized to the first frame's size; taken at ``fps``."""
    total = len(paths)
    keep = list(range(total))
    if total > max_frames:
        keep = [int(i) for i in np.unique(np.linspace(0, total - 1, max_frames, dtype=int))]
    frames = [open_image(paths[i]) for i in keep]
    size = frames[0].size
    arr = np.stack([np.asarray(f if f.size == size else f.resize(size, Image.Resampling.BICUBIC)) for f in frames])
    return DecodedVideo(arr, keep, total, fps, "frames")


def folder_frames(path: str) -> list[str] | None:
    """The frame paths of a video path that names a folder of frames (:func:`is_frame_folder`), None for a video
    file; a folder without image files is a :class:`MediaError` (``missing_media``) naming it."""
    if path[:5] == "data:" or not is_frame_folder(path):
        return None
    try:
        paths, why = frame_files(path)
    except storage.StorageError as e:
        if e.fatal:
            raise
        raise MediaError(f"cannot list the video folder {path}: {e}", "media_unreachable") from e
    if why is not None:
        raise MediaError(f"video not found: {path}" if why == "not found" else f"video folder {path} is {why}",
                         "missing_media")
    return paths


def read_video(path: str, args, fps: float = FRAME_FPS) -> DecodedVideo:
    """A video path's sampled frames: a folder of frame images (:func:`folder_frames`; an object-storage prefix
    named without its trailing ``/`` too) through :func:`frames_video` at ``fps``, a video file through
    :func:`decode_video`. ``args``: the video budget (``video_max_frames``, the frame picker)."""
    paths = folder_frames(path)
    if paths is not None:
        return frames_video(paths, args.video_max_frames, fps)
    try:
        return decode_video(path, args)
    except MediaError as e:
        if e.kind != "missing_media" or not storage.is_url(path) or storage.is_http_url(path):
            raise
        try:  # no such object: a prefix of frames named without its trailing slash?
            paths, why = frame_files(path + "/")
        except storage.StorageError:
            raise e from None
        if why is None:
            return frames_video(paths, args.video_max_frames, fps)
        if why.startswith("an empty folder or not found"):  # no such prefix either
            raise
        raise MediaError(f"video folder {path} is {why}", "missing_media") from None


def process_video(video: DecodedVideo, spec: VisionSpec, min_pixels: int, max_pixels: int
                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """Sampled frames -> (pixel_values_videos (patches, patch_dim), grid_thw (3,), second_per_grid_ts)."""
    frames = [Image.fromarray(f) for f in video.frames]
    pv, grids = process_images(frames, spec, min_pixels, max_pixels)
    n = len(frames)
    _, gh, gw = (int(x) for x in grids[0])
    tp, ps = spec.temporal_patch_size, spec.patch_size
    s = gh * gw
    # each frame came out as (s, C, tp, ps, ps) with its tp copies identical: keep one copy
    per_frame = pv.reshape(n, s, 3, tp, ps, ps)[:, :, :, 0]
    if n % tp:
        per_frame = np.concatenate([per_frame, np.repeat(per_frame[-1:], tp - n % tp, axis=0)])
    gt = per_frame.shape[0] // tp
    # (gt, tp, s, C, ps, ps) -> (gt, s, C, tp, ps, ps)
    vid = per_frame.reshape(gt, tp, s, 3, ps, ps).transpose(0, 2, 3, 1, 4, 5)
    pixel_values = np.ascontiguousarray(vid.reshape(gt * s, 3 * tp * ps * ps), dtype=np.float32)
    fps = n / video.duration
    return pixel_values, np.array([gt, gh, gw], dtype=np.int64), tp / fps


@lru_cache(maxsize=16)
def _head_video_processor(spec: VisionSpec):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor(patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size,
                                 merge_size=spec.merge_size, image_mean=list(spec.image_mean),
                                 image_std=list(spec.image_std), do_sample_frames=False, cap_pixels_per_frame=False)


def head_timestamps(frame_idx: list[int], fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Seconds of each temporal patch as HEAD writes them into the prompt: indices padded with the last one to a
    multiple of the patch, then the mean of the patch's first and last frame time."""
    idx = list(frame_idx)
    if len(idx) % temporal_patch_size:
        idx.extend([idx[-1]] * (temporal_patch_size - len(idx) % temporal_patch_size))
    t = [i / fps for i in idx]
    return [(t[i] + t[i + temporal_patch_size - 1]) / 2 for i in range(0, len(t), temporal_patch_size)]


def process_video_head(video: DecodedVideo, spec: VisionSpec, min_pixels: int, max_pixels: int
                       ) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """HEAD's Qwen3-VL video processing of the sampled frames -> (pixel_values_videos, grid_thw (3,), the
    timestamp of each temporal patch). ``min_pixels``/``max_pixels`` bound T x H x W of all sampled frames
    together (transformers' ``Qwen3VLVideoProcessor``, torchvision resize); a frame side below
    ``patch_size * merge_size`` or a single frame is refused as HEAD refuses it."""
    import torch

    frames = torch.from_numpy(np.ascontiguousarray(video.frames)).permute(0, 3, 1, 2)  # (T, C, H, W) uint8
    t, _, h, w = frames.shape
    factor = spec.patch_size * spec.merge_size
    if t < spec.temporal_patch_size:
        raise MediaError(f"video has {t} frame(s); Qwen3-VL needs at least {spec.temporal_patch_size} (HEAD "
                         "refuses it too): use a longer clip")
    if h < factor or w < factor:
        raise MediaError(f"video frames are {w}x{h}, smaller than {factor} pixels on a side (HEAD refuses them "
                         "too): use a larger video")
    proc = _head_video_processor(spec)
    try:
        out = proc(videos=[frames], size={"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)},
                   return_tensors="np")
    except ValueError as e:  # aspect ratio above 200
        raise MediaError(f"video processor refused the video: {e}") from e
    pv = np.ascontiguousarray(out["pixel_values_videos"], dtype=np.float32)
    grid = np.asarray(out["video_grid_thw"], dtype=np.int64).reshape(-1, 3)[0]
    return pv, grid, head_timestamps(video.frame_idx, video.avg_fps, spec.temporal_patch_size)
