"""Hugging Face datasets as dictionary entries (qwenvl.data.hf_source): parquet with embedded image bytes, a
save_to_disk folder, a folder of shards, a LLaMA-Factory file_name - check, check --deep, preview and the store
see the same samples. Fixtures are written here with pyarrow (no network, no ``datasets`` library)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from cli_inprocess import vlsft  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from qwenvl.data import annotations as ann  # noqa: E402
from qwenvl.data import hf_source  # noqa: E402
from qwenvl.data.dictionary import load_dictionary  # noqa: E402
from qwenvl.data.store import AnnotationStore  # noqa: E402
from vlsft.cli import app  # noqa: E402

runner = CliRunner()
HF_FEATURES = {"messages": [{"role": {"dtype": "string", "_type": "Value"},
                             "content": {"dtype": "string", "_type": "Value"}}],
               "images": {"feature": {"_type": "Image"}, "_type": "Sequence"}}


def _png(colour: tuple[int, int, int], size: int = 56) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


def _rows(n: int, start: int = 0) -> list[dict]:
    """messages records; every third one text-only (``images: []``), the others one embedded PNG."""
    rows = []
    for i in range(start, start + n):
        imgs = [{"bytes": _png((i * 7 % 256, 40, 90)), "path": None}] if i % 3 else []
        rows.append({"messages": [{"role": "user", "content": ("<image>" if imgs else "") + f"What is {i}?"},
                                  {"role": "assistant", "content": f"It is {i}."}], "images": imgs})
    return rows


def _table(rows: list[dict], hf_meta: bool = True):
    t = pa.Table.from_pylist(rows)
    if hf_meta:
        t = t.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": HF_FEATURES}})})
    return t


def _dictionary(tmp_path: Path, entries: dict) -> Path:
    p = tmp_path / "dict.json"
    p.write_text(json.dumps({k: {"data_path": None, "annotation_path": v} for k, v in entries.items()}))
    return p


def _save_to_disk(folder: Path, rows: list[dict]) -> None:
    """The layout ``Dataset.save_to_disk`` writes: Arrow IPC *stream* shards + state.json + dataset_info.json."""
    folder.mkdir(parents=True)
    t = _table(rows)
    names = []
    for i, part in enumerate((t.slice(0, len(rows) // 2), t.slice(len(rows) // 2))):
        name = f"data-{i:05d}-of-00002.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, t.schema) as w:
            w.write_table(part)
        names.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({"_data_files": names, "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": HF_FEATURES}))


@pytest.fixture()
def sources(tmp_path: Path) -> dict[str, str]:
    pq.write_table(_table(_rows(9)), tmp_path / "one.parquet", row_group_size=4)
    _save_to_disk(tmp_path / "saved", _rows(9))
    shards = tmp_path / "hub" / "data"
    shards.mkdir(parents=True)
    pq.write_table(_table(_rows(5)), shards / "train-00000-of-00002.parquet")
    pq.write_table(_table(_rows(4, 5)), shards / "train-00001-of-00002.parquet")
    pq.write_table(_table(_rows(3, 100)), shards / "test-00000-of-00001.parquet")  # another split: not read
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, _table(_rows(9)).schema) as w:
        w.write_table(_table(_rows(9)))
    return {"parquet": str(tmp_path / "one.parquet"), "saved": str(tmp_path / "saved"),
            "shards": str(tmp_path / "hub"), "arrow_file": str(tmp_path / "file.arrow")}


def test_every_layout_reads_the_same_records(sources):
    want = [json.loads(line) for line in hf_source.iter_lines(sources["parquet"])]
    assert len(want) == 9
    for name, path in sources.items():
        assert hf_source.count_rows(path) == 9, name
        assert ann.count_records(path) == 9, name
        store = AnnotationStore.from_file(path)
        assert [store[i] for i in range(len(store))] == want, name
        assert store.where(3) == f"{path}:4"  # row N (1-based) is line N
    first = want[1]["images"][0]
    assert first.startswith("data:image/png;base64,")
    assert base64.b64decode(first.split(",", 1)[1]) == _png((7, 40, 90))
    assert want[0]["images"] == []  # text-only rows of a List(Image) column


def test_media_columns_without_hf_metadata_and_paths(tmp_path):
    rows = [{"image": {"bytes": None, "path": "a.jpg"}, "conversations": [
        {"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "yo"}]}]
    pq.write_table(_table(rows, hf_meta=False), tmp_path / "p.parquet")
    assert hf_source.media_columns(pq.read_schema(tmp_path / "p.parquet")) == {"image": "image"}
    rec = next(hf_source.iter_rows(str(tmp_path / "p.parquet")))
    assert rec["image"] == "a.jpg"  # a path stays a path, relative to data_path
    info = ann.probe(str(tmp_path / "p.parquet"))
    assert info.records == 1 and info.format == "official" and info.media_line == 1
    raw = [{"image": _png((1, 2, 3)), "conversations": rows[0]["conversations"]}]  # plain binary column
    pq.write_table(pa.Table.from_pylist(raw), tmp_path / "b.parquet")
    rec = next(hf_source.iter_rows(str(tmp_path / "b.parquet")))
    assert rec["image"] == hf_source.data_url(_png((1, 2, 3)))


def test_arrow_nulls_are_absent_keys(tmp_path):
    """Arrow gives every struct all its fields: a message without 'loss' reads back without it, not 'loss': None;
    an image part has no 'text' key."""
    rows = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "yo"}], "loss": True}],
             "system": None},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "b"}]}], "system": "Be brief."}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "n.parquet")
    got = list(hf_source.iter_rows(str(tmp_path / "n.parquet")))
    assert got[0] == {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
                                   {"role": "assistant", "content": [{"type": "text", "text": "yo"}], "loss": True}]}
    assert got[1]["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": "b"}]}
    assert got[1]["system"] == "Be brief."


@pytest.mark.parametrize("deep", [(), ("--deep",), ("--deep", "--decode")])
def test_check_counts(sources, tmp_path, deep):
    p = _dictionary(tmp_path, sources)
    r = runner.invoke(app, ["datasets", "check", str(p), "--json", *deep])
    assert r.exit_code == 0, r.stdout
    report = json.loads(r.stdout)
    assert report["ok"] is True, report["problems"]
    for row in report["datasets"]:
        assert (row["format"], row["actual_length"], row["images"], row["text_only"]) == ("messages", 9, 6, 3), row


def test_dictionary_accepts_folders_and_llamafactory_file_name(sources, tmp_path):
    d = load_dictionary(_dictionary(tmp_path, sources))
    assert not d.errors, [e.render() for e in d.errors]
    assert d.record_counts == {k: 9 for k in sources}
    lf = tmp_path / "lf"
    lf.mkdir()
    pq.write_table(_table(_rows(6)), lf / "mllm.parquet")
    (lf / "dataset_info.json").write_text(json.dumps({"mllm_demo": {
        "file_name": "mllm.parquet", "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    d = load_dictionary(lf / "dataset_info.json")
    assert not d.errors, [e.render() for e in d.errors]
    assert d.record_counts == {"mllm_demo": 6}
    r = runner.invoke(app, ["datasets", "check", str(lf / "dataset_info.json"), "--deep", "--json"])
    assert r.exit_code == 0, r.stdout
    (row,) = json.loads(r.stdout)["datasets"]
    assert (row["images"], row["text_only"]) == (4, 2)


def test_folder_without_data_is_one_problem(tmp_path):
    (tmp_path / "empty").mkdir()
    d = load_dictionary(_dictionary(tmp_path, {"e": str(tmp_path / "empty")}))
    assert len(d.errors) == 1 and "no .parquet / .arrow files" in d.errors[0].render()


@pytest.mark.slow
def test_preview_embedded_png_matches_jsonl(sources, tmp_path, qwen_tokenizer_dir, cli_env):
    """The builder opens the data URL from memory: the parquet's sample = the same record as a .jsonl line."""
    vision = Path(__file__).resolve().parents[1] / "qwenvl/data/vision.py"
    if "data_url_bytes" not in vision.read_text():  # the builder's data: URL decoding lands separately
        pytest.skip("the sample builder does not decode data: URL images yet")
    jl = tmp_path / "same.jsonl"
    jl.write_bytes(hf_source.jsonl_bytes(sources["parquet"]))
    p = _dictionary(tmp_path, {"pq": sources["parquet"], "saved": sources["saved"], "jl": str(jl)})
    got = {}
    for name in ("pq", "saved", "jl"):
        r = vlsft("datasets", "preview", "--model", str(qwen_tokenizer_dir), "--dictionary", str(p), "--dataset", name,
                  "--index", "4", "--json")  # in process: the same command, the imports paid once
        assert r.returncode == 0, r.stderr
        got[name] = json.loads(r.stdout)
    assert got["pq"]["image_grid_thw"] == [[1, 8, 8]]
    for name in ("saved", "jl"):
        for key in ("input_ids", "labels", "image_grid_thw", "pixel_values"):
            assert got[name][key] == got["pq"][key], (name, key)


