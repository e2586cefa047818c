"""The position-aware JSON parser: positions, recovery, and agreement with json on valid input."""

from __future__ import annotations

import json
import math

from qwenvl.data.jsonloc import parse


def test_positions_of_keys_and_values():
    text = '{\n  "a": 1,\n  "b": {"c": [true, null, "x"]}\n}'
    node, errors = parse(text)
    assert errors == []
    (ka, va), (kb, vb) = node.value
    assert (ka.name, ka.line, ka.column) == ("a", 2, 3)
    assert (va.value, va.line, va.column) == (1, 2, 8)
    assert (kb.line, kb.column, vb.line, vb.column) == (3, 3, 3, 8)
    assert node.to_python() == json.loads(text)


def test_trailing_comma_is_reported_and_recovered():
    node, errors = parse('{"a": [1, 2,],\n "b": 3,\n}')
    assert node.to_python() == {"a": [1, 2], "b": 3}
    assert [(e.line, e.column) for e in errors] == [(1, 12), (2, 8)]
    assert all("trailing comma" in e.message for e in errors)


def test_duplicate_keys_are_kept_in_order():
    node, errors = parse('{"x": 1, "x": 2}')
    assert errors == []
    assert [k.name for k, _ in node.value] == ["x", "x"]
    assert [v.value for _, v in node.value] == [1, 2]


def test_missing_comma_colon_and_unclosed():
    node, errors = parse('{"a" 1 "b": 2')
    assert node.to_python() == {"a": 1, "b": 2}
    msgs = [e.message for e in errors]
    assert any("expected ':'" in m for m in msgs)
    assert any("missing comma" in m for m in msgs)
    assert any("never closed" in m for m in msgs)


def test_lenient_literals_are_errors_but_parsed():
    node, errors = parse("{a: True, 'b': None, \"c\": NaN, \"d\": -Infinity} // note")
    value = node.to_python()
    assert value["a"] is True and value["b"] is None
    assert math.isnan(value["c"]) and value["d"] == -math.inf
    msgs = " | ".join(e.message for e in errors)
    assert "double quotes" in msgs and "'True' is not JSON" in msgs and "comments" in msgs
    # NaN / Infinity are accepted by the parser itself (Python's json accepts them too)
    assert not any("NaN" in e.message for e in errors)


def test_empty_and_garbage():
    assert parse("") == (None, [])
    assert parse("  \n ") == (None, [])
    node, errors = parse("@@@")
    assert node is None and errors and errors[0].line == 1


def test_deep_nesting_does_not_crash():
    node, errors = parse("[" * 5000 + "]" * 5000)
    assert errors and "nesting" in errors[0].message


def test_agrees_with_json_on_valid_documents():
    docs = [
        {"name": {"data_path": "é/ü", "annotation_path": "a\\b\n\t\"q\"", "length": 10, "sampling_rate": 1e-3}},
        [1, -2.5, 3e10, {"k": []}, [], "", None, False],
        "just a string",
        12,
    ]
    for doc in docs:
        for text in (json.dumps(doc), json.dumps(doc, indent=2, ensure_ascii=False)):
            node, errors = parse(text)
            assert errors == [], (text, errors)
            assert node.to_python() == doc


def test_percent_and_thousands_separator_are_one_error_each():
    node, errors = parse('{"r": 50%, "n": 1,000,000, "k": 2,\n "m": 12,345 }')
    assert node.to_python() == {"r": 0.5, "n": 1000000, "k": 2, "m": 12345}
    got = [(e.line, e.column, e.message, e.hint) for e in errors]
    assert got == [
        (1, 7, "'50%' is not a JSON number (no percent signs)", "write 0.5: rates are fractions (0.5 = 50 %)"),
        (1, 17, "'1,000,000' is not a JSON number (no thousands separators)", "write 1000000"),
        (2, 7, "'12,345' is not a JSON number (no thousands separators)", "write 12345"),
    ]
    node, errors = parse('{"a": 1, "000": 2}')  # a quoted key that looks like digits is fine
    assert errors == [] and node.to_python() == {"a": 1, "000": 2}
