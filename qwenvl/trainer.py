"""``QwenVLTrainer``: ``transformers.Trainer`` with vlsft's optimizer groups, throughput logging and exports.

* Loss: token mean over the whole optimizer step (:func:`qwenvl.loss.token_mean_loss`), independent of how the
  step is split into per-device batches, accumulation steps and ranks; computed by the chunked head of
  :mod:`qwenvl.loss` (no ``[tokens x vocabulary]`` logits) when the head is a plain linear layer.
* Optimizer: :func:`qwenvl.model.parameter_groups` (merger / vision / llm learning rates, no weight
  decay on biases and norms), the optimizer class from ``--optim`` as usual; the default ``adamw_torch_fused`` is
  fused wherever torch has the kernel (CUDA and CPU), torch's own choice elsewhere (:mod:`qwenvl.optim`).
* Per logging step, on top of HF's loss / grad_norm / learning_rate: ``lr/<group>`` for every group,
  ``samples_per_second``, ``tokens_per_second`` (real tokens, all ranks), ``tokens_per_second_per_device``,
  ``padding_fraction``, ``skipped_samples`` (cumulative, from the collator's ``num_skipped``) and, on
  CUDA with a known device, ``mfu``. Counters are summed over ranks with one all-reduce per log.
* Batch statistics: the collator's contract (:data:`qwenvl.data.collate.NON_MODEL_KEYS`, popped with
  :func:`~qwenvl.data.collate.pop_batch_stats`) - counted by the collator, also inside DataLoader workers, and
  carried in the batch to the main process. Each skipped sample is appended to
  ``<output_dir>/logs/skipped-samples-rank<R>.jsonl`` (kind, reason, dataset, file:line).
* Bad samples: once per optimizer step the read / skipped counts are summed over ranks (one small all-reduce)
  and the data module's ``BadSampleMonitor`` stops the run on every rank at once when, with 99 % confidence
  (one-sided Clopper-Pearson lower bound), the bad fraction is above ``--max_bad_sample_ratio`` - from the
  first samples on, and again on the totals at the end; the stop names the counts by reason kind.
* Losses per dataset (the names of ``--dataset_use`` / ``--eval_dataset_use``): the collator tags every token
  with its sample's dataset (``token_datasets``, also inside packed / flattened rows); per log line
  ``loss/<name>`` and ``tokens/<name>`` are the token-weighted training loss of each dataset since the last log
  (summed over ranks with one all-reduce; ``sum(loss/<n> x tokens/<n>) / sum(tokens/<n>)`` is the token-weighted
  loss of the window). Evaluation (``--eval_strategy steps|epoch`` with an eval dataset) logs HF's ``eval_loss``
  plus ``eval_loss_tokens`` (token-weighted over all ranks), ``eval_loss/<name>``, ``eval_tokens/<name>``,
  ``eval_samples`` and ``eval_skipped_samples``; bad eval samples are written to the skipped-samples log
  (``"phase": "eval"``) and stop the run by the same rule as training. These eval figures count each sample once
  (:class:`EvalSamples`), although the distributed sampler repeats a few to give every rank the same batches.
* :meth:`QwenVLTrainer.finish_run` (after ``train()``, before the final save): a run that trained on no sample
  is an error; rank 0 logs the summary (samples trained / skipped by kind, all ranks), ``qwenvl.train`` prints it.
* HF's unused-column removal is off: the collator receives whole samples (skipped ones carry no model inputs).
* ``--packing_rows R`` (with ``--data_packing``): steps sized by tokens, R rows of ``model_max_length`` per device,
  instead of ``per_device_train_batch_size`` samples. Rank 0 estimates every sample's tokens without decoding media
  (:mod:`qwenvl.data.length_estimate`) and sends them to the other ranks; the training DataLoader's batch sampler is
  :class:`~qwenvl.data.length_sampler.TokenBudgetBatchSampler` (every sample once per epoch, the same number of
  steps on every rank, seeded by ``data_seed`` / ``seed`` and the epoch). Evaluation batches are unchanged.
* Data position (:class:`~qwenvl.trainer_position.DataPositionMixin`): every checkpoint carries
  ``vlsft-position.json`` (geometry, epoch, samples of it trained); a resume places the run by samples, so a new
  world size, batch, accumulation or ``packing_rows`` trains each sample of the epoch once.
* ``VLSFT_SAMPLE_LOG=1`` writes ``<output_dir>/logs/samples-rank<R>.jsonl``: per micro-batch the rank,
  world size, fingerprints of the samples and its image/video token counts (used by the tests to prove
  that ranks see different data).
* Saved weights always carry the standard Hugging Face key names (see :func:`standardise_checkpoint_keys`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from qwenvl import loss as qloss
from qwenvl import mfu
from qwenvl.data.collate import BadSampleLimitExceeded, BadSampleMonitor, describe_kinds, pop_batch_stats
from qwenvl.data.token_budget import budget_problem, tokens_per_step
from qwenvl.loss import token_mean_loss
from qwenvl.model import parameter_groups
from qwenvl.optim import adamw_kwargs
from qwenvl.optim import describe as describe_optimizer
from qwenvl.problems import UserError
from qwenvl.runpolicy import read_run_record, write_run_record
from qwenvl.trainer_position import DataPositionMixin

__all__ = ["QwenVLTrainer", "dataset_loss_sums", "token_mean_loss"]

logger = logging.getLogger(__name__)


def _segment_lengths(inputs: dict) -> list[int]:
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return [int(x) for x in mask.sum(dim=1).tolist()]
    pos = inputs.get("position_ids")
    if pos is not None and pos.dim() == 3 and pos.shape[0] == 4:
        lengths: list[int] = []
        for row in pos[0]:
            starts = (row == 0).nonzero().view(-1).tolist() + [row.numel()]
            lengths += [e - s for s, e in zip(starts[:-1], starts[1:], strict=False)]
        return lengths
    cu = inputs.get("cu_seqlens")
    if cu is not None:
        c = cu.view(-1).tolist()
        return [e - s for s, e in zip(c[:-1], c[1:], strict=False)]
    return [ids.shape[1]] * ids.shape[0]


def _segments(inputs: dict) -> list[torch.Tensor]:
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return [row[m.bool()] for row, m in zip(ids, mask, strict=False)]
    out: list[torch.Tensor] = []
    lengths = _segment_lengths(inputs)
    flat = ids.reshape(-1)
    start = 0
    for n in lengths:
        out.append(flat[start:start + n])
        start += n
    return out


class QwenVLTrainer(DataPositionMixin, Trainer):
    def __init__(self, *args, image_token_id: int | None = None, video_token_id: int | None = None,
                 data_report: dict | None = None, bad_sample_monitor=None, dataset_names: list[str] | None = None,
                 **kwargs):
        model = kwargs.get("model") if kwargs.get("model") is not None else (args[0] if args else None)
        text_cfg = getattr(getattr(model, "config", None), "text_config", None)
        aux_coef = float(getattr(text_cfg, "router_aux_loss_coef", 0.0) or 0.0) \
            if getattr(text_cfg, "output_router_logits", False) else 0.0
        # the MoE router loss as the model adds it when it computes the loss itself (labels are popped here)
        kwargs.setdefault("compute_loss_func", functools.partial(token_mean_loss, aux_coef=aux_coef))
        super().__init__(*args, **kwargs)
        self._chunked_loss = qloss.install(self.model)  # no [tokens x vocabulary] logits (qwenvl.loss)
        logger.info("chunked loss head %s", self._chunked_loss)
        self._dataset_names = list(dataset_names or [])
        self._ds_win = torch.zeros(2 * len(self._dataset_names), dtype=torch.float64)  # loss sums, then tokens
        self._eval_acc = torch.zeros_like(self._ds_win)
        self._eval_counts = [0, 0]  # samples, skipped (batches without sample ids)
        self._eval_by_sample = EvalSamples()  # batches with sample ids: per sample, counted once over the ranks
        self._eval_monitor = BadSampleMonitor(getattr(bad_sample_monitor, "max_ratio", 1.0))
        self._image_token_id = image_token_id
        self._video_token_id = video_token_id
        self._data_report = data_report
        self.add_callback(LogLastStepCallback())
        # without a monitor the counts are still kept (the no-sample check), but the ratio never stops the run
        self._bad_sample_monitor = bad_sample_monitor if bad_sample_monitor is not None else BadSampleMonitor(1.0)
        self._bad_sample_monitor.hint = f"see {Path(self.args.output_dir) / 'logs'}/skipped-samples-rank*.jsonl"
        self.add_callback(BadSampleCheckCallback(self))
        self._steps_this_run = 0
        #: what the checkpoint's vlsft-run.json records (qwenvl.train sets them): settings compared on resume
        self.run_settings: dict = {}
        self.run_schedule: dict = {}
        self._resuming_from: str | None = None
        self._trained_before: int | None = 0  # samples trained by the run's earlier segments (None: unknown)
        self.loading_checkpoint = False  # True from train(resume) until the checkpoint's state is loaded
        self._skip_log = None
        self._reset_window()
        self._skipped_total = 0
        self._micro_step = 0
        self._sample_log = None
        if os.environ.get("VLSFT_SAMPLE_LOG") == "1":
            d = Path(self.args.output_dir) / "logs"
            d.mkdir(parents=True, exist_ok=True)
            self._sample_log = open(d / f"samples-rank{self.args.process_index}.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._flop_params = mfu.flop_params(self.model)  # matmul parameters per part, trained flags
        self._token_sampler = None
        rows = getattr(self.args, "packing_rows", None)
        found = budget_problem(packing=getattr(self.data_collator, "mode", None) == "packing", packing_rows=rows)
        if found:
            raise UserError(f"{found[0]} ({found[1]})")
        self._peak = mfu.peak_flops(torch.cuda.get_device_name() if torch.cuda.is_available() else None)

    # ---- optimizer --------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = parameter_groups(opt_model, learning_rate=self.args.learning_rate,
                                      weight_decay=self.args.weight_decay,
                                      mm_projector_lr=getattr(self.args, "mm_projector_lr", None),
                                      vision_tower_lr=getattr(self.args, "vision_tower_lr", None))
            if not groups:
                raise ValueError("no trainable parameters: set at least one of tune_mm_vision, tune_mm_mlp, tune_mm_llm")
            resumed = self._resuming_from
            for g in groups:
                # on a resume the checkpoint's optimizer state brings back its own base lr: the configured one
                # applies to a fresh run only (qwenvl.train warns when they differ)
                lr = (f"lr from {Path(resumed).name} (configured {g['lr']:.3g}, applied to a fresh run only)"
                      if resumed else f"lr {g['lr']:.3g}")
                logger.info("optimizer group %-16s %s weight_decay %.3g params %d", g["name"], lr,
                            g["weight_decay"], sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in g["params"]))
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            if optimizer_cls is torch.optim.AdamW:  # fused where torch has the kernel (qwenvl.optim)
                optimizer_kwargs = {**optimizer_kwargs,
                                    **adamw_kwargs(self.args.optim, [p for g in groups for p in g["params"]])}
            if _offloads_optimizer(self.args):
                # ZeRO-Offload steps the optimizer on the CPU and insists on DeepSpeed's CPU Adam (a C++ op
                # JIT-built on first use, ~40 s, cached in TORCH_EXTENSIONS_DIR); our groups keep their lrs.
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                optimizer_cls = DeepSpeedCPUAdam
                optimizer_kwargs = {"lr": self.args.learning_rate, "betas": (self.args.adam_beta1, self.args.adam_beta2),
                                    "eps": self.args.adam_epsilon, "weight_decay": self.args.weight_decay,
                                    "adamw_mode": True}
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            logger.info("optimizer: %s (--optim %s)", describe_optimizer(self.optimizer),
                        getattr(self.args.optim, "value", self.args.optim))
        return self.optimizer

    # ---- throughput-sized batches (--packing_rows) -----------------------------------------------------
    def get_train_dataloader(self):
        rows = getattr(self.args, "packing_rows", None)
        if not rows:
            return super().get_train_dataloader()
        from functools import partial

        from torch.utils.data import DataLoader
        from transformers.trainer_utils import seed_worker

        self._token_sampler = self._make_token_sampler(int(rows))
        a = self.args
        params = {"batch_sampler": self.data_order(self._token_sampler), "collate_fn": self.data_collator,
                  "num_workers": a.dataloader_num_workers, "pin_memory": a.dataloader_pin_memory,
                  "persistent_workers": a.dataloader_persistent_workers,
                  "multiprocessing_context": a.dataloader_multiprocessing_context,
                  "prefetch_factor": a.dataloader_prefetch_factor, "in_order": a.dataloader_in_order,
                  "worker_init_fn": partial(seed_worker, num_workers=a.dataloader_num_workers, rank=a.process_index)}
        # the sampler yields every rank's steps (step i is rank i % world): accelerate's BatchSamplerShard picks ours
        return self.accelerator.prepare(DataLoader(self.train_dataset, **params))

    def _make_token_sampler(self, rows: int):
        from qwenvl.data.length_estimate import estimate_lengths
        from qwenvl.data.length_sampler import TokenBudgetBatchSampler

        ds = self.train_dataset
        if not all(hasattr(ds, k) for k in ("sources", "ds_ids", "rec_ids", "builder")):
            raise UserError("--packing_rows needs qwenvl's own training dataset (dataset_use / dataset_dict), whose "
                            "records it reads to estimate sample lengths")
        payload = [None]
        if self.args.process_index == 0:  # one estimate, sent to every rank: all ranks must plan the same steps
            payload = [estimate_lengths(ds)]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.args.world_size > 1:
            torch.distributed.broadcast_object_list(payload, src=0)
        lengths, info = payload[0]
        cap = int(self.data_collator.model_max_length)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        sampler = TokenBudgetBatchSampler(lengths, row_capacity=cap, rows_per_step=rows,
                                          world_size=max(self.args.world_size, 1), seed=seed)
        summary = sampler.summary()
        if self.args.process_index == 0:
            logger.info("token budget: %d rows x %d = %d tokens per device per step (packing_rows); estimated "
                        "lengths of %d samples in %.1f s (%d image headers read, %d images and %d videos at their "
                        "pixel bound, bytes per token %s): %d rows, %d steps per epoch per rank, %.1f samples per "
                        "step, estimated fill %.1f %%", rows, cap, tokens_per_step(rows, cap), info["samples"],
                        info["seconds"], info["image_headers"], info["images_at_bound"], info["videos_at_bound"],
                        info["bytes_per_token"], summary["rows"], summary["steps_per_rank"],
                        summary["samples_per_step"], 100 * summary["estimated_fill"])
            if summary["rows"] < summary["steps"]:
                logger.warning("token budget: %d samples make fewer rows than the %d steps every rank needs: some "
                               "steps are empty (a masked dummy batch whose loss counts 0)", info["samples"],
                               summary["steps"])
        return sampler

    def _run_epoch(self, *args, **kwargs):
        # HF sets a batch sampler's epoch through accelerate's wrappers, but not once a resumed epoch is wrapped in
        # a SkipBatchSampler: the epoch number, set here, decides the steps of the epoch (exact resume)
        if self._token_sampler is not None and "epoch" in kwargs:
            self._token_sampler.set_epoch(int(kwargs["epoch"]))
        return super()._run_epoch(*args, **kwargs)

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        # the collator needs whole samples: a skipped sample is a dict of bookkeeping keys only (no model inputs),
        # which HF's column removal would empty (KeyError in the collator), and sample_index feeds the logs
        return data_collator

    # ---- statistics -------------------------------------------------------------------------------
    def _reset_window(self) -> None:
        self._win = {"samples": 0.0, "real": 0.0, "total": 0.0, "skipped": 0.0, "flops": 0.0}
        self._win_start = time.perf_counter()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        stats = pop_batch_stats(inputs)
        token_datasets = stats.pop("token_datasets", None)
        by_sample = False
        if model.training:
            self._account(inputs, stats)
            if "num_samples" in stats:  # counted here, checked over all ranks once per step (check_bad_samples)
                self._bad_sample_monitor.update(stats, check=False)
            if stats.get("skipped"):
                self._write_skips(stats["skipped"])
        else:  # evaluation: its own counts (the same stop rule, decided on the totals after the loop)
            if "num_samples" in stats:
                self._eval_monitor.update(stats, check=False)
            if stats.get("skipped"):
                self._write_skips([{**r, "phase": "eval"} for r in stats["skipped"]])
            by_sample = self._eval_by_sample.note_batch(stats)
            if not by_sample:  # no sample ids (a dataset of another kind): counted as they come
                self._eval_counts[0] += int(stats.get("num_samples", 0) or 0)
                self._eval_counts[1] += int(stats.get("num_skipped", 0) or 0)
        split = token_datasets is not None and len(self._dataset_names) > 0 and int(stats.get("num_samples", 1)) > 0
        labels = inputs.get("labels")
        with qloss.armed(labels if self._chunked_loss else None):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs or split,
                                          num_items_in_batch=num_items_in_batch)
            if split:
                loss, outputs = result
                if labels is not None:
                    tokens = qloss.per_token(outputs)
                    if not model.training and by_sample:  # per sample: a sample the sampler repeats counts once
                        n = len(stats["sample_ids"])
                        sums = (dataset_loss_sums_of_tokens(*tokens, stats["token_samples"], n)
                                if tokens is not None else
                                dataset_loss_sums(outputs, labels, stats["token_samples"], n))
                        self._eval_by_sample.add(stats, token_datasets, sums)
                    else:
                        acc = self._ds_win if model.training else self._eval_acc
                        acc += (dataset_loss_sums_of_tokens(*tokens, token_datasets, len(self._dataset_names))
                                if tokens is not None else
                                dataset_loss_sums(outputs, labels, token_datasets, len(self._dataset_names)))
                result = (loss, outputs) if return_outputs else loss
        n = stats.get("num_samples")
        if n is not None and int(n) == 0:
            # an all-dummy batch (every sample of this micro-batch was skipped): it still runs forward and
            # backward so ZeRO-3 ranks stay in step, but contributes nothing
            if return_outputs:
                return result[0] * 0.0, result[1]
            return result * 0.0
        return result

    def _account(self, inputs: dict, stats: dict) -> None:
        ids = inputs["input_ids"]
        lengths = _segment_lengths(inputs)
        real = sum(lengths)
        skipped = stats.get("num_skipped", 0)
        n_samples = stats.get("num_samples")
        n_samples = n_samples if n_samples is not None else len(lengths)
        patches = 0
        for key in ("pixel_values", "pixel_values_videos"):
            if inputs.get(key) is not None:
                patches += int(inputs[key].shape[0])
        self._win["samples"] += n_samples
        self._win["real"] += real
        self._win["total"] += ids.numel()
        self._win["skipped"] += skipped
        self._win["flops"] += mfu.step_flops(**self._flop_params, text_tokens=real, vision_patches=patches,
                                             sum_len_sq=sum(n * n for n in lengths))
        if self._sample_log is not None:
            segs = _segments(inputs)
            rec = {
                "micro_step": self._micro_step, "global_step": self.state.global_step,
                "rank": self.args.process_index, "world_size": self.args.world_size,
                "samples": [hashlib.sha1(s.cpu().numpy().tobytes()).hexdigest()[:12] for s in segs],
                "image_tokens": int((ids == self._image_token_id).sum()) if self._image_token_id is not None else None,
                "video_tokens": int((ids == self._video_token_id).sum()) if self._video_token_id is not None else None,
            }
            for key, name in (("image_grid_thw", "images"), ("video_grid_thw", "videos")):
                g = inputs.get(key)  # masked dummies are 2x2-patch grids: count only larger ones
                rec[name] = int((g.prod(dim=-1) > 4).sum()) if g is not None else 0
            if "sample_ids" in stats:
                rec["sample_ids"] = stats["sample_ids"]
                if hasattr(self.train_dataset, "record_key"):  # name:record, to prove what was (not) trained on
                    rec["records"] = [self.train_dataset.record_key(i) for i in stats["sample_ids"]]
            self._sample_log.write(json.dumps(rec) + "\n")
            self._sample_log.flush()
        self._micro_step += 1
        if self.optimizer is not None:  # the lrs this step uses (the scheduler moves them after the step)
            self._lrs = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            self._add_window_metrics(logs)
        super().log(logs, start_time)

    def _add_window_metrics(self, logs: dict) -> None:
        keys = ("samples", "real", "total", "skipped", "flops")
        w = dict(zip(keys, _sum_over_ranks([self._win[k] for k in keys]), strict=False))
        dt = max(time.perf_counter() - self._win_start, 1e-9)
        world = max(self.args.world_size, 1)
        self._skipped_total += int(w["skipped"])
        logs["samples_per_second"] = round(w["samples"] / dt, 3)
        logs["tokens_per_second"] = round(w["real"] / dt, 1)
        logs["tokens_per_second_per_device"] = round(w["real"] / dt / world, 1)
        planned = _planned_rate()
        if planned:  # vlsft print-args / train's estimate (qwenvl.timing): measured / planned
            logs["tokens_per_second_vs_plan"] = round(w["real"] / dt / world / planned, 3)
        logs["padding_fraction"] = round(1.0 - w["real"] / w["total"], 4) if w["total"] else 0.0
        logs["skipped_samples"] = self._skipped_total
        if self._peak:
            logs["mfu"] = round(w["flops"] / dt / (self._peak * world), 4)
        logs.update(getattr(self, "_lrs", {}))
        if self._dataset_names:  # per-dataset training loss, token-weighted, all ranks
            logs.update(_per_dataset_metrics(self._dataset_names, _sum_over_ranks(self._ds_win.tolist()), "loss",
                                             "tokens"))
            self._ds_win.zero_()
        self._reset_window()

    # ---- evaluation -------------------------------------------------------------------------------
    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_acc.zero_()
        self._eval_counts = [0, 0]
        self._eval_by_sample = EvalSamples()
        self._eval_monitor.seen = self._eval_monitor.skipped = self._eval_monitor.trained = 0
        self._eval_monitor.kinds = {}
        out = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                      ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        k = len(self._dataset_names)
        # the distributed sampler evens the ranks out by repeating samples: those are counted once
        unique_sums, unique_counts = self._eval_by_sample.totals_over_ranks(k)
        values = _sum_over_ranks(self._eval_acc.tolist() + [float(x) for x in self._eval_counts])
        sums = [a + b for a, b in zip(values[:2 * k], unique_sums, strict=True)]
        counts = [a + b for a, b in zip(values[2 * k:], unique_counts, strict=True)]
        p = metric_key_prefix
        if k:
            out.metrics.update(_per_dataset_metrics(self._dataset_names, sums, f"{p}_loss", f"{p}_tokens"))
            tokens = sum(sums[k:])
            if tokens:
                out.metrics[f"{p}_loss_tokens"] = round(sum(sums[:k]) / tokens, 6)
        out.metrics[f"{p}_samples"] = int(counts[0])
        out.metrics[f"{p}_skipped_samples"] = int(counts[1])
        seen, skipped = int(counts[0] + counts[1]), int(counts[1])
        if self._eval_monitor.exceeded(skipped, seen):
            raise BadSampleLimitExceeded("evaluation " + self._eval_monitor.stop_message(
                seen, skipped, self._eval_monitor.kinds))
        return out

    # ---- bad samples and the run's honesty -----------------------------------------------------------
    def _write_skips(self, records: list[dict]) -> None:
        if self._skip_log is None:
            d = Path(self.args.output_dir) / "logs"
            d.mkdir(parents=True, exist_ok=True)
            self._skip_log = open(d / f"skipped-samples-rank{self.args.process_index}.jsonl", "a",  # noqa: SIM115
                                  encoding="utf-8")
        for rec in records:
            self._skip_log.write(json.dumps({"rank": self.args.process_index, "step": self.state.global_step,
                                             **rec}, default=str) + "\n")
        self._skip_log.flush()

    def sample_totals(self) -> tuple[int, int, int]:
        """``(read, skipped, trained)`` summed over ranks (a collective: every rank calls it together)."""
        m = self._bad_sample_monitor
        seen, skipped, trained = _sum_over_ranks([m.seen, m.skipped, m.trained])
        return int(seen), int(skipped), int(trained)

    def _kinds_over_ranks(self) -> dict:
        kinds = dict(self._bad_sample_monitor.kinds)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, kinds)
            kinds = {}
            for part in parts:
                for k, n in (part or {}).items():
                    kinds[k] = kinds.get(k, 0) + int(n)
        return kinds

    def check_bad_samples(self) -> tuple[int, int, int]:
        """The bad-sample stop on the counts so far, summed over ranks: the same decision on every rank."""
        seen, skipped, trained = self.sample_totals()
        m = self._bad_sample_monitor
        if m.exceeded(skipped, seen):
            raise BadSampleLimitExceeded(m.stop_message(seen, skipped, self._kinds_over_ranks()))
        return seen, skipped, trained

    # ---- the run over its segments (resumes) -------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        rfc = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        self._resuming_from = rfc
        if rfc:
            record = read_run_record(rfc)
            before = record.get("trained_samples") if record else None
            self._trained_before = int(before) if isinstance(before, int) and before >= 0 else None
        self.loading_checkpoint = bool(rfc)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _prepare_for_training(self, *args, **kwargs):
        out = super()._prepare_for_training(*args, **kwargs)
        self.loading_checkpoint = False  # the weights, optimizer and scheduler state of the checkpoint are loaded
        return out

    def trained_over_run(self) -> int | None:
        """Samples trained by the whole run (earlier segments too), summed over ranks (a collective); None when
        a checkpoint of an older vlsft left the earlier count unknown and this segment trained none."""
        trained = self.sample_totals()[2]
        if self._trained_before is None:
            return trained or None
        return self._trained_before + trained

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        if self.control.should_save and self.trained_over_run() == 0:
            # a checkpoint of a run that trained no sample would be resumed as a finished run later
            self.control.should_save = False
            if self.args.process_index == 0:
                logger.warning("no checkpoint at step %d: no sample has been trained yet (every sample read was "
                               "bad)", self.state.global_step)
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def finish_run(self) -> str:
        """After ``train()``, on every rank, before the final model is saved: the totals over ranks. A run that
        trained on no sample (every sample bad) or is past the bad-sample limit raises
        :class:`BadSampleLimitExceeded` (no final model is written). Rank 0 logs the summary line (samples
        trained / skipped by kind / read, all ranks); it is returned for the entry point to print."""
        seen, skipped, trained = self.check_bad_samples()
        kinds = self._kinds_over_ranks() if skipped else {}
        world = max(self.args.world_size, 1)
        line = (f"# samples: {trained:,} trained, {skipped:,} skipped as bad"
                + (f" ({describe_kinds(kinds)})" if skipped else "") + f", {seen:,} read on {world} rank(s)")
        if self.args.process_index == 0:
            logger.info("%s", line[2:])
        if self._skip_log is not None:
            self._skip_log.close()
            self._skip_log = None
        before = self._trained_before if self._resuming_from else 0
        if trained == 0 and not (seen == 0 and self._steps_this_run == 0 and self.state.global_step > 0
                                 and (before is None or before > 0)):
            # (a resumed run with no step left reads nothing; that is not a failure when its earlier segments
            # trained samples: the count is in the checkpoint's vlsft-run.json, unknown for older checkpoints)
            what = (f"all {seen:,} samples read were bad ({describe_kinds(kinds)}); {self._bad_sample_monitor.hint}"
                    if seen else
                    f"the run resumed from {self._resuming_from}, saved before any sample was trained, with no step "
                    "left (start over: output.resume=never with output.overwrite=true)"
                    if self._resuming_from and self.state.global_step > 0 else "no sample was read")
            raise BadSampleLimitExceeded(f"no sample was trained: {what}; no final model was written; fix the data "
                                         "(vlsft datasets check --deep)")
        return line

    # ---- saving -----------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        delay = os.environ.get("VLSFT_TEST_SAVE_DELAY_S")  # test hook: a slow checkpoint save (process faults)
        if delay:
            logger.warning("VLSFT_TEST_SAVE_DELAY_S=%s: the checkpoint save sleeps first (test hook)", delay)
            time.sleep(float(delay))
        trained = self.trained_over_run()  # every rank (a collective), before rank 0 writes it
        out = super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and folder.is_dir():  # what a resume compares with (qwenvl.train)
            write_run_record(folder, {"version": 1, "global_step": self.state.global_step,
                                      "trained_samples": trained, "settings": self.run_settings,
                                      "schedule": self.run_schedule})
        return out

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        out = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            standardise_checkpoint_keys(out, self.model)


def dataset_loss_sums(outputs, labels: torch.Tensor, token_datasets: torch.Tensor, k: int,
                      chunk: int = 2048) -> torch.Tensor:
    """``[loss sum of dataset 0..k-1, trained tokens of dataset 0..k-1]`` (float64, CPU) for one batch: the
    causal-LM cross entropy of every trained token (as :func:`token_mean_loss` computes it: logits at t predict
    the label at t+1, in float32), added to its sample's dataset. No gradient; chunked over tokens."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    out = torch.zeros(2 * k, dtype=torch.float64)
    with torch.no_grad():
        dev = logits.device
        shift_labels = labels[..., 1:].to(dev)
        ds = token_datasets[..., 1:].to(dev)
        mask = (shift_labels != -100) & (ds >= 0)
        if not bool(mask.any()):
            return out
        flat_logits = logits[..., :-1, :][mask]
        flat_labels, flat_ds = shift_labels[mask], ds[mask]
        for s in range(0, flat_labels.numel(), chunk):
            ce = torch.nn.functional.cross_entropy(flat_logits[s:s + chunk].float(), flat_labels[s:s + chunk],
                                                   reduction="none").double().cpu()
            d = flat_ds[s:s + chunk].cpu()
            out[:k].index_add_(0, d, ce)
            out[k:].index_add_(0, d, torch.ones_like(ce))
    return out


