"""`vlsft export` through the real CLI on a LoRA checkpoint made in-process (PEFT adapter with non-zero B and a
changed merger, saved exactly as the trainer saves it): merged logits equal base-plus-adapter logits, the merged
model reloads with plain transformers and generates, the un-merged export loads with PEFT, and --out is never
overwritten."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
