"""`vlsft datasets check` / `vlsft datasets use`, through Typer's CliRunner and as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dictionary_fixtures import TUTORIAL
from typer.testing import CliRunner

from vlsft.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def vlsft(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlsft", *args], capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.fixture()
def golden_dict(golden_dir: Path, tmp_path: Path) -> Path:
    """The golden annotations registered in a dictionary (relative media, absolute annotation paths)."""
    p = tmp_path / "golden.json"
    p.write_text(json.dumps({
        "public_a": {"data_path": str(golden_dir / "media"), "annotation_path": str(golden_dir / "annotations/public_a.json"),
                     "length": 15, "sampling_rate": 0.05437},
        "public_b": {"data_path": str(golden_dir / "media"), "annotation_path": str(golden_dir / "annotations/public_b.jsonl"),
                     "length": 14, "repeat_time": 2.5},
    }, indent=2))
    return p


@pytest.fixture()
def tutorial(tmp_path: Path) -> Path:
    p = tmp_path / "Dataset-Dictionary.json"
    p.write_text(TUTORIAL)
    return p


def test_check_tutorial_as_published(tutorial):
    r = invoke("datasets", "check", str(tutorial))
    assert r.exit_code == 1
    assert f"{tutorial}:6:9: error: [sampleing_rate] unknown key 'sampleing_rate'" in r.stdout
    assert "did you mean 'sampling_rate'?" in r.stdout
    assert f"{tutorial}:13:6: error: JSON syntax: trailing comma" in r.stdout
    assert "FAILED" in r.stdout and "Traceback" not in r.stdout + r.stderr


def test_check_tutorial_comma_fixed(tutorial):
    tutorial.write_text(TUTORIAL.replace("    },\n}", "    }\n}"))
    r = invoke("datasets", "check", str(tutorial), "--json")
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    typo = [p for p in report["problems"] if p["key"] == "sampleing_rate"]
    assert typo == [{"severity": "error", "file": str(tutorial), "line": 6, "column": 9, "key": "sampleing_rate",
                     "message": "unknown key 'sampleing_rate' in dataset 'dataset1'",
                     "hint": "did you mean 'sampling_rate'?"}]
    assert not any("trailing comma" in p["message"] for p in report["problems"])


def test_check_golden_ok_table(golden_dict):
    r = invoke("datasets", "check", str(golden_dict))
    assert r.exit_code == 0, r.stdout
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith("public_")}
    cells_a = [c.strip() for c in lines["public_a"].split("│")]
    cells_b = [c.strip() for c in lines["public_b"].split("│")]
    # name, format, declared, samples, rate, per epoch, share, images, videos, text-only, problems
    assert cells_a == ["public_a", "official", "15", "15", "5.437%", "1", "2.8%", "11", "4", "2", "ok"]
    assert cells_b == ["public_b", "official", "14", "14", "250%", "35", "97.2%", "8", "5", "1", "ok"]
    assert "OK check: 2 datasets (none with errors), 36 samples per epoch; 0 errors, 0 warnings" in r.stdout


def test_check_golden_deep_flags_quirks(golden_dict, golden_dir):
    r = invoke("datasets", "check", str(golden_dict), "--deep", "--json")
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert set(report) == {"ok", "problems", "datasets"} and report["ok"] is False
    for p in report["problems"]:
        assert set(p) == {"severity", "file", "line", "column", "key", "message", "hint"}
    a = str(golden_dir / "annotations/public_a.json")
    b = str(golden_dir / "annotations/public_b.jsonl")
    got = {(Path(p["file"]).name, p["line"], p["key"], p["severity"]) for p in report["problems"]}
    # q_05 (public_a.json, record at line 218) uses "images"; q_07 (public_b.jsonl:14) has 2 images, 1 tag
    assert ("public_a.json", 218, "images", "error") in got
    assert ("public_b.jsonl", 14, "image", "error") in got
    # gpt-first samples gf_01 / gf_03 are warnings (the official code drops the turn)
    assert ("public_a.json", 171, "conversations", "warning") in got
    assert ("public_b.jsonl", 11, "conversations", "warning") in got
    assert all(p["file"] in (a, b) for p in report["problems"])
    assert report["datasets"] == [
        {"name": "public_a", "format": "official", "declared_length": 15, "actual_length": 15, "rate": 0.05437, "samples_per_epoch": 1,
         "images": 11, "videos": 4, "text_only": 2},
        {"name": "public_b", "format": "official", "declared_length": 14, "actual_length": 14, "rate": 2.5, "samples_per_epoch": 35,
         "images": 8, "videos": 5, "text_only": 1},
    ]
    text = invoke("datasets", "check", str(golden_dict), "--deep")
    assert text.exit_code == 1
    assert f"{a}:218: error: [images] key 'images' is not read by the trainer" in text.stdout
    assert f"{b}:14: error: [image] 1 <image> tag(s) for 2 image(s)" in text.stdout


def _write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def _turns(q: str, a: str = "ok") -> list:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def test_deep_checks_each_rule(tmp_path):
    media = tmp_path / "media"
    (media / "sub").mkdir(parents=True)
    (media / "a.jpg").write_bytes(b"x")
    (media / "sub" / "v.mp4").write_bytes(b"x")
    good = {"image": "a.jpg", "conversations": _turns("<image>\nWhat?")}
    records = [
        good,                                                                            # 1
        "{not json",                                                                     # 2
        {"image": "missing.jpg", "conversations": _turns("<image> q")},                  # 3
        {"video": ["sub/v.mp4"], "conversations": _turns("q")},                          # 4 tag count
        {"conversations": _turns("q", "<image> here")},                                  # 5 tag in gpt
        {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"},
                           {"from": "gpt", "value": "a"}]},                             # 6 alternation (warning)
        {"conversations": _turns("q", "   ")},                                           # 7 empty value
        {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},  # 8 ok
        {"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]},  # 9 speaker
        {"image": str(media / "a.jpg"), "conversations": _turns("<image>")},             # 10 absolute ok
        {"videos": ["sub/v.mp4"], "conversations": _turns("<video>")},                   # 11 misspelt
        [1, 2],                                                                          # 12 not object
        {"image": "a.jpg"},                                                              # 13 no conversations
        {"image": ["", 3], "conversations": _turns("<image><image>")},                   # 14 bad paths
    ]
    _write_jsonl(tmp_path / "t.jsonl", records)
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"t": {"data_path": "media", "annotation_path": "t.jsonl"}}))
    r = invoke("datasets", "check", str(d), "--deep", "--json")
    assert r.exit_code == 1
    probs = json.loads(r.stdout)["problems"]
    by_line = {}
    for p in probs:
        by_line.setdefault(p["line"], []).append((p["severity"], p["message"]))
    assert 1 not in by_line and 8 not in by_line and 10 not in by_line
    assert "not valid JSON" in by_line[2][0][1]
    assert by_line[3] == [("error", f"media file not found: {media / 'missing.jpg'}")]
    assert ("error", "0 <video> tag(s) for 1 video(s)") in by_line[4]
    assert by_line[5][0][1].startswith("a gpt turn contains an <image>/<video> tag")
    assert by_line[6] == [("warning", "two turns in a row from the same speaker")]
    # an empty answer is trained (as official: only <|im_end|>), so the check warns instead of failing
    assert by_line[7] == [("warning", "a gpt turn has an empty value: it trains an empty answer (only <|im_end|>)")]
    assert by_line[9][0] == ("error", "unknown speaker 'robot'")
    assert by_line[11][0][0] == "error" and "'videos' is not read" in by_line[11][0][1]
    assert "not a JSON object" in by_line[12][0][1]
    assert by_line[13][0][1] == "sample has no 'conversations'"
    assert by_line[14] == [("error", "image entry '' is not a path"), ("error", "image entry 3 is not a path")]
    # without --deep: counts from one cheap pass, which still names lines that do not parse
    r2 = invoke("datasets", "check", str(d), "--json")
    assert r2.exit_code == 1, r2.stdout
    report = json.loads(r2.stdout)
    assert [p["line"] for p in report["problems"]] == [2, 12]
    ds = report["datasets"][0]
    assert (ds["actual_length"], ds["images"], ds["videos"], ds["text_only"]) == (14, 5, 1, 6)


def test_deep_problems_are_capped(tmp_path):
    (tmp_path / "media").mkdir()
    _write_jsonl(tmp_path / "t.jsonl", [{"image": f"m{i}.jpg", "conversations": _turns("<image>")} for i in range(500)])
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"t": {"data_path": "media", "annotation_path": "t.jsonl"}}))
    r = invoke("datasets", "check", str(d), "--deep", "--json")
    probs = json.loads(r.stdout)["problems"]
    assert len(probs) == 22  # the data_path problem, 20 files, the count of the rest
    assert probs[0]["message"] == f"none of the 500 media files of dataset 't' exist under data_path {tmp_path}/media"
    assert probs[-1]["message"].startswith("... and 480 more like: media file not found")


def test_packed_json_and_sharing_files(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.png").write_bytes(b"x")
    s = {"image": "x.png", "conversations": _turns("<image>")}
    t = {"conversations": _turns("hi")}
    (tmp_path / "packed.json").write_text(json.dumps([[s, t], [t], [s, s, {"image": "gone.png", "conversations": _turns("<image>")}]], indent=1))
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"p": {"data_path": "m", "annotation_path": "packed.json", "length": 3},
                             "p2": {"data_path": "m", "annotation_path": "packed.json", "sampling_rate": 0.5}}))
    r = invoke("datasets", "check", str(d), "--deep", "--json")
    report = json.loads(r.stdout)
    assert r.exit_code == 1
    [missing] = report["problems"]
    text_lines = (tmp_path / "packed.json").read_text().splitlines()
    record_line = next(i for i, line in enumerate(text_lines) if "gone.png" in line)  # the '{' line above it
    assert text_lines[record_line - 1].strip() == "{"
    assert missing["message"].endswith("gone.png") and missing["line"] == record_line
    p, p2 = report["datasets"]
    # the trainer flattens packs: 6 samples (declared length 3 = the packs, accepted too)
    assert (p["actual_length"], p["images"], p["text_only"], p["samples_per_epoch"]) == (6, 4, 2, 6)
    assert p2["samples_per_epoch"] == 3  # round(6 * 0.5)


def test_check_unusable_file_exits_2(tmp_path):
    for target in (tmp_path / "nope.json", tmp_path):
        r = invoke("datasets", "check", str(target))
        assert r.exit_code == 2 and "error:" in r.stdout
        rj = invoke("datasets", "check", str(target), "--json")
        assert rj.exit_code == 2 and json.loads(rj.stdout)["ok"] is False
    (tmp_path / "empty.json").write_text("")
    r = invoke("datasets", "check", str(tmp_path / "empty.json"))
    assert r.exit_code == 2 and "the file is empty" in r.stdout


def test_use_exact_and_integer(golden_dict, tmp_path):
    r = invoke("datasets", "use", str(golden_dict))
    assert r.exit_code == 0 and r.stdout == "public_a%5.437,public_b%250\n" and r.stderr == ""
    r = invoke("datasets", "use", str(golden_dict), "--integer-percent")
    assert r.exit_code == 0 and r.stdout == "public_a%5,public_b%250\n"
    assert "public_a: 5.437% rounded to %5 (precision lost)" in r.stderr
    assert "up-sampling, which the official trainer ignores" in r.stderr
    # neither key -> 100 (bare name); 0.567 -> 56.7 exactly; tiny rate -> %0 warning in integer mode
    ann = golden_dict.parent / "a.jsonl"
    ann.write_text(json.dumps({"conversations": _turns("q")}) + "\n")
    d = tmp_path / "mix.json"
    d.write_text(json.dumps({"all": {"annotation_path": "a.jsonl"}, "part": {"annotation_path": "a.jsonl", "sampling_rate": 0.567},
                             "tiny": {"annotation_path": "a.jsonl", "sampling_rate": 0.001}}))
    assert invoke("datasets", "use", str(d)).stdout == "all,part%56.7,tiny%0.1\n"
    r = invoke("datasets", "use", str(d), "--integer-percent")
    assert r.stdout == "all,part%57,tiny%0\n"
    assert "would use no samples" in r.stderr


def test_use_refuses_errors(tutorial):
    r = invoke("datasets", "use", str(tutorial))
    assert r.exit_code == 1 and r.stdout == ""
    assert ":6:9: error: [sampleing_rate]" in r.stderr and "refusing" in r.stderr


def test_subprocess_check_and_use(golden_dict, tutorial, cli_env):
    r = vlsft("datasets", "check", str(golden_dict), "--deep", env=cli_env)
    assert r.returncode == 1 and ":218: error: [images]" in r.stdout and "Traceback" not in r.stderr
    r = vlsft("datasets", "check", str(golden_dict), env=cli_env)
    assert r.returncode == 0 and "OK check" in r.stdout
    r = vlsft("datasets", "check", str(tutorial), "--json", env=cli_env)
    assert r.returncode == 1
    lines = {(p["line"], p["key"]) for p in json.loads(r.stdout)["problems"]}
    assert (6, "sampleing_rate") in lines and (13, None) in lines
    r = vlsft("datasets", "use", str(golden_dict), env=cli_env)
    assert r.returncode == 0 and r.stdout == "public_a%5.437,public_b%250\n"
    r = vlsft("datasets", "check", os.path.join(str(tutorial) + ".missing"), env=cli_env)
    assert r.returncode == 2 and "not found" in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_parallel_scan_matches_serial(tmp_path, fmt):
    """Forked workers over small chunks give exactly the serial result (counts, lines, capping, media)."""
    from qwenvl.data.annotations import scan

    (tmp_path / "m").mkdir()
    for i in range(0, 30, 2):
        (tmp_path / "m" / f"{i}.jpg").write_bytes(b"x")
    records = []
    for k in range(400):
        if k % 7 == 0:
            records.append({"conversations": _turns("q", "a")})
        elif k % 11 == 0:
            records.append({"images": [f"{k % 30}.jpg"], "conversations": _turns("<image>")})
        else:
            records.append({"image": f"{k % 30}.jpg", "conversations": _turns("<image>" * (1 + (k % 13 == 0)))})
    ann = tmp_path / f"t.{fmt}"
    if fmt == "jsonl":
        lines = [json.dumps(r) for r in records]
        lines[5] = "{broken"
        lines.insert(9, "   ")
        ann.write_text("\n".join(lines) + "\n")
    else:
        ann.write_text(json.dumps(records, indent=1))
    serial = scan(str(ann), str(tmp_path / "m"), workers=1, chunk=1000)
    for workers, chunk in [(2, 7), (3, 64), (1, 5)]:
        par = scan(str(ann), str(tmp_path / "m"), workers=workers, chunk=chunk)
        assert par == serial, (workers, chunk)
    assert serial.records == 400 and serial.missing_media == 15
    assert any(p.message.startswith("... and") for p in serial.problems)


@pytest.mark.slow
def test_check_dictionary_on_s3(golden_dir, tmp_path):
    """The dictionary, annotations and media all on a real S3 server (moto), relative paths resolved as URLs."""
    sys.path.insert(0, str(Path(__file__).parent))
    from s3server import get_server

    server = get_server()
    bucket = server.make_bucket()
    server.upload_dir(golden_dir / "annotations", bucket, "data/annotations")
    server.upload_dir(golden_dir / "media", bucket, "data/media")
    server.put(bucket, "data/Dataset-Dictionary.json", json.dumps({
        "public_a": {"data_path": "media", "annotation_path": "annotations/public_a.json", "length": 15},
        "public_b": {"data_path": "media", "annotation_path": "annotations/public_b.jsonl", "sampling_rate": 0.5},
        "wrong_media": {"data_path": "no-media-here", "annotation_path": "annotations/public_b.jsonl"},
        "gone": {"data_path": "media", "annotation_path": "annotations/gone.jsonl"},
    }).encode())
    env = server.subprocess_env()
    r = vlsft("datasets", "check", f"s3://{bucket}/data/Dataset-Dictionary.json", "--deep", "--json", env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    rows = {d["name"]: d for d in report["datasets"]}
    assert (rows["public_a"]["actual_length"], rows["public_a"]["images"], rows["public_a"]["videos"]) == (15, 11, 4)
    assert rows["public_b"]["samples_per_epoch"] == 7
    probs = report["problems"]
    a = f"s3://{bucket}/data/annotations/public_a.json"
    assert any(p["file"] == a and p["line"] == 218 and p["key"] == "images" for p in probs)
    missing = [p for p in probs if p["message"].startswith("media file not found")]
    assert missing and all(f"s3://{bucket}/data/no-media-here/" in p["message"] for p in missing)
    assert not any(f"s3://{bucket}/data/media/" in p["message"] for p in missing)
    assert any("dataset 'gone' not found" in p["message"] for p in probs)
    r = vlsft("datasets", "use", f"s3://{bucket}/data/Dataset-Dictionary.json", env=env)
    assert r.returncode == 1 and "gone" in r.stderr


def test_media_without_data_path_found_late(tmp_path, monkeypatch):
    """Media first referenced after the records load_dictionary looks at: --deep still names the missing data_path."""
    from qwenvl.data import annotation_read

    monkeypatch.setattr(annotation_read, "PROBE_LIMIT", 3)
    records = [{"conversations": _turns("q")}] * 5 + [{"image": "x.jpg", "conversations": _turns("<image>")}]
    _write_jsonl(tmp_path / "t.jsonl", records)
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"t": {"annotation_path": "t.jsonl"}}))
    assert invoke("datasets", "check", str(d)).exit_code == 0  # the probe saw only text-only samples
    r = invoke("datasets", "check", str(d), "--deep", "--json")
    assert r.exit_code == 1
    [p] = json.loads(r.stdout)["problems"]
    assert p["key"] == "data_path" and p["line"] == 1 and "reference media (first at t.jsonl:6)" in p["message"]


# ---- round 2: inputs real users have ------------------------------------------------------------------------


def _human_gpt(q: str = "<image>q") -> dict:
    return {"image": "a.jpg", "conversations": _turns(q)}


def test_jsonl_bom_crlf_blank_lines_and_no_final_newline(tmp_path):
    """A BOM (the trainer's json reads past it), CRLF ends, blank/whitespace lines, no final newline:
    counts and line numbers follow the file, problems come in line order."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.jpg").write_bytes(b"x")
    good = json.dumps(_human_gpt())
    lines = [good, "", json.dumps({"image": "zz.jpg", "conversations": _turns("<image>")}), "{bad json", "   \t",
             json.dumps({"conversations": []})]
    (tmp_path / "t.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"t": {"data_path": "m", "annotation_path": "t.jsonl", "length": 4}}))
    r = invoke("datasets", "check", str(d), "--deep", "--json")
    report = json.loads(r.stdout)
    got = [(p["line"], p["column"], p["message"].split(":")[0]) for p in report["problems"]]
    assert got == [(3, None, "media file not found"), (4, 2, "line is not valid JSON"),
                   (6, None, "'conversations' must be a non-empty list of turns")], got
    assert report["datasets"][0]["actual_length"] == 4 and r.exit_code == 1


def test_jsonl_line_errors_are_explained(tmp_path):
    rows = [
        "{'conversations': []}",                                              # 1 single quotes
        '{"conversations": [{"from": "human", "value": "q"},]}',              # 2 trailing comma
        json.dumps({"conversations": _turns("q")}) + json.dumps({"a": 1}),    # 3 two objects
        json.dumps([{"conversations": _turns("q")}]),                         # 4 a list on the line
        '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "score": NaN}',  # 5 ok
        '{"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": True}]}',  # 6 Python literal
    ]
    data = "\n".join(rows).encode() + b'\n{"conversations": [{"from": "human", "value": "caf\xe9"}]}\n'  # 7 latin-1
    (tmp_path / "t.jsonl").write_bytes(data)
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"t": {"annotation_path": "t.jsonl"}}))
    probs = json.loads(invoke("datasets", "check", str(d), "--deep", "--json").stdout)["problems"]
    by_line = {p["line"]: p for p in probs}
    assert 5 not in by_line  # NaN: not strict JSON, but Python's json (the trainer's reader) takes it
    assert (by_line[1]["column"], by_line[1]["message"]) == (2, "line is not valid JSON: strings and keys need double "
                                                                  "quotes, not single quotes")
    assert by_line[2]["column"] == 51 and "trailing comma before ']'" in by_line[2]["message"]
    assert "more than one JSON value on the line" in by_line[3]["message"]
    assert "JSON list" in by_line[4]["message"] and ".json" in by_line[4]["hint"]
    assert "True is not JSON" in by_line[6]["message"] and by_line[6]["hint"] == "write true"
    assert by_line[7]["message"] == "line is not UTF-8 text (byte 0xe9)" and by_line[7]["column"] == 51
    assert by_line[7]["hint"] == "save the file as UTF-8"