def dataset_loss_sums_of_tokens(losses: torch.Tensor, positions: torch.Tensor, token_datasets: torch.Tensor,
                                k: int) -> torch.Tensor:
    """:func:`dataset_loss_sums` from the per-token losses of :mod:`qwenvl.loss` (``positions`` index the
    batch's flattened positions; the token at position t is trained on the label at t+1)."""
    out = torch.zeros(2 * k, dtype=torch.float64)
    with torch.no_grad():
        ds = torch.full_like(token_datasets, -1)
        ds[..., :-1] = token_datasets[..., 1:]
        d = ds.reshape(-1).to(positions.device).index_select(0, positions).cpu()
        ce = losses.detach().double().cpu()
        keep = d >= 0
        out[:k].index_add_(0, d[keep], ce[keep])
        out[k:].index_add_(0, d[keep], torch.ones_like(ce[keep]))
    return out


class EvalSamples:
    """Evaluation results per sample, so that a sample counts once however often it was evaluated.

    To give every rank the same number of batches, the distributed evaluation sampler repeats samples from the
    start of the eval set (5 samples on 2 ranks x batch 4 evaluate 8). Each sample is keyed by its dataset index
    (``sample_ids``): its dataset, loss sum and trained tokens; a skipped sample by the index of its skip
    record. :meth:`totals_over_ranks` gathers them from every rank (one collective) and sums the unique ones."""

    def __init__(self) -> None:
        self.good: dict[int, tuple[int, float, float]] = {}  # sample index -> (dataset, loss sum, tokens)
        self.skipped: set[int] = set()
        self.unkeyed_skips = 0  # skip records without an index (counted as they come)
        self._pending: list[int] = []  # this batch's sample ids, until its losses are known

    def note_batch(self, stats: dict) -> bool:
        """Record a batch's samples (True) or nothing when it carries no sample ids (False: count it elsewhere)."""
        ids = stats.get("sample_ids")
        n = int(stats.get("num_samples", 0) or 0)
        if n and (ids is None or len(ids) != n or "token_samples" not in stats):
            return False
        for r in stats.get("skipped") or []:
            if r.get("sample_index") is not None:
                self.skipped.add(int(r["sample_index"]))
            else:
                self.unkeyed_skips += 1
        self._pending = [int(i) for i in ids or []]
        for i in self._pending:  # no loss computed (no labels, no dataset split): still one sample
            self.good.setdefault(i, (-1, 0.0, 0.0))
        return True

    def add(self, stats: dict, token_datasets: torch.Tensor, sums: torch.Tensor) -> None:
        """This batch's per-sample ``[loss sums, tokens]`` (``sums``, in ``sample_ids`` order)."""
        n = len(self._pending)
        slots = stats["token_samples"].reshape(-1).cpu()
        tags = token_datasets.reshape(-1).cpu()
        keep = slots >= 0
        ds = torch.full((n,), -1, dtype=torch.long)
        ds[slots[keep]] = tags[keep]
        for j, i in enumerate(self._pending):
            self.good[i] = (int(ds[j]), float(sums[j]), float(sums[n + j]))

    def totals_over_ranks(self, k: int) -> tuple[list[float], list[float]]:
        """``([loss sums of the k datasets, their tokens], [samples, skipped])`` over all ranks, each sample once."""
        mine = (self.good, self.skipped, self.unkeyed_skips)
        every = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            every = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, mine)
        good: dict = {}
        skipped: set = set()
        unkeyed = 0
        for g, s, u in every:
            for i, v in g.items():
                if i not in good or (good[i][0] < 0 <= v[0]):
                    good[i] = v
            skipped |= s
            unkeyed += u
        sums = [0.0] * (2 * k)
        for d, loss, tokens in good.values():
            if 0 <= d < k:
                sums[d] += loss
                sums[k + d] += tokens
        return sums, [float(len(good)), float(len(skipped - good.keys()) + unkeyed)]


