"""`vlsft datasets preview` reads the one dataset it is asked for:

* a LLaMA-Factory ``dataset_info.json`` catalogue whose other entries vlsft cannot read (alpaca, ranking) is
  previewed with one warning line, with ``--dictionary`` and with ``--config`` (as ``print-args`` accepts it);
  the named entry's own errors still refuse it;
* a record whose JSONL line is not JSON is a bad sample: one ``error:`` line with file:line and exit 1 (``--json``:
  ``{"bad_sample", "where", "format"}``), as a sample the builder refuses (was a traceback).

In process (:mod:`cli_inprocess`); each call loads the tiny model's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _vlsft(*args):
    from cli_inprocess import vlsft

    return vlsft("datasets", "preview", *(str(a) for a in args))


@pytest.fixture()
def catalogue(tmp_path) -> Path:
    """A LLaMA-Factory dataset_info.json: a readable sharegpt entry, an alpaca one and a ranking one."""
    rec = {"messages": [{"role": "user", "content": "What is two plus two?"},
                        {"role": "assistant", "content": "Four."}]}
    (tmp_path / "chat_demo.json").write_text(json.dumps([rec, rec]))
    info = {
        "chat_demo": {"file_name": "chat_demo.json", "formatting": "sharegpt",
                      "columns": {"messages": "messages"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant"}},
        "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
        "dpo_demo": {"file_name": "dpo_en_demo.json", "ranking": True, "formatting": "sharegpt",
                     "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return tmp_path / "dataset_info.json"


def _warning_lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.strip()]


def test_preview_reads_the_named_entry_of_a_catalogue(catalogue, tiny_model_dir, tmp_path):
    r = _vlsft("--model", tiny_model_dir, "--dictionary", catalogue, "--dataset", "chat_demo", "--index", "1")
    assert r.returncode == 0, r.stderr
    assert "What is two plus two?" in r.stdout and "Traceback" not in r.stderr
    lines = _warning_lines(r.stderr)
    assert len(lines) == 1 and "warning: 2 other dataset(s)" in lines[0], r.stderr
    assert "alpaca_en_demo, dpo_demo" in lines[0] and f"vlsft datasets check {catalogue}" in lines[0]

    r = _vlsft("--model", tiny_model_dir, "--dictionary", catalogue, "--dataset", "chat_demo", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["format"] and len(_warning_lines(r.stderr)) == 1

    # --config with data.use naming the readable entry (print-args accepts this run)
    (tmp_path / "run.yaml").write_text(f"model:\n  name_or_path: {tiny_model_dir}\n"
                                       f"data:\n  dictionary: {catalogue.name}\n  use: [chat_demo]\n"
                                       "output:\n  dir: out\n")
    r = _vlsft("--config", tmp_path / "run.yaml", "--dataset", "chat_demo", "--index", "0")
    assert r.returncode == 0 and "What is two plus two?" in r.stdout, r.stderr
    assert len(_warning_lines(r.stderr)) == 1


def test_preview_refuses_the_named_entry_when_it_is_unreadable(catalogue, tiny_model_dir):
    r = _vlsft("--model", tiny_model_dir, "--dictionary", catalogue, "--dataset", "dpo_demo")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = _warning_lines(r.stderr)
    assert len(lines) == 1 and "dpo_demo" in lines[0] and "ranking" in lines[0], r.stderr
    r = _vlsft("--model", tiny_model_dir, "--dictionary", catalogue, "--dataset", "chat_dmeo")
    assert r.returncode == 2 and "no dataset named 'chat_dmeo'" in r.stderr and "chat_demo" in r.stderr


def test_preview_of_a_line_that_is_not_json_is_a_bad_sample(tmp_path, tiny_model_dir):
    good = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
    lines = [json.dumps(good)] * 2 + [json.dumps(good)[:-1] + ",}"] + [json.dumps(good)] * 2
    (tmp_path / "ann.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "dict.json").write_text(json.dumps({"x": {"data_path": ".", "annotation_path": "ann.jsonl"}}))
    args = ("--model", tiny_model_dir, "--dictionary", tmp_path / "dict.json", "--dataset", "x", "--index", "2")
    r = _vlsft(*args)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    out = _warning_lines(r.stderr)
    assert len(out) == 1 and out[0].startswith(f"{tmp_path / 'ann.jsonl'}:3: error: bad sample"), r.stderr
    assert "not valid JSON" in out[0] and out[0].count("ann.jsonl") == 1
    r = _vlsft(*args, "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    got = json.loads(r.stdout)
    assert got["where"] == f"{tmp_path / 'ann.jsonl'}:3" and got["bad_sample"].startswith("not valid JSON")
    assert got["format"]
    r = _vlsft(*args[:-1], "3")  # the next record is read as usual
    assert r.returncode == 0 and "Hello." in r.stdout, r.stderr
