"""The trainer's dataset: registry -> compact stores -> samples; and ``make_data_module``.

``make_data_module(tokenizer, image_processor, data_args, seed=..., model_type=...)`` returns::

    {"train_dataset": SupervisedDataset, "data_collator": DataCollator, "report": SamplingReport,
     "bad_sample_monitor": BadSampleMonitor}

``train_dataset[i]`` is a sample dict (see :mod:`qwenvl.data.sample`) or, for a sample that cannot
be used, a marker ``{"bad_sample": reason, "kind": reason_class, "dataset": name, "where": "file:line"}``
- logged once with its reason, dropped and counted by the collator (``num_skipped`` and a ``skipped``
record with the kind), never replaced by another sample. The kind is the error's ``kind`` (e.g.
``missing_media``, ``too_long``; ``other`` when it names none). The trainer pops the collator's batch
statistics (:func:`qwenvl.data.collate.pop_batch_stats`, the one definition of those keys), feeds them to
``bad_sample_monitor.update`` and checks the counts summed over ranks once per step
(:class:`qwenvl.data.collate.BadSampleMonitor` holds the rule).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from qwenvl.data.collate import OTHER, BadSampleMonitor, DataCollator
from qwenvl.data.registry import DatasetSource, RegistryError, SamplingReport, build_index, resolve_sources
from qwenvl.data.sample import SampleBuilder, VisionBudget
from qwenvl.data.vision import VisionSpec
from qwenvl.storage import StorageError

log = logging.getLogger(__name__)


class SupervisedDataset(torch.utils.data.Dataset):
    """Map-style dataset over the sampled index; all state is numpy arrays + stores (fork-shared)."""

    def __init__(self, sources: list[DatasetSource], ds_ids: np.ndarray, rec_ids: np.ndarray,
                 builder: SampleBuilder | None):
        self.sources = sources
        self.ds_ids = ds_ids
        self.rec_ids = rec_ids
        self.builder = builder

    def __len__(self) -> int:
        return len(self.rec_ids)

    def record(self, i: int) -> tuple[DatasetSource, int, dict]:
        src = self.sources[int(self.ds_ids[i])]
        r = int(self.rec_ids[i])
        return src, r, src.store[r]

    @staticmethod
    def _bad(src: DatasetSource, where: str, i: int, exc: Exception, kind: str) -> dict:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("skipped sample %s (%s): %s", src.name, where, reason)
        return {"bad_sample": reason, "kind": str(kind), "dataset": src.name, "where": where, "sample_index": int(i)}

    def __getitem__(self, i: int) -> dict:
        src = self.sources[int(self.ds_ids[i])]
        r = int(self.rec_ids[i])
        where = src.store.where(r)
        try:
            sample = self.builder.build(src.store[r], src.data_path, src.fmt)
        except StorageError as e:
            if e.fatal:  # endpoint down / credentials refused: no sample can be read, stop now
                raise
            # StorageError.kind is the storage layer's own vocabulary (not_found, other, ...)
            return self._bad(src, where, i, e, "missing_media" if e.kind == "not_found" else "media_unreadable")
        except Exception as e:  # every other failure is a counted, logged bad sample
            return self._bad(src, where, i, e, getattr(e, "kind", None) or OTHER)
        if isinstance(sample, dict):
            sample["sample_index"] = int(i)
        return sample


def collate_mode(data_args) -> str:
    if data_args.data_packing:
        return "packing"
    if data_args.data_flatten:
        return "flatten"
    return "padded"


def make_builder(tokenizer, image_processor, data_args, model_type: str = "qwen2.5vl") -> SampleBuilder:
    return SampleBuilder(tokenizer=tokenizer, budget=VisionBudget.from_args(data_args),
                         spec=VisionSpec.from_processor(image_processor), model_type=model_type,
                         model_max_length=data_args.model_max_length)


def make_collator(tokenizer, builder: SampleBuilder, data_args, *, ensure_vision: bool = True) -> DataCollator:
    spec = builder.spec
    enc = builder.encoder
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.convert_tokens_to_ids(
        "<|endoftext|>")
    return DataCollator(pad_token_id=pad, mode=collate_mode(data_args),
                        model_max_length=data_args.model_max_length,
                        ensure_vision=ensure_vision, patch_dim=spec.patch_dim, merge_size=spec.merge_size,
                        temporal_patch_size=spec.temporal_patch_size,
                        token_ids={"vision_start": enc.vision_start, "vision_end": enc.vision_end,
                                   "image_pad": enc.image_pad, "video_pad": enc.video_pad},
                        rope=builder.rope,
                        keep_second_per_grid_ts=builder.model_type.replace(".", "").replace("_", "").lower()
                        in ("qwen25vl",))


def make_data_module(tokenizer, image_processor, data_args, *, seed: int, model_type: str = "qwen2.5vl",
                     ensure_vision: bool = True) -> dict:
    """Build dataset + collator + sampling report (+ bad-sample monitor) from
    :class:`qwenvl.arguments.DataArguments` (which owns every default; ``seed`` is the sampling seed)."""
    data_seed = int(seed)
    sources = resolve_sources(data_args.dataset_use, data_args.dataset_dict)
    ds_ids, rec_ids, report = build_index(sources, data_seed)
    report.log(log)
    if len(rec_ids) == 0:  # the trainer's sampler would fail with a traceback on an empty dataset
        raise RegistryError("no samples to train on (" + "; ".join(line.strip() for line in report.lines()) + "): "
                            "check the annotation files and the --dataset_use percents")
    builder = make_builder(tokenizer, image_processor, data_args, model_type)
    dataset = SupervisedDataset(sources, ds_ids, rec_ids, builder)
    collator = make_collator(tokenizer, builder, data_args, ensure_vision=ensure_vision)
    monitor = BadSampleMonitor(max_ratio=float(data_args.max_bad_sample_ratio))
    return {"train_dataset": dataset, "data_collator": collator, "report": report, "bad_sample_monitor": monitor}


__all__ = ["SupervisedDataset", "make_data_module", "make_builder", "make_collator", "SamplingReport"]
