"""Throughput-sized batches with packing: the per-device token budget in numbers and words (torch-free, numpy-free).

With ``data_packing`` the collator packs each per-device batch into rows of at most ``model_max_length`` tokens
(:mod:`qwenvl.data.collate`). By default a step holds ``per_device_train_batch_size`` *samples*, so its token count
follows their lengths. ``packing_rows`` (run YAML ``data.packing_rows``) sizes a step by *tokens* instead::

    tokens per device per step   = packing_rows x model_max_length
    tokens per optimizer step    = that x gradient_accumulation_steps x world size

and the length-aware batch sampler (:mod:`qwenvl.data.length_sampler`) fills each step up to that budget from
estimated sample lengths (:mod:`qwenvl.data.length_estimate`); ``per_device_train_batch_size`` is then unused for
training. This module holds what the front door (``vlsft print-args``) and the trainer both say about it.
"""

from __future__ import annotations


def tokens_per_step(packing_rows: int, model_max_length: int) -> int:
    """The per-device token budget of one step: ``packing_rows`` rows of ``model_max_length`` tokens."""
    return int(packing_rows) * int(model_max_length)


def budget_problem(*, packing: bool, packing_rows: int | None) -> tuple[str, str] | None:
    """``(message, hint)`` when ``packing_rows`` cannot be used as given, else None."""
    if packing_rows is None:
        return None
    if int(packing_rows) < 1:
        return (f"packing_rows {packing_rows} must be at least 1 (rows of model_max_length tokens per device per "
                "step)", "e.g. packing_rows: 4, or remove it to pack per_device_train_batch_size samples per step")
    if not packing:
        return ("packing_rows sets a token budget for packed rows, but packing is off",
                "set data.packing: true (trainer: --data_packing True), or remove data.packing_rows")
    return None


def budget_lines(*, packing: bool, packing_rows: int | None, model_max_length: int, per_device: int,
                 accumulation: int, world: int) -> list[str]:
    """What ``print-args`` says about tokens per step (nothing without packing)."""
    if not packing:
        return []
    accumulation, world = max(int(accumulation), 1), max(int(world), 1)
    if packing_rows:
        per_device_tokens = tokens_per_step(packing_rows, model_max_length)
        per_step = per_device_tokens * accumulation * world
        return [f"tokens per step = {packing_rows} rows x {model_max_length:,} (model_max_length) = "
                f"{per_device_tokens:,} per device; x {accumulation} accumulation x {world} ranks = {per_step:,} per "
                "optimizer step (data.packing_rows: samples per step follow their estimated lengths and the trainer "
                "logs the steps per epoch at start; per_device_train_batch_size and the step counts below, which "
                "assume it, do not apply)"]
    bound = int(per_device) * int(model_max_length)
    return [f"tokens per step <= {per_device} samples x {model_max_length:,} (model_max_length) = {bound:,} per "
            f"device; x {accumulation} accumulation x {world} ranks = {bound * accumulation * world:,} per optimizer "
            "step at most (packing per_device_train_batch_size samples: tokens follow their lengths; "
            "data.packing_rows sets a token budget instead)"]
