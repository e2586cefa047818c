"""``vlsft predict --resume`` appends only to a predictions file (issue "Trust, round 3", item 2).

A file whose rows lack the keys every predict row has (a user's own JSONL, the training annotations given as
``--out`` by mistake, text that is not JSON) is refused in one line, exit 2, its bytes unchanged; an empty file
resumes; a last row cut by an interrupted write is dropped (with a warning) and its sample predicted again.
The check is :func:`vlsft.cmd_predict.resume_rows`; the CLI runs it before loading the dataset or the model,
so the CLI test needs no trained model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl.problems import UserError
from vlsft.cmd_predict import ROW_KEYS, resume_rows

REPO = Path(__file__).resolve().parents[1]
VLSFT = str(Path(sys.executable).with_name("vlsft"))


def row(i: int, prediction: str = "4.") -> str:
    return json.dumps({"dataset": "twenty", "index": i, "where": f"t.jsonl:{i + 1}", "prompt": f"What is {i}?",
                       "reference": "4.", "prediction": prediction}, ensure_ascii=False) + "\n"


ANNOTATIONS = json.dumps({"conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                            {"from": "gpt", "value": "A cat."}], "image": "cat.jpg"}) + "\n"


def test_rows_of_a_predictions_file():
    text = row(0) + "\n" + row(1, "a\u2028b")  # a blank line; a prediction holding a Unicode line break
    rows, keep, note = resume_rows(text, "p.jsonl")
    assert [r["index"] for r in rows] == [0, 1] and rows[1]["prediction"] == "a\u2028b"
    assert keep == len(text) and note is None
    assert resume_rows("", "p.jsonl") == ([], 0, None)  # an empty file resumes
    assert set(json.loads(row(0))) == set(ROW_KEYS)


@pytest.mark.parametrize(("text", "line", "why"), [
    (ANNOTATIONS, 1, "lacks dataset, index, where, prompt, reference, prediction"),
    (row(0) + '{"dataset": "twenty", "index": 1}\n', 2, "lacks where, prompt, reference, prediction"),
    ("id,text\n1,hello\n", 1, "is not a JSON object"),
    (row(0) + "[1, 2]\n", 2, "is not a JSON object"),
    (row(0) + "my notes", 2, "is not a JSON object"),  # no newline at its end, yet not a cut row of ours
])
def test_other_files_are_refused(text, line, why):
    with pytest.raises(UserError) as err:
        resume_rows(text, "mine.jsonl")
    (message,) = err.value.lines()
    assert message == (f"error: --out mine.jsonl is not a predictions file written by vlsft predict (line {line} "
                       f"{why}): choose another --out (nothing was written)")


def test_a_cut_last_row_is_dropped_with_a_warning():
    whole = row(0) + row(1)
    for cut in (row(2)[:30], row(2)[:-1]):  # cut mid-row, or just before its newline
        rows, keep, note = resume_rows(whole + cut, "p.jsonl")
        assert [r["index"] for r in rows] == [0, 1] and keep == len(whole)
        assert "line 3" in note and "interrupted write" in note and "dropped" in note


@pytest.fixture()
def fake_model(tmp_path) -> tuple[Path, Path]:
    """A folder predict takes for a model (config.json + weights) and a dictionary: enough to reach the check."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    (model / "model.safetensors").write_bytes(b"")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(ANNOTATIONS)
    dictionary = data / "Dataset-Dictionary.json"
    dictionary.write_text(json.dumps({"train": {"data_path": str(data), "annotation_path": str(data / "train.jsonl")}}))
    return model, dictionary


def test_cli_refuses_the_annotations_as_out_untouched(fake_model):
    model, dictionary = fake_model
    annotations = dictionary.parent / "train.jsonl"
    before = annotations.read_bytes()
    p = subprocess.run([VLSFT, "predict", str(model), "--dataset", "train", "--dictionary", str(dictionary),
                        "--out", str(annotations), "--resume"], capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "is not a predictions file written by vlsft predict (line 1 lacks dataset" in lines[0], p.stderr
    assert "choose another --out" in lines[0] and "Traceback" not in p.stderr
    assert annotations.read_bytes() == before
    assert not Path(str(annotations) + ".metrics.json").exists()


@pytest.mark.slow
def test_cli_resume_drops_a_cut_row_and_predicts_it_again(trained_run, tmp_path):
    """On the shared trained run: a row cut mid-way (after non-ASCII rows) is dropped, predicted again."""
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"Combien font {i} × 2 ?"},
                                                          {"from": "gpt", "value": f"{2 * i}."}]},
                                       ensure_ascii=False) + "\n" for i in range(3)), encoding="utf-8")
    dictionary = tmp_path / "Dataset-Dictionary.json"
    dictionary.write_text(json.dumps({"three": {"data_path": str(tmp_path), "annotation_path": str(data)}}))
    out = tmp_path / "preds.jsonl"
    args = [VLSFT, "predict", str(trained_run["out"]), "--dataset", "three", "--dictionary", str(dictionary),
            "--out", str(out), "--max-new-tokens", "2"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert first.returncode == 0, first.stderr[-2000:]
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:25], encoding="utf-8")  # an interrupted write
    again = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert again.returncode == 0 and "1 new row(s), 3 in" in again.stdout, again.stderr[-2000:]
    assert "warning: --out" in again.stderr and "line 3 is a row cut by an interrupted write" in again.stderr
    now = out.read_text(encoding="utf-8").splitlines(keepends=True)
    assert now[:2] == lines[:2] and len(now) == 3 and now[2].endswith("\n")  # the cut row again, on its own line
    redone = json.loads(now[2])
    assert redone["index"] == 2 and redone["prompt"] == "Combien font 2 × 2 ?"
