"""Registry: seeded, rank-independent sampling; dictionary + --dataset_use; make_data_module end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from qwenvl.data.registry import RegistryError, resolve_sources, sample_indices
from qwenvl.data.store import AnnotationStore


def test_percent_semantics():
    idx, whole, k = sample_indices(10, 250.0, seed=1, name="a")
    assert whole == 2 and k == 5 and len(idx) == 25
    assert sorted(idx[:20].tolist()) == sorted(list(range(10)) * 2)
    assert len(set(idx[20:].tolist())) == 5  # the fraction is drawn without replacement
    idx, whole, k = sample_indices(1000, 5.437, seed=1, name="a")
    assert (whole, k, len(idx)) == (0, 54, 54)  # round(1000 * 0.05437)
    assert sample_indices(7, 100.0, 3, "x")[0].tolist() == list(range(7))


def test_seeded_and_name_dependent():
    a = sample_indices(10_000, 12.5, seed=42, name="a")[0]
    assert np.array_equal(a, sample_indices(10_000, 12.5, seed=42, name="a")[0])
    assert not np.array_equal(a, sample_indices(10_000, 12.5, seed=43, name="a")[0])
    assert not np.array_equal(a, sample_indices(10_000, 12.5, seed=42, name="b")[0])


def test_same_subset_in_every_process():
    """Two fresh interpreters with different hash seeds (= two ranks) draw the same subset."""
    code = ("from qwenvl.data.registry import sample_indices;"
            "print(sample_indices(5000, 33.3, seed=7, name='ds')[0].sum())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(h), "PATH": ""}).stdout for h in (1, 2)}
    assert len(outs) == 1 and int(outs.pop()) == int(sample_indices(5000, 33.3, seed=7, name="ds")[0].sum())


def test_store_formats(tmp_path):
    recs = [{"id": i, "conversations": [{"from": "human", "value": f"q{i} ü"}]} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs[:3]) + "\n\n" + json.dumps(recs[3]) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([recs[0], [recs[1], recs[2]], recs[3]]))  # official pre-packed
    s = AnnotationStore.from_file(str(tmp_path / "a.jsonl"))
    assert len(s) == 4 and s[3] == recs[3] and s.where(3).endswith("a.jsonl:5")
    p = AnnotationStore.from_file(str(tmp_path / "b.json"))
    assert [p[i]["id"] for i in range(len(p))] == [0, 1, 2, 3]
    (tmp_path / "c.jsonl").write_text('{"ok": 1}\n{broken\n')
    c = AnnotationStore.from_file(str(tmp_path / "c.jsonl"))
    with pytest.raises(ValueError, match="c.jsonl:2"):
        c[1]


@pytest.fixture()
def dictionary(tmp_path, golden_dir):
    d = {"pub_a": {"data_path": str(golden_dir / "media"), "annotation_path": str(golden_dir / "annotations/public_a.json")},
         "pub_b": {"data_path": str(golden_dir / "media"),
                   "annotation_path": str(golden_dir / "annotations/public_b.jsonl"), "sampling_rate": 0.5}}
    p = tmp_path / "dict.json"
    p.write_text(json.dumps(d))
    return str(p)


def test_resolve_sources(dictionary):
    src = resolve_sources("pub_a%250,pub_b", dictionary)
    assert [(s.name, s.percent) for s in src] == [("pub_a", 250.0), ("pub_b", 50.0)]  # dictionary rate kept
    assert [s.percent for s in resolve_sources("", dictionary)] == [100.0, 50.0]  # default: all
    with pytest.raises(RegistryError, match="pub_c"):
        resolve_sources("pub_c", dictionary)


def test_make_data_module_end_to_end(dictionary, qwen_tokenizer_dir, caplog):
    from transformers import AutoTokenizer

    from qwenvl.data.arguments import DataArguments
    from qwenvl.data.collate import pop_batch_stats
    from qwenvl.data.dataset import make_data_module

    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    args = DataArguments(dataset_use="pub_a%150,pub_b%100", dataset_dict=dictionary, max_pixels=50176,
                         min_pixels=784, data_flatten=True)
    with caplog.at_level("INFO"):
        mod = make_data_module(tok, None, args, seed=3, model_type="qwen2_5_vl")
    ds, coll, report = mod["train_dataset"], mod["data_collator"], mod["report"]
    n_a = len(json.loads(open(json.loads(open(dictionary).read())["pub_a"]["annotation_path"]).read()))
    assert report.to_dict()["datasets"]["pub_a"]["samples"] == n_a + round(n_a * 0.5)
    assert len(ds) == report.total and "samples per epoch" in caplog.text
    items = [ds[i] for i in range(len(ds))]
    bad = [s for s in items if "bad_sample" in s]
    reasons = " | ".join(s["bad_sample"] for s in bad)
    assert "'images'" in reasons and "tag" in reasons  # q_05 and q_07, reported, not replaced
    assert all(s["where"] for s in bad)
    batch = coll(items[:6])
    stats = pop_batch_stats(batch)
    assert stats["num_samples"] + stats["num_skipped"] == 6
    assert stats["sample_ids"] == [i for i in range(6) if "bad_sample" not in items[i]]
    assert "sample_ids" not in batch
    assert batch["position_ids"].shape[0] == 4
    # same seed -> same dataset, different seed -> a different 50 % draw of pub_a
    again = make_data_module(tok, None, args, seed=3, model_type="qwen2_5_vl")["train_dataset"]
    assert np.array_equal(again.rec_ids, ds.rec_ids)
    # (qwenvl.train passes --data_seed, else --seed, as `seed`: DataArguments holds no seed of its own)
    other = make_data_module(tok, None, args, seed=4, model_type="qwen2_5_vl")["train_dataset"]
    assert not np.array_equal(other.rec_ids, ds.rec_ids)


def test_missing_dictionary_is_clear():
    with pytest.raises(RegistryError, match="dataset_dict"):
        resolve_sources("a", None)


def test_sampling_report_lines():
    from qwenvl.data.registry import SamplingReport

    r = SamplingReport(seed=1, datasets=[{"name": "a", "records": 10, "percent": 250.0, "samples": 25, "copies": 2,
                                          "sampled": 5, "annotation_path": "x"}])
    assert r.total == 25 and "a: 10 records x 250% -> 25 samples (2 whole copies + 5 sampled)" in "\n".join(r.lines())
    assert json.loads(json.dumps(r.to_dict()))["total_samples"] == 25


def test_dataloader_workers_end_to_end(dictionary, qwen_tokenizer_dir):
    """The real DataLoader path: 2 workers, packing collator, bad samples counted across the epoch."""
    import torch
    from transformers import AutoTokenizer

    from qwenvl.data.arguments import DataArguments
    from qwenvl.data.collate import BadSampleMonitor, pop_batch_stats
    from qwenvl.data.dataset import make_data_module

    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    args = DataArguments(dataset_use="pub_a,pub_b", dataset_dict=dictionary, max_pixels=50176, min_pixels=784,
                         data_packing=True, model_max_length=400)
    mod = make_data_module(tok, None, args, seed=0, model_type="qwen2_5_vl")
    loader = torch.utils.data.DataLoader(mod["train_dataset"], batch_size=8, num_workers=2,
                                         collate_fn=mod["data_collator"])
    monitor = BadSampleMonitor(max_ratio=0.5)
    for batch in loader:
        monitor.update(pop_batch_stats(batch))
        assert batch["input_ids"].shape[1] <= 400 and batch["position_ids"].shape[0] == 4
        assert "pixel_values" in batch and "pixel_values_videos" in batch
    assert monitor.seen == len(mod["train_dataset"]) and monitor.skipped == 2  # q_05, q_07


def test_dataset_listed_twice_and_spaced_percent(dictionary, caplog):
    """'a,a' (the official way to up-sample): two report lines, a separate draw each; 'a %50' keeps its 50."""
    from qwenvl.data.registry import build_index

    src = resolve_sources("pub_a %40, pub_a%40,pub_b", dictionary)
    assert [s.percent for s in src] == [40.0, 40.0, 50.0]  # explicit percents win, even with spaces
    ds_ids, rec_ids, report = build_index(src, seed=5)
    n_a = report["datasets"]["pub_a"]["records"]
    assert list(report["datasets"]) == ["pub_a", "pub_a#2", "pub_b"]
    assert report.total == len(rec_ids) == 2 * round(n_a * 0.4) + report["datasets"]["pub_b"]["samples"]
    first, second = rec_ids[ds_ids == 0], rec_ids[ds_ids == 1]
    assert len(first) == len(second) and not np.array_equal(first, second)  # not the same subset twice
    assert src[0].store is src[1].store  # the file is read once
    tiny = resolve_sources("pub_a%1", dictionary)  # round(n * 0.01) == 0 for the small public file
    with caplog.at_level("WARNING"):
        _, idx, rep = build_index(tiny, seed=5)
    assert len(idx) == 0 and rep.total == 0 and "gives no samples" in caplog.text


def test_no_samples_is_a_clear_error(dictionary, qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    from qwenvl.data.arguments import DataArguments
    from qwenvl.data.dataset import make_data_module

    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    args = DataArguments(dataset_use="pub_a%1", dataset_dict=dictionary)
    with pytest.raises(RegistryError, match="no samples to train on .*pub_a: .* -> 0 samples"):
        make_data_module(tok, None, args, seed=0)


# --------------------------------------------------------------------------- plan and trainer: one resolver

PLAN_RATES = {"docs": {"sampling_rate": 0.5}, "charts": {"repeat_time": 2.5}}  # 'plain' has no rate: 100
PLAN_SIZES = {"docs": (40, None), "charts": (30, None), "plain": (20, None)}


@pytest.mark.parametrize("use, want", [
    (None, [("docs", 50.0), ("charts", 250.0), ("plain", 100.0)]),  # no data.use: every dataset at its own rate
    (["docs"], [("docs", 50.0)]),  # no percent: the dictionary's rate
    (["docs%100"], [("docs", 100.0)]),  # an explicit %100 beats the dictionary's 50
    (["docs%100", "charts"], [("docs", 100.0), ("charts", 250.0)]),
    (["plain"], [("plain", 100.0)]),
    (["plain%100"], [("plain", 100.0)]),
    (["docs%12.5", "plain"], [("docs", 12.5), ("plain", 100.0)]),
    (["docs%5.437"], [("docs", 5.437)]),  # decimals
    (["plain%250", "charts%100"], [("plain", 250.0), ("charts", 100.0)]),  # up-sampling, and %100 over 250
    (["charts%3.5"], [("charts", 3.5)]),  # a decimal below 100 of an up-sampled dataset
])
def test_plan_and_trainer_resolve_a_selection_identically(tmp_path, use, want):
    """print-args (--json) and the trainer's registry agree on every dataset's percent and the epoch's samples.

    The plan's --dataset_use is what the trainer is given: resolving it must give back the plan's percents, and
    the trainer's real sample index must hold the plan's samples_per_epoch."""
    from plan_fixtures import make_project
    from typer.testing import CliRunner

    from qwenvl.data.dataset_use import sample_count
    from qwenvl.data.registry import build_index
    from vlsft.cli import app

    path = make_project(tmp_path, sizes=PLAN_SIZES, rates=PLAN_RATES)
    overrides = [] if use is None else [f"data.use=[{', '.join(use)}]"]
    result = CliRunner().invoke(app, ["print-args", "--config", str(path), *overrides, "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    argv = plan["trainer_args"]
    assert argv[argv.index("--dataset_use") + 1] == plan["dataset_use"]
    dictionary = str(tmp_path / "data" / "dict.json")
    from_plan = resolve_sources(plan["dataset_use"], dictionary)  # what the trainer makes of the plan's argv
    assert [(s.name, s.percent) for s in from_plan] == want
    if use is not None:  # the user's own text, given straight to the trainer (`torchrun -m qwenvl.train ...`)
        assert [(s.name, s.percent) for s in resolve_sources(",".join(use), dictionary)] == want
    _, rec_ids, report = build_index(from_plan, seed=0)
    assert plan["samples_per_epoch"] == report.total == len(rec_ids) == \
        sum(sample_count(PLAN_SIZES[name][0], pct) for name, pct in want)


@pytest.mark.parametrize("text, separate", [
    ("docs,docs", [("docs", 50.0), ("docs", 50.0)]),
    ("docs%50,docs%30", [("docs", 50.0), ("docs", 30.0)]),
    ("docs%100,docs", [("docs", 100.0), ("docs", 50.0)]),
    ("plain%250,charts,plain", [("plain", 250.0), ("charts", 250.0), ("plain", 100.0)]),
])
def test_doubled_names_one_resolver_two_policies(tmp_path, text, separate, cli_env):
    """A name listed twice: the trainer counts each listing (own draw, 'docs#2'); a run YAML refuses the second
    listing in one line, exit 2. Both come from resolve_selection, the policy being its only difference."""
    from plan_fixtures import make_project

    from qwenvl.data.dataset_use import resolve_selection
    from qwenvl.data.registry import build_index

    path = make_project(tmp_path, sizes=PLAN_SIZES, rates=PLAN_RATES)
    dictionary = str(tmp_path / "data" / "dict.json")
    sources = resolve_sources(text, dictionary)
    assert [(s.name, s.percent) for s in sources] == separate
    _, _, report = build_index(sources, seed=0)
    name = separate[0][0]
    assert f"{name}#2" in report["datasets"]
    rates = {"docs": 50.0, "charts": 250.0, "plain": 100.0}
    assert [(d.name, d.percent) for d in resolve_selection(text, rates, duplicates="separate").datasets] == separate
    rejected = resolve_selection(text.split(","), rates, duplicates="reject")
    second = [i for i, item in enumerate(text.split(",")) if item.split("%")[0] == name][1]
    assert [(p.index, p.message) for p in rejected.problems] == \
        [(second, f"dataset {name!r} is listed twice (also item 0)")]
    assert [(d.name, d.percent) for d in rejected.datasets] == [d for i, d in enumerate(separate) if i != second]
    # the real CLI: one line naming the YAML item, exit 2, no traceback
    r = subprocess.run([sys.executable, "-m", "vlsft", "print-args", "--config", str(path),
                        f"data.use=[{text.replace(',', ', ')}]"], capture_output=True, text=True, env=cli_env,
                       timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"[data.use[{second}]] dataset {name!r} is listed twice (also item 0)" in errors[0]
    assert "Traceback" not in r.stderr


def test_selection_entry_knows_a_written_percent():
    from qwenvl.data.dataset_use import DatasetUseEntry, format_dataset_use, parse_dataset_use

    a, b, c = parse_dataset_use("a, a%100, a%100.0")
    assert (a.written, a.percent, b.written, b.percent, c.written) == (False, 100.0, True, 100.0, True)
    assert a != b and b == c
    assert format_dataset_use([a, b, c]) == "a,a%100,a%100"  # %100 survives a round trip
    assert DatasetUseEntry("x").format() == "x" and DatasetUseEntry("x", 100.0).format() == "x%100"
    assert DatasetUseEntry("x", 250.0, written=False).format() == "x%250"


def test_unknown_and_malformed_selection_one_line_each(dictionary):
    with pytest.raises(RegistryError) as info:
        resolve_sources("pub_a,pub_c,pubb", dictionary)
    lines = str(info.value).splitlines()
    assert lines == [f"dataset 'pub_c' is not in {dictionary} (hint: did you mean 'pub_b'?)",
                     f"dataset 'pubb' is not in {dictionary} (hint: did you mean 'pub_b'?)"]
    with pytest.raises(RegistryError, match="cannot parse 'pub_a%x'"):
        resolve_sources("pub_a%x", dictionary)
