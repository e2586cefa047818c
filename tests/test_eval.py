"""Evaluation and per-dataset losses (issue 11, item 1-2).

* Through the real CLI: one shared 2-rank ZeRO-3 packing run (``eval_fixtures``) with ``data.eval_split`` and
  ``data.eval``: eval losses (total and per dataset) at the configured steps, held-out records never trained on
  (by record ids), per-dataset training losses that sum token-weighted to the logged loss, a memorised dataset
  whose loss falls below a noise dataset's.
* In process: the dataset tag of every token survives padded, flatten and packing batches (the per-dataset loss
  sums of one tiny-model forward are the same in all three modes); the held-out split is a pure function of
  (seed, name) - the same in a fresh process (= on every rank and after a resume); print-args and refusals.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from eval_fixtures import VLSFT, write_data, write_yaml

REPO = Path(__file__).resolve().parents[1]


def _history(run) -> list[dict]:
    return json.loads((run["out"] / "trainer_state.json").read_text())["log_history"]


def _per_dataset(entry: dict, loss_key: str, tokens_key: str) -> dict[str, tuple[float, int]]:
    out = {}
    for k, v in entry.items():
        if k.startswith(loss_key + "/"):
            name = k.split("/", 1)[1]
            out[name] = (v, entry[f"{tokens_key}/{name}"])
    return out


@pytest.mark.slow
def test_eval_losses_logged_at_the_configured_steps(trained_run):
    evals = [h for h in _history(trained_run) if "eval_loss" in h]
    assert [h["step"] for h in evals] == [3, 6]
    for h in evals:
        per = _per_dataset(h, "eval_loss", "eval_tokens")
        assert set(per) == {"mem", "noise", "shapes", "facts"}, h  # held-out parts + the data.eval dataset
        assert h["eval_samples"] == 4 + 4 + 2 + 6 and h["eval_skipped_samples"] == 0
        total = sum(loss * n for loss, n in per.values()) / sum(n for _, n in per.values())
        assert total == pytest.approx(h["eval_loss_tokens"], abs=1e-4)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    log = trained_run["out"] / "vlsft" / "torchrun.log"
    out = trained_run["proc"].stdout + trained_run["proc"].stderr + (log.read_text() if log.exists() else "")
    assert "records held out (eval_split 0.25, never trained on)" in out


@pytest.mark.slow
def test_held_out_records_never_trained_and_the_rest_all_trained(trained_run):
    out = trained_run["out"]
    split = json.loads((out / "logs" / "eval-split.json").read_text())
    held = {f"{name}:{r}" for name, recs in split["held_out"].items() for r in recs}
    assert {k: len(v) for k, v in split["held_out"].items()} == {"mem": 4, "noise": 4, "shapes": 2}
    trained = set()
    for rank in (0, 1):
        for line in (out / "logs" / f"samples-rank{rank}.jsonl").read_text().splitlines():
            trained |= set(json.loads(line)["records"])
    assert not trained & held
    everything = {f"{n}:{i}" for n, size in (("mem", 16), ("noise", 16), ("shapes", 8)) for i in range(size)}
    assert trained == everything - held  # the first 5 steps are one epoch: every training record


@pytest.mark.slow
def test_per_dataset_training_losses_sum_to_the_loss_and_separate(trained_run):
    logs = [h for h in _history(trained_run) if "loss" in h]
    assert len(logs) == 6
    for h in logs:  # logging every step, one micro-batch per rank: the window is one optimizer step
        per = _per_dataset(h, "loss", "tokens")
        assert {"mem", "noise"} <= set(per), h
        weighted = sum(loss * n for loss, n in per.values()) / sum(n for _, n in per.values())
        assert weighted == pytest.approx(h["loss"], abs=2e-3), (h, weighted)
    # the memorised dataset ends clearly below the noise one (both started at the same ~11.9)
    first, last = logs[0], logs[-1]
    assert abs(first["loss/mem"] - first["loss/noise"]) < 0.1
    assert last["loss/mem"] < last["loss/noise"] - 0.3, (last["loss/mem"], last["loss/noise"])


@pytest.mark.slow
def test_dataset_tags_survive_padded_flatten_and_packing(tiny_model_dir):
    """Per-dataset loss sums of one forward are the same whether the batch is padded, flattened or packed."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qwenvl.arguments import DataArguments
    from qwenvl.data.collate import pop_batch_stats
    from qwenvl.data.dataset import make_data_module
    from qwenvl.trainer import dataset_loss_sums

    dictionary = REPO / "configs" / "demo" / "Dataset-Dictionary.json"
    proc = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    results = {}
    for mode in ("padded", "flatten", "packing"):
        args = DataArguments(dataset_use="shapes,facts", dataset_dict=str(dictionary), max_pixels=12544,
                             min_pixels=3136, model_max_length=256, data_flatten=mode == "flatten",
                             data_packing=mode == "packing")
        data = make_data_module(proc.tokenizer, proc.image_processor, args, seed=3)
        ds = data["train_dataset"]
        names = data["dataset_names"]
        batch = data["data_collator"]([ds[i] for i in (0, 9, 1, 10, 2)])  # shapes, facts, shapes, facts, shapes
        stats = pop_batch_stats(batch)
        tags = stats["token_datasets"]
        assert tags.shape == batch["labels"].shape
        trained = batch["labels"] != -100
        assert bool((tags[trained] >= 0).all())  # every trained token has its dataset
        with torch.no_grad():
            outputs = model(**batch)
        sums = dataset_loss_sums(outputs, batch["labels"], tags, len(names))
        results[mode] = dict(zip(names, zip(sums[:len(names)].tolist(), sums[len(names):].tolist(), strict=True),
                                 strict=True))
    for mode in ("flatten", "packing"):
        for name in ("shapes", "facts"):
            assert results[mode][name][1] == results["padded"][name][1] > 0, (mode, name)
            assert results[mode][name][0] == pytest.approx(results["padded"][name][0], rel=1e-4), (mode, name)


