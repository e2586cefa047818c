"""The Trainer side of :mod:`qwenvl.data.position`: the data position kept in samples across a resume.

:class:`DataPositionMixin` sits between :class:`~qwenvl.trainer.QwenVLTrainer` and ``transformers.Trainer``:

* every checkpoint gets ``vlsft-position.json`` (rank 0, after the Trainer's own save): this run's geometry, the
  epoch in progress and the samples of it already trained;
* a resume from a checkpoint with that record places the run by samples, not by steps: the resumed epoch's
  stream (:meth:`~qwenvl.data.position.EpochStreams.resume`) is this run's DataLoader batch sampler, the Trainer
  skips its placeholder steps, and with an epoch-based run the step total is the steps already taken plus the steps
  left in the new geometry (the LR schedule runs to its end); one log line gives the position and the effective
  batch before and after;
* without a record (a checkpoint of an older vlsft), with ``--ignore_data_skip`` or other training data, the
  Trainer's own step arithmetic applies, with a warning when the geometry may have changed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from qwenvl.data import position

logger = logging.getLogger("qwenvl.trainer")


class DataPositionMixin:
    """Mixed into the Trainer before ``transformers.Trainer`` (see the module docstring)."""

    _streams = None  # position.EpochStreams of this run (None: the order is not one we can follow)
    _streams_in_loader = False
    _resume_record: dict | None = None
    _resume_plan: dict | None = None
    _epoch_at: tuple[int, int] | None = None  # (epoch, global step at its stream start)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        rfc = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        self._resume_record = position.read_record(rfc) if rfc and not self.args.ignore_data_skip else None
        if rfc and self._resume_record is None and not self.args.ignore_data_skip and self.args.process_index == 0:
            logger.warning("resume: %s has no %s (written by an older vlsft): the data position follows the "
                           "Trainer's step arithmetic, which is exact only on the geometry (world size, batch, "
                           "accumulation) that wrote it", rfc, position.RECORD)
        return super().train(rfc if rfc else resume_from_checkpoint, *args, **kwargs)

    def geometry(self) -> position.Geometry:
        a = self.args
        rows = getattr(a, "packing_rows", None) or None
        cap = int(self.data_collator.model_max_length) if rows else None
        return position.Geometry(max(int(a.world_size), 1), int(a.per_device_train_batch_size),
                                 int(a.gradient_accumulation_steps), rows, cap)

    # ---- the training DataLoader
    def get_train_dataloader(self):
        if self._resume_record is not None and not getattr(self.args, "packing_rows", None):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            streams = position.random_streams(self.geometry(), len(self.train_dataset), int(seed),
                                              bool(self.args.dataloader_drop_last))
            self.data_order(streams)
            if self._streams_in_loader:
                return self._loader_over(streams)
            self._streams = None  # not placed: HF's own DataLoader (and its seed) below
        loader = super().get_train_dataloader()
        if self._streams is None:
            self._streams = self._default_streams(loader)
        return loader

    def data_order(self, sampler):
        """The batch sampler for the training DataLoader: ``sampler`` itself, or, resuming from a checkpoint with a
        position record, the resumed :class:`~qwenvl.data.position.EpochStreams`. A token budget sampler
        (``packing_rows``) or ready streams are accepted."""
        streams = sampler if isinstance(sampler, position.EpochStreams) else \
            position.token_budget_streams(self.geometry(), sampler)
        self._streams = streams
        if self._resume_record is None or not self._plan_resume(streams):
            self._streams_in_loader = False
            return sampler
        self._streams_in_loader = True
        return streams

    def _loader_over(self, batch_sampler):
        from functools import partial

        from torch.utils.data import DataLoader
        from transformers.trainer_utils import seed_worker

        a = self.args
        params = {"batch_sampler": batch_sampler, "collate_fn": self.data_collator,
                  "num_workers": a.dataloader_num_workers, "pin_memory": a.dataloader_pin_memory,
                  "persistent_workers": a.dataloader_persistent_workers,
                  "multiprocessing_context": a.dataloader_multiprocessing_context,
                  "prefetch_factor": a.dataloader_prefetch_factor, "in_order": a.dataloader_in_order,
                  "worker_init_fn": partial(seed_worker, num_workers=a.dataloader_num_workers, rank=a.process_index)}
        return self.accelerator.prepare(DataLoader(self.train_dataset, **params))

    def _default_streams(self, loader):
        """The streams HF's default DataLoader deals (its seeded permutation), None for any other order."""
        from accelerate.data_loader import SeedableRandomSampler

        batches = getattr(loader, "batch_sampler", None)
        batches = getattr(batches, "batch_sampler", batches)  # BatchSamplerShard -> the BatchSampler it shards
        sampler = getattr(batches, "sampler", None)
        if not isinstance(sampler, SeedableRandomSampler) or not getattr(batches, "batch_size", None):
            return None
        return position.random_streams(self.geometry(), len(self.train_dataset), int(sampler.initial_seed),
                                       bool(batches.drop_last))

    # ---- the resume plan
    def _plan_resume(self, streams) -> bool:
        rec = self._resume_record
        problem = position.record_problem(rec, streams.samples)
        if problem:
            if self.args.process_index == 0:
                logger.warning("resume: the data position cannot be kept in samples (%s): the Trainer's step "
                               "arithmetic applies", problem)
            return False
        epoch, done = int(rec["epoch"]), position.decode_mask(rec["trained"], streams.samples)
        skip = streams.resume(epoch, done)
        self._resume_plan = {"epoch": epoch, "skip": skip, "global_step": int(rec["global_step"])}
        if self.args.process_index == 0:
            logger.info("%s", self._resume_line(streams, epoch, done, skip))
        return True

    def _resume_line(self, streams, epoch: int, done, skip: int) -> str:
        old, new = position.record_geometry(self._resume_record), streams.geometry
        change = f"effective batch {old.describe()} -> {new.describe()}" if old != new else \
            f"same effective batch ({new.describe()})"
        trained = int(done.sum())
        line = (f"resume: data position kept in samples: epoch {epoch}, {trained:,} of its {streams.samples:,} "
                f"samples trained before, the other {streams.samples - trained:,} come next; {change}")
        sizes, full = streams.step_sizes(epoch), new.per_device * new.unit
        if not new.packing_rows and sizes and (sizes[0] != full or sizes[-1] != full):
            line += (f"; the {sum(sizes):,} samples left are not whole steps of {full}: the first step after the "
                     f"resume trains {sizes[0]}, the last of the epoch {sizes[-1]}")
        return line

    def set_initial_training_values(self, args, dataloader):
        out = list(super().set_initial_training_values(args, dataloader))
        plan = self._resume_plan
        if plan:  # steps already taken + steps left in this geometry; enough epochs to get there
            spe, taken = out[1], plan["global_step"]
            at = plan["epoch"] * spe + plan["skip"] // self._streams.geometry.unit
            if args.max_steps <= 0:
                out[6] = taken + max(math.ceil(args.num_train_epochs * spe) - at, 0)
            left = out[6] - taken  # none: no epoch to run (HF would start one and train a step past the end)
            out[0] = max(out[0], plan["epoch"] + 1 + math.ceil(left / spe)) if left > 0 else plan["epoch"]
        return tuple(out)

    def _init_training_state(self, *args, **kwargs):
        epochs, steps = super()._init_training_state(*args, **kwargs)
        plan = self._resume_plan
        if plan:  # placeholders per rank (whole steps): the Trainer skips them, never loading a sample
            return plan["epoch"], plan["skip"] // self._streams.geometry.world_size
        return epochs, steps

    def _run_epoch(self, *args, **kwargs):
        epoch = int(kwargs["epoch"])
        if self._streams_in_loader:  # (a resumed epoch is wrapped where the DataLoader does not reach it)
            self._streams.set_epoch(epoch)
        resumed = epoch == kwargs.get("epochs_trained") and kwargs.get("resume_from_checkpoint") is not None
        skipped = int(kwargs.get("steps_trained_in_current_epoch") or 0) if resumed else 0
        self._epoch_at = (epoch, self.state.global_step - skipped // self.args.gradient_accumulation_steps)
        return super()._run_epoch(*args, **kwargs)

    # ---- the record in every checkpoint
    def _save_checkpoint(self, model, trial):
        out = super()._save_checkpoint(model, trial)
        if self.args.should_save and self._streams is not None and self._epoch_at is not None:
            epoch, start = self._epoch_at
            now, done = self._streams.done_after(epoch, self.state.global_step - start)
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            if folder.is_dir():
                position.write_record(folder, position.make_record(
                    self.geometry(), global_step=self.state.global_step, epoch=now, done=done,
                    order=self._streams.order, seed=self._streams.seed))
        return out
