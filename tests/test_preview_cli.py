"""`vlsft datasets preview` against the golden records: in process (the same command code; torch, transformers and
the processor are imported once per session instead of once per call), and one refusal in a real subprocess (its
exit status, one stderr line, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture()
def run_yaml(tmp_path, golden_dir, qwen_tokenizer_dir):
    d = {"pub_a": {"data_path": str(golden_dir / "media"), "annotation_path": str(golden_dir / "annotations/public_a.json")},
         "pub_b": {"data_path": str(golden_dir / "media"), "annotation_path": str(golden_dir / "annotations/public_b.jsonl")}}
    (tmp_path / "dict.json").write_text(json.dumps(d))
    (tmp_path / "run.yaml").write_text(
        f"model:\n  name_or_path: {qwen_tokenizer_dir}\n"
        "data:\n  dictionary: dict.json\n  max_pixels: 50176\n  min_pixels: 784\n"
        "output:\n  dir: out\n")
    return tmp_path / "run.yaml"


def _vlsft(*args, env, process: bool = False):
    if not process:
        from cli_inprocess import vlsft

        return vlsft("datasets", "preview", *args)
    return subprocess.run([sys.executable, "-m", "vlsft", "datasets", "preview", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def _index_of(golden_dir, sid: str) -> tuple[str, int]:
    a = [r["id"] for r in json.loads((golden_dir / "annotations/public_a.json").read_text())]
    if sid in a:
        return "pub_a", a.index(sid)
    b = [json.loads(x)["id"] for x in (golden_dir / "annotations/public_b.jsonl").read_text().splitlines() if x.strip()]
    return "pub_b", b.index(sid)


def test_preview_json_matches_golden(run_yaml, golden_dir, cli_env):
    exp = json.loads((golden_dir / "expected/script.json").read_text())["samples"]
    for sid in ("mi_02", "vid_01"):
        name, idx = _index_of(golden_dir, sid)
        r = _vlsft("--config", str(run_yaml), "--dataset", name, "--index", str(idx), "--json", env=cli_env)
        assert r.returncode == 0, r.stderr
        got, e = json.loads(r.stdout), exp[sid]
        assert got["input_ids"] == e["input_ids"] and got["labels"] == e["labels"]
        assert got["position_ids"] == e["position_ids"]
        assert got["image_grid_thw"] == e["image_grid_thw"] and got["video_grid_thw"] == e["video_grid_thw"]
        for key in ("pixel_values", "pixel_values_videos"):
            if e[key] is None:
                assert got[key] is None
            else:
                assert got[key]["shape"] == e[key]["shape"]
                assert got[key]["sum_sq"] == pytest.approx(e[key]["sum_sq"], rel=1e-4)
                assert got[key]["abs_sum"] == pytest.approx(e[key]["abs_sum"], rel=1e-4)


def test_preview_text_and_errors(run_yaml, golden_dir, cli_env, qwen_tokenizer_dir):
    name, idx = _index_of(golden_dir, "si_01")
    r = _vlsft("--config", str(run_yaml), "--dataset", name, "--index", str(idx), env=cli_env)
    assert r.returncode == 0, r.stderr
    assert "<|image_pad|>×64" in r.stdout and "grid t,h,w = [1, 16, 16] -> 64 tokens" in r.stdout
    assert "tokens: 104" in r.stdout
    # overrides take effect: si_02 is 98 tokens under `script` (the YAML), 584 under `defaults`
    name2, idx2 = _index_of(golden_dir, "si_02")
    r = _vlsft("--config", str(run_yaml), "--dataset", name2, "--index", str(idx2), "data.max_pixels=451584",
               "data.min_pixels=12544", env=cli_env)
    assert r.returncode == 0 and "tokens: 584" in r.stdout, r.stderr
    # a bad sample: reason, non-zero exit, no traceback
    name, idx = _index_of(golden_dir, "q_05")
    r = _vlsft("--config", str(run_yaml), "--dataset", name, "--index", str(idx), env=cli_env)
    assert r.returncode == 1 and "'images'" in r.stderr and "Traceback" not in r.stderr
    r = _vlsft("--config", str(run_yaml), "--dataset", "pub_c", env=cli_env, process=True)
    assert r.returncode == 2 and "pub_c" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # direct use without a run YAML
    r = _vlsft("--model", str(qwen_tokenizer_dir), "--dictionary", str(run_yaml.parent / "dict.json"),
               "--dataset", "pub_a", "--index", "99", env=cli_env)
    assert r.returncode == 2 and "out of range" in r.stderr


def test_preview_model_run_uses_the_runs_pixel_budget(run_yaml, golden_dir, qwen_tokenizer_dir, cli_env, tmp_path):
    """Issue 19 item 10: `preview --model RUN` (no run YAML) renders images with the pixel budget saved with the
    run's processor - what training, chat and predict use - not the library default (576 tokens vs 16)."""
    run = tmp_path / "run"
    run.mkdir()
    for f in qwen_tokenizer_dir.iterdir():
        if f.is_file():
            (run / f.name).symlink_to(f)
    pre = json.loads((qwen_tokenizer_dir / "preprocessor_config.json").read_text())
    pre["size"] = {"shortest_edge": 3136, "longest_edge": 12544}  # as vlsft train saves a run's limits
    (run / "preprocessor_config.json").unlink()
    (run / "preprocessor_config.json").write_text(json.dumps(pre))
    counts = {}
    for model in (qwen_tokenizer_dir, run):
        r = _vlsft("--model", str(model), "--dictionary", str(run_yaml.parent / "dict.json"), "--dataset", "pub_a",
                   "--index", "0", "--json", env=cli_env)
        assert r.returncode == 0, r.stderr[-2000:]
        ids = json.loads(r.stdout)["input_ids"]
        counts[model] = ids.count(151655)  # <|image_pad|>
    assert 0 < counts[run] <= 16 < counts[qwen_tokenizer_dir], counts