def test_json_annotation_errors_point_at_the_cause(tmp_path):
    ok = {"conversations": _turns("q")}
    cases = {
        "pretty.json": (json.dumps([ok, ok], indent=2)[:-2] + ",\n]", "trailing comma before ']'"),
        "oneline.json": ('[{"conversations": []},]', "trailing comma before ']'"),
        "lines.json": (json.dumps(ok) + "\n" + json.dumps(ok) + "\n", "one JSON object after another"),
        "latin.json": (b'[\n{"conversations": [{"from": "human", "value": "caf\xe9"}]}]', "not UTF-8 text (byte 0xe9)"),
        "empty.json": ("", "the file is empty"),
    }
    entries = {}
    for name, (text, _) in cases.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        entries[name.split(".")[0]] = {"annotation_path": name}
    d = tmp_path / "d.json"
    d.write_text(json.dumps(entries))
    probs = json.loads(invoke("datasets", "check", str(d), "--json").stdout)["problems"]
    by_file = {Path(p["file"]).name: p for p in probs}
    for name, (_, fragment) in cases.items():
        assert fragment in by_file[name]["message"], (name, by_file[name])
    pretty = (tmp_path / "pretty.json").read_text().splitlines()
    p = by_file["pretty.json"]
    assert pretty[p["line"] - 1][p["column"] - 1] == ","  # the comma itself, not the ']' after it
    assert (by_file["oneline.json"]["line"], by_file["oneline.json"]["column"]) == (1, 23)
    assert "rename the file to .jsonl" in by_file["lines.json"]["hint"]
    assert (by_file["latin.json"]["line"], by_file["latin.json"]["column"]) == (2, 51)
    # a BOM before a .json list keeps its line numbers
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([ok, {"conversations": []}], indent=1).encode())
    d.write_text(json.dumps({"bom": {"annotation_path": "bom.json"}}))
    [p] = json.loads(invoke("datasets", "check", str(d), "--deep", "--json").stdout)["problems"]
    assert p["line"] == 14 and "non-empty list" in p["message"]


