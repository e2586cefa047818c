"""``vlsft chat`` through the real CLI on the shared trained run (conftest ``trained_run``: 2-rank ZeRO-3 run).

* one answer with an image: the prompt (``--show-prompt``) is the run's chat template with the image at the
  run's pixel limits (16 tokens for a 224x224 image at max_pixels 12544), the streamed answer is the model's
  greedy answer (the same text as a plain ``generate`` in process);
* another pixel budget: a different token count and one warning line naming both budgets;
* a checkpoint-N folder works as well; the prompt loop reads stdin until EOF;
* a folder that is not a model: one ``error:`` line, exit 2, no traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VLSFT = str(Path(sys.executable).with_name("vlsft"))


def chat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([VLSFT, "chat", *args], capture_output=True, text=True, timeout=240, cwd=REPO,
                          input=stdin)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    p = tmp_path_factory.mktemp("chat") / "big.png"
    Image.new("RGB", (224, 224), (200, 30, 30)).save(p)
    return p


def test_chat_answers_with_an_image_at_the_runs_pixel_budget(trained_run, image):
    p = chat(str(trained_run["out"]), "--image", str(image), "--show-prompt", "--max-new-tokens", "6",
             "What colour is the shape?")
    assert p.returncode == 0, p.stderr[-2000:]
    prompt, answer = p.stdout.split("---\n", 1)
    assert "<|im_start|>system\nYou are a helpful assistant.<|im_end|>" in prompt
    assert "<|vision_start|><|image_pad|>×16<|vision_end|>\nWhat colour is the shape?<|im_end|>" in prompt
    assert prompt.rstrip().endswith("<|im_start|>assistant")
    assert "warning" not in p.stderr and "Traceback" not in p.stderr

    from qwenvl import infer

    engine = infer.load(trained_run["out"])
    inputs = engine.prompt_inputs(engine.messages("What colour is the shape?", images=[str(image)]))
    assert answer == engine.generate(inputs, max_new_tokens=6) + "\n"  # streamed = plain greedy generation


def test_chat_other_pixel_budget_warns_once(trained_run, image):
    p = chat(str(trained_run["out"] / "checkpoint-6"), "--image", str(image), "--max-pixels", "50176",
             "--show-prompt", "--max-new-tokens", "2", "Hi")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "<|image_pad|>×64<|vision_end|>" in p.stdout
    warnings = [x for x in p.stderr.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and "max_pixels 50176 (the run trained with 12544)" in warnings[0], p.stderr


def test_chat_prompt_loop_reads_until_eof(trained_run):
    p = chat(str(trained_run["out"]), "--max-new-tokens", "2", stdin="Hello\nTell me the secret phrase.\n")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("> ") == 3  # two questions, then EOF at the third prompt


def test_chat_refuses_a_folder_that_is_not_a_model(tmp_path, trained_run):
    for folder in (tmp_path, trained_run["out"] / "logs", tmp_path / "missing"):
        p = chat(str(folder), "Hi")
        errors = [x for x in p.stderr.splitlines() if x.strip()]
        assert p.returncode == 2 and len(errors) == 1 and errors[0].startswith("error:"), p.stderr
        assert "Traceback" not in p.stderr
    media = chat(str(trained_run["out"]), "--image", str(tmp_path / "nope.png"), "Hi")
    assert media.returncode == 2 and "media file" in media.stderr and "Traceback" not in media.stderr


# ---- vlsft predict -------------------------------------------------------------------------------------------
def predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([VLSFT, "predict", *args], capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.fixture(scope="module")
def twenty(tmp_path_factory) -> Path:
    """A dictionary with a 20-sample text dataset (and the demo's images, for a dataset with media)."""
    import json

    d = tmp_path_factory.mktemp("predict")
    with open(d / "twenty.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"What is {i} plus zero?"},
                                                  {"from": "gpt", "value": f"{i}."}]}) + "\n")
    path = d / "Dataset-Dictionary.json"
    path.write_text(json.dumps({"twenty": {"data_path": str(d), "annotation_path": str(d / "twenty.jsonl")}}))
    return path


def test_predict_writes_rows_and_metrics_and_resumes(trained_run, twenty, tmp_path):
    import json

    out = tmp_path / "preds.jsonl"
    args = [str(trained_run["out"]), "--dataset", "twenty", "--dictionary", str(twenty), "--out", str(out),
            "--max-new-tokens", "3", "--batch-size", "8"]
    p = predict(*args)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 20 and [r["index"] for r in rows] == list(range(20))
    assert set(rows[0]) == {"dataset", "index", "where", "prompt", "reference", "prediction"}
    assert rows[3]["prompt"] == "What is 3 plus zero?" and rows[3]["reference"] == "3."
    assert rows[3]["where"].endswith("twenty.jsonl:4")
    metrics = json.loads(Path(str(out) + ".metrics.json").read_text())
    assert metrics["samples"] == 20 and {"exact_match", "normalised_exact_match", "token_f1"} <= set(metrics)
    assert "20 new row(s)" in p.stdout
    before = out.read_bytes()
    again = predict(*args, "--resume")
    assert again.returncode == 0 and "0 new row(s), 20 in" in again.stdout
    assert out.read_bytes() == before  # nothing new written
    out.write_text("".join(x + "\n" for x in before.decode().splitlines()[:15]))  # an interrupted run
    partial = predict(*args, "--resume")
    assert partial.returncode == 0 and "5 new row(s), 20 in" in partial.stdout
    assert [json.loads(x)["index"] for x in out.read_text().splitlines()] == list(range(20))


def test_predict_one_line_errors(trained_run, twenty, tmp_path):
    out = tmp_path / "p.jsonl"
    cases = [
        ([str(tmp_path), "--dataset", "twenty", "--dictionary", str(twenty), "--out", str(out)], "not a model folder"),
        ([str(trained_run["out"]), "--dataset", "nope", "--dictionary", str(twenty), "--out", str(out)], "'nope'"),
    ]
    out2 = tmp_path / "exists.jsonl"
    out2.write_text("{}\n")
    cases.append(([str(trained_run["out"]), "--dataset", "twenty", "--dictionary", str(twenty), "--out", str(out2)],
                  "--resume"))
    for args, expected in cases:
        p = predict(*args)
        lines = [x for x in p.stderr.splitlines() if x.strip()]
        assert p.returncode == 2 and len(lines) == 1 and expected in lines[0], p.stderr
        assert "Traceback" not in p.stderr
    assert out2.read_text() == "{}\n"  # the user's file is untouched


def test_predict_metrics():
    from vlsft.cmd_predict import normalise, summarise, token_f1

    assert normalise("The  Square, is RED!") == "square is red"
    assert token_f1("the square is red", "A red square.") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("", "") == 1.0 and token_f1("blue", "red") == 0.0
    rows = [{"prediction": "Paris.", "reference": "Paris."}, {"prediction": "paris", "reference": "Paris."},
            {"prediction": "Lyon", "reference": "Paris."}]
    assert summarise(rows) == {"samples": 3, "exact_match": 0.3333, "normalised_exact_match": 0.6667,
                               "token_f1": 0.6667}
