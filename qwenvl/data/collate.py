"""Collators: padded, flatten (one row) and online packing (rows of at most ``model_max_length``).

All three take the dataset's samples (see :mod:`qwenvl.data.sample`) and bad-sample markers
(``{"bad_sample": reason, ...}``), drop the markers and count them.

Every batch carries bookkeeping keys the trainer must ``pop`` before ``model(**batch)``
(:func:`pop_batch_stats`, ``NON_MODEL_KEYS``): ``num_samples`` (real samples), ``num_skipped`` (bad
samples dropped) and, from the trainer's dataset, ``sample_ids`` (dataset indices of the real samples).
When ``num_samples == 0`` the batch is a dummy (one trained token so the loss is finite): the
trainer must multiply that loss by 0 (it still runs forward/backward so ZeRO-3 ranks stay in step).

``ensure_vision=True`` (default): a batch always holds ``pixel_values`` *and*
``pixel_values_videos`` (with grids). A missing kind gets a masked dummy (a 2x2-patch zero image /
one-frame-pair video = one token each, labels -100): under DeepSpeed ZeRO-3 every rank must call
the vision tower the same number of times each step. Padded mode puts the dummy tokens at the end
of row 0 with attention 0; flatten/packing add them as a separate segment (its own positions,
never attended by real tokens). The loss is unchanged (tested).

Modes
-----
* ``padded`` (official default): right padding with ``pad_token_id``, labels -100, position ids
  ``(3, B, L)`` padded with 1 (as the official collator), ``attention_mask`` ``(B, L)`` 0/1.
* ``flatten`` (``data_flatten``): all samples in one row ``(1, N)``; ``position_ids`` ``(4, 1, N)``
  (row 0 restarts at 0 per sample = what transformers 5.x uses to build the block-diagonal causal
  mask for sdpa/eager and cu_seqlens for flash-attention; rows 1-3 the M-RoPE ids); NO attention
  mask; ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32, leading 0) + ``max_length_q``/``max_length_k``
  for the flash varlen path; ``use_cache=False`` (a cache disables packed-mask detection).
  Rows 1-3 / ``cu_seq_lens_q`` equal the official flattened batch's 3-row position ids / cu_seqlens.
* ``packing`` (``data_packing``): the per-device batch is packed online (greedy, longest first into
  the least-loaded of the fewest possible rows) into rows of at most ``model_max_length`` tokens; rows are right-padded to the longest row, each row's
  padding tail written as one more (masked) segment. ``position_ids`` ``(4, R, L)``; cu_seqlens over
  the flattened ``R*L`` tokens for flash. Choice: packing inside the collator over the per-device
  batch (no length pre-pass over the dataset, works for remote media, exact step count per epoch);
  set ``per_device_train_batch_size`` to the number of samples to pack per step.

``model_max_length``: the dataset skips (and counts) samples longer than it; the collators also
drop any that slip through (never truncate: cutting vision tokens breaks the image/feature match).
Each sample's first label is set to -100 in flatten/packing (no loss across sample boundaries).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from qwenvl.data.preprocess import IGNORE_INDEX
from qwenvl.data.rope import RopeIndex
from qwenvl.problems import UserError

log = logging.getLogger(__name__)

STAT_KEYS = ("num_samples", "num_skipped")
# bookkeeping keys that are not model inputs: pop them before model(**batch)
NON_MODEL_KEYS = ("num_samples", "num_skipped", "sample_ids")
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def is_bad(sample) -> bool:
    return sample is None or (isinstance(sample, dict) and "bad_sample" in sample)


def pop_batch_stats(batch: dict) -> dict:
    """Remove the bookkeeping keys; return ``num_samples`` / ``num_skipped`` as ints (+ ``sample_ids`` if any)."""
    out = {k: int(batch.pop(k, 0)) for k in STAT_KEYS}
    if "sample_ids" in batch:
        out["sample_ids"] = list(batch.pop("sample_ids"))
    return out


class BadSampleLimitExceeded(UserError, RuntimeError):
    every_rank = True  # found by whichever rank crossed the limit


@dataclass
class BadSampleMonitor:
    """Running count of skipped samples; raises when skipped/seen exceeds ``max_ratio``.

    Call ``update(pop_batch_stats(batch))`` once per batch (on every rank). The ratio is enforced
    once ``min_seen`` samples were seen (so one early bad sample cannot kill a run), and always when
    every sample so far was bad.
    """

    max_ratio: float = 0.01
    min_seen: int = 100
    seen: int = 0
    skipped: int = 0

    def update(self, stats: dict) -> None:
        self.skipped += int(stats.get("num_skipped", 0))
        self.seen += int(stats.get("num_samples", 0)) + int(stats.get("num_skipped", 0))
        self.check()

    @property
    def ratio(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0

    def check(self) -> None:
        if not self.skipped:
            return
        all_bad = self.skipped == self.seen and self.seen >= 8
        if (self.seen >= self.min_seen and self.ratio > self.max_ratio) or all_bad:
            raise BadSampleLimitExceeded(
                f"{self.skipped} of {self.seen} samples ({self.ratio:.1%}) were skipped as bad, above "
                f"--max_bad_sample_ratio {self.max_ratio}: see the 'skipped sample' log lines for the reasons, "
                "fix the data (vlsft datasets check --deep) or raise --max_bad_sample_ratio")


class DataCollator:
    """``collator(samples) -> batch``; ``mode`` in ``padded`` | ``flatten`` | ``packing``."""

    def __init__(self, *, pad_token_id: int, mode: str = "padded", model_max_length: int | None = None,
                 ensure_vision: bool = True, patch_dim: int = 1176, merge_size: int = 2,
                 temporal_patch_size: int = 2, token_ids: dict | None = None, rope: RopeIndex | None = None,
                 keep_second_per_grid_ts: bool = True):
        if mode not in ("padded", "flatten", "packing"):
            raise ValueError(f"unknown collate mode {mode!r}: padded, flatten or packing")
        if mode == "packing" and not model_max_length:
            raise ValueError("packing needs model_max_length (the row capacity)")
        self.pad_token_id = int(pad_token_id)
        self.mode = mode
        self.model_max_length = model_max_length
        self.ensure_vision = ensure_vision
        self.keep_second_per_grid_ts = keep_second_per_grid_ts  # only Qwen2.5-VL's forward takes it
        self.patch_dim = patch_dim
        self.merge_size = merge_size
        self.temporal_patch_size = temporal_patch_size
        ids = {"vision_start": 151652, "vision_end": 151653, "image_pad": 151655, "video_pad": 151656}
        ids.update(token_ids or {})
        self.ids = ids
        self.rope = rope or RopeIndex(spatial_merge_size=merge_size, image_token_id=ids["image_pad"],
                                      video_token_id=ids["video_pad"])

    # ------------------------------------------------------------------ helpers
    def _dummy(self, need_image: bool, need_video: bool) -> dict | None:
        """A masked sample carrying a 2x2-patch image and/or a one-temporal-patch video."""
        if not (need_image or need_video):
            return None
        m = self.merge_size
        ids: list[int] = []
        s: dict = {}
        if need_image:
            ids += [self.ids["vision_start"], self.ids["image_pad"], self.ids["vision_end"]]
            s["pixel_values"] = torch.zeros(m * m, self.patch_dim)
            s["image_grid_thw"] = torch.tensor([[1, m, m]])
        if need_video:
            ids += [self.ids["vision_start"], self.ids["video_pad"], self.ids["vision_end"]]
            s["pixel_values_videos"] = torch.zeros(m * m, self.patch_dim)
            s["video_grid_thw"] = torch.tensor([[1, m, m]])
            s["second_per_grid_ts"] = torch.tensor([1.0], dtype=torch.float64)
        s["input_ids"] = torch.tensor(ids, dtype=torch.long)
        s["labels"] = torch.full((len(ids),), IGNORE_INDEX, dtype=torch.long)
        s["position_ids"] = self.rope(s["input_ids"], s.get("image_grid_thw"), s.get("video_grid_thw"),
                                      s.get("second_per_grid_ts"))
        s["_dummy"] = True
        return s

    @staticmethod
    def _cat_vision(samples: list[dict], out: dict) -> None:
        for key in VISION_KEYS:
            parts = [s[key] for s in samples if key in s]
            if parts:
                out[key] = torch.cat(parts, dim=0)

    def _split(self, instances) -> tuple[list[dict], int]:
        good, skipped = [], 0
        for s in instances:
            if is_bad(s):
                skipped += 1
                continue
            if self.model_max_length and len(s["input_ids"]) > self.model_max_length:
                log.warning("skipped sample: %d tokens > model_max_length %d", len(s["input_ids"]),
                            self.model_max_length)
                skipped += 1
                continue
            good.append(s)
        return good, skipped

    # ------------------------------------------------------------------ entry
    def __call__(self, instances) -> dict:
        samples, skipped = self._split(list(instances))
        n_real = len(samples)
        dummy = None
        if self.ensure_vision or not samples:
            need_img = self.ensure_vision and not any("pixel_values" in s for s in samples)
            need_vid = self.ensure_vision and not any("pixel_values_videos" in s for s in samples)
            dummy = self._dummy(need_img or not samples, need_vid)
            if dummy is not None and not samples:
                # nothing real: one trained token keeps the loss finite; the trainer scales it by 0
                dummy["labels"][-1] = dummy["input_ids"][-1]
        if self.mode == "padded":
            batch = self._padded(samples, dummy)
        elif self.mode == "flatten":
            batch = self._packed_rows([samples + ([dummy] if dummy else [])])
        else:
            batch = self._packed_rows(self._pack(samples, dummy))
        if not self.keep_second_per_grid_ts:
            batch.pop("second_per_grid_ts", None)
        ids = [s["sample_index"] for s in samples if "sample_index" in s]
        if ids:
            batch["sample_ids"] = ids  # dataset indices of the real samples (for per-rank sample logs)
        batch["num_samples"] = n_real
        batch["num_skipped"] = skipped
        return batch

    # ------------------------------------------------------------------ padded
    def _padded(self, samples: list[dict], dummy: dict | None) -> dict:
        rows = samples if samples else []
        lens = [len(s["input_ids"]) for s in rows]
        extra = len(dummy["input_ids"]) if dummy is not None else 0
        width = max(lens, default=0) + extra
        b = max(len(rows), 1)
        input_ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.ones((3, b, width), dtype=torch.long)
        attention_mask = torch.zeros((b, width), dtype=torch.long)
        for r, s in enumerate(rows):
            n = lens[r]
            input_ids[r, :n] = s["input_ids"]
            labels[r, :n] = s["labels"]
            position_ids[:, r, :n] = s["position_ids"]
            attention_mask[r, :n] = 1
        if dummy is not None:
            k = len(dummy["input_ids"])
            input_ids[0, width - k:] = dummy["input_ids"]
            labels[0, width - k:] = dummy["labels"]
            if not rows:  # an all-dummy batch attends to itself so its one trained token is finite
                attention_mask[0, width - k:] = 1
                position_ids[:, 0, width - k:] = dummy["position_ids"]
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
               "position_ids": position_ids}
        self._cat_vision(rows + ([dummy] if dummy is not None else []), out)
        return out

    # ------------------------------------------------------------------ packing
    def _pack(self, samples: list[dict], dummy: dict | None) -> list[list[dict]]:
        """Greedy balanced packing into the fewest rows of at most ``model_max_length`` tokens.

        With R = ceil(total / capacity) rows, items go longest-first to the least-loaded row (LPT);
        if a row would exceed the capacity, R grows by one. Balanced rows keep the padding to the
        longest row small (the rows of one batch share a width).
        """
        cap = int(self.model_max_length)
        items = samples + ([dummy] if dummy is not None else [])
        lens = [len(s["input_ids"]) for s in items]
        order = sorted(range(len(items)), key=lambda i: -lens[i])
        rows = max(1, -(-sum(lens) // cap))
        while True:
            load = [0] * rows
            bins: list[list[int]] = [[] for _ in range(rows)]
            for i in order:
                j = min(range(rows), key=load.__getitem__)
                bins[j].append(i)
                load[j] += lens[i]
            if max(load) <= cap or rows >= len(items):
                break
            rows += 1
        # keep each row in the samples' original order (vision tensors follow row-major token order)
        return [[items[i] for i in sorted(b)] for b in bins if b]

    def _packed_rows(self, rows: list[list[dict]]) -> dict:
        lens = [sum(len(s["input_ids"]) for s in row) for row in rows]
        width = max(lens)
        R = len(rows)
        input_ids = torch.full((R, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((R, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((4, R, width), dtype=torch.long)
        cu = [0]
        ordered: list[dict] = []
        for r, row in enumerate(rows):
            o = 0
            for s in row:
                n = len(s["input_ids"])
                input_ids[r, o:o + n] = s["input_ids"]
                lab = s["labels"].clone()
                lab[0] = IGNORE_INDEX
                labels[r, o:o + n] = lab
                position_ids[0, r, o:o + n] = torch.arange(n)
                position_ids[1:, r, o:o + n] = s["position_ids"]
                o += n
                cu.append(r * width + o)
                ordered.append(s)
            if o < width:  # the padding tail is one more segment, positions 0..p-1
                p = width - o
                position_ids[:, r, o:] = torch.arange(p)
                cu.append(r * width + width)
        cu_t = torch.tensor(cu, dtype=torch.int32)
        max_len = int((cu_t[1:] - cu_t[:-1]).max())
        out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
               "cu_seq_lens_q": cu_t, "cu_seq_lens_k": cu_t, "max_length_q": max_len, "max_length_k": max_len,
               "use_cache": False}
        self._cat_vision(ordered, out)
        return out
