"""`vlsft export` through the real CLI on a LoRA checkpoint made in-process (PEFT adapter with non-zero B and a
changed merger, saved exactly as the trainer saves it): merged logits equal base-plus-adapter logits, the merged
model reloads with plain transformers and generates, the un-merged export loads with PEFT, and --out is never
overwritten."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
VLSFT = str(Path(sys.executable).with_name("vlsft"))
TOL = 1e-4  # float32 on CPU: merged W + s*B@A vs the adapter applied on the fly differ only by rounding


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model_dir):
    from qwenvl import lora
    from qwenvl import model as qm

    d = tmp_path_factory.mktemp("export") / "run" / "checkpoint-2"
    torch.manual_seed(1)
    m = qm.load_model(str(tiny_model_dir), dtype=torch.float32)
    plan = lora.resolve_targets(tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=False, targets="llm,vision")
    qm.apply_freezing(m, tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=False)
    pm = lora.apply_lora(m, plan, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or ".merger." in n:
                p.add_(torch.randn_like(p) * 0.05)  # a trained adapter and merger
    pm.save_pretrained(str(d))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        shutil.copy(tiny_model_dir / f, d / f)
    lora.save_lora_extras(pm, d, should_save=True, plan=plan, base_model=str(tiny_model_dir), settings={"r": 4})
    (d / "trainer_state.json").write_text('{"global_step": 2, "log_history": []}')
    ids = torch.tensor([[151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30, 151645, 198]])
    pm.eval()
    with torch.no_grad():
        logits = pm(input_ids=ids).logits
    return {"dir": d, "ids": ids, "logits": logits, "base": tiny_model_dir}


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([VLSFT, "export", *args], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_merged_export_equals_base_plus_adapter_and_generates(checkpoint, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / "merged"
    p = export(str(checkpoint["dir"].parent), "--out", str(out), "--merge")  # the run dir: newest checkpoint
    assert p.returncode == 0, p.stderr[-3000:]
    assert not list(out.glob("adapter_*")) and (out / "model.safetensors").is_file()
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=checkpoint["ids"]).logits
    assert (logits - checkpoint["logits"]).abs().max().item() < TOL
    proc = AutoProcessor.from_pretrained(out)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is two plus two?"}]}]
    x = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    gen = model.generate(**x, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert gen.shape[1] - x["input_ids"].shape[1] == 3
    # the frozen, non-adapted weights are the base's, bit for bit; adapted and trained ones are not
    from safetensors.torch import load_file

    before, after = load_file(str(checkpoint["base"] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)
    assert torch.equal(before["visual.patch_embed.proj.weight"], after["visual.patch_embed.proj.weight"])
    assert not torch.equal(before["visual.merger.mlp.0.weight"], after["visual.merger.mlp.0.weight"])
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"])


def test_unmerged_export_loads_with_peft(checkpoint, tmp_path):
    import json

    from qwenvl.export import load_adapter_export

    out = tmp_path / "adapter"
    p = export(str(checkpoint["dir"]), "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(checkpoint["base"])
    manifest = json.loads((out / "vlsft-export.json").read_text())
    assert manifest["base_model"] == str(checkpoint["base"]) and not manifest["merged"]
    for f in ("adapter_model.safetensors", "trained_parts.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (out / f).is_file(), f
    assert not (out / "trainer_state.json").exists()
    model = load_adapter_export(out, dtype=torch.float32).eval()
    assert type(model).__name__ == "PeftModel"
    with torch.no_grad():
        logits = model(input_ids=checkpoint["ids"]).logits
    assert (logits - checkpoint["logits"]).abs().max().item() < TOL


def test_export_refuses_a_non_empty_out_and_a_non_lora_folder(checkpoint, tmp_path, tiny_model_dir):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    p = export(str(checkpoint["dir"]), "--out", str(out))
    assert p.returncode == 2 and "not empty" in p.stderr and "Traceback" not in p.stderr
    assert [x.name for x in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    p = export(str(tiny_model_dir), "--out", str(tmp_path / "x"))
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "full model, not a LoRA adapter" in errors[0]
    assert not (tmp_path / "x").exists()


# ---- a source that is not whole is refused before anything is written (Trust, round 3) ---------------------------
def _broken(checkpoint, tmp_path, name: str, how: str) -> Path:
    d = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(checkpoint["dir"], d)
    f = d / name
    if how == "delete":
        f.unlink()
    else:  # truncate: a save cut short
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    return d


@pytest.mark.parametrize("name, how, merge, says", [
    ("adapter_model.safetensors", "delete", False, "no adapter weights (adapter_model.safetensors)"),
    ("adapter_model.safetensors", "truncate", True, "adapter_model.safetensors"),
    ("trained_parts.safetensors", "delete", True, "vlsft-lora.json lists trained_parts.safetensors, which is missing"),
    ("trained_parts.safetensors", "truncate", False, "trained_parts.safetensors"),
    ("vlsft-lora.json", "truncate", True, "vlsft-lora.json is truncated or not JSON"),
    ("vlsft-lora.json", "delete", False, "no vlsft-lora.json"),
    ("adapter_config.json", "truncate", False, "adapter_config.json is truncated or not JSON"),
    ("preprocessor_config.json", "delete", True, "no processor settings"),
])
def test_export_refuses_a_source_that_is_not_whole(checkpoint, tmp_path, name, how, merge, says):
    d = _broken(checkpoint, tmp_path, name, how)
    out = tmp_path / "out"
    for source in (d, d.parent):  # the checkpoint itself, and the run whose newest checkpoint it is
        p = export(str(source), "--out", str(out), *(["--merge"] if merge else []))
        errors = [x for x in p.stderr.splitlines() if x.strip()]
        assert p.returncode == 2 and "Traceback" not in p.stderr and "exported" not in p.stdout, p.stderr[-3000:]
        assert len(errors) == 1 and errors[0].startswith("error: cannot export ") and says in errors[0], errors
        assert not out.exists() and not list(tmp_path.glob(".out*")), list(tmp_path.iterdir())


def test_export_refuses_a_source_without_a_tokenizer(checkpoint, tmp_path):
    d = _broken(checkpoint, tmp_path, "tokenizer.json", "delete")
    (d / "tokenizer_config.json").unlink()
    p = export(str(d), "--out", str(tmp_path / "out"))
    assert p.returncode == 2 and "no tokenizer" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_interrupted_merge_leaves_no_temporary_folder(checkpoint, tmp_path, sig):
    import signal
    import time

    out = tmp_path / "merged"
    proc = subprocess.Popen([VLSFT, "export", str(checkpoint["dir"]), "--out", str(out), "--merge"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".merged.vlsft-tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the export ended before it could be interrupted"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    num = int(getattr(signal, sig))
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert proc.returncode == 128 + num and "Traceback" not in err, err[-3000:]
    assert len(errors) == 1 and f"export interrupted by {sig}" in errors[0], err[-3000:]
    assert not out.exists() and list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_a_killed_exports_temporary_folder_is_removed_by_the_next(checkpoint, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".adapter.vlsft-tmp-{int(dead.stdout)}"  # left by a `kill -9`ed export
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    p = export(str(checkpoint["dir"]), "--out", str(tmp_path / "adapter"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["adapter"]


# ---- a bad --out is one line, before the model is loaded, and nothing is written (Trust, round 3, item 7) ---------
def _bad_out(base: Path, case: str) -> Path:
    (base / "target").mkdir()  # an empty folder: a link to it would otherwise be taken as an empty --out
    (base / "afile").write_text("mine\n")
    os.symlink(base / "target", base / "to-folder")
    os.symlink(base / "nowhere", base / "dangling")
    return {"link to a folder": base / "to-folder", "dangling link": base / "dangling",
            "under a file": base / "afile" / "out", "unwritable folder": Path("/proc/vlsft-export-test"),
            "too long": base / ("y" * 300)}[case]


@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merge"])
@pytest.mark.parametrize("case", ["link to a folder", "dangling link", "under a file", "unwritable folder",
                                  "too long"])
def test_export_to_a_bad_out_is_one_line_and_writes_nothing(checkpoint, tmp_path, case, merge):
    out = _bad_out(tmp_path, case)
    before = sorted(p.name for p in tmp_path.iterdir())
    p = export(str(checkpoint["dir"]), "--out", str(out), *(["--merge"] if merge else []))
    lines = [x for x in p.stderr.splitlines() if x.strip()]  # one line: no "loading the base model" before it
    assert p.returncode == 2 and "Traceback" not in p.stderr and "exported" not in p.stdout, p.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: --out "), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary folder, nothing new
    assert list((tmp_path / "target").iterdir()) == [] and (tmp_path / "afile").read_text() == "mine\n"
    assert not os.path.lexists(tmp_path / "nowhere") and not os.path.lexists("/proc/vlsft-export-test")


def test_export_refuses_a_base_of_another_model(checkpoint, tmp_path):
    """A base of another family or size would merge into a broken model: refused in one line, nothing written; the
    manifest records the base it was trained on (model type and sizes), an older manifest is compared with the base
    it names."""
    import json

    from qwenvl.tiny import ensure_tiny_model

    other = ensure_tiny_model(checkpoint["base"].parent / "tiny-qwen2_vl", family="qwen2_vl")
    meta = json.loads((checkpoint["dir"] / "vlsft-lora.json").read_text())
    assert meta["base_signature"]["model_type"] == "qwen2_5_vl"
    older = tmp_path / "older" / "checkpoint-2"
    shutil.copytree(checkpoint["dir"], older)
    (older / "vlsft-lora.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "base_signature"}))
    for src in (checkpoint["dir"], older):
        for merge in ([], ["--merge"]):
            out = tmp_path / f"out-{src.parent.name}-{len(merge)}"
            p = export(str(src), "--out", str(out), "--base", str(other), *merge)
            errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
            assert p.returncode == 2 and len(errors) == 1, p.stderr
            assert "is not the one the adapter was trained on (model_type qwen2_5_vl vs qwen2_vl" in errors[0]
            assert not out.exists() and "Traceback" not in p.stderr
