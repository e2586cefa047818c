"""The length-aware batch sampler behind ``packing_rows``: each packed step filled up to a token budget (torch-free).

``TokenBudgetBatchSampler(lengths, row_capacity=model_max_length, rows_per_step=packing_rows, world_size=W,
seed=data_seed)`` yields the steps of one epoch as lists of dataset indices, for all ranks together: step ``i``
belongs to rank ``i % W`` (what accelerate's ``BatchSamplerShard`` hands each rank, so the trainer passes this
sampler to the DataLoader as its ``batch_sampler``). Properties (tested in ``tests/test_token_budget.py``):

* **Every sample exactly once per epoch**: no sample is dropped or repeated to even out ranks.
* **The budget, per the estimate**: each step's samples fit ``rows_per_step`` rows of ``row_capacity`` tokens
  (at most ``1 - margin`` full, :data:`MARGIN`, so estimation noise and the collator's own row packing still fit).
  A sample estimated above one row gets a row to itself: the collator decides on its real length (a sample longer
  than ``model_max_length`` is skipped and counted; a step whose real tokens need one more row gets one).
* **Equal steps on every rank**: the step count is a multiple of ``world_size``; rows are dealt so step sizes differ
  by at most one row (balanced ranks). Only a dataset with fewer samples than steps leaves a step empty, which the
  collator turns into a masked dummy batch (its loss counts 0).
* **Fixed step count, fresh composition each epoch**: the rows are built once by best-fit-decreasing bin packing on
  the estimated lengths rounded up to a quantum (``row_capacity / 1024``); each epoch the samples of one rounded
  length swap places at random, the rows are shuffled and dealt into steps. So ``len()`` never changes (the LR
  schedule and ``resume`` step arithmetic stay exact) while which samples share a step changes every epoch.
* **Deterministic**: a pure function of ``(lengths, seed, epoch)``; every rank computes the same steps.

Token-mean loss is unchanged: it divides by the trained tokens of the whole optimizer step, whatever the number
of samples per step (:func:`qwenvl.loss.token_mean_loss`).
"""

from __future__ import annotations

import numpy as np

MARGIN = 0.05  # head-room below each row's capacity for estimation noise (steps are packed to <= 95 % of the rows)
LEVELS = 1024  # length quantisation: row_capacity / LEVELS tokens per unit