def test_turn_checks_do_not_cascade(tmp_path):
    rows = [
        {"conversations": [{"from": ["human"], "value": "q"}, {"from": "gpt", "value": "a"}]},   # 1 bad speaker only
        {"conversations": [{"from": "Human", "value": "q"}, {"from": "gpt", "value": "a"}]},     # 2 case
        {"conversations": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a"}]},                              # 3 role first
        {"conversations": [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                           {"role": "assistant", "content": "a"}]},                              # 4 content list
    ]
    _write_jsonl(tmp_path / "t.jsonl", rows)
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"t": {"annotation_path": "t.jsonl"}}))
    probs = json.loads(invoke("datasets", "check", str(d), "--deep", "--json").stdout)["problems"]
    got = [(p["line"], p["message"]) for p in probs]
    assert got == [(1, "unknown speaker ['human']"), (2, "unknown speaker 'Human'"),
                   (3, "the conversation starts with an assistant turn"), (4, "'content' must be a string, found a list")]
    assert probs[1]["hint"] == "write 'human' (lowercase, no spaces)"
    assert "<image>" in probs[3]["hint"]


def test_packed_length_mismatch_names_samples_and_packs(tmp_path):
    t = {"conversations": _turns("q")}
    (tmp_path / "p.json").write_text(json.dumps([[t, t], [t], t]))
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"p": {"annotation_path": "p.json", "length": 10}, "ok": {"annotation_path": "p.json",
                                                                                      "length": 3}}))
    report = json.loads(invoke("datasets", "check", str(d), "--json").stdout)
    [p] = report["problems"]
    assert "declares length 10 but p.json holds 4 samples in 3 packed lists" in p["message"]
    assert [r["actual_length"] for r in report["datasets"]] == [4, 4]
    from qwenvl.data.dictionary import count_records

    assert count_records(str(tmp_path / "p.json")) == 4  # what print-args and the trainer count


