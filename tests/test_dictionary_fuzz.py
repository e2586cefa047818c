"""Property tests: thousands of malformed dictionaries, never an uncaught exception.

Every input ends in either ``ok`` (and then each dataset is a valid DatasetSpec) or a list of
problems, each with a file, a 1-based line when it has one, a message and a severity. The
position-aware parser also agrees with :mod:`json` about which texts are valid JSON.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenvl.data.dictionary import KNOWN_KEYS, DatasetSpec, load_dictionary
from qwenvl.data.jsonloc import parse

EXAMPLES = int(os.environ.get("VLSFT_FUZZ_EXAMPLES", "500"))  # raise it for a deeper local run
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

VALID = """{
    "dataset1": {
        "data_path": "media",
        "annotation_path": "ann.jsonl",
        "length": 2,
        "sampling_rate": 0.05437
    },
    "dataset2": {
        "data_path": "media",
        "annotation_path": "ann.json",
        "repeat_time": 2.5
    }
}
"""
JSON_CHARS = '{}[],:"\'\\ \n\t-+.0123456789eEaNInfity_%/*'


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    (d / "media").mkdir()
    (d / "media" / "a.jpg").write_bytes(b"x")
    rec = {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]}
    (d / "ann.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    (d / "ann.json").write_text(json.dumps([rec, [rec, rec]]))
    (d / "bad.json").write_text("[{],")
    (d / "obj.json").write_text("{}")
    (d / "empty.jsonl").write_text("")
    return d


def check_invariants(path: Path) -> None:
    d = load_dictionary(str(path))
    assert isinstance(d.problems, list)
    for p in d.problems:
        assert p.severity in ("error", "warning")
        assert p.file and p.message and "\n" not in p.message
        assert p.line is None or p.line >= 1
        assert p.column is None or p.column >= 1
        p.render()
    if d.ok:
        assert not d.unusable
        for name, spec in d.datasets.items():
            assert name.strip() and "," not in name and "%" not in name
            DatasetSpec.model_validate(spec.model_dump())
            assert math.isfinite(spec.percent) and spec.percent > 0
    else:
        assert d.errors


def write(workdir: Path, text: str) -> Path:
    p = workdir / "Dataset-Dictionary.json"
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    return p


@SETTINGS
@given(st.text(max_size=300))
def test_random_text(workdir, text):
    check_invariants(write(workdir, text))


@st.composite
def mutated(draw) -> str:
    text = VALID
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["delete", "insert", "replace", "duplicate", "truncate"]))
        i = draw(st.integers(0, len(text)))
        if op == "delete":
            j = draw(st.integers(i, min(len(text), i + 8)))
            text = text[:i] + text[j:]
        elif op == "insert":
            text = text[:i] + draw(st.text(alphabet=JSON_CHARS, min_size=1, max_size=4)) + text[i:]
        elif op == "replace" and i < len(text):
            text = text[:i] + draw(st.sampled_from(JSON_CHARS)) + text[i + 1:]
        elif op == "duplicate":
            j = draw(st.integers(i, min(len(text), i + 40)))
            text = text[:j] + text[i:j] + text[j:]
        elif op == "truncate":
            text = text[:i]
    return text


@SETTINGS
@given(mutated())
def test_mutated_valid_dictionary(workdir, text):
    check_invariants(write(workdir, text))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
entry_values = st.one_of(
    json_values,
    st.sampled_from(["ann.jsonl", "ann.json", "bad.json", "obj.json", "empty.jsonl", "missing.jsonl", "media",
                     "x.txt", "", "s3://bucket/x.jsonl", "/abs/none.json"]),
    st.floats(min_value=-3, max_value=3),
)
entry_keys = st.sampled_from(list(KNOWN_KEYS) + ["sampleing_rate", "Length", "images", ""]) | st.text(max_size=6)
entries = st.dictionaries(entry_keys, entry_values, max_size=6) | json_values
names = st.sampled_from(["a", "b", "a,b", "x%1", "", " ", "ds"]) | st.text(max_size=6)


@SETTINGS
@given(st.dictionaries(names, entries, max_size=4) | json_values)
def test_random_structures(workdir, doc):
    text = json.dumps(doc, allow_nan=True)
    check_invariants(write(workdir, text))


@settings(max_examples=2 * EXAMPLES, deadline=None)
@given(st.one_of(st.text(alphabet=JSON_CHARS, max_size=40), mutated(),
                 json_values.map(lambda v: json.dumps(v, allow_nan=True))))
def test_parser_agrees_with_json(text):
    node, errors = parse(text)
    try:
        expected = json.loads(text)
    except (ValueError, RecursionError):
        assert errors or node is None, text
        return
    assert errors == [], (text, errors)
    got = node.to_python()
    assert json.dumps(got, sort_keys=True, allow_nan=True) == json.dumps(expected, sort_keys=True, allow_nan=True)


turn_values = st.one_of(
    st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "robot"]) | json_values,
                           "value": st.sampled_from(["<image>", "<video> x", "", " ", "hi"]) | json_values}),
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]) | json_values,
                           "content": st.text(max_size=10) | json_values}),
    json_values,
)
media_values = st.none() | st.sampled_from(["a.jpg", "gone.jpg", "", "/abs/x.png"]) | st.lists(
    st.sampled_from(["a.jpg", "b/c.mp4", ""]) | json_values, max_size=3) | json_values
records = st.one_of(
    st.fixed_dictionaries({}, optional={"image": media_values, "video": media_values, "images": media_values,
                                        "conversations": st.lists(turn_values, max_size=4) | json_values}),
    json_values,
)


@settings(max_examples=max(1, EXAMPLES // 3), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(records, max_size=12), st.sampled_from(["jsonl", "json"]))
def test_deep_scan_of_random_records(workdir, recs, fmt):
    """Per-sample checks on arbitrary records: problems with lines, never an exception; counts add up."""
    from qwenvl.data.annotations import scan

    path = workdir / f"random.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in recs))
    else:
        path.write_text(json.dumps(recs, allow_nan=True, indent=1))
    res = scan(str(path), str(workdir / "media"), deep=True)
    dicts = [r for r in recs if isinstance(r, dict)] if fmt == "jsonl" else None
    if dicts is not None:
        assert res.records == len(recs)
        assert res.images + res.text_only <= len(dicts) + res.videos
    for p in res.problems:
        assert p.severity in ("error", "warning") and "\n" not in p.message
        assert p.line is None or p.line >= 1
