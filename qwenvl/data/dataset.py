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
from qwenvl.data.registry import (
    DatasetSource,
    RegistryError,
    SamplingReport,
    build_index,
    build_split_index,
    resolve_sources,
)
from qwenvl.data.sample import SampleBuilder, VisionBudget
from qwenvl.data.vision import VisionSpec
from qwenvl.secrets import mask_urls
from qwenvl.storage import StorageError
from qwenvl.templates import describe

log = logging.getLogger(__name__)


class SupervisedDataset(torch.utils.data.Dataset):
    """Map-style dataset over the sampled index; all state is numpy arrays + stores (fork-shared)."""

    def __init__(self, sources: list[DatasetSource], ds_ids: np.ndarray, rec_ids: np.ndarray,
                 builder: SampleBuilder | None, dataset_names: list[str] | None = None):
        self.sources = sources
        self.ds_ids = ds_ids
        self.rec_ids = rec_ids
        self.builder = builder
        # the names losses are reported under (the user's dataset names; shared by the train and eval datasets so
        # a sample's ``dataset_index`` means the same on both), one index per source
        self.dataset_names = list(dataset_names) if dataset_names is not None else list(
            dict.fromkeys(s.name for s in sources))
        self._name_index = np.array([self.dataset_names.index(s.name) for s in sources], dtype=np.int32)

    def record_key(self, i: int) -> str:
        """``name:record`` of dataset index ``i`` (the record's position in its annotation file)."""
        return f"{self.sources[int(self.ds_ids[i])].name}:{int(self.rec_ids[i])}"

    def __len__(self) -> int:
        return len(self.rec_ids)

    def record(self, i: int) -> tuple[DatasetSource, int, dict]:
        src = self.sources[int(self.ds_ids[i])]
        r = int(self.rec_ids[i])
        return src, r, src.store[r]

    @staticmethod
    def _bad(src: DatasetSource, where: str, i: int, exc: Exception, kind: str) -> dict:
        reason = mask_urls(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__  # no URL password
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
            sample["dataset_index"] = int(self._name_index[int(self.ds_ids[i])])
        return sample


def collate_mode(data_args) -> str:
    if data_args.data_packing:
        return "packing"
    if data_args.data_flatten:
        return "flatten"
    return "padded"


def make_builder(tokenizer, image_processor, data_args, model_type: str = "qwen2_5_vl") -> SampleBuilder:
    return SampleBuilder(tokenizer=tokenizer, budget=VisionBudget.from_args(data_args),
                         spec=VisionSpec.from_processor(image_processor), model_type=model_type,
                         model_max_length=data_args.model_max_length,
                         rendering=getattr(data_args, "chat_template", None))


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
                        keep_second_per_grid_ts=builder.family.keeps_second_per_grid_ts)


def make_data_module(tokenizer, image_processor, data_args, *, seed: int, model_type: str = "qwen2_5_vl",
                     ensure_vision: bool = True) -> dict:
    """Build dataset + collator + sampling report (+ bad-sample monitor) from
    :class:`qwenvl.arguments.DataArguments` (which owns every default; ``seed`` is the sampling seed)."""
    data_seed = int(seed)
    sources = resolve_sources(data_args.dataset_use, data_args.dataset_dict)
    eval_split = float(getattr(data_args, "eval_split", 0.0) or 0.0)
    if not 0.0 <= eval_split < 1.0:
        raise RegistryError(f"--eval_split {eval_split:g} must be in [0, 1) (a fraction such as 0.02)")
    ds_ids, rec_ids, report, held = build_split_index(sources, data_seed, eval_split)
    report.log(log)
    if len(rec_ids) == 0:  # the trainer's sampler would fail with a traceback on an empty dataset
        raise RegistryError("no samples to train on (" + "; ".join(line.strip() for line in report.lines()) + "): "
                            "check the annotation files and the --dataset_use percents")
    builder = make_builder(tokenizer, image_processor, data_args, model_type)
    for src in sources:  # what print-args says per dataset (qwenvl.templates.describe)
        log.info("chat: %s: %s", src.name, describe(builder.rendering, src.fmt))
    eval_sources, eval_ds, eval_rec, eval_lines = _eval_index(sources, held, data_args, data_seed)
    names = list(dict.fromkeys([s.name for s in sources] + [s.name for s in eval_sources]))
    dataset = SupervisedDataset(sources, ds_ids, rec_ids, builder, names)
    eval_dataset = SupervisedDataset(eval_sources, eval_ds, eval_rec, builder, names) if len(eval_rec) else None
    for line in eval_lines:
        log.info("%s", line)
    collator = make_collator(tokenizer, builder, data_args, ensure_vision=ensure_vision)
    monitor = BadSampleMonitor(max_ratio=float(data_args.max_bad_sample_ratio))
    held_out = {sources[k].name: [int(r) for r in recs] for k, recs in held.items()}
    return {"train_dataset": dataset, "data_collator": collator, "report": report, "bad_sample_monitor": monitor,
            "eval_dataset": eval_dataset, "dataset_names": names, "held_out": held_out}


def _eval_index(sources: list[DatasetSource], held: dict, data_args, seed: int):
    """The eval dataset's index: the held-out records of each training dataset (``--eval_split``) followed by the
    ``--eval_dataset_use`` datasets drawn at their percents. Returns (sources, dataset ids, record ids, log lines)."""
    eval_sources: list[DatasetSource] = []
    ds_parts, rec_parts, lines = [], [], []
    for k, recs in held.items():
        src = sources[k]
        eval_sources.append(src)
        ds_parts.append(np.full(len(recs), len(eval_sources) - 1, dtype=np.int32))
        rec_parts.append(recs)
        lines.append(f"eval: {src.name}: {len(recs)} of {len(src.store)} records held out (eval_split "
                     f"{data_args.eval_split:g}, never trained on)")
    use = str(getattr(data_args, "eval_dataset_use", "") or "").strip()
    if use:
        extra = resolve_sources(use, data_args.dataset_dict)
        e_ds, e_rec, e_report = build_index(extra, seed)
        base = len(eval_sources)
        eval_sources += extra
        ds_parts.append(e_ds + base)
        rec_parts.append(e_rec)
        lines += ["eval: " + line.strip() for line in e_report.lines()[1:]]
    if not rec_parts:
        return [], np.zeros(0, np.int32), np.zeros(0, np.int64), lines
    return eval_sources, np.concatenate(ds_parts), np.concatenate(rec_parts), lines


__all__ = ["SupervisedDataset", "make_data_module", "make_builder", "make_collator", "SamplingReport"]