def test_rate_that_yields_no_samples_warns(tmp_path):
    _write_jsonl(tmp_path / "t.jsonl", [{"conversations": _turns("q")}] * 3)
    d = tmp_path / "d.json"
    d.write_text('{\n "few": {"annotation_path": "t.jsonl", "sampling_rate": 0.1},\n'
                 ' "one": {"annotation_path": "t.jsonl", "length": 3}\n}')
    r = invoke("datasets", "check", str(d))
    assert r.exit_code == 0
    assert (f"{d}:2:40: warning: [sampling_rate] dataset 'few' contributes no samples: 10% of 3 records rounds to 0 "
            "(hint: raise sampling_rate to at least 0.33 or remove the dataset)") in r.stdout
    assert "3 samples per epoch; 0 errors, 1 warning" in r.stdout
    d.write_text(json.dumps({"one": {"annotation_path": "t.jsonl", "sampling_rate": 0.5}}))
    assert "2 samples per epoch" in invoke("datasets", "check", str(d)).stdout
    (tmp_path / "u.jsonl").write_text(json.dumps({"conversations": _turns("q")}) + "\n")
    d.write_text(json.dumps({"one": {"annotation_path": "u.jsonl"}}))
    assert "1 sample per epoch" in invoke("datasets", "check", str(d)).stdout


