"""Where a run stands in its data, in samples, so that a resume on another geometry trains every sample once.

The Trainer's own resume skips ``global_step x gradient_accumulation_steps`` batches of the *new* geometry, which is
wrong as soon as the world size, the per-device batch, the accumulation or ``packing_rows`` changed. Instead:

* **The stream.** Each epoch is one *global stream* of micro-batches (lists of dataset indices): batch ``g`` goes
  to rank ``g % W`` and optimizer step ``s`` takes batches ``[s U, (s+1) U)`` with ``U = W x accumulation`` (the last
  step of an epoch may take fewer). :func:`random_stream` is exactly what HF + accelerate deal the ranks by default
  (a seeded permutation of the samples, cut into per-device batches, ``BatchSamplerShard``); with ``packing_rows``
  it is :class:`~qwenvl.data.length_sampler.TokenBudgetBatchSampler`'s steps.
* **The record.** Every checkpoint carries ``vlsft-position.json`` (:func:`make_record`): the geometry that wrote it
  (world size, per-device batch, accumulation, packing rows), the epoch in progress and the set of samples of that
  epoch already trained (a bitmap: ``ceil(N / 8)`` bytes, compressed), written by rank 0 after the Trainer's save.
* **The resumed epoch** (:meth:`EpochStreams.resume`): when the trained samples are exactly a whole-batch prefix of
  this run's stream (same geometry), the stream goes on from there as an uninterrupted run would. Otherwise the
  samples not yet trained are laid out anew - by default in the same permutation order, so the per-sample order is
  the uninterrupted run's, cut into the new per-device batches starting exactly at the first untrained sample; with
  ``packing_rows``, packed by the token budget sampler on the new world size. The Trainer skips the whole steps
  before them (placeholder batches it never loads); when the new step does not divide the samples left, the first
  step after the resume is a partial one (some micro-batches empty: masked dummies whose loss counts 0), and the
  last batch of the epoch holds what is left. No sample
  is trained twice or skipped; later epochs are the new geometry's own streams.

torch-free at import (accelerate's samplers are imported where the default stream is built).
"""

from __future__ import annotations

import base64
import os
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

RECORD = "vlsft-position.json"
VERSION = 1


# ---------------------------------------------------------------------------------------------------
# the geometry of a run and the record of a checkpoint
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    world_size: int
    per_device: int
    grad_accum: int
    packing_rows: int | None = None
    model_max_length: int | None = None

    @property
    def unit(self) -> int:
        """Global micro-batches per optimizer step."""
        return self.world_size * self.grad_accum

    def describe(self) -> str:
        ranks = f"{self.world_size} rank{'s' if self.world_size != 1 else ''}"
        if self.packing_rows:
            per = self.packing_rows * (self.model_max_length or 0)
            return (f"{per * self.unit:,} tokens per step ({ranks} x {self.packing_rows} rows of "
                    f"{self.model_max_length} tokens x {self.grad_accum} accumulation)")
        return (f"{self.per_device * self.unit} samples per step ({ranks} x {self.per_device} per device x "
                f"{self.grad_accum} accumulation)")


def encode_mask(mask: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.packbits(mask.astype(bool)).tobytes(), 9)).decode("ascii")


def decode_mask(text: str, n: int) -> np.ndarray:
    bits = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8)
    return np.unpackbits(bits)[:n].astype(bool)


def make_record(geometry: Geometry, *, global_step: int, epoch: int, done: np.ndarray, order: str,
                seed: int | None) -> dict:
    return {"version": VERSION, **asdict(geometry), "global_step": int(global_step), "order": order,
            "seed": seed, "samples": int(len(done)), "epoch": int(epoch), "trained_in_epoch": int(done.sum()),
            "trained": encode_mask(done)}


def write_record(folder: str | os.PathLike, record: dict) -> None:
    """``<folder>/vlsft-position.json``, written to a temporary name and renamed."""
    from qwenvl.runpolicy import write_json_record

    write_json_record(folder, RECORD, record)


def read_record(folder: str | os.PathLike | None) -> dict | None:
    from qwenvl.runpolicy import read_json_record

    record = read_json_record(folder, RECORD)
    return record if record is not None and record.get("version") == VERSION else None


