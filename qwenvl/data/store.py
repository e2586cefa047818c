"""Compact annotation store: every record's JSON bytes in one numpy buffer + int64 offsets.

The official code keeps a Python list of dicts (~6.5x the JSONL size) that every DataLoader worker
ends up copying (touching a Python object writes its refcount, so copy-on-write pages get copied):
4 workers over 200,000 annotations held 4.19 copies. Here a record is three numbers and a slice
of one contiguous byte array; workers only read it, so the pages stay shared after ``fork``.
A record is decoded (``json.loads``) when its sample is built.

Accepted files: ``.jsonl`` (one object per line; blank lines ignored), ``.json`` (a list of records,
or the official pre-packed list of lists, which is flattened: packing is done online here), and Hugging
Face datasets (parquet / arrow / folders, :mod:`qwenvl.data.hf_source`: one JSON line per row).
A ``.jsonl`` line is stored as is and parsed on use, so a broken line becomes a bad sample (with
its line number) instead of failing the whole run.
"""

from __future__ import annotations

import json

import numpy as np

from qwenvl import storage


class AnnotationStore:
    """Read-only, fork-friendly record store. ``store[i]`` -> dict (or raises ``ValueError``)."""

    def __init__(self, buf: np.ndarray, offsets: np.ndarray, lines: np.ndarray, source: str = ""):
        self.buf = buf
        self.offsets = offsets
        self.lines = lines
        self.source = source

    # ------------------------------------------------------------------ building
    @classmethod
    def from_records(cls, records, source: str = "") -> AnnotationStore:
        chunks = [json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode("utf-8") for r in records]
        return cls._from_chunks(chunks, np.zeros(len(chunks), dtype=np.int32), source)

    @classmethod
    def from_bytes(cls, data: bytes, path: str) -> AnnotationStore:
        if path.lower().endswith(".jsonl"):
            chunks, lines = [], []
            for ln, raw in enumerate(data.split(b"\n"), start=1):
                if raw.strip():
                    chunks.append(raw)
                    lines.append(ln)
            return cls._from_chunks(chunks, np.asarray(lines, dtype=np.int32), path)
        doc = json.loads(data)
        if not isinstance(doc, list):
            raise ValueError(f"{path}: the top level must be a list of samples (or a list of lists)")
        flat = []
        for item in doc:
            if isinstance(item, list):
                flat.extend(item)
            else:
                flat.append(item)
        del doc
        return cls.from_records(flat, path)

    @classmethod
    def from_file(cls, path: str) -> AnnotationStore:
        from qwenvl.data import hf_source

        if hf_source.is_arrow_source(path):
            store = cls.from_blocks(hf_source.iter_blocks(path), path)
            hf_source.release_memory()
            return store
        return cls.from_bytes(storage.read_bytes(path), path)

    @classmethod
    def from_blocks(cls, blocks, source: str = "") -> AnnotationStore:
        """A store of ``(lines joined by b"\\n", each line's length)`` blocks: a Hugging Face dataset's rows,
        record batch by record batch (row N = line N); each record keeps its newline (JSON reads past it)."""
        blobs: list[bytes] = []
        sizes: list[np.ndarray] = []
        for blob, lengths in blocks:
            blobs.append(blob + b"\n")
            sizes.append(np.asarray(lengths, dtype=np.int64) + 1)
        lengths = np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        buf = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        del blobs
        return cls(buf, offsets, np.arange(1, len(lengths) + 1, dtype=np.int32), source)

    @classmethod
    def _from_chunks(cls, chunks: list[bytes], lines: np.ndarray, source: str) -> AnnotationStore:
        lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
        offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        buf = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
        return cls(buf, offsets, lines, source)

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.offsets) - 1

    def raw(self, i: int) -> bytes:
        return self.buf[self.offsets[i]:self.offsets[i + 1]].tobytes()

    def __getitem__(self, i: int) -> dict:
        try:
            return json.loads(self.raw(i))
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.where(i)}: not valid JSON ({e.msg})") from None

    def where(self, i: int) -> str:
        line = int(self.lines[i]) if len(self.lines) > i and self.lines[i] else 0
        return f"{self.source}:{line}" if line else f"{self.source}[{i}]"

    @property
    def nbytes(self) -> int:
        return int(self.buf.nbytes + self.offsets.nbytes + self.lines.nbytes)