def test_use_integer_percent_rounding_edges(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"conversations": _turns("q")}) + "\n")
    rates = {"half": 0.005, "zero": 0.004, "noise": 0.145, "near": 0.999999, "tiny": 1e-05, "one": 1.0, "rep1": 1}
    entries = {k: {"annotation_path": "t.jsonl", ("repeat_time" if k == "rep1" else "sampling_rate"): v}
               for k, v in rates.items()}
    entries["big"] = {"annotation_path": "t.jsonl", "repeat_time": 123456.789}
    d = tmp_path / "d.json"
    d.write_text(json.dumps(entries))
    r = invoke("datasets", "use", str(d))
    assert r.stdout == "half%0.5,zero%0.4,noise%14.5,near%99.9999,tiny%0.001,one,rep1,big%12345678.9\n"
    r = invoke("datasets", "use", str(d), "--integer-percent")
    assert r.stdout == "half%1,zero%0,noise%14,near%100,tiny%0,one%100,rep1%100,big%12345679\n"
    assert "noise: 14.5% rounded to %14 (precision lost; not %15" in r.stderr
    assert "zero: 0.4% rounds to %0" in r.stderr and "tiny: 0.001% rounds to %0" in r.stderr
    assert "half: 0.5% rounded to %1 (precision lost)\n" in r.stderr