@pytest.mark.parametrize("mode", ["padded", "packing"])
def test_a_sample_evaluated_twice_counts_once(tiny_model_dir, mode):
    """The distributed eval sampler repeats samples to even the ranks out (16 samples on 2 ranks x 3 evaluate 18):
    per-sample sums keyed by dataset index count each sample once - totals equal one pass over the unique ones."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qwenvl.arguments import DataArguments
    from qwenvl.data.collate import pop_batch_stats
    from qwenvl.data.dataset import make_data_module
    from qwenvl.trainer import EvalSamples, dataset_loss_sums

    dictionary = REPO / "configs" / "demo" / "Dataset-Dictionary.json"
    proc = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    args = DataArguments(dataset_use="shapes,facts", dataset_dict=str(dictionary), max_pixels=12544,
                         min_pixels=3136, model_max_length=256, data_packing=mode == "packing")
    data = make_data_module(proc.tokenizer, proc.image_processor, args, seed=3)
    ds, k = data["train_dataset"], len(data["dataset_names"])
    collate = data["data_collator"]

    def run(indices, into: EvalSamples):
        batch = collate([ds[i] for i in indices])
        stats = pop_batch_stats(batch)
        assert into.note_batch(stats)
        with torch.no_grad():
            outputs = model(**batch)
        n = len(stats["sample_ids"])
        into.add(stats, stats["token_datasets"], dataset_loss_sums(outputs, batch["labels"], stats["token_samples"], n))
        return dataset_loss_sums(outputs, batch["labels"], stats["token_datasets"], k)

    once = EvalSamples()
    expected = run([0, 9, 1, 10], once)
    twice = EvalSamples()
    run([0, 9, 1, 10], twice)
    run([10, 0], twice)  # the wrap-around batch: samples already evaluated
    for es in (once, twice):
        sums, counts = es.totals_over_ranks(k)
        assert counts == [4.0, 0.0]
        assert sums[k:] == expected[k:].tolist() and min(sums[k:]) > 0
        assert sums[:k] == pytest.approx(expected[:k].tolist(), rel=1e-6)


def test_held_out_split_is_the_same_in_a_fresh_process(tmp_path):
    """The split is a pure function of (data seed, dataset name): another process (another rank, a resumed run)
    holds out exactly the same records, and they are never in the training index."""
    from qwenvl.data.registry import build_split_index, resolve_sources

    dictionary = write_data(tmp_path)
    sources = resolve_sources("mem,noise,shapes", str(dictionary))
    ds_ids, rec_ids, report, held = build_split_index(sources, 42, 0.25)
    mine = {sources[k].name: v.tolist() for k, v in held.items()}
    code = ("import json,sys; from qwenvl.data.registry import build_split_index, resolve_sources; "
            f"s = resolve_sources('mem,noise,shapes', {str(dictionary)!r}); "
            "h = build_split_index(s, 42, 0.25)[3]; print(json.dumps({s[k].name: v.tolist() for k, v in h.items()}))")
    other = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                      cwd=REPO).stdout)
    assert mine == other and {k: len(v) for k, v in mine.items()} == {"mem": 4, "noise": 4, "shapes": 2}
    for k, recs in held.items():
        assert not set(rec_ids[ds_ids == k].tolist()) & set(recs.tolist())
    assert report["datasets"]["mem"]["samples"] == 12 and report["datasets"]["mem"]["held_out"] == 4
    assert build_split_index(sources, 43, 0.25)[3][0].tolist() != mine["mem"]  # the seed moves it


def test_print_args_shows_eval_samples_and_cadence(tmp_path, tiny_model_dir):
    dictionary = write_data(tmp_path / "data")
    cfg = write_yaml(tmp_path / "run.yaml", tiny_model_dir, dictionary, tmp_path / "out", steps=6, port=29672)
    p = subprocess.run([VLSFT, "print-args", "--config", str(cfg)], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert "eval samples = 16, evaluated every 3 steps (2 times)" in p.stdout
    assert "mem (held out)" in p.stdout and "facts" in p.stdout
    assert "samples per epoch = 30" in p.stdout  # 12 + 12 + 6: the held-out records are not trained on
    for flag in ("--eval_dataset_use facts", "--eval_split 0.25", "--eval_strategy steps", "--eval_steps 3"):
        assert flag in " ".join(p.stdout.split()), flag
    bad = subprocess.run([VLSFT, "print-args", "--config", str(cfg), "data.eval=[nope]"], capture_output=True,
                         text=True, cwd=REPO)
    assert bad.returncode == 2 and "data.eval[0]" in bad.stderr and "'nope'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_eval_strategy_without_eval_data_is_one_line(tmp_path, capsys):
    from qwenvl.train import main

    rc = main(["--model_name_or_path", str(tmp_path / "no-model"), "--dataset_dict",
               str(REPO / "configs" / "demo" / "Dataset-Dictionary.json"), "--tune_mm_llm", "True",
               "--output_dir", str(tmp_path / "out"), "--eval_strategy", "steps"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "needs eval data" in err[0] and "--eval_split" in err[0]