def _per_dataset_metrics(names: list[str], sums: list[float], loss_key: str, tokens_key: str) -> dict:
    k = len(names)
    metrics: dict = {}
    for i, name in enumerate(names):
        n = sums[k + i]
        if n:
            metrics[f"{loss_key}/{name}"] = round(sums[i] / n, 6)
            metrics[f"{tokens_key}/{name}"] = int(n)
    return metrics


def _sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sum over all ranks (one all-reduce; the values themselves without a process group)."""
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        backend = torch.distributed.get_backend()
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        t = t.to(dev)
        torch.distributed.all_reduce(t)
        t = t.cpu()
    return t.tolist()


def standardise_checkpoint_keys(folder: str | os.PathLike, model) -> list[str]:
    """Rewrite saved safetensors so every key is what a plain ``save_pretrained`` writes.

    DeepSpeed ZeRO-3's gathered state dict comes back through a second key conversion, which writes the
    text decoder as ``model.model.layers.*``; other loaders (vLLM, older transformers) expect
    ``model.layers.*``. Returns the renamed keys (empty when nothing needed fixing).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        return []
    expected = set(_standard_keys(model))
    renamed: list[str] = []
    index_path = folder / "model.safetensors.index.json"
    weight_map: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            keys = list(fh.keys())
            meta = fh.metadata() or {"format": "pt"}
            mapping = {k: _fix_key(k, expected) for k in keys}
            if all(k == v for k, v in mapping.items()):
                weight_map.update({k: f.name for k in keys})
                continue
            tensors = {mapping[k]: fh.get_tensor(k) for k in keys}
        renamed += [k for k, v in mapping.items() if k != v]
        tmp = f.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, f)
        weight_map.update({v: f.name for v in mapping.values()})
    if renamed and index_path.exists():
        idx = json.loads(index_path.read_text())
        idx["weight_map"] = dict(sorted(weight_map.items()))
        index_path.write_text(json.dumps(idx, indent=2))
    if renamed:
        logger.info("standardised %d checkpoint keys in %s (e.g. %s)", len(renamed), folder, renamed[0])
    return renamed