def test_unusable_dictionaries_exit_2_in_check_and_use(tmp_path):
    cases = {"empty_obj.json": b"{}\n", "utf16.json": '{"a": {"annotation_path": "t.jsonl"}}'.encode("utf-16"),
             "blank.json": b"  \n"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        r = invoke("datasets", "check", str(tmp_path / name))
        assert r.exit_code == 2, (name, r.stdout)
        r = invoke("datasets", "use", str(tmp_path / name))
        assert r.exit_code == 2 and r.stdout == "", name
    r = invoke("datasets", "check", str(tmp_path / "utf16.json"))
    assert r.stdout.count("error:") == 1 and "UTF-16" in r.stdout


def test_listing_progress_reaches_the_object_store_check(tmp_path):
    """scan() hands a progress callback to storage.existing (URL data_path: one listing per folder)."""
    from qwenvl.data.annotations import scan

    for sub in ("a", "b", "c"):
        (tmp_path / "m" / sub).mkdir(parents=True)
        (tmp_path / "m" / sub / "x.jpg").write_bytes(b"x")
    _write_jsonl(tmp_path / "t.jsonl", [{"image": f"{s}/x.jpg", "conversations": _turns("<image>")} for s in "abcd"])
    calls: list = []
    res = scan(str(tmp_path / "t.jsonl"), f"file://{tmp_path}/m", list_progress=lambda done, total: calls.append(
        (done, total)))
    assert res.missing_media == 1 and calls[-1] == (4, 4) and len(calls) == 4


def test_big_dictionary_table_is_fast_and_aligned(tmp_path):
    """1,000 datasets (a rich Table took ~2 s to lay them out); wide (CJK) names keep the columns aligned."""
    import time

    from rich.cells import cell_len

    _write_jsonl(tmp_path / "t.jsonl", [{"conversations": _turns("q")}] * 2)
    names = [f"ds_{i}" for i in range(998)] + ["数据集 一", "with space"]
    d = tmp_path / "d.json"
    d.write_text(json.dumps({n: {"annotation_path": "t.jsonl", "length": 2} for n in names}))
    t0 = time.perf_counter()
    r = invoke("datasets", "check", str(d))
    elapsed = time.perf_counter() - t0
    assert r.exit_code == 0 and "1,000 datasets (none with errors), 2,000 samples per epoch" in r.stdout
    table = [line for line in r.stdout.splitlines() if "│" in line or "┃" in line or "╇" in line]
    assert len(table) == 1002 and len({cell_len(line.rstrip()) for line in table[2:]}) == 1
    assert {line.index("│") for line in table[2:] if line.startswith("ds_")} == {cell_len("with space") + 1}
    assert elapsed < 2.0, elapsed  # ~0.4 s on the 2-core CI box


def test_missing_data_path_is_one_error_not_one_per_file(tmp_path):
    _write_jsonl(tmp_path / "t.jsonl", [{"image": f"{i}.jpg", "conversations": _turns("<image>")} for i in range(30)]
                 + [{"image": str(tmp_path / "abs.jpg"), "conversations": _turns("<image>")}])
    (tmp_path / "link.jsonl").symlink_to("gone.jsonl")
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"t": {"data_path": "no_such_dir", "annotation_path": "t.jsonl"},
                             "l": {"data_path": ".", "annotation_path": "link.jsonl"}}, indent=1))
    probs = json.loads(invoke("datasets", "check", str(d), "--deep", "--json").stdout)["problems"]
    msgs = [(p["key"], p["message"], p["hint"]) for p in probs]
    assert msgs == [
        ("data_path", f"data_path of dataset 't' does not exist: {tmp_path / 'no_such_dir'}",
         "relative paths start at the dictionary's folder"),
        ("annotation_path", f"annotation file of dataset 'l' not found: {tmp_path / 'link.jsonl'}",
         "it is a symbolic link to gone.jsonl, which does not exist"),
        ("image/video", f"media file not found: {tmp_path / 'abs.jpg'}", None),  # absolute: still checked
    ], msgs


