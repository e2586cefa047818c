"""A cheap token count per training sample, without decoding any media (torch-free).

Used by the length-aware batch sampler (:mod:`qwenvl.data.length_sampler`) to fill each packed step up to its
token budget (``packing_rows`` x ``model_max_length``). One pass over the dataset's annotation records:

* **Text**: one token per ASCII digit (the Qwen tokenizers split numbers into digits: coordinates and tables cost
  ~1 token a byte) plus the other UTF-8 bytes of every turn the trainer tokenizes (``<image>`` / ``<video>`` tags
  taken out) divided by the dataset's bytes-per-token ratio, plus the chat template (``<|im_start|>role\\n ...
  <|im_end|>\\n`` per turn, the system turn). The ratio is measured per dataset by tokenizing up to
  :data:`CALIBRATION_RECORDS` of its records (evenly spread, so the same on every run; prose ~4 bytes a token,
  code ~2). Without a tokenizer: :data:`DEFAULT_BYTES_PER_TOKEN`.
* **Images**: exact for local files - the image *header* is read (PIL opens lazily: width and height, no pixel
  decode; threads for network filesystems) and resized as the processor resizes it (``smart_resize`` with
  ``min_pixels`` / ``max_pixels``); an image at a URL or one whose header cannot be read counts the most it can
  cost, ``max_pixels / (patch_size x merge_size)^2`` tokens.
* **Videos**: the most they can cost (frames are not opened): ``video_max_frames`` at the per-frame pixel budget
  (Qwen2/2.5-VL), or ``video_max_pixels`` over all frames plus the per-patch timestamps (Qwen3 families).
* **Grounding objects**: :data:`OBJECT_TOKENS` each (their coordinates are written into the text).
* A record that cannot be read counts 1 token: the dataset turns it into a skipped bad sample anyway.

Estimates are per annotation record (up-sampled copies share theirs). They only steer the batching: the collator
packs the real token counts, and a step whose real tokens do not fit its rows gets one more row.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

CALIBRATION_RECORDS = 256  # records tokenized per dataset to measure its bytes per token
DEFAULT_BYTES_PER_TOKEN = 3.0  # without a tokenizer (tests of the sampler): between prose (~4) and code (~2)
TURN_TOKENS = 5  # <|im_start|> role \n ... <|im_end|> \n
MEDIA_TOKENS = 3  # <|vision_start|> <|vision_end|> and a split text segment around each pad run
OBJECT_TOKENS = 24  # one grounding object's rendered <ref>/<box> text, roughly
TIMESTAMP_TOKENS = 6  # HEAD's "<t seconds>" before each temporal patch of a video, roughly
HEADER_THREADS = 16

try:  # orjson when installed (the deep check uses it too)
    import orjson as _orjson

    _loads = _orjson.loads
except ImportError:  # pragma: no cover - orjson is optional
    _loads = json.loads


@dataclass(frozen=True)
class VisionCost:
    """What one image / video can cost in tokens, from the sample builder's pixel budgets and patch geometry."""

    factor: int  # patch_size x merge_size: one merged token per factor x factor pixels
    min_pixels: int
    max_pixels: int
    video_tokens: int  # the most one video can cost, with its timestamps and markers
    head: bool  # Qwen3 families: no default system prompt

    @property
    def image_bound(self) -> int:
        return max(1, self.max_pixels // (self.factor * self.factor))

    def image_tokens(self, width: int, height: int) -> int:
        from qwenvl.data.grounding import smart_resize

        h, w = smart_resize(int(height), int(width), factor=self.factor, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)
        return (h // self.factor) * (w // self.factor)

    @classmethod
    def of_builder(cls, builder) -> VisionCost:
        spec, budget, vb = builder.spec, builder.budget, builder.video_budget
        factor = int(spec.patch_size) * int(spec.merge_size)
        tp = max(int(spec.temporal_patch_size), 1)
        frames = max(int(vb.video_max_frames), tp)
        patches = -(-frames // tp)
        if vb.head:  # min/max pixels bound T x H x W of all sampled frames together
            pads = max(1, int(vb.max_pixels) // (factor * factor * tp))
            video = pads + patches * (TIMESTAMP_TOKENS + MEDIA_TOKENS)
        else:  # per frame
            video = patches * max(1, int(vb.max_pixels) // (factor * factor)) + MEDIA_TOKENS
        return cls(factor=factor, min_pixels=int(budget.min_pixels), max_pixels=int(budget.max_pixels),
                   video_tokens=int(video), head=bool(builder.head))


@dataclass
class _Record:
    text_bytes: int = 0  # without the digits
    digits: int = 0
    turns: int = 0
    system: str | None = None  # the record's own system prompt (None: the family's default)
    images: list = field(default_factory=list)  # resolved paths
    videos: int = 0
    objects: int = 0
    text: str | None = None  # kept only for calibration records
    ok: bool = True


_NO_DIGITS = str.maketrans("", "", "0123456789")


def _strip_tags(s: str) -> str:
    return s.replace("<image>", "").replace("<video>", "") if "<" in s else s


def _read_record(src, r: int, keep_text: bool) -> _Record:
    from qwenvl import storage
    from qwenvl.data import formats, sample_rules

    out = _Record()
    try:
        rec = _loads(src.store.raw(r))
        rec, extras, problems = formats.normalise(rec, src.fmt)
        if rec is None or type(rec) is not dict or sample_rules.first_error(problems) is not None:
            return _Record(ok=False)
        triples = sample_rules.turn_triples(rec["conversations"], extras.untrained)
    except Exception:  # noqa: BLE001 - any unreadable record: the dataset skips it as a bad sample
        return _Record(ok=False)
    texts = [_strip_tags(c) if type(c) is str else str(c) for _, c, _ in triples]
    out.turns = len(texts)
    out.digits = sum(len(t) - len(t.translate(_NO_DIGITS)) for t in texts)
    out.text_bytes = sum(len(t.encode("utf-8")) for t in texts) - out.digits
    out.system = extras.system if extras.system is not None else getattr(src.fmt, "system", None)
    if keep_text:
        out.text = "\n".join(texts)
    for key in ("image", "video"):
        value = rec.get(key)
        items = [] if value is None else [value] if isinstance(value, str) else list(value)
        if key == "video":
            out.videos = len(items)
            continue
        for p in items:
            p = str(p)
            local = not storage.is_url(p) and (os.path.isabs(p) or src.data_path)
            out.images.append(storage.join(src.data_path, p) if local else None)
    objs = rec.get("objects")
    if type(objs) is dict:  # ms-swift's {ref, bbox, ...}: one object per bbox item (qwenvl.data.grounding)
        objs = objs.get("bbox")
    out.objects = len(objs) if isinstance(objs, list) else 0
    return out


def _header_tokens(path: str | None, cost: VisionCost) -> int:
    if path is None:
        return cost.image_bound
    from qwenvl import storage

    if storage.is_url(path):
        return cost.image_bound
    try:
        from PIL import Image

        with Image.open(path) as im:  # reads the header only; no pixel is decoded
            w, h = im.size
        return cost.image_tokens(w, h)
    except Exception:  # noqa: BLE001 - unreadable here: the most it can cost (the dataset decides later)
        return cost.image_bound


def _encode_lengths(builder, texts: list[str]) -> list[int]:
    enc = getattr(builder, "encoder", None)
    if enc is not None and hasattr(enc, "encode_segments"):
        return [len(x) for x in enc.encode_segments(texts)]
    tok = builder.tokenizer
    return [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]


def estimate_lengths(dataset, *, headers: bool = True, threads: int = HEADER_THREADS,
                     calibration_records: int = CALIBRATION_RECORDS) -> tuple[np.ndarray, dict]:
    """Estimated tokens of every sample of ``dataset`` (a :class:`~qwenvl.data.dataset.SupervisedDataset`:
    ``sources``, ``ds_ids``, ``rec_ids``, ``builder``) as an int64 array, and a summary for the log."""
    t0 = time.perf_counter()
    builder = dataset.builder
    cost = VisionCost.of_builder(builder)
    ds_ids = np.asarray(dataset.ds_ids, dtype=np.int64)
    rec_ids = np.asarray(dataset.rec_ids, dtype=np.int64)
    keys, inverse = np.unique((ds_ids << 40) | rec_ids, return_inverse=True)
    uniq_ds, uniq_rec = keys >> 40, keys & ((1 << 40) - 1)
    # calibration records: evenly spread over each dataset's unique records (the same every run)
    calib: set[int] = set()
    for k in np.unique(uniq_ds):
        where = np.flatnonzero(uniq_ds == k)
        take = min(len(where), int(calibration_records))
        if take:
            calib.update(int(x) for x in where[np.linspace(0, len(where) - 1, take).round().astype(np.int64)])
    records = [_read_record(dataset.sources[int(d)], int(r), i in calib)
               for i, (d, r) in enumerate(zip(uniq_ds.tolist(), uniq_rec.tolist(), strict=True))]
    t_read = time.perf_counter() - t0

    # bytes per token of each dataset, measured on its calibration records
    tokenizer = getattr(builder, "tokenizer", None)
    ratio: dict[int, float] = {}
    for k in np.unique(uniq_ds).tolist():
        idx = [i for i in calib if uniq_ds[i] == k and records[i].ok and records[i].text]
        ratio[k] = DEFAULT_BYTES_PER_TOKEN
        if tokenizer is not None and idx:
            texts = [records[i].text for i in idx]
            digits = sum(records[i].digits for i in idx)
            n_tok = sum(_encode_lengths(builder, texts)) - digits
            n_bytes = sum(len(t.encode("utf-8")) for t in texts) - digits
            if n_tok > 0 and n_bytes > 0:
                ratio[k] = min(max(n_bytes / n_tok, 0.5), 8.0)
    default_system = 0
    if not cost.head:
        from qwenvl.data.preprocess import SYSTEM_MESSAGE

        default_system = _system_tokens(builder, SYSTEM_MESSAGE, tokenizer)

    # image headers: one read per distinct local path, in threads (network filesystems are latency-bound)
    paths = sorted({p for rec in records for p in rec.images if p is not None})
    sizes: dict[str, int] = {}
    t1 = time.perf_counter()
    if headers and paths:
        with ThreadPoolExecutor(max_workers=max(1, int(threads))) as pool:
            sizes = dict(zip(paths, pool.map(lambda p: _header_tokens(p, cost), paths, chunksize=64), strict=True))
    t_headers = time.perf_counter() - t1
    bounded = 0
    per_record = np.ones(len(records), dtype=np.int64)
    system_cache: dict[str, int] = {}
    for i, rec in enumerate(records):
        if not rec.ok:
            continue
        n = rec.digits + math.ceil(rec.text_bytes / ratio[int(uniq_ds[i])]) + TURN_TOKENS * rec.turns
        if rec.system is None:
            n += default_system
        else:
            if rec.system not in system_cache:
                system_cache[rec.system] = _system_tokens(builder, rec.system, tokenizer)
            n += system_cache[rec.system]
        for p in rec.images:
            t = sizes.get(p) if p is not None else None
            if t is None:
                t = cost.image_bound
                bounded += 1
            n += t + MEDIA_TOKENS
        n += rec.videos * cost.video_tokens + rec.objects * OBJECT_TOKENS
        per_record[i] = n
    lengths = per_record[inverse]
    info = {"samples": int(len(lengths)), "records": int(len(records)), "tokens": int(lengths.sum()),
            "mean": round(float(lengths.mean()), 1) if len(lengths) else 0.0,
            "unreadable_records": int(sum(not r.ok for r in records)), "image_headers": len(sizes),
            "images_at_bound": bounded, "videos_at_bound": int(sum(r.videos for r in records)),
            "bytes_per_token": {dataset.sources[k].name: round(v, 2) for k, v in ratio.items()},
            "seconds": round(time.perf_counter() - t0, 2), "seconds_reading": round(t_read, 2),
            "seconds_headers": round(t_headers, 2)}
    return lengths, info


def _system_tokens(builder, text: str, tokenizer) -> int:
    """The system turn's tokens (``<|im_start|>system\\n{text}<|im_end|>\\n``)."""
    if tokenizer is None:
        return TURN_TOKENS + math.ceil(len(text.encode("utf-8")) / DEFAULT_BYTES_PER_TOKEN)
    return TURN_TOKENS - 2 + _encode_lengths(builder, [f"system\n{text}"])[0]