def record_geometry(record: dict) -> Geometry:
    return Geometry(int(record["world_size"]), int(record["per_device"]), int(record["grad_accum"]),
                    record.get("packing_rows"), record.get("model_max_length"))


def record_problem(record: dict, samples: int) -> str | None:
    """Why ``record`` cannot place this run in its data (one phrase), None when it can."""
    try:
        record_geometry(record)
        n, epoch = int(record["samples"]), int(record["epoch"])
        decode_mask(record["trained"], n)
    except (KeyError, TypeError, ValueError, zlib.error):
        return f"{RECORD} is not readable"
    if n != samples:
        return f"the training data had {n:,} samples per epoch then and has {samples:,} now"
    return None if epoch >= 0 else f"{RECORD} names epoch {epoch}"


# ---------------------------------------------------------------------------------------------------
# the default stream (what HF + accelerate deal the ranks)
# ---------------------------------------------------------------------------------------------------
def random_order(n: int, seed: int, epoch: int) -> list[int]:
    """The permutation accelerate's ``SeedableRandomSampler`` yields in ``epoch``."""
    from accelerate.data_loader import SeedableRandomSampler

    sampler = SeedableRandomSampler(range(n), data_seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def random_stream(n: int, per_device: int, world: int, drop_last: bool, seed: int, epoch: int) -> list[list[int]]:
    """The global stream HF's default sampler and accelerate's ``BatchSamplerShard`` (even batches) deal the ranks:
    rank ``r``'s ``k``-th batch is entry ``k W + r``."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    batches = [list(b) for b in BatchSampler(random_order(n, seed, epoch), per_device, drop_last)]
    rounds = len(batches) // world  # whole rounds of full batches: dealt as they come
    if batches and len(batches[-1]) < per_device and len(batches) % world == 0:
        rounds -= 1
    if world == 1 or rounds * world == len(batches):
        return batches
    # the end of the epoch as BatchSamplerShard deals it (it cycles back to the first round to even out ranks),
    # run over the first round + the last one only (one pass over the whole epoch per rank would be slow)
    head = min(rounds, 1) * world
    tail = _Batches(batches[:head] + batches[rounds * world:])
    tail.batch_size, tail.drop_last = per_device, drop_last
    per_rank = [list(BatchSamplerShard(tail, num_processes=world, process_index=r, even_batches=True))[head // world:]
                for r in range(world)]
    return batches[:rounds * world] + [list(per_rank[r][k]) for k in range(len(per_rank[0])) for r in range(world)]


class _Batches(list):
    """A list of batches that says its batch size (as a ``BatchSampler`` does, for ``BatchSamplerShard``)."""

    batch_size: int
    drop_last: bool

    def __iter__(self):  # fresh lists, as a BatchSampler yields them (BatchSamplerShard extends the last one)
        return (list(b) for b in super().__iter__())


def chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def done_prefix(stream: list[list[int]], done: np.ndarray) -> int | None:
    """``k`` when the samples ``done`` are exactly those of ``stream[:k]`` (the longest such prefix), else None."""
    seen = np.zeros(len(done), dtype=bool)
    k = 0
    while k < len(stream) and all(done[i] for i in stream[k]):
        seen[stream[k]] = True
        k += 1
    return k if np.array_equal(seen, done) else None


def lay_out(length: int, unit: int, real: list[list[int]]) -> tuple[list[list[int]], int]:
    """The resumed epoch's stream of ``length`` batches: whole skipped steps (placeholders), then empty batches
    up to the next step boundary, then ``real``; returns it and the number of placeholder batches."""
    skip = (length - len(real)) // unit * unit
    return [[] for _ in range(length - len(real))] + real, skip


# ---------------------------------------------------------------------------------------------------
# every epoch's stream, and the resumed one
# ---------------------------------------------------------------------------------------------------
class EpochStreams:
    """The global stream of every epoch; a batch sampler over it (for a resumed run's DataLoader).

    ``standard(epoch)`` gives an epoch's stream as an uninterrupted run of this geometry has it;
    ``remaining(epoch, done)`` lays out the samples not in ``done`` as batches of this geometry."""

    def __init__(self, geometry: Geometry, samples: int, order: str, seed: int | None,
                 standard: Callable[[int], list[list[int]]],
                 remaining: Callable[[int, np.ndarray], list[list[int]]]):
        self.geometry, self.samples, self.order, self.seed = geometry, samples, order, seed
        self._make_standard, self._remaining = standard, remaining
        self._cache: tuple[int, list[list[int]]] | None = None
        self.resumed: dict[int, tuple[list[list[int]], int, np.ndarray]] = {}  # epoch -> (stream, skip, done)
        self.epoch = 0
        self._length = len(self._standard(0))

    def _standard(self, epoch: int) -> list[list[int]]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._make_standard(epoch))
        return self._cache[1]

    def stream(self, epoch: int) -> list[list[int]]:
        return self.resumed[epoch][0] if epoch in self.resumed else self._standard(epoch)

    def resume(self, epoch: int, done: np.ndarray) -> int:
        """Plan ``epoch`` after the samples ``done``; returns how many whole-step placeholder batches lead it."""
        standard = self._standard(epoch)
        k = done_prefix(standard, done)
        if k is not None:  # the same geometry (or one that lines up): go on as an uninterrupted run would
            stream, skip = lay_out(len(standard), self.geometry.unit, standard[k:])
        else:
            real = self._remaining(epoch, done)
            if len(real) > len(standard):  # (token budget only, and rare) the standard steps minus what is done
                real = [[i for i in b if not done[i]] for b in standard]
                lead = next((j for j, b in enumerate(real) if b), len(real))
                real = real[lead // self.geometry.unit * self.geometry.unit:]
            stream, skip = lay_out(len(standard), self.geometry.unit, real)
        self.resumed[epoch] = (stream, skip, done.copy())
        return skip

    def done_after(self, epoch: int, steps: int) -> tuple[int, np.ndarray]:
        """(epoch in progress, samples of it trained) after ``steps`` optimizer steps of ``epoch``."""
        stream = self.stream(epoch)
        used = min(steps * self.geometry.unit, len(stream))
        if used >= len(stream):
            return epoch + 1, np.zeros(self.samples, dtype=bool)
        done = self.resumed[epoch][2].copy() if epoch in self.resumed else np.zeros(self.samples, dtype=bool)
        for batch in stream[:used]:
            done[batch] = True
        return epoch, done

    def step_sizes(self, epoch: int) -> list[int]:
        """Samples in each step of the resumed ``epoch`` after its skipped steps."""
        stream, skip, _ = self.resumed[epoch]
        u = self.geometry.unit
        return [sum(len(b) for b in stream[s:s + u]) for s in range(skip, len(stream), u)]

    # ---- batch sampler protocol (accelerate deals entry g to rank g % W)
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._length

    def __iter__(self):
        return iter(self.stream(self.epoch))


def random_streams(geometry: Geometry, samples: int, seed: int, drop_last: bool) -> EpochStreams:
    """The default order: a seeded permutation per epoch; the samples left keep their order."""
    def standard(epoch: int) -> list[list[int]]:
        return random_stream(samples, geometry.per_device, geometry.world_size, drop_last, seed, epoch)

    def remaining(epoch: int, done: np.ndarray) -> list[list[int]]:
        return chunks([i for i in random_order(samples, seed, epoch) if not done[i]], geometry.per_device)

    return EpochStreams(geometry, samples, "random", seed, standard, remaining)


def token_budget_streams(geometry: Geometry, sampler) -> EpochStreams:
    """``packing_rows``: the token budget sampler's steps; the samples left are packed anew on this world size."""
    from qwenvl.data.length_sampler import TokenBudgetBatchSampler

    def remaining(epoch: int, done: np.ndarray) -> list[list[int]]:
        left = np.flatnonzero(~done)
        if len(left) == 0:
            return []
        sub = TokenBudgetBatchSampler(sampler.lengths[left], row_capacity=sampler.row_capacity,
                                      rows_per_step=sampler.rows_per_step, world_size=sampler.world_size,
                                      seed=sampler.seed)
        return [left[b].tolist() for b in sub.steps(epoch)]

    return EpochStreams(geometry, len(sampler.lengths), "token_budget", sampler.seed, sampler.steps, remaining)