def test_media_tag_in_a_system_turn_is_not_counted(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    rec = {"image": "a.jpg", "conversations": [{"role": "system", "content": "<image> context"},
                                               {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    _write_jsonl(tmp_path / "t.jsonl", [rec])
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"t": {"data_path": ".", "annotation_path": "t.jsonl"}}))
    probs = json.loads(invoke("datasets", "check", str(d), "--deep", "--json").stdout)["problems"]
    assert [(p["key"], p["message"]) for p in probs] == [
        ("content", "a system turn inside the conversation is kept as a second system turn after the default "
                    "system prompt (as the official code does)"),  # issue 12: a warning now
        ("content", "a system turn contains an <image>/<video> tag; it is not replaced"),
        ("image", "0 <image> tag(s) for 1 image(s)")]


def test_data_path_needed_only_for_relative_media_and_empty_media_lists(tmp_path):
    """Absolute media need no data_path (the first *relative* one is named); 'image': [] is a sample the
    trainer skips; 'images' next to 'image' is only ignored."""
    (tmp_path / "a.jpg").write_bytes(b"x")
    absolute = {"image": str(tmp_path / "a.jpg"), "conversations": _turns("<image>")}
    _write_jsonl(tmp_path / "abs.jsonl", [absolute])
    _write_jsonl(tmp_path / "mixed.jsonl", [absolute, {"image": "rel.jpg", "conversations": _turns("<image>")}])
    _write_jsonl(tmp_path / "odd.jsonl", [{"image": [], "conversations": _turns("q")},
                                          {**absolute, "images": [str(tmp_path / "a.jpg")]}])
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"abs": {"annotation_path": "abs.jsonl"}, "mixed": {"annotation_path": "mixed.jsonl"},
                             "odd": {"annotation_path": "odd.jsonl"}}))
    for deep in ((), ("--deep",)):
        report = json.loads(invoke("datasets", "check", str(d), "--json", *deep).stdout)
        no_dp = [p["message"] for p in report["problems"] if p["key"] == "data_path"]
        assert no_dp == ["dataset 'mixed' has no data_path but its samples reference media (first at mixed.jsonl:2)"]
    odd = [(p["line"], p["severity"], p["message"]) for p in report["problems"] if p["file"].endswith("odd.jsonl")]
    assert odd == [(1, "error", "'image' is an empty list: the trainer skips the sample"),
                   (2, "warning", "key 'images' is ignored: the sample uses 'image'")]


def test_near_miss_keys_get_a_rename_hint(tmp_path):
    _write_jsonl(tmp_path / "t.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"conversations": [{"from": "human", "content": "q"}, {"from": "gpt", "value": "a"}]},
    ])
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"t": {"annotation_path": "t.jsonl"}}))
    probs = json.loads(invoke("datasets", "check", str(d), "--deep", "--json").stdout)["problems"]
    assert [(p["line"], p["message"], p["hint"]) for p in probs] == [
        (1, "sample has no 'conversations'", "rename 'messages' to 'conversations'"),
        (2, "a turn has no 'value'", "'from' goes with 'value', 'role' with 'content': rename 'content' to 'value'")]


def test_pretty_printed_json_named_jsonl(tmp_path):
    """A JSON list saved as .jsonl is one problem (not one per line); a sample spread over lines is explained."""
    recs = [{"conversations": _turns("q")}, {"conversations": _turns("r")}]
    (tmp_path / "list.jsonl").write_text(json.dumps(recs, indent=2))
    (tmp_path / "spread.jsonl").write_text(json.dumps(recs[0]) + "\n" + json.dumps(recs[1], indent=1) + "\n")
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"l": {"annotation_path": "list.jsonl"}, "s": {"annotation_path": "spread.jsonl"}}))
    for deep in ((), ("--deep",)):
        r = invoke("datasets", "check", str(d), "--json", *deep)
        probs = json.loads(r.stdout)["problems"]
        listed = [p for p in probs if p["file"].endswith("list.jsonl")]
        assert [(p["line"], p["message"], p["hint"]) for p in listed] == [
            (1, "the file is one JSON list of 2 items, not JSON Lines (one sample per line)",
             "rename it to .json, or write one sample object per line")], deep
        spread = {p["line"]: p["message"] for p in probs if p["file"].endswith("spread.jsonl")}
        assert spread[2] == "line is not valid JSON: the line ends before the sample is complete"
        assert spread[3] == "line is not valid JSON: the line is a piece of an object, not a whole sample"