def psutil_process():
    import psutil

    return psutil.Process()


def _measure_workers(path: str, warm: str) -> dict:
    """Run in a fresh interpreter (a clean baseline): load the store from ``path`` and run one epoch with 4 forked
    workers; the copies of the store the process tree then holds, as tests/test_worker_memory.py counts them."""
    import gc

    import torch
    from test_worker_memory import WORKERS, _tree_pss, _TrivialBuilder

    from qwenvl.data.dataset import SupervisedDataset
    from qwenvl.data.registry import DatasetSource, build_index

    # pyarrow's code pages (libarrow / libparquet, shared by every process, whatever the data size) are no copy
    # of the annotations: touch them before the baseline by reading a small parquet once
    AnnotationStore.from_file(warm)
    gc.collect()
    me = psutil_process()
    before = me.memory_info().rss
    src = DatasetSource("big", str(Path(path).parent), path, 100.0)
    ds_ids, rec_ids, report = build_index([src], seed=0)
    ds = SupervisedDataset([src], ds_ids, rec_ids, _TrivialBuilder())
    gc.collect()
    gc.freeze()
    loader = torch.utils.data.DataLoader(ds, batch_size=500, num_workers=WORKERS, collate_fn=len,
                                         persistent_workers=True, multiprocessing_context="fork")
    seen = sum(loader)
    _, worker_uss = _tree_pss()
    store_bytes = src.store.nbytes
    # the main process's resident growth (the store counted whole) + what each worker holds privately (a copy
    # of the store would show there): an upper bound that does not depend on how PSS splits shared pages
    grown = me.memory_info().rss - before + sum(worker_uss) - WORKERS * 8 * 2**20
    return {"seen": seen, "last_id": src.store[len(src.store) - 1]["id"], "store_mib": store_bytes / 2**20,
            "copies": grown / store_bytes,
            "worker_share": max(worker_uss) / store_bytes}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="PSS needs Linux /proc")