class TokenBudgetBatchSampler:
    """Steps of estimated tokens <= ``rows_per_step`` x ``row_capacity`` (see the module doc)."""

    def __init__(self, lengths, *, row_capacity: int, rows_per_step: int, world_size: int = 1, seed: int = 0,
                 margin: float = MARGIN):
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.ndim != 1 or len(lengths) == 0:
            raise ValueError("TokenBudgetBatchSampler needs a non-empty 1-D array of sample lengths")
        if row_capacity < 1 or rows_per_step < 1 or world_size < 1 or not 0 <= margin < 1:
            raise ValueError(f"row_capacity {row_capacity}, rows_per_step {rows_per_step}, world_size {world_size} "
                             f"and margin {margin} must be positive (margin in [0, 1))")
        self.lengths = lengths
        self.row_capacity = int(row_capacity)
        self.rows_per_step = int(rows_per_step)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.epoch = 0
        self.quantum = max(1, -(-self.row_capacity // LEVELS))
        self.units = max(1, int(self.row_capacity * (1 - margin)) // self.quantum)  # one row, in quanta
        self.size = np.clip(-(-lengths // self.quantum), 1, self.units)  # over-long samples: one row each
        slot_class, slot_row = _best_fit_decreasing(self.size, self.units)
        n_rows = int(slot_row.max()) + 1
        per_rank = -(-n_rows // (self.rows_per_step * self.world_size))
        self.num_steps = per_rank * self.world_size
        if n_rows < self.num_steps:  # fewer rows than steps (a small dataset): split rows rather than leave a step empty
            slot_row, n_rows = _split_rows(slot_row, n_rows, self.num_steps)
        self.num_rows = n_rows
        # the epoch-independent structure: slots grouped by rounded length (swapped within a group each epoch)
        self._slot_order = np.argsort(slot_class, kind="stable")
        self._slot_row = slot_row

    # ------------------------------------------------------------------ sampler protocol
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self):
        return iter(self.steps(self.epoch))

    # ------------------------------------------------------------------ the plan of one epoch
    def steps(self, epoch: int) -> list[list[int]]:
        """All ranks' steps of ``epoch`` in order (step ``i`` belongs to rank ``i % world_size``)."""
        rng = np.random.default_rng([self.seed, int(epoch), 0x7B])
        n = len(self.lengths)
        # samples grouped by rounded length, random order inside each group -> the slots of that length
        by_class = np.lexsort((rng.random(n), self.size))
        sample_of_slot = np.empty(n, dtype=np.int64)
        sample_of_slot[self._slot_order] = by_class
        # rows shuffled and dealt round-robin into the steps: step sizes differ by at most one row
        row_step = np.empty(self.num_rows, dtype=np.int64)
        row_step[rng.permutation(self.num_rows)] = np.arange(self.num_rows) % self.num_steps
        step_of_slot = row_step[self._slot_row]
        order = np.lexsort((self._slot_row, step_of_slot))  # by step, a row's samples together
        samples = sample_of_slot[order]
        bounds = np.searchsorted(step_of_slot[order], np.arange(self.num_steps + 1))
        return [samples[bounds[i]:bounds[i + 1]].tolist() for i in range(self.num_steps)]

    def rank_steps(self, rank: int, epoch: int | None = None) -> list[list[int]]:
        """The steps rank ``rank`` trains on in ``epoch`` (default: the current one)."""
        return self.steps(self.epoch if epoch is None else epoch)[rank::self.world_size]

    def summary(self) -> dict:
        """Figures for the log: rows, steps, the estimated fill of the token budget."""
        budget = self.rows_per_step * self.row_capacity
        tokens = int(self.lengths.sum())
        per_rank = self.num_steps // self.world_size
        return {"rows": self.num_rows, "steps": self.num_steps, "steps_per_rank": per_rank,
                "tokens_per_step_budget": budget, "estimated_tokens": tokens,
                "estimated_fill": round(tokens / (self.num_steps * budget), 4) if self.num_steps else 0.0,
                "samples_per_step": round(len(self.lengths) / self.num_steps, 2) if self.num_steps else 0.0}


def _best_fit_decreasing(size: np.ndarray, units: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing bin packing of integer sizes (each <= ``units``) into bins of ``units``; returns, per
    slot (one per item, items sorted by size descending), its size class and its bin. Bins are kept in buckets
    by remaining room, so an item goes to the fullest bin it fits (a bin keeps taking items of one size while they
    fit, as item-by-item best fit would): O(units^2 + items)."""
    classes, counts = np.unique(size, return_counts=True)
    open_rows: list[list[int]] = [[] for _ in range(units + 1)]  # bin ids by remaining room
    slot_class: list[int] = []
    slot_row: list[int] = []
    n_rows = 0
    for s, k in zip(classes[::-1].tolist(), counts[::-1].tolist(), strict=True):
        r = s
        while k > 0:
            while r <= units and not open_rows[r]:
                r += 1
            if r > units:  # nothing open has room: new bins, each filled with as many of this size as fit
                per_bin = units // s
                while k > 0:
                    q = min(per_bin, k)
                    slot_class += [s] * q
                    slot_row += [n_rows] * q
                    open_rows[units - q * s].append(n_rows)
                    n_rows += 1
                    k -= q
                break
            bucket = open_rows[r]
            q = r // s  # items of this size one bin of room r takes
            m = min(len(bucket), -(-k // q))
            ids = bucket[-m:]
            del bucket[-m:]
            for rid in ids:
                take = min(q, k)
                slot_class += [s] * take
                slot_row += [rid] * take
                open_rows[r - take * s].append(rid)
                k -= take
    return np.asarray(slot_class, dtype=np.int64), np.asarray(slot_row, dtype=np.int64)


def _split_rows(slot_row: np.ndarray, n_rows: int, want: int) -> tuple[np.ndarray, int]:
    """Split rows holding several samples until there are ``want`` rows (or no row has two samples left)."""
    slot_row = slot_row.copy()
    while n_rows < want:
        counts = np.bincount(slot_row, minlength=n_rows)
        big = int(counts.argmax())
        if counts[big] < 2:
            break
        members = np.flatnonzero(slot_row == big)
        slot_row[members[len(members) // 2:]] = n_rows
        n_rows += 1
    return slot_row, n_rows
