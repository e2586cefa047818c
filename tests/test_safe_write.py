"""Trust, round 3: writers of user-named destinations through the real CLI (datasets convert --out, preview
--draw, predict --out; train / print-args output.dir) and convert's per-sample system prompts and atomic folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_inprocess import vlsft as vlsft_in_process
from PIL import Image

from qwenvl.safe_write import Interrupted, atomic_folder

ROOT = Path(__file__).resolve().parents[1]
QA = [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "yo"}]


def vlsft(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlsft", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


def _one_line(r: subprocess.CompletedProcess, code: int = 2) -> str:
    assert r.returncode == code and "Traceback" not in r.stderr, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture()
def mixed(tmp_path) -> Path:
    """A messages dataset where only the second sample has its own system prompt."""
    (tmp_path / "media").mkdir()
    Image.new("RGB", (56, 84), (10, 200, 30)).save(tmp_path / "media/a.png")
    recs = [{"messages": QA, "images": ["a.png"]},
            {"messages": [{"role": "system", "content": "Be brief."}, *QA], "images": ["a.png"]},
            {"messages": [{"role": "assistant", "content": "Hello."}, *QA], "images": ["a.png"]}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "d.json").write_text(json.dumps({"m": {"data_path": "media", "annotation_path": "m.jsonl"}}))
    return tmp_path


def _preview(model: Path, dictionary: Path, index: int, env) -> dict:
    """The preview JSON of one sample (in process: cli_inprocess; the subprocess form is test_preview_cli's)."""
    r = vlsft_in_process("datasets", "preview", "--model", str(model), "--dictionary", str(dictionary), "--dataset",
                         "m", "--index", str(index), "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow
def test_convert_keeps_a_system_prompt_of_some_samples_in_those_samples(mixed, qwen_tokenizer_dir, cli_env):
    out = mixed / "conv"
    r = vlsft("datasets", "convert", str(mixed / "d.json"), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    conv = json.loads((out / "Dataset-Dictionary.json").read_text())
    assert "system" not in conv["m"] and conv["m"]["length"] == 3  # not the dataset's: only sample 1 has it
    r = vlsft("datasets", "check", str(out / "Dataset-Dictionary.json"), "--deep")
    assert r.returncode == 0 and "OK deep check" in r.stdout, r.stdout + r.stderr
    for i in range(3):  # the same tokens and labels as the original: default prompt where none, own where given
        ref = _preview(qwen_tokenizer_dir, mixed / "d.json", i, cli_env)
        got = _preview(qwen_tokenizer_dir, out / "Dataset-Dictionary.json", i, cli_env)
        assert (got["input_ids"], got["labels"]) == (ref["input_ids"], ref["labels"]), i
        text = json.dumps(got["conversation"])
        assert ("Be brief." in text) == (i == 1) and ("You are a helpful assistant." in text) == (i != 1), text


def test_convert_with_one_shared_system_prompt_still_gives_it_to_the_dataset(mixed):
    recs = [{"messages": [{"role": "system", "content": "Be brief."}, *QA], "images": ["a.png"]}] * 2
    (mixed / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    r = vlsft("datasets", "convert", str(mixed / "d.json"), "--out", str(mixed / "conv"))
    assert r.returncode == 0, r.stderr
    conv = json.loads((mixed / "conv/Dataset-Dictionary.json").read_text())
    assert conv["m"]["system"] == "Be brief." and conv["m"]["format"] == "official"


def _bad_destinations(base: Path) -> dict[str, Path]:
    (base / "afile").write_text("mine\n")
    os.symlink(base / "nowhere", base / "dangling")
    return {"under a file": base / "afile" / "x", "dangling link": base / "dangling",
            "under a dangling link": base / "dangling" / "x", "too long": base / ("y" * 300)}


def test_convert_into_bad_destinations_is_one_line_and_writes_nothing(mixed):
    for case, dest in _bad_destinations(mixed).items():
        before = sorted(p.name for p in mixed.iterdir())
        line = _one_line(vlsft("datasets", "convert", str(mixed / "d.json"), "--out", str(dest)))
        assert "--out" in line, (case, line)
        assert sorted(p.name for p in mixed.iterdir()) == before, case
        assert (mixed / "afile").read_text() == "mine\n" and not os.path.exists(mixed / "nowhere")


def test_convert_and_draw_into_a_folder_nobody_can_write_are_one_line(mixed):
    """/proc: even root cannot create anything there (os.access says yes to root: the write itself fails)."""
    line = _one_line(vlsft("datasets", "convert", str(mixed / "d.json"), "--out", "/proc/vlsft-test/out"))
    assert "--out /proc/vlsft-test/out" in line
    line = _one_line(vlsft("datasets", "convert", str(mixed / "d.json"), "--out", "/proc/vlsft-test"))
    assert "--out /proc/vlsft-test" in line


def test_interrupted_convert_leaves_nothing_and_the_retry_works(mixed):
    """A real SIGTERM arrives while convert writes (after the first file, before the dictionary)."""
    out = mixed / "conv"
    script = ("import os, signal, sys\n"
              "import qwenvl.safe_write as sw\n"
              "real = sw._fsync_tree\n"
              "def killed(folder):\n"
              "    assert any(folder.iterdir())\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "sw._fsync_tree = killed\n"
              "from vlsft.cli import main\n"
              f"sys.argv = ['vlsft', 'datasets', 'convert', {str(mixed / 'd.json')!r}, '--out', {str(out)!r}]\n"
              "main()\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 128 + signal.SIGTERM and "Traceback" not in r.stderr, r.stderr
    assert "interrupted by SIGTERM" in r.stderr
    assert not out.exists() and not [p for p in mixed.iterdir() if p.name.startswith(".conv")]
    r = vlsft("datasets", "convert", str(mixed / "d.json"), "--out", str(out))
    assert r.returncode == 0 and (out / "Dataset-Dictionary.json").is_file(), r.stderr


def test_atomic_folder_removes_its_temporary_on_a_signal(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(Interrupted), atomic_folder(out, "--out") as tmp:
        (tmp / "a.jsonl").write_text("half")
        os.kill(os.getpid(), signal.SIGINT)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()  # an empty folder is filled whole
    with atomic_folder(tmp_path / "empty", "--out") as tmp:
        (tmp / "a.jsonl").write_text("x\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and (tmp_path / "empty/a.jsonl").is_file()


STOP_RIGHT_AFTER_CREATE = """
import os, pathlib, signal, sys
from qwenvl import safe_write as sw
kind, out = sys.argv[1], sys.argv[2]
real_mkdir, real_open = pathlib.Path.mkdir, os.open
def mkdir(self, *a, **k):  # the temporary folder exists, the next instruction is interrupted
    real_mkdir(self, *a, **k)
    if sw._TMP_MARK in self.name:
        os.kill(os.getpid(), signal.SIGTERM)
def open_(path, *a, **k):  # the same for the temporary file
    fd = real_open(path, *a, **k)
    if sw._TMP_MARK in str(path):
        os.kill(os.getpid(), signal.SIGTERM)
    return fd
pathlib.Path.mkdir, os.open = mkdir, open_
try:
    with (sw.atomic_folder(out, "--out") if kind == "folder" else sw.atomic_file(out, "--out")):
        pass
except sw.Interrupted:
    sys.exit(3)
"""


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_stop_signal_the_instant_the_temporary_exists_still_removes_it(tmp_path, kind):
    """The handlers are in place before the temporary is made: SIGTERM right after it exists (a busy machine
    makes this instant reachable) ends in Interrupted and removes it, instead of killing the process and leaving
    a hidden half-written folder or file beside the destination."""
    r = subprocess.run([sys.executable, "-c", STOP_RIGHT_AFTER_CREATE, kind, str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
    assert list(tmp_path.iterdir()) == []


def test_predict_into_bad_destinations_is_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    for case, dest in _bad_destinations(tmp_path).items():
        line = _one_line(vlsft("predict", str(tmp_path / "run"), "--dataset", "m", "--out", str(dest),
                               "--dictionary", str(tmp_path / "d.json")))
        assert line.startswith("error: --out "), (case, line)
        assert (tmp_path / "afile").read_text() == "mine\n" and not os.path.exists(tmp_path / "nowhere")


def test_print_args_and_train_with_a_too_long_output_dir_are_one_line(tmp_path):
    long = str(tmp_path / ("z" * 300))
    for cmd in ("print-args", "train"):
        line = _one_line(vlsft(cmd, "--config", str(ROOT / "configs/demo.yaml"), f"output.dir={long}", cwd=ROOT))
        assert "output.dir" in line and "shorter" in line, (cmd, line)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_preview_draw_into_bad_destinations_is_one_line(mixed, qwen_tokenizer_dir, cli_env):
    dests = {**_bad_destinations(mixed), "unwritable": Path("/proc/vlsft-seen.png")}
    for case, dest in dests.items():
        before = sorted(p.name for p in mixed.iterdir())
        line = _one_line(vlsft("datasets", "preview", "--model", str(qwen_tokenizer_dir), "--dictionary",
                               str(mixed / "d.json"), "--dataset", "m", "--draw", str(dest), env=cli_env))
        assert f"--draw {dest}" in line or "--draw" in line, (case, line)
        assert sorted(p.name for p in mixed.iterdir()) == before, case
        assert (mixed / "afile").read_text() == "mine\n" and not os.path.exists(mixed / "nowhere")