_STD_CACHE: dict[int, list[str]] = {}


def _standard_keys(model) -> list[str]:
    """Key names a plain ``save_pretrained`` of a freshly built model of this class writes.

    Computed from this model's parameter names with transformers' own reverse key conversion, as for a
    model built from its config (no load-time conversions attached; no new model is built, which under
    ZeRO-3 would start collectives on one rank only).
    """
    key = id(type(model))
    if key not in _STD_CACHE:
        from transformers.core_model_loading import revert_weight_conversion

        # meta tensors of the real shapes (ZeRO-3: ds_shape): the MoE converters transpose / split expert tensors
        sd = {k: torch.empty(tuple(getattr(v, "ds_shape", v.shape)), device="meta")
              for k, v in model.state_dict(keep_vars=True).items()}
        had = "_weight_conversions" in model.__dict__
        saved = model.__dict__.pop("_weight_conversions", None)
        try:
            names = list(revert_weight_conversion(model, sd).keys())
        except Exception:  # noqa: BLE001 - fall back to the known layout of these families
            names = [_legacy_name(k) for k in sd]
        finally:
            if had:
                model.__dict__["_weight_conversions"] = saved
        _STD_CACHE[key] = names
    return _STD_CACHE[key]


def _legacy_name(k: str) -> str:
    if k.startswith("model.visual."):
        return k[len("model."):]
    if k.startswith("model.language_model."):
        return "model." + k[len("model.language_model."):]
    return k


