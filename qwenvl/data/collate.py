"""Collators: padded, flatten (one row) and online packing (rows of at most ``model_max_length``).

All three take the dataset's samples (see :mod:`qwenvl.data.sample`) and bad-sample markers
(``{"bad_sample": reason, ...}``), drop the markers and count them.

Every batch carries bookkeeping keys the trainer must ``pop`` before ``model(**batch)``
(:func:`pop_batch_stats`, ``NON_MODEL_KEYS``, the one definition of that contract): ``num_samples`` (real
samples), ``num_skipped`` (bad samples dropped), ``skipped`` (one record per dropped sample with its reason
``kind``) and, from the trainer's dataset, ``sample_ids`` (dataset indices of the real samples). The same
module holds :class:`BadSampleMonitor`, the bad-sample stop rule. When ``num_samples == 0`` the batch is a dummy (one trained token so the loss is finite): the
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
import math
from dataclasses import dataclass, field

import torch

from qwenvl.data.preprocess import IGNORE_INDEX
from qwenvl.data.rope import RopeIndex
from qwenvl.problems import UserError

log = logging.getLogger(__name__)

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")

# ---------------------------------------------------------------------------------------------------------------
# The batch-statistics contract (collator -> trainer), defined here once. Every batch carries bookkeeping keys
# that are not model inputs; the trainer pops them with pop_batch_stats() before model(**batch):
#   num_samples  int        real samples in the batch (0: the batch is a dummy, its loss is scaled by 0)
#   num_skipped  int        bad samples dropped from this batch
#   skipped      list[dict] one record per dropped sample: kind (reason class, e.g. missing_media, too_long),
#                           reason (one line), and where known dataset, where (file:line), sample_index
#   sample_ids   list[int]  dataset indices of the real samples (only when the dataset gives them)
#   token_datasets  LongTensor shaped like labels: per token, the index of its sample's dataset name (the
#                   dataset's ``dataset_names``), -1 on padding and dummy tokens; in flatten/packing rows every
#                   segment keeps its own dataset, so losses can be split by dataset (only when samples carry
#                   ``dataset_index``)
#   token_samples   LongTensor shaped like labels: per token, the position in ``sample_ids`` of its sample, -1 on
#                   padding and dummy tokens (only when every real sample has its dataset index): per-sample loss
#                   sums, so evaluation counts each sample once although the distributed sampler repeats some
# They are plain Python values (one tensor), so they travel from DataLoader workers to the main process.
# ---------------------------------------------------------------------------------------------------------------
NON_MODEL_KEYS = ("num_samples", "num_skipped", "skipped", "sample_ids", "token_datasets", "token_samples")
COUNT_KEYS = ("num_samples", "num_skipped")
TOO_LONG = "too_long"  # reason class of a sample longer than model_max_length
OTHER = "other"  # reason class of a bad sample whose error names none


def is_bad(sample) -> bool:
    return sample is None or (isinstance(sample, dict) and "bad_sample" in sample)


def _as_int(v) -> int:
    if isinstance(v, torch.Tensor):
        return int(v.sum())
    return int(v or 0)


def pop_batch_stats(batch: dict) -> dict:
    """Remove the bookkeeping keys (``NON_MODEL_KEYS``) from ``batch`` and return them: ``num_samples`` /
    ``num_skipped`` as ints (when the batch has them), ``skipped`` (only when a sample was skipped),
    ``sample_ids``, ``token_datasets`` and ``token_samples`` (when present)."""
    out = {k: _as_int(batch.pop(k)) for k in COUNT_KEYS if k in batch}
    skipped = batch.pop("skipped", None)
    if skipped:
        out["skipped"] = list(skipped)
    if "sample_ids" in batch:
        ids = batch.pop("sample_ids")
        out["sample_ids"] = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    for key in ("token_datasets", "token_samples"):
        if key in batch:
            out[key] = batch.pop(key)
    return out


def _skip_record(sample, reason: str | None = None, kind: str | None = None) -> dict:
    rec = {"kind": kind or OTHER, "reason": reason or "unusable sample"}
    if isinstance(sample, dict):
        rec["kind"] = kind or sample.get("kind") or OTHER
        rec["reason"] = reason or str(sample.get("bad_sample") or rec["reason"])
        for key in ("dataset", "where", "sample_index"):
            if sample.get(key) is not None:
                rec[key] = sample[key]
    return rec


# ---------------------------------------------------------------------------------------------------------------
# The bad-sample stop: a one-sided Clopper-Pearson bound on the bad fraction
# ---------------------------------------------------------------------------------------------------------------
BAD_SAMPLE_CONFIDENCE = 0.99


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(front + math.log(_betacf(a, b, x)) - math.log(a))
    return 1.0 - math.exp(front + math.log(_betacf(b, a, 1.0 - x)) - math.log(b))


def binomial_upper_tail(bad: int, seen: int, p: float) -> float:
    """P(X >= bad) for X ~ Binomial(seen, p)."""
    if bad <= 0:
        return 1.0
    if bad > seen:
        return 0.0
    return min(1.0, max(0.0, _betainc(bad, seen - bad + 1, p)))


def bad_fraction_lower_bound(bad: int, seen: int, confidence: float = BAD_SAMPLE_CONFIDENCE) -> float:
    """One-sided Clopper-Pearson lower bound of the bad fraction: the smallest rate p that makes ``bad`` or
    more bad samples out of ``seen`` at least ``1 - confidence`` likely (0 when nothing is bad)."""
    if bad <= 0 or seen <= 0:
        return 0.0
    bad = min(bad, seen)
    alpha = 1.0 - confidence
    lo, hi = 0.0, bad / seen
    for _ in range(100):
        mid = (lo + hi) / 2
        if binomial_upper_tail(bad, seen, mid) < alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return lo


def bad_ratio_exceeded(bad: int, seen: int, limit: float, confidence: float = BAD_SAMPLE_CONFIDENCE) -> bool:
    """True when the bad fraction is above ``limit`` with ``confidence``: the one-sided Clopper-Pearson lower
    bound of ``bad / seen`` exceeds ``limit`` (equivalently, ``bad`` or more bad samples would be less than
    ``1 - confidence`` likely if the true rate were ``limit``). 0 bad never stops; limit 1 never stops; limit 0
    stops at the first bad sample; for large counts it is the plain ratio test ``bad / seen > limit``."""
    if bad <= 0 or seen <= 0 or limit >= 1.0:
        return False
    bad = min(bad, seen)
    if bad / seen <= limit:  # the lower bound is below the observed ratio
        return False
    return binomial_upper_tail(bad, seen, limit) < (1.0 - confidence) * (1.0 - 1e-9)


def describe_kinds(kinds: dict) -> str:
    """``{"missing_media": 35, "too_long": 2}`` -> ``"35 missing_media, 2 too_long"`` (most frequent first)."""
    items = sorted(((int(n), k) for k, n in kinds.items() if int(n)), key=lambda t: (-t[0], t[1]))
    return ", ".join(f"{n:,} {k}" for n, k in items)


class BadSampleLimitExceeded(UserError, RuntimeError):
    """The bad-sample stop (or a run that trained on no sample). The trainer decides it on counts summed over
    all ranks, so every rank raises it at the same step and rank 0 reports it."""

    every_rank = False


@dataclass
class BadSampleMonitor:
    """Counts read / trained / skipped samples (skips by reason kind) and decides the bad-sample stop.

    Rule: stop when, with 99 % confidence (one-sided Clopper-Pearson), the bad fraction is above ``max_ratio``
    (:func:`bad_ratio_exceeded`), evaluated on the counts so far - from the first samples on - and on the totals
    at the end of the run. 0 bad never stops; with ``max_ratio`` 0.01 a single bad sample never stops a run by
    itself (1 of 3: the bound is 0.3 %), two bad of up to 15 or three of up to 44 do, and for large counts the
    rule converges to the plain ``skipped / seen > max_ratio``.

    ``update(pop_batch_stats(batch))`` adds one batch and checks these counts (one process); the trainer adds
    with ``check=False`` and checks the counts summed over ranks (:meth:`check_totals`) once per step.
    """

    max_ratio: float
    confidence: float = BAD_SAMPLE_CONFIDENCE
    seen: int = 0
    skipped: int = 0
    trained: int = 0
    kinds: dict = field(default_factory=dict)
    hint: str = "see the 'skipped sample' log lines"

    def update(self, stats: dict, check: bool = True) -> None:
        n_skip = _as_int(stats.get("num_skipped", 0))
        n_real = _as_int(stats.get("num_samples", 0))
        self.skipped += n_skip
        self.trained += n_real
        self.seen += n_real + n_skip
        recs = stats.get("skipped") or []
        for rec in recs:
            kind = str(rec.get("kind") or OTHER) if isinstance(rec, dict) else OTHER
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if n_skip > len(recs):  # counted without a record (a foreign collator)
            self.kinds[OTHER] = self.kinds.get(OTHER, 0) + n_skip - len(recs)
        if check:
            self.check()

    @property
    def ratio(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0

    def exceeded(self, skipped: int, seen: int) -> bool:
        return bad_ratio_exceeded(skipped, seen, self.max_ratio, self.confidence)

    def check(self) -> None:
        self.check_totals(self.seen, self.skipped, self.kinds)

    def check_totals(self, seen: int, skipped: int, kinds: dict | None = None) -> None:
        if self.exceeded(skipped, seen):
            raise BadSampleLimitExceeded(self.stop_message(seen, skipped, kinds if kinds is not None else self.kinds))

    def stop_message(self, seen: int, skipped: int, kinds: dict) -> str:
        lb = bad_fraction_lower_bound(skipped, seen, self.confidence)
        by_kind = describe_kinds(kinds) or f"{skipped:,} {OTHER}"
        return (f"stopped: {skipped:,} of {seen:,} samples bad ({skipped / seen:.1%}, at {self.confidence:.0%} "
                f"confidence at least {lb:.1%} > max_bad_sample_ratio {self.max_ratio:g}): {by_kind}; {self.hint}; "
                "fix the data (vlsft datasets check --deep) or raise max_bad_sample_ratio")


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

    def _split(self, instances) -> tuple[list[dict], list[dict]]:
        good, skipped = [], []
        for s in instances:
            if is_bad(s):
                skipped.append(_skip_record(s))
                continue
            if self.model_max_length and len(s["input_ids"]) > self.model_max_length:
                reason = f"{len(s['input_ids'])} tokens > model_max_length {self.model_max_length}"
                log.warning("skipped sample: %s", reason)
                skipped.append(_skip_record(s, reason, TOO_LONG))
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
        if any("dataset_index" in s for s in samples):
            batch["token_datasets"] = self._token_map(batch, samples, dummy,
                                                      [int(s.get("dataset_index", -1)) for s in samples])
        ids = [s["sample_index"] for s in samples if "sample_index" in s]
        if ids:
            batch["sample_ids"] = ids  # dataset indices of the real samples (per-rank sample logs, evaluation)
            if len(ids) == len(samples):
                batch["token_samples"] = self._token_map(batch, samples, dummy, list(range(len(samples))))
        batch["num_samples"] = n_real
        batch["num_skipped"] = len(skipped)
        if skipped:
            batch["skipped"] = skipped
        return batch

    def _token_map(self, batch: dict, samples: list[dict], dummy: dict | None, values: list[int]) -> torch.Tensor:
        """Per token of ``batch['labels']``: ``values[j]`` on the tokens of ``samples[j]`` (-1: padding, dummy).
        Rebuilt from the same layout rules as the batch: padded rows hold sample r from column 0; flatten/packing
        rows hold their samples back to back in the order :meth:`_pack` (or the one flatten row) placed them."""
        labels = batch["labels"]
        out = torch.full(labels.shape, -1, dtype=torch.long)
        if self.mode == "padded":
            for r, s in enumerate(samples):
                out[r, :len(s["input_ids"])] = values[r]
            return out
        slot = {id(s): j for j, s in enumerate(samples)}
        rows = [samples + ([dummy] if dummy else [])] if self.mode == "flatten" else self._last_rows
        for r, row in enumerate(rows):
            o = 0
            for s in row:
                n = len(s["input_ids"])
                if not s.get("_dummy"):
                    out[r, o:o + n] = values[slot[id(s)]]
                o += n
        return out

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
        self._last_rows = [[items[i] for i in sorted(b)] for b in bins if b]
        return self._last_rows

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