def test_use_string_reads_back_exactly_for_tiny_rates(tmp_path):
    from qwenvl.data.dataset_use import parse_dataset_use

    (tmp_path / "t.jsonl").write_text(json.dumps({"conversations": _turns("q")}) + "\n")
    rates = [1.2345678e-09, 0.05437, 0.1 + 0.2, 1e-05, 0.07]
    d = tmp_path / "d.json"
    d.write_text(json.dumps({f"d{i}": {"annotation_path": "t.jsonl", "sampling_rate": r} for i, r in enumerate(rates)}))
    r = invoke("datasets", "use", str(d))
    assert r.stdout.startswith("d0%0.00000012345678,d1%5.437,d2%30.000000000000004,d3%0.001,d4%7\n")
    assert [e.percent / 100 for e in parse_dataset_use(r.stdout.strip())][:2] == rates[:2]


def test_format_percent_reads_back_exactly():
    from qwenvl.data.dataset_use import format_percent

    for p in (1e-05, 1.2345678e-07, 1.5e22, 5.437, 250.0, 30.000000000000004):
        assert float(format_percent(p)) == p and "e" not in format_percent(p)


def test_json_rate_is_the_rate_as_written(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"conversations": _turns("q")}) + "\n")
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"a": {"annotation_path": "t.jsonl", "sampling_rate": 0.567},
                             "b": {"annotation_path": "t.jsonl", "repeat_time": 1.1},
                             "c": {"annotation_path": "t.jsonl"}}))
    report = json.loads(invoke("datasets", "check", str(d), "--json").stdout)
    assert [r["rate"] for r in report["datasets"]] == [0.567, 1.1, 1.0]  # not 0.5670000000000001
    table = invoke("datasets", "check", str(d)).stdout
    assert "56.7%" in table and "110%" in table and "0000000" not in table


def test_utf16_annotation_files(tmp_path):
    """UTF-16 .jsonl: one file-level error (the trainer cannot read its lines); UTF-16 .json: Python's json (the
    trainer's reader) decodes it, and problems keep their line numbers."""
    recs = [{"conversations": _turns("q")}, {"conversations": []}]
    (tmp_path / "w.jsonl").write_bytes("".join(json.dumps(r) + "\n" for r in recs).encode("utf-16"))
    (tmp_path / "w.json").write_bytes(json.dumps(recs, indent=1).encode("utf-16"))
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"l": {"annotation_path": "w.jsonl"}, "j": {"annotation_path": "w.json"}}))
    report = json.loads(invoke("datasets", "check", str(d), "--deep", "--json").stdout)
    got = [(Path(p["file"]).name, p["line"], p["message"]) for p in report["problems"]]
    second = [i for i, line in enumerate(json.dumps(recs, indent=1).splitlines(), 1) if line == " {"][1]
    assert got == [("w.jsonl", 1, "the file is UTF-16 text, not UTF-8: the trainer cannot read its lines"),
                   ("w.json", second, "'conversations' must be a non-empty list of turns")], got
    assert [r["actual_length"] for r in report["datasets"]] == [None, 2]


def test_missing_media_hints_for_invisible_and_windows_paths(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    _write_jsonl(tmp_path / "t.jsonl", [{"image": "a.jpg ", "conversations": _turns("<image>")},
                                        {"image": "sub\\\\a.jpg", "conversations": _turns("<image>")},
                                        {"image": "A.JPG", "conversations": _turns("<image>")}])
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"t": {"data_path": ".", "annotation_path": "t.jsonl"}}))
    probs = json.loads(invoke("datasets", "check", str(d), "--deep", "--json").stdout)["problems"]
    assert [p["hint"] for p in probs] == ["the path 'a.jpg ' has a space (or tab) at its start or end",
                                          "write paths with / (this looks like a Windows path)",
                                          "'a.jpg' exists: names are case-sensitive here"]


def test_every_media_file_missing_points_at_data_path(tmp_path):
    (tmp_path / "media" / "sub").mkdir(parents=True)
    names = [f"{i}.jpg" for i in range(12)]
    for n in names:
        (tmp_path / "media" / n).write_bytes(b"x")
    _write_jsonl(tmp_path / "t.jsonl", [{"image": n, "conversations": _turns("<image>")} for n in names])
    d = tmp_path / "d.json"
    d.write_text('{"ok": {"data_path": "media", "annotation_path": "t.jsonl"},\n'
                 ' "wrong": {"data_path": "media/sub", "annotation_path": "t.jsonl"}}')
    probs = json.loads(invoke("datasets", "check", str(d), "--deep", "--json").stdout)["problems"]
    first = probs[0]
    assert (first["line"], first["column"], first["key"]) == (2, 12, "data_path")
    assert first["message"] == f"none of the 12 media files of dataset 'wrong' exist under data_path {tmp_path}/media/sub"
    assert [p["message"].split(":")[0] for p in probs[1:]] == ["media file not found"] * 12


def test_summary_line_names_failing_datasets_and_the_decode_depth(tutorial, golden_dict):
    """Issue 19 item 10: a failed check no longer says '(1 valid)', and --decode is named as such."""
    r = invoke("datasets", "check", str(tutorial))
    assert r.exit_code == 1
    last = [x for x in r.stdout.splitlines() if x.startswith("FAILED")][-1]
    assert "with errors" in last and "valid" not in last, last
    r = invoke("datasets", "check", str(golden_dict), "--decode")
    assert "deep check with decoding:" in r.stdout, r.stdout[-500:]
