"""Hugging Face datasets as annotation files: parquet, Arrow IPC, folders of shards, ``save_to_disk`` folders.

Read with pyarrow alone (the ``datasets`` library is not needed, and is not imported). Each row becomes the
record the rest of the pipeline already reads (messages, sharegpt, official, TRL prompt/completion: the
columns are the record's keys), serialised as one JSON line, record batch by record batch (never a Python
list of every row): the result is the same JSONL bytes that a ``.jsonl`` file holds, so ``datasets check``,
``check --deep``, ``preview`` and the trainer's :class:`~qwenvl.data.store.AnnotationStore` read the same
samples, and "line N" of a problem is row N (1-based) of the dataset.

Image (and video) columns: a Hugging Face ``Image`` feature is a struct ``{"bytes": binary, "path": string}``.
Embedded bytes become a base64 ``data:image/png;base64,...`` URL (the MIME type from the bytes' magic number),
which the sample builder opens from memory — nothing is written next to the user's data. A struct with only
a ``path`` becomes that path (relative paths resolve against ``data_path`` as usual). A list of such structs
(``Sequence(Image)`` / ``List(Image)``) becomes a list. The columns are found from the ``huggingface`` schema
metadata the ``datasets`` library writes (``Image`` / ``Video`` features), or else from their Arrow type
(a struct of exactly ``bytes`` + ``path``, or raw bytes in a column named like ``image`` / ``video``).

Sources (:func:`is_arrow_source`): a ``.parquet`` or ``.arrow`` file (local or ``s3://``, through
:mod:`qwenvl.storage`); a local folder holding ``.parquet`` / ``.arrow`` shards (searched recursively, sorted;
when the names tell splits apart, the ``train`` ones); a ``save_to_disk`` folder (its ``state.json`` lists the
``data-*.arrow`` files; a ``DatasetDict`` folder's ``train`` split is read).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from typing import Any

from qwenvl import storage

EXTENSIONS = (".parquet", ".arrow")
BATCH_ROWS = 1024
# rows converted by a probe (format, media paths relative to data_path): embedded images make rows large, and
# the full checks (datasets check's scan, --deep) read every row anyway
PROBE_ROWS = 2000
_MEDIA_FEATURES = {"Image": "image", "Video": "video"}
_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
          (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))
_SPLIT_WORDS = ("train", "test", "validation", "valid", "val", "dev", "eval")


def is_arrow_source(path: str) -> bool:
    """Whether ``path`` is read by this module: a .parquet / .arrow file, or a local folder (of shards or a
    ``save_to_disk`` folder)."""
    p = str(path)
    if p.lower().endswith(EXTENSIONS) or (storage.is_url(p) and p.endswith("/")):  # s3://bucket/dataset/: a folder
        return True
    # a folder named like a JSON file is a mistake the dictionary reports as such ("is a folder")
    return not p.lower().endswith((".json", ".jsonl")) and not storage.is_url(p) and os.path.isdir(p)


def _mime(data: bytes, kind: str) -> str:
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "video/mp4" if kind == "video" else "image/png"


def data_url(data: bytes, kind: str = "image") -> str:
    """``data:<mime>;base64,...`` of embedded media bytes."""
    return f"data:{_mime(data, kind)};base64,{base64.b64encode(data).decode('ascii')}"


# ---------------------------------------------------------------------------------------------
# Which files
# ---------------------------------------------------------------------------------------------


def _split_of(rel: str) -> str | None:
    name = rel.lower().replace("\\", "/")
    for word in _SPLIT_WORDS:
        for part in name.replace("-", "/").replace("_", "/").replace(".", "/").split("/"):
            if part == word:
                return "train" if word == "train" else "other"
    return None


def _join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name if storage.is_url(folder) else os.path.join(folder, name)


def _save_to_disk_files(folder: str) -> list[str] | None:
    """The ``data-*.arrow`` files of a ``save_to_disk`` folder (a ``DatasetDict``: its train split), or None."""
    names = storage.list_names(folder) if storage.is_url(folder) else set(os.listdir(folder))
    if "dataset_dict.json" in names:
        splits = json.loads(storage.read_bytes(_join(folder, "dataset_dict.json"))).get("splits") or []
        split = "train" if "train" in splits else (splits[0] if splits else None)
        if split is None:
            raise ValueError(f"{folder}: dataset_dict.json names no splits")
        return _save_to_disk_files(_join(folder, split))
    if "state.json" not in names:
        return None
    state = json.loads(storage.read_bytes(_join(folder, "state.json")))
    return [_join(folder, d["filename"]) for d in state.get("_data_files") or []]


def _all_files(folder: str) -> list[str]:
    """Every .parquet / .arrow file under a folder (local, or a URL prefix listed once), no hidden ones."""
    if storage.is_url(folder):
        scheme = folder.split("://", 1)[0]
        fs = storage.filesystem(folder)
        keys = fs.find(folder.split("://", 1)[1].rstrip("/") + "/")
        found = [f"{scheme}://{k}" for k in keys]
    else:
        found = []
        for root, dirs, names in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [os.path.join(root, n) for n in names]
    return sorted(f for f in found if f.lower().endswith(EXTENSIONS) and "/." not in f[len(folder.rstrip("/")):])


def source_files(path: str) -> list[str]:
    """The data files of a source, in order. Raises ValueError when a folder holds none."""
    p = str(path)
    if p.lower().endswith(EXTENSIONS) and not (not storage.is_url(p) and os.path.isdir(p)):
        return [p]
    saved = _save_to_disk_files(p)
    if saved is not None:
        return saved
    found = _all_files(p)
    if not found:
        raise ValueError(f"{p} is a folder with no .parquet / .arrow files (and no save_to_disk state.json)")
    splits = {f: _split_of(f[len(p.rstrip("/")):]) for f in found}
    if any(s == "train" for s in splits.values()) and any(s == "other" for s in splits.values()):
        found = [f for f in found if splits[f] != "other"]
    return found


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _open(path: str):
    """A pyarrow input for ``path``: memory-mapped when local, the bytes through storage otherwise."""
    import pyarrow as pa

    if storage.is_url(path):
        return pa.BufferReader(storage.read_bytes(path))
    return pa.memory_map(path, "r")


def _batches(path: str) -> Iterator[Any]:
    """Record batches of one file (parquet, Arrow IPC stream as ``save_to_disk`` writes, or Arrow IPC file)."""
    import pyarrow as pa

    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(_open(path))
        yield pf.schema_arrow
        yield from pf.iter_batches(batch_size=BATCH_ROWS)
        return
    src = _open(path)
    try:
        reader = pa.ipc.open_stream(src)
    except pa.ArrowInvalid:
        src.seek(0)
        reader = pa.ipc.open_file(src)
        yield reader.schema
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
        return
    yield reader.schema
    yield from reader


def _hf_features(schema) -> dict:
    meta = schema.metadata or {}
    raw = meta.get(b"huggingface")
    if not raw:
        return {}
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    feats = (info.get("info") or {}).get("features") or {}
    return feats if isinstance(feats, dict) else {}


def _media_kind_of_feature(feat: Any) -> str | None:
    """``"image"`` / ``"video"`` for an Image/Video feature or a list/Sequence of one, else None."""
    if isinstance(feat, list) and feat:
        return _media_kind_of_feature(feat[0])
    if isinstance(feat, dict):
        kind = _MEDIA_FEATURES.get(feat.get("_type"))
        if kind:
            return kind
        if feat.get("_type") in ("Sequence", "List", "LargeList"):
            return _media_kind_of_feature(feat.get("feature"))
    return None


def _is_media_struct(typ, name: str = "") -> bool:
    """A ``{bytes, path}`` struct (or a list of them); or raw bytes in a column named like media (``image``,
    ``images``, ``video_bytes``, ...)."""
    import pyarrow as pa

    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        return _is_media_struct(typ.value_type, name)
    if (pa.types.is_binary(typ) or pa.types.is_large_binary(typ)) and ("image" in name or "video" in name):
        return True
    return pa.types.is_struct(typ) and sorted(typ.field(i).name for i in range(typ.num_fields)) == ["bytes", "path"]


def media_columns(schema) -> dict[str, str]:
    """``column -> "image" | "video"`` of a schema: from the ``huggingface`` metadata, else by Arrow type."""
    feats = _hf_features(schema)
    out = {}
    for name in schema.names:
        kind = _media_kind_of_feature(feats.get(name)) if name in feats else None
        if kind is None and _is_media_struct(schema.field(name).type, name.lower()):
            kind = "video" if "video" in name.lower() else "image"
        if kind:
            out[name] = kind
    return out


def _media_value(value: Any, kind: str) -> Any:
    if isinstance(value, list):
        return [_media_value(v, kind) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return data_url(bytes(value), kind) if value else None
    if isinstance(value, dict):
        data = value.get("bytes")
        if data:
            return data_url(bytes(data), kind)
        return value.get("path")
    return value


def _drop_nulls(value: Any) -> Any:
    """Arrow gives every struct all its fields (a message without ``loss`` gets ``"loss": None``, an image part
    ``"text": None``): a null is an absent key, as in the JSON the row came from. List items stay."""
    if type(value) is dict:
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if type(value) is list:
        return [_drop_nulls(v) for v in value]
    return value


def _has_nulls(array) -> bool:
    """Whether an Arrow array holds a null at any depth (then its values need :func:`_drop_nulls`)."""
    import pyarrow as pa

    if array.null_count:
        return True
    typ = array.type
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        return _has_nulls(array.flatten())
    if pa.types.is_struct(typ):
        return any(_has_nulls(array.field(i)) for i in range(typ.num_fields))
    return False


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    return str(value)


def iter_rows(path: str, rows: int | None = None) -> Iterator[dict]:
    """Every row (or the first ``rows``) of a source as a record dict (media columns as data URLs / paths),
    record batch by record batch."""
    import pyarrow as pa

    left = -1 if rows is None else rows
    pool = pa.default_memory_pool()
    # the system allocator gives the batches' memory back (malloc_trim); mimalloc / jemalloc would keep tens of
    # MiB that every forked DataLoader worker then inherits
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        for file in source_files(path):
            it = _batches(file)
            media = media_columns(next(it))
            for batch in it:
                if left == 0:
                    return
                if left > 0:
                    batch = batch.slice(0, left)
                    left -= batch.num_rows
                nulls = [name for name, col in zip(batch.schema.names, batch.columns, strict=True)
                         if name not in media and _has_nulls(col)]
                for row in batch.to_pylist():
                    for col, kind in media.items():
                        if col in row:
                            row[col] = _media_value(row[col], kind)
                    for col in nulls:
                        row[col] = _drop_nulls(row[col])
                    yield {k: v for k, v in row.items() if v is not None}
            if left == 0:
                return
    finally:
        pa.set_memory_pool(pool)


def _dumps():
    """Row -> compact UTF-8 JSON bytes: orjson (several times faster on long base64 strings), else json."""
    try:
        import orjson
    except ImportError:  # pragma: no cover - orjson is in requirements.txt
        enc = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_jsonable).encode
        return lambda row: enc(row).encode("utf-8")

    def dumps(row: dict) -> bytes:
        try:
            return orjson.dumps(row, default=_jsonable)
        except TypeError:  # an integer beyond 64 bits, a non-string key: json writes those
            return json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=_jsonable).encode("utf-8")

    return dumps


def iter_blocks(path: str, rows: int | None = None) -> Iterator[tuple[bytes, list[int]]]:
    """``(JSON lines joined by newlines, each line's length)`` per record batch: a few hundred Python objects
    for the whole source, not one per row."""
    dumps = _dumps()
    block: list[bytes] = []
    for row in iter_rows(path, rows):
        block.append(dumps(row))
        if len(block) == BATCH_ROWS:
            yield b"\n".join(block), [len(x) for x in block]
            block = []
    if block:
        yield b"\n".join(block), [len(x) for x in block]


def iter_lines(path: str, rows: int | None = None) -> Iterator[bytes]:
    """Every row (or the first ``rows``) as one JSON line (UTF-8, no newline)."""
    for blob, lengths in iter_blocks(path, rows):
        pos = 0
        for n in lengths:
            yield blob[pos:pos + n]
            pos += n + 1


def jsonl_bytes(path: str, rows: int | None = None) -> bytes:
    """The source (or its first ``rows``) as JSONL bytes, one row a line: what a ``.jsonl`` file would hold."""
    blobs = [blob for blob, _ in iter_blocks(path, rows)]
    return b"\n".join(blobs) + b"\n" if blobs else b""


def release_memory() -> None:
    """Hand the memory of the conversion back to the system (pyarrow's pool, then glibc's free lists), so that
    forked DataLoader workers do not inherit (and the memory accounting does not count) a dead copy."""
    import ctypes

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def count_rows(path: str) -> int:
    """Rows of a source, from the parquet footers / Arrow batch lengths (no row is converted)."""
    total = 0
    for file in source_files(path):
        if file.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            total += pq.ParquetFile(_open(file)).metadata.num_rows
            continue
        it = _batches(file)
        next(it)
        total += sum(b.num_rows for b in it)
    return total
