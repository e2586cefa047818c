"""The batch-statistics contract (collator -> trainer) and the bad-sample stop rule.

The rule (qwenvl.data.collate.bad_ratio_exceeded): stop when the one-sided 99 % Clopper-Pearson lower bound of
the bad fraction exceeds max_ratio. Decided boundaries: 0 bad never stops; with max_ratio 0.01 one bad sample
never stops a run by itself (1 of 3: the bound is 0.33 %), two of up to 15 and three of up to 44 do; large
counts converge to the plain ratio test.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from qwenvl.data.collate import (  # noqa: E402
    NON_MODEL_KEYS,
    BadSampleLimitExceeded,
    BadSampleMonitor,
    DataCollator,
    bad_fraction_lower_bound,
    bad_ratio_exceeded,
    binomial_upper_tail,
    describe_kinds,
    pop_batch_stats,
)

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "configs" / "demo" / "images"


# ---- the statistical rule ------------------------------------------------------------------------------------
def _exact_tail(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1))


@pytest.mark.parametrize("k,n,p", [(1, 3, 0.01), (3, 20, 0.05), (10, 50, 0.3), (40, 100, 0.5), (7, 7, 0.2),
                                   (2, 400, 0.001), (150, 300, 0.45)])
def test_binomial_tail_matches_the_exact_sum(k, n, p):
    assert binomial_upper_tail(k, n, p) == pytest.approx(_exact_tail(k, n, p), rel=1e-9, abs=1e-15)


def test_zero_bad_never_stops():
    for n in (1, 3, 100, 10 ** 7):
        for limit in (0.0, 0.01, 0.5):
            assert not bad_ratio_exceeded(0, n, limit)
            assert bad_fraction_lower_bound(0, n) == 0.0


def test_one_bad_of_three_at_one_percent_does_not_stop():
    # decided and documented: a single bad sample is never enough at 99 % confidence for a 1 % limit
    assert bad_fraction_lower_bound(1, 3) == pytest.approx(1 - 0.99 ** (1 / 3), rel=1e-6)  # 0.33 %
    assert not bad_ratio_exceeded(1, 3, 0.01)
    assert not any(bad_ratio_exceeded(1, n, 0.01) for n in range(1, 1000))
    # ... but a stricter limit or a second early bad sample does
    assert bad_ratio_exceeded(1, 3, 0.001)
    assert bad_ratio_exceeded(2, 15, 0.01) and not bad_ratio_exceeded(2, 16, 0.01)
    assert bad_ratio_exceeded(3, 44, 0.01) and not bad_ratio_exceeded(3, 45, 0.01)


def test_small_counts_apply_from_the_first_samples():
    # the old rule waited for 100 samples per rank; 15 % bad in a tiny set now stops
    assert bad_ratio_exceeded(3, 20, 0.01)
    assert bad_ratio_exceeded(2, 2, 0.01)  # everything bad
    assert bad_ratio_exceeded(1, 1, 0.0) and bad_ratio_exceeded(1, 10 ** 6, 0.0)  # limit 0: no bad sample at all
    assert not bad_ratio_exceeded(10, 10, 1.0)  # limit 1: never


def test_large_counts_converge_to_the_plain_ratio():
    n = 10 ** 6
    assert bad_fraction_lower_bound(20_000, n) == pytest.approx(0.02, abs=0.0005)
    assert bad_ratio_exceeded(10_500, n, 0.01)  # 1.05 % > 1 %
    assert not bad_ratio_exceeded(9_900, n, 0.01)
    gaps = [0.02 - bad_fraction_lower_bound(int(0.02 * m), m) for m in (100, 10_000, 1_000_000)]
    assert gaps[0] > gaps[1] > gaps[2] > 0


def test_lower_bound_is_the_exceed_threshold():
    for k, n in ((1, 3), (2, 30), (5, 40), (60, 1000)):
        lb = bad_fraction_lower_bound(k, n)
        assert bad_ratio_exceeded(k, n, lb * 0.999) and not bad_ratio_exceeded(k, n, lb * 1.001)


# ---- the monitor and its message ------------------------------------------------------------------------------
def test_monitor_counts_by_kind_and_stops_with_a_by_kind_line():
    m = BadSampleMonitor(max_ratio=0.01)
    m.hint = "see out/logs/skipped-samples-rank*.jsonl"
    m.update({"num_samples": 2, "num_skipped": 1, "skipped": [{"kind": "missing_media", "reason": "x"}]})
    assert (m.seen, m.skipped, m.trained, m.kinds) == (3, 1, 2, {"missing_media": 1})  # 1 of 3: no stop
    with pytest.raises(BadSampleLimitExceeded) as e:
        m.update({"num_samples": 1, "num_skipped": 2,
                  "skipped": [{"kind": "too_long", "reason": "y"}, {"kind": "missing_media", "reason": "z"}]})
    (line,) = e.value.lines()
    assert re.fullmatch(r"error: stopped: 3 of 6 samples bad \(50\.0%, at 99% confidence at least \d+\.\d% > "
                        r"max_bad_sample_ratio 0\.01\): 2 missing_media, 1 too_long; see out/logs/skipped-samples-"
                        r"rank\*\.jsonl; fix the data \(vlsft datasets check --deep\) or raise max_bad_sample_ratio",
                        line), line
    assert not BadSampleLimitExceeded.every_rank  # decided on counts summed over ranks: rank 0 reports it


def test_skips_without_records_count_as_other():
    m = BadSampleMonitor(max_ratio=1.0)
    m.update({"num_samples": 1, "num_skipped": 2})
    assert m.kinds == {"other": 2} and describe_kinds({"a": 1, "b": 3, "c": 0}) == "3 b, 1 a"


# ---- the contract ---------------------------------------------------------------------------------------------
def _sample(n: int, index: int) -> dict:
    ids = torch.full((n,), 9707, dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(n).expand(3, n).clone(),
            "sample_index": index}


@pytest.mark.parametrize("mode", ["padded", "flatten", "packing"])
def test_collator_bookkeeping_is_exactly_the_contract(mode):
    coll = DataCollator(pad_token_id=151643, mode=mode, model_max_length=16)
    marker = {"bad_sample": "image not found: a.png", "kind": "missing_media", "dataset": "d", "where": "a.json:3",
              "sample_index": 1}
    batch = coll([_sample(8, 0), marker, _sample(20, 2), _sample(5, 3)])
    stats = pop_batch_stats(batch)
    slots = stats.pop("token_samples")  # per token: the position of its sample in sample_ids (-1: padding)
    assert slots.shape == batch["labels"].shape
    assert sorted(slots[slots >= 0].tolist()) == [0] * 8 + [1] * 5
    assert stats == {"num_samples": 2, "num_skipped": 2, "sample_ids": [0, 3], "skipped": [
        {"kind": "missing_media", "reason": "image not found: a.png", "dataset": "d", "where": "a.json:3",
         "sample_index": 1},
        {"kind": "too_long", "reason": "20 tokens > model_max_length 16", "sample_index": 2}]}
    left = set(batch) & set(NON_MODEL_KEYS)
    assert not left, left
    model_inputs = {"input_ids", "labels", "attention_mask", "position_ids", "pixel_values", "image_grid_thw",
                    "pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "cu_seq_lens_q", "cu_seq_lens_k",
                    "max_length_q", "max_length_k", "use_cache"}
    assert set(batch) <= model_inputs, set(batch) - model_inputs


def test_trainer_has_no_second_copy_of_the_keys():
    import qwenvl.trainer as trainer

    assert not hasattr(trainer, "STAT_KEYS")
    assert trainer.pop_batch_stats is pop_batch_stats


def test_kinds_reach_the_main_process_from_dataloader_workers(tmp_path, qwen_tokenizer_dir):
    """Real dataset + DataLoader with 2 workers: skip records (with their kind and file:line) travel in the
    batch, so the main process counts skips by kind."""
    from transformers import AutoTokenizer

    from qwenvl.data.arguments import DataArguments
    from qwenvl.data.dataset import make_data_module

    def rec(image: str | None, text: str) -> dict:
        turns = [{"from": "human", "value": ("<image>\n" if image else "") + "What colour?"},
                 {"from": "gpt", "value": text}]
        return {"image": image, "conversations": turns} if image else {"conversations": turns}

    recs = [rec(None, f"red {i}") for i in range(9)]
    recs[2] = rec("missing_2.png", "red")
    recs[5] = rec("missing_5.png", "red")
    recs[7] = rec(None, "very long answer " * 200)  # > model_max_length
    (tmp_path / "a.json").write_text(json.dumps(recs))
    d = tmp_path / "dict.json"
    d.write_text(json.dumps({"a": {"data_path": str(IMAGES), "annotation_path": str(tmp_path / "a.json")}}))
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    args = DataArguments(dataset_use="a", dataset_dict=str(d), model_max_length=256, max_bad_sample_ratio=0.5)
    mod = make_data_module(tok, None, args, seed=0)
    loader = torch.utils.data.DataLoader(mod["train_dataset"], batch_size=3, num_workers=2,
                                         collate_fn=mod["data_collator"])
    monitor, records = mod["bad_sample_monitor"], []
    for batch in loader:
        stats = pop_batch_stats(batch)
        records += stats.get("skipped", [])
        monitor.update(stats)
    assert (monitor.seen, monitor.skipped, monitor.trained) == (9, 3, 6)
    assert monitor.kinds == {"missing_media": 2, "too_long": 1}
    assert sorted((r["where"], r["kind"]) for r in records) == [  # where: the record in the .json array
        (f"{tmp_path / 'a.json'}[{i}]", kind) for i, kind in ((2, "missing_media"), (5, "missing_media"),
                                                             (7, "too_long"))]