def _fix_key(k: str, expected: set[str]) -> str:
    if k in expected:
        return k
    candidates = []
    if k.startswith("model.model."):
        candidates.append(k[len("model."):])
    if k.startswith("model.language_model."):
        candidates.append("model." + k[len("model.language_model."):])
    if k.startswith("model.visual."):
        candidates.append(k[len("model."):])
    parts = k.split(".")
    for j in range(1, len(parts)):  # a doubled "model" segment anywhere (Qwen3-VL: model.language_model.model.*)
        if parts[j] == "model":
            candidates.append(".".join(parts[:j] + parts[j + 1:]))
    for n in (2, 3):  # a doubled prefix (Qwen3.5 MoE under ZeRO-3: model.language_model.model.language_model.*)
        if len(parts) > 2 * n and parts[n:2 * n] == parts[:n]:
            candidates.append(".".join(parts[n:]))
    for c in candidates:
        if c in expected:
            return c
    return k


def _planned_rate() -> float | None:
    from qwenvl.timing import PLANNED_ENV

    try:
        return float(os.environ.get(PLANNED_ENV, "")) or None
    except ValueError:
        return None


class LogLastStepCallback(TrainerCallback):
    """Log the last step too when ``max_steps`` is not a multiple of ``logging_steps`` (HF would end the run
    without logging its last steps, e.g. ``--max_steps 5 --logging_steps 10`` logs no loss at all)."""

    def on_step_end(self, args, state, control, **kwargs):
        if (state.max_steps and state.global_step >= state.max_steps and state.logging_steps
                and str(getattr(args.logging_strategy, "value", args.logging_strategy)) == "steps"
                and state.global_step % state.logging_steps != 0):
            control.should_log = True
        return control


class BadSampleCheckCallback(TrainerCallback):
    """After every optimizer step (on every rank): the bad-sample stop on the counts summed over ranks."""

    def __init__(self, trainer: QwenVLTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._steps_this_run += 1
        self.trainer.check_bad_samples()
        return control


class ExtraRunConfigCallback(TrainerCallback):
    """Adds the resolved run config and per-dataset sample counts to the W&B run (rank 0 only)."""

    def __init__(self, run_config: dict | None, data_report: dict | None):
        self.run_config = run_config
        self.data_report = data_report

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        try:
            import wandb
        except ImportError:
            return
        if getattr(wandb, "run", None) is None:
            return
        extra = {}
        if self.run_config:
            extra["vlsft"] = self.run_config
        if self.data_report:
            extra["datasets"] = self.data_report
        if extra:
            wandb.config.update(extra, allow_val_change=True)


def _offloads_optimizer(args) -> bool:
    cfg = getattr(args, "hf_deepspeed_config", None)
    if cfg is None:
        return False
    zo = cfg.config.get("zero_optimization", {})
    return str(zo.get("offload_optimizer", {}).get("device", "none")).lower() == "cpu"
