"""Dataset dictionary loading: every problem named with file:line:column, key and hint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from dictionary_fixtures import TUTORIAL

from qwenvl.data.dictionary import DatasetSpec, count_records, load_dictionary


def _write(tmp_path: Path, text: str, name: str = "Dataset-Dictionary.json") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _sample(image: str | None = "a.jpg") -> dict:
    rec = {"conversations": [{"from": "human", "value": ("<image>\n" if image else "") + "What?"},
                             {"from": "gpt", "value": "That."}]}
    if image:
        rec["image"] = image
    return rec


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    """A folder with media + a 3-record .jsonl + a 2-record .json."""
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.jpg").write_bytes(b"x")
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(_sample()) for _ in range(3)) + "\n\n")
    (tmp_path / "val.json").write_text(json.dumps([_sample(), _sample(None)]))
    return tmp_path


def test_tutorial_dictionary_as_published(tmp_path):
    d = load_dictionary(_write(tmp_path, TUTORIAL), check_files=False)
    assert not d.ok
    rendered = [p.render() for p in d.problems]
    typo = [p for p in d.problems if p.key == "sampleing_rate"]
    comma = [p for p in d.problems if "trailing comma" in p.message]
    assert len(typo) == 1 and (typo[0].line, typo[0].column) == (6, 9)
    assert typo[0].hint == "did you mean 'sampling_rate'?"
    assert len(comma) == 1 and (comma[0].line, comma[0].column) == (13, 6)
    assert any(":6:9: error: [sampleing_rate]" in r for r in rendered)
    assert any(":13:6: error: JSON syntax: trailing comma" in r for r in rendered)
    # the valid entry survives the syntax error
    assert d.datasets["dataset2"].percent == 56.7


def test_tutorial_with_comma_fixed_still_names_typo(tmp_path):
    fixed = TUTORIAL.replace("    },\n}", "    }\n}")
    d = load_dictionary(_write(tmp_path, fixed), check_files=False)
    assert [(p.line, p.key, p.hint) for p in d.problems] == [(6, "sampleing_rate", "did you mean 'sampling_rate'?")]
    assert "dataset1" not in d.datasets and "dataset2" in d.datasets
    assert d.positions == {"dataset1": (2, 5), "dataset2": (8, 5)}


def test_tutorial_files_missing_are_named(tmp_path):
    d = load_dictionary(_write(tmp_path, TUTORIAL))
    missing = [p for p in d.problems if "not found" in p.message]
    assert [(p.line, p.key) for p in missing] == [(4, "annotation_path"), (10, "annotation_path")]


def test_valid_dictionary_resolves_relative_paths(data_dir):
    path = _write(data_dir, json.dumps({
        "train": {"data_path": "media", "annotation_path": "train.jsonl", "length": 3, "sampling_rate": 0.05437},
        "val": {"data_path": str(data_dir / "media"), "annotation_path": "./val.json", "repeat_time": 2.5},
        "all": {"data_path": "media", "annotation_path": "train.jsonl"},
    }, indent=1))
    d = load_dictionary(path)
    assert d.ok, [p.render() for p in d.problems]
    assert d.problems == []
    assert d.datasets["train"].data_path == str(data_dir / "media")
    assert d.datasets["val"].annotation_path == str(data_dir / "val.json")
    assert [d.datasets[n].percent for n in ("train", "val", "all")] == [5.437, 250.0, 100.0]
    assert d.record_counts == {"train": 3, "val": 2, "all": 3}
    assert count_records(str(data_dir / "train.jsonl")) == 3
    assert count_records(str(data_dir / "val.json")) == 2


def test_dictionary_in_other_folder_resolves_against_its_own_folder(data_dir, monkeypatch, tmp_path_factory):
    sub = data_dir / "dicts"
    sub.mkdir()
    path = _write(sub, json.dumps({"t": {"data_path": "../media", "annotation_path": "../train.jsonl"}}))
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    d = load_dictionary(os.path.relpath(path))
    assert d.ok, [p.render() for p in d.problems]
    assert d.datasets["t"].annotation_path == str(data_dir / "train.jsonl")


@pytest.mark.parametrize(
    "entry, key, fragment, hint_fragment",
    [
        ({"annotation_path": "x.jsonl", "sampling_rate": "0.5"}, "sampling_rate", "must be a number", "0.5 without quotes"),
        ({"annotation_path": "x.jsonl", "sampling_rate": True}, "sampling_rate", "found a boolean", None),
        ({"annotation_path": "x.jsonl", "sampling_rate": 0}, "sampling_rate", "must be > 0", None),
        ({"annotation_path": "x.jsonl", "repeat_time": -1}, "repeat_time", "must be > 0", None),
        ({"annotation_path": "x.jsonl", "repeat_time": 1e300}, "repeat_time", "above 1,000,000 repeats", "epochs"),
        ({"annotation_path": "x.jsonl", "sampling_rate": 1.5}, "sampling_rate", "above 1", "repeat_time"),
        ({"annotation_path": "x.jsonl", "sampling_rate": 0.5, "repeat_time": 2}, "repeat_time", "both", None),
        ({"annotation_path": "x.jsonl", "length": "10"}, "length", "must be an integer", "10 without quotes"),
        ({"annotation_path": "x.jsonl", "length": 2.5}, "length", "whole number", None),
        ({"annotation_path": "x.jsonl", "length": -1}, "length", "negative", None),
        ({"annotation_path": 3}, "annotation_path", "path string", None),
        ({"annotation_path": ""}, "annotation_path", "is empty", None),
        ({"annotation_path": "x.csv"}, "annotation_path", ".json or .jsonl", None),
        ({"data_path": "m"}, "annotation_path", "has no 'annotation_path'", None),
        ({"annotation_path": "x.jsonl", "Sampling_Rate": 0.5}, "Sampling_Rate", "unknown key", "sampling_rate"),
    ],
)
def test_entry_errors(tmp_path, entry, key, fragment, hint_fragment):
    d = load_dictionary(_write(tmp_path, json.dumps({"ds": entry})), check_files=False)
    errs = [p for p in d.errors if p.key == key]
    assert errs, [p.render() for p in d.problems]
    assert fragment in errs[0].message
    assert errs[0].line == 1 and errs[0].column is not None and errs[0].file.endswith("Dataset-Dictionary.json")
    if hint_fragment:
        assert hint_fragment in (errs[0].hint or "")
    assert "ds" not in d.datasets


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_rates(tmp_path, literal):
    d = load_dictionary(_write(tmp_path, '{"ds": {"annotation_path": "x.jsonl", "repeat_time": ' + literal + "}}"),
                        check_files=False)
    assert [p.key for p in d.errors] == ["repeat_time"]


@pytest.mark.parametrize("name, fragment", [("a,b", "','"), ("a%5", "'%'"), ("", "empty"), ("  ", "empty"),
                                            (" a", "whitespace")])
def test_bad_names(tmp_path, name, fragment):
    d = load_dictionary(_write(tmp_path, json.dumps({name: {"annotation_path": "x.jsonl"}})), check_files=False)
    assert len(d.errors) == 1 and fragment in d.errors[0].message
    assert d.datasets == {}


def test_duplicates(tmp_path):
    text = '{\n "a": {"annotation_path": "x.jsonl"},\n "a": {"annotation_path": "y.jsonl", "length": 1, "length": 2}\n}'
    d = load_dictionary(_write(tmp_path, text), check_files=False)
    msgs = [(p.line, p.message) for p in d.errors]
    assert any(line == 3 and "defined twice (first at line 2)" in m for line, m in msgs)
    assert any(line == 3 and "'length' appears twice" in m for line, m in msgs)


@pytest.mark.parametrize("text, fragment", [("", "empty"), ("  \n", "empty"), ("[1, 2]", "top level must be an object"),
                                            ('"x"', "top level must be an object"), ("{}", "no datasets")])
def test_file_level(tmp_path, text, fragment):
    d = load_dictionary(_write(tmp_path, text))
    assert not d.ok and fragment in d.errors[0].message


def test_missing_file_is_unusable(tmp_path):
    d = load_dictionary(str(tmp_path / "nope.json"))
    assert d.unusable and not d.ok and "not found" in d.errors[0].message


def test_annotation_file_checks(data_dir):
    (data_dir / "obj.json").write_text('{"not": "a list"}')
    (data_dir / "broken.json").write_text('[{"a": 1},\n {"b": 2},\n]')
    (data_dir / "adir.jsonl").mkdir()
    (data_dir / "txt.jsonl").write_text(json.dumps(_sample(None)) + "\n")
    path = _write(data_dir, json.dumps({
        "len": {"data_path": "media", "annotation_path": "train.jsonl", "length": 1000},
        "obj": {"data_path": "media", "annotation_path": "obj.json"},
        "broken": {"data_path": "media", "annotation_path": "broken.json"},
        "gone": {"data_path": "media", "annotation_path": "gone.jsonl"},
        "dir": {"data_path": "media", "annotation_path": "adir.jsonl"},
        "nodata": {"annotation_path": "train.jsonl"},
        "badmedia": {"data_path": "no-such-folder", "annotation_path": "train.jsonl"},
        "textonly": {"annotation_path": "txt.jsonl"},
    }, indent=1))
    d = load_dictionary(path)
    by = {p.message: p for p in d.problems}
    text = "\n".join(by)
    assert "declares length 1000 but train.jsonl holds 3 records" in text
    assert "must be a list of samples, found an object" in text
    broken = [p for p in d.problems if p.file.endswith("broken.json")]
    assert broken and (broken[0].line, broken[0].column) == (2, 10)  # the trailing comma itself
    assert "trailing comma before ']'" in broken[0].message
    assert "annotation file of dataset 'gone' not found" in text
    assert "annotation_path of dataset 'dir' is a folder" in text
    assert "dataset 'nodata' has no data_path but its samples reference media (first at train.jsonl:1)" in text
    assert "data_path of dataset 'badmedia' does not exist" in text
    assert not any("textonly" in m for m in by)  # text-only samples need no data_path
    length = next(p for p in d.problems if "declares length" in p.message)
    assert length.severity == "warning" and length.key == "length" and length.hint == 'set "length": 3'


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_annotation(data_dir):
    f = data_dir / "secret.jsonl"
    f.write_text("{}\n")
    f.chmod(0)
    d = load_dictionary(_write(data_dir, json.dumps({"s": {"annotation_path": "secret.jsonl"}})))
    assert "not readable" in d.errors[0].message


def test_spec_model_is_strict_and_documented():
    assert DatasetSpec.model_config["extra"] == "forbid"
    for name, f in DatasetSpec.model_fields.items():
        assert f.description, name
    with pytest.raises(ValueError):
        DatasetSpec(annotation_path="a.jsonl", samplng_rate=0.5)
    assert DatasetSpec(annotation_path="a.jsonl", repeat_time=2.5).percent == 250.0
    assert DatasetSpec(annotation_path="a.jsonl", sampling_rate=0.05437).percent == 5.437
    assert DatasetSpec(annotation_path="a.jsonl").percent == 100.0


def test_golden_dictionary(golden_dir, tmp_path):
    path = _write(tmp_path, json.dumps({
        "public_a": {"data_path": str(golden_dir / "media"), "annotation_path": str(golden_dir / "annotations/public_a.json"),
                     "length": 15},
        "public_b": {"data_path": str(golden_dir / "media"), "annotation_path": str(golden_dir / "annotations/public_b.jsonl"),
                     "length": 14, "sampling_rate": 0.5},
    }))
    d = load_dictionary(path)
    assert d.ok and d.problems == [], [p.render() for p in d.problems]
    assert d.record_counts == {"public_a": 15, "public_b": 14}


def test_wrong_type_messages_and_tilde_hint(tmp_path):
    text = ('{\n "n": {"annotation_path": null},\n "o": {"annotation_path": {"p": "x.jsonl"}, "data_path": ["m"]},\n'
            ' "t": {"annotation_path": "~/surely-not-here-vlsft/x.jsonl"}\n}')
    d = load_dictionary(_write(tmp_path, text))
    msgs = {(p.line, p.key): (p.message, p.hint) for p in d.problems}
    assert msgs[(2, "annotation_path")][0] == "'annotation_path' of dataset 'n' must be a path string, found null"
    assert msgs[(3, "annotation_path")][0].endswith("must be a path string, found an object")
    assert msgs[(3, "data_path")][0].endswith("must be a path string, found a list")
    message, hint = msgs[(4, "annotation_path")]
    home = os.path.expanduser("~")
    assert message.endswith(f"not found: {home}/surely-not-here-vlsft/x.jsonl") and hint == f"'~' was expanded to {home}"


def test_non_utf8_dictionary_names_line_and_column(tmp_path):
    p = tmp_path / "d.json"
    p.write_bytes(b'{\n "ok": {"annotation_path": "a.jsonl"},\n "caf\xe9": {"annotation_path": "a.jsonl"}\n}')
    d = load_dictionary(str(p), check_files=False)
    [err] = [e for e in d.errors if "UTF-8" in e.message]
    assert (err.line, err.column, err.message) == (3, 6, "not UTF-8 text (byte 0xe9)")
    assert "ok" in d.datasets and not d.unusable


def test_duplicate_key_on_one_line_names_the_column(tmp_path):
    d = load_dictionary(_write(tmp_path, '{"h": {"annotation_path": "a.jsonl", "length": 1, "length": 2}}'),
                        check_files=False)
    [err] = d.errors
    assert (err.line, err.column) == (1, 51) and err.message.endswith("appears twice in dataset 'h' (first at column 38)")


def test_dictionary_wrapped_in_a_list_gets_a_hint(tmp_path):
    d = load_dictionary(_write(tmp_path, '[{"a": {"annotation_path": "a.jsonl"}}]'), check_files=False)
    assert d.unusable and d.errors[0].hint == "remove the [ ] around the object"


def test_quoted_numbers_get_the_number_to_write(tmp_path):
    text = ('{"a": {"annotation_path": "a.jsonl", "length": "1,000", "sampling_rate": "50%"},\n'
            ' "b": {"annotation_path": "a.jsonl", "length": "abc", "repeat_time": "2"}}')
    d = load_dictionary(_write(tmp_path, text), check_files=False)
    assert [(p.key, p.hint) for p in d.errors] == [
        ("length", "write 1000 without quotes"), ("sampling_rate", "write 0.5 without quotes"),
        ("length", "write the number of records, e.g. 1000"), ("repeat_time", "write 2 without quotes")]


def test_annotation_file_given_as_dictionary(tmp_path):
    sample = {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}
    for name, text in [("train.jsonl", json.dumps(sample) + "\n" + json.dumps(sample) + "\n"),
                       ("train.json", json.dumps([sample, sample], indent=1)), ("packed.json", json.dumps([[sample]]))]:
        d = load_dictionary(_write(tmp_path, text, name))
        assert d.unusable and [e.message for e in d.errors] == [
            "this is an annotation file (samples with conversations), not a dataset dictionary"], name
        assert f'"annotation_path": "{name}"' in d.errors[0].hint
    # datasets that happen to be named like sample keys are still datasets
    d = load_dictionary(_write(tmp_path, '{"image": {"annotation_path": "a.jsonl"}, "video": {"annotation_path": "a.jsonl"}}'),
                        check_files=False)
    assert d.ok and list(d.datasets) == ["image", "video"]


def test_run_yaml_given_as_dictionary(tmp_path):
    d = load_dictionary(_write(tmp_path, "model:\n  name_or_path: x\ndata:\n  dictionary: data/dd.json  # mine\n", "run.yaml"))
    assert d.unusable and [(e.message, e.hint) for e in d.errors] == [
        ("this is a YAML file, not a dataset dictionary (JSON)",
         "the run YAML names it: vlsft datasets check data/dd.json (relative to the YAML's folder)")]


def test_windows_path_hint(tmp_path):
    d = load_dictionary(_write(tmp_path, '{"w": {"annotation_path": "C:\\\\data\\\\t.jsonl"}}'))
    [err] = d.errors
    assert "not found" in err.message and err.hint == "write paths with / (this looks like a Windows path)"


def test_unknown_key_synonyms(tmp_path):
    text = '{"a": {"ann_path": "a.jsonl", "image_folder": "m", "num_samples": 3, "weight": 0.5, "sampleing_rate": 1}}'
    d = load_dictionary(_write(tmp_path, text), check_files=False)
    hints = {p.key: p.hint for p in d.errors}
    assert hints["ann_path"] == "did you mean 'annotation_path'?"  # the spelling match alone said data_path
    assert hints["image_folder"] == "did you mean 'data_path'?" and hints["num_samples"] == "did you mean 'length'?"
    assert hints["weight"].startswith("did you mean 'sampling_rate'?")
    assert hints["sampleing_rate"] == "did you mean 'sampling_rate'?"


def test_misspelt_annotation_path_is_one_error(tmp_path):
    d = load_dictionary(_write(tmp_path, '{"a": {"annotation_paht": "a.jsonl"}, "b": {"length": 3}}'), check_files=False)
    assert [(p.key, p.message) for p in d.errors] == [
        ("annotation_paht", "unknown key 'annotation_paht' in dataset 'a'"),
        ("annotation_path", "dataset 'b' has no 'annotation_path'")]


def test_absurd_percent_in_dataset_use_is_one_line():
    from qwenvl.data.dataset_use import DatasetUseError, parse_dataset_use

    assert parse_dataset_use("a%100000000")[0].percent == 1e8  # a million repeats: the limit itself
    with pytest.raises(DatasetUseError, match=r"above 100,000,000 %"):
        parse_dataset_use("a%100000000000000000000000")