def test_parquet_store_is_shared_by_workers(tmp_path, cli_env):
    """tests/test_worker_memory.py's measurement, from a 200,000-row parquet: the rows fill the same compact
    store (batch by batch, no list of dicts), and 4 forked DataLoader workers share it."""
    from test_worker_memory import N

    path = tmp_path / "big.parquet"
    with pq.ParquetWriter(path, pa.schema([("id", pa.string()), ("image", pa.string()), ("conversations", pa.list_(
            pa.struct([("from", pa.string()), ("value", pa.string())])))])) as w:
        for lo in range(0, N, 20_000):
            w.write_table(pa.Table.from_pylist([{
                "id": f"sample-{i:07d}", "image": f"images/{i % 977:04d}/img_{i:07d}.jpg",
                "conversations": [{"from": "human", "value": f"<image>\nWhat is in picture {i}? Describe it."},
                                  {"from": "gpt", "value": "A photo of " + "something " * (i % 7 + 3) + "."}]}
                for i in range(lo, lo + 20_000)], schema=w.schema))
    pq.write_table(pa.Table.from_pylist(_rows(3)), tmp_path / "warm.parquet")
    tests = str(Path(__file__).resolve().parent)
    code = (f"import json, sys; sys.path[:0] = [{tests!r}]; import test_hf_datasets as t; "
            f"print(json.dumps(t._measure_workers({str(path)!r}, {str(tmp_path / 'warm.parquet')!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"parquet store {got['store_mib']:.1f} MiB; {got['copies']:.2f} copies; "
          f"largest worker private {got['worker_share']:.3f} of the store")
    assert got["seen"] == N and got["last_id"] == f"sample-{N - 1:07d}"
    assert got["copies"] <= 1.5 and got["worker_share"] <= 0.2


@pytest.mark.slow
def test_parquet_on_s3(tmp_path, sources):
    """A .parquet, a save_to_disk folder and a folder of shards on S3 (moto; a folder is named with a trailing
    '/') read through the storage layer: counts as the local ones."""
    sys.path.insert(0, str(Path(__file__).parent))
    from s3server import get_server

    server = get_server()
    bucket = server.make_bucket()
    server.put(bucket, "hf/one.parquet", Path(sources["parquet"]).read_bytes())
    server.upload_dir(Path(sources["saved"]), bucket, "hf/saved")
    server.upload_dir(Path(sources["shards"]), bucket, "hf/hub")
    server.put(bucket, "hf/dict.json", json.dumps({k: {"data_path": None, "annotation_path": v} for k, v in (
        ("pq", "one.parquet"), ("saved", "saved/"), ("shards", "hub/"))}).encode())
    r = subprocess.run([sys.executable, "-m", "vlsft", "datasets", "check", f"s3://{bucket}/hf/dict.json", "--deep",
                        "--json"], capture_output=True, text=True, timeout=120, env=server.subprocess_env())
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(r.stdout)["datasets"]
    assert [(row["name"], row["actual_length"], row["images"], row["text_only"]) for row in rows] == [
        ("pq", 9, 6, 3), ("saved", 9, 6, 3), ("shards", 9, 6, 3)]
