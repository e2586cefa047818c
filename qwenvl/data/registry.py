"""Dataset registry: dictionary + ``--dataset_use`` -> a seeded, rank-independent sample index.

* The dictionary is helper-agnostic JSON (``name -> data_path, annotation_path, sampling_rate |
  repeat_time``) loaded with :func:`qwenvl.data.dictionary.load_dictionary`; an entry of
  ``--dataset_use`` with a ``%percent`` overrides the dictionary's rate (the one resolver,
  :func:`qwenvl.data.dataset_use.resolve_selection`, shared with the launch plan).
* ``name%250`` = 2 whole copies + a seeded random 50 % (without replacement); ``name%5.437`` = a
  seeded sample of ``round(n * 0.05437)`` records. The draw is a pure function of
  ``(seed, dataset name)`` (numpy PCG64 seeded with the seed and a CRC32 of the name), so every
  rank and every DataLoader worker computes the same subset; nothing is shuffled here (the
  trainer's sampler shuffles per epoch).
* :class:`SamplingReport` lists per-dataset counts; it is logged before training and its
  ``to_dict()`` goes to W&B.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from qwenvl.data import formats
from qwenvl.data.dataset_use import DatasetUseError, format_percent, held_out_count, resolve_selection, sample_count
from qwenvl.data.store import AnnotationStore
from qwenvl.problems import UserError

log = logging.getLogger(__name__)


class RegistryError(UserError, ValueError):
    """A dataset name or dictionary problem (one line per problem in the message)."""


@dataclass
class DatasetSource:
    name: str
    data_path: str | None
    annotation_path: str
    percent: float
    store: AnnotationStore | None = None
    fmt: Any = None  # qwenvl.data.formats.FormatSpec: declared in the dictionary, settled by build_index


class SamplingReport(dict):
    """Per-dataset sample counts of one epoch; a plain JSON-able dict (W&B config, logs).

    Keys: ``seed``, ``total_samples``, ``datasets`` (name -> records, percent, samples, copies,
    sampled, annotation_path). ``lines()`` / ``log()`` render it for humans.
    """

    def __init__(self, seed: int, datasets: list[dict] | None = None):
        super().__init__(seed=int(seed), total_samples=0, datasets={})
        for d in datasets or []:
            self.add(d)

    def add(self, entry: dict) -> None:
        self["datasets"][entry["name"]] = dict(entry)
        self["total_samples"] = sum(d["samples"] for d in self["datasets"].values())

    @property
    def seed(self) -> int:
        return self["seed"]

    @property
    def datasets(self) -> list[dict]:
        return list(self["datasets"].values())

    @property
    def total(self) -> int:
        return self["total_samples"]

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self))

    def lines(self) -> list[str]:
        out = [f"data: {len(self.datasets)} dataset(s), {self.total} samples per epoch (data_seed {self.seed})"]
        for d in self.datasets:
            held = f", {d['held_out']} records held out for eval" if d.get("held_out") else ""
            out.append(f"  {d['name']}: {d['records']} records x {format_percent(d['percent'])}% -> "
                       f"{d['samples']} samples ({d['copies']} whole copies + {d['sampled']} sampled{held})")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def log(self, logger: logging.Logger | None = None) -> None:
        for line in self.lines():
            (logger or log).info(line)


def sample_indices(n: int, percent: float, seed: int, name: str) -> tuple[np.ndarray, int, int]:
    """Record indices for one dataset: (indices, whole copies, sampled count). Pure function."""
    whole, frac = divmod(percent / 100.0, 1.0)
    whole = int(whole)
    k = sample_count(n, percent) - whole * n
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode("utf-8"))])
    parts = [np.arange(n, dtype=np.int64)] * whole
    if k > 0:
        parts.append(np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64))
    idx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return idx, whole, k


def resolve_sources(dataset_use: str, dataset_dict: str | None, base_dir: str | None = None) -> list[DatasetSource]:
    """Parse ``dataset_use`` against the dictionary file (relative paths against ``base_dir`` when given, else
    the file's folder). Raises :class:`RegistryError`.

    The selection is resolved by :func:`qwenvl.data.dataset_use.resolve_selection` (the resolver the launch plan
    uses too) with ``duplicates="separate"``: ``a,a`` is two entries, each drawn on its own (see :func:`build_index`).
    """
    if not dataset_dict:
        raise RegistryError("--dataset_dict is not set: pass the dataset dictionary JSON (name -> "
                            "data_path, annotation_path, ...)")
    from qwenvl.data.dictionary import load_dictionary

    d = load_dictionary(dataset_dict, check_files=False, base_dir=base_dir)
    errors = [p for p in d.problems if getattr(p, "severity", "error") == "error"]
    if errors:
        raise RegistryError("\n".join(p.render() for p in errors))
    try:
        selection = resolve_selection(dataset_use, {name: spec.percent for name, spec in d.datasets.items()},
                                      duplicates="separate", source=str(dataset_dict))
    except DatasetUseError as e:
        raise RegistryError(str(e)) from None
    if selection.problems:
        raise RegistryError("\n".join(p.render() for p in selection.problems))
    return [DatasetSource(s.name, d.datasets[s.name].data_path, d.datasets[s.name].annotation_path, s.percent,
                          fmt=d.datasets[s.name].format_spec) for s in selection.datasets]


def held_out_records(n: int, fraction: float, seed: int, name: str) -> np.ndarray:
    """The records of a dataset held out for evaluation (``data.eval_split``): a seeded, sorted sample of
    ``round(n * fraction)`` records (at least one when ``fraction > 0`` and ``n > 1``; never all of them). A pure
    function of ``(seed, name)``: the same on every rank, in every worker and after a resume."""
    k = held_out_count(n, fraction)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(f"{name}#eval_split".encode())])
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


def build_index(sources: list[DatasetSource], seed: int) -> tuple[np.ndarray, np.ndarray, SamplingReport]:
    """Load each source's store (if not loaded) and draw its samples. Returns (dataset ids, record ids, report)."""
    ds_ids, rec_ids, report, _held = build_split_index(sources, seed, 0.0)
    return ds_ids, rec_ids, report


def build_split_index(sources: list[DatasetSource], seed: int, eval_split: float
                      ) -> tuple[np.ndarray, np.ndarray, SamplingReport, dict[int, np.ndarray]]:
    """:func:`build_index` with a held-out fraction: each dataset's held-out records (:func:`held_out_records`,
    keyed by the dataset name, so ``a,a`` holds out one set) are removed before its training samples are drawn.
    Returns (dataset ids, record ids, report, {source index: held-out record ids} for the first entry of each
    name)."""
    held: dict[int, np.ndarray] = {}
    held_by_name: dict[str, np.ndarray] = {}
    ds_ids, rec_ids = [], []
    report = SamplingReport(seed=int(seed))
    seen: dict[str, int] = {}
    stores: dict[str, AnnotationStore] = {}
    for k, src in enumerate(sources):
        if src.store is None:  # one store per file, however often the file is listed
            src.store = stores.get(src.annotation_path) or AnnotationStore.from_file(src.annotation_path)
        stores[src.annotation_path] = src.store
        if src.fmt is None or src.fmt.name is None:  # the annotation format, as datasets check settles it
            src.fmt = formats.settle(src.fmt, formats.store_head(src.store))
        n = len(src.store)
        # a name listed twice ('a,a': the official way to up-sample) is two entries: its own report
        # line ('a#2') and its own draw (seeded with the occurrence), not the first one's subset again
        occurrence = seen[src.name] = seen.get(src.name, 0) + 1
        key = src.name if occurrence == 1 else f"{src.name}#{occurrence}"
        if src.name not in held_by_name:
            held_by_name[src.name] = held_out_records(n, eval_split, seed, src.name)
            if len(held_by_name[src.name]):
                held[k] = held_by_name[src.name]
        out = held_by_name[src.name]
        keep = np.setdiff1d(np.arange(n, dtype=np.int64), out, assume_unique=True) if len(out) else None
        idx, whole, sampled = sample_indices(n - len(out), src.percent, seed, key)
        if keep is not None:
            idx = keep[idx]
        ds_ids.append(np.full(len(idx), k, dtype=np.int32))
        rec_ids.append(idx)
        entry = {"name": key, "records": n, "percent": src.percent, "samples": int(len(idx)),
                 "copies": whole, "sampled": sampled, "annotation_path": src.annotation_path}
        if k in held:
            entry["held_out"] = int(len(held[k]))
        report.add(entry)
        if len(idx) == 0:
            log.warning("dataset %s gives no samples (%d records x %s%%): it is not trained on", key, n,
                        format_percent(src.percent))
    if not ds_ids:
        return np.zeros(0, np.int32), np.zeros(0, np.int64), report, held
    return np.concatenate(ds_ids), np.concatenate(rec_ids), report, held
