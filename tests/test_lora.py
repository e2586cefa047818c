"""LoRA in-process (no training loop): which parameters train for every tune_mm_* x lora.targets combination,
learning rates per part, torch-free parameter counts against real tiny models, the front door's refusals
(conflicts, QLoRA without CUDA) through the real CLI, and the adapter checkpoint layout's completeness rules."""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from qwenvl import lora  # noqa: E402
from qwenvl import model as qm  # noqa: E402
from qwenvl.tiny import tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VLSFT = str(Path(sys.executable).with_name("vlsft"))
DICT = REPO / "configs" / "demo" / "Dataset-Dictionary.json"
FLAGS = list(itertools.product([False, True], repeat=3))  # (vision, mlp, llm)
TARGETS = [c for n in (1, 2, 3) for c in itertools.combinations(("llm", "vision", "merger"), n)]


@pytest.fixture(scope="module")
def base():
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(tiny_config("qwen2_5_vl"))


def _apply(base, vision, mlp, llm, targets, regex=None, **kw):
    m = copy.deepcopy(base)
    plan = lora.resolve_targets(tune_mm_vision=vision, tune_mm_mlp=mlp, tune_mm_llm=llm,
                                targets=",".join(targets) if targets else None, target_modules=regex)
    qm.apply_freezing(m, tune_mm_vision="vision" in plan.full, tune_mm_mlp="merger" in plan.full,
                      tune_mm_llm="llm" in plan.full)
    return lora.apply_lora(m, plan, r=kw.get("r", 4), alpha=8, dropout=0.0), plan


def expected(base, vision: bool, mlp: bool, llm: bool, targets) -> set[str]:
    """Written out by name: adapters on every nn.Linear of a targeted part (never lm_head), every weight of a
    tune_mm_* part, nothing else."""
    out = set()
    for n, mod in base.named_modules():
        part = ("merger" if ".merger." in f"{n}." else "vision") if n.startswith("model.visual") else "llm"
        if isinstance(mod, torch.nn.Linear) and n != "lm_head" and part in targets:
            out |= {f"base_model.model.{n}.lora_A.default.weight", f"base_model.model.{n}.lora_B.default.weight"}
    for n, _ in base.named_parameters():
        is_merger = n.startswith("model.visual.merger.")
        part = "merger" if is_merger else ("vision" if n.startswith("model.visual.") else "llm")
        if {"vision": vision, "merger": mlp, "llm": llm}[part]:
            out.add(f"base_model.model.{n}")
    return out


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "v{}m{}l{}".format(*map(int, f)))
def test_every_tune_mm_combination_times_targets_trains_exactly_that_or_is_refused(base, flags):
    vision, mlp, llm = flags
    for targets in TARGETS:
        tune = {"vision": vision, "merger": mlp, "llm": llm}
        clash = [p for p in targets if tune[p]]
        if clash:
            with pytest.raises(lora.LoraConfigError) as e:
                _apply(base, vision, mlp, llm, targets)
            flag = lora.TUNE_FLAG[[p for p in lora.PARTS if p in clash][0]]
            assert "\n" not in str(e.value) and flag in str(e.value) and "lora targets" in str(e.value)
            continue
        pm, _ = _apply(base, vision, mlp, llm, targets)
        got = set(qm.trainable_parameter_names(pm))
        want = expected(base, vision, mlp, llm, targets)
        assert got == want, (targets, sorted(got ^ want)[:5])
        # the base weights of LoRA-wrapped layers stay frozen; lm_head never gets an adapter
        assert not [n for n in got if ".base_layer." in n or "lm_head.lora" in n]


def test_adapters_take_the_learning_rate_of_their_part(base):
    pm, _ = _apply(base, False, True, False, ("llm", "vision"))
    groups = qm.parameter_groups(pm, learning_rate=1e-4, weight_decay=0.1, mm_projector_lr=2e-4, vision_tower_lr=3e-4)
    by = {g["name"]: g for g in groups}
    names = {id(p): n for n, p in pm.named_parameters()}
    assert by["vision"]["lr"] == 3e-4 and by["merger"]["lr"] == 2e-4 and by["llm"]["lr"] == 1e-4
    assert all(".lora_" in names[id(p)] and ".visual.blocks." in names[id(p)] for p in by["vision"]["params"])
    assert all(".lora_" in names[id(p)] and ".language_model." in names[id(p)] for p in by["llm"]["params"])
    assert all(".visual.merger." in names[id(p)] and ".lora_" not in names[id(p)]
               for p in by["merger"]["params"] + by["merger.no_decay"]["params"])


def test_official_lora_enable_with_tune_mm_llm_trains_the_llm_through_adapters():
    plan = lora.resolve_targets(tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=True, official=True)
    assert plan.targets == ("llm",) and plan.full == ("merger",)
    with pytest.raises(lora.LoraConfigError, match="tune_mm_llm is true and lora targets include llm"):
        lora.resolve_targets(tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=True, targets="llm", official=True)


def test_target_modules_regex_selects_linears_and_refuses_a_fully_trained_part(base):
    pm, _ = _apply(base, False, True, False, None, regex=r".*language_model\.layers\.1\.mlp\.(up|down)_proj")
    got = {n for n in qm.trainable_parameter_names(pm) if ".lora_" in n}
    assert {n.split(".")[-4] for n in got} == {"up_proj", "down_proj"} and all(".layers.1." in n for n in got)
    with pytest.raises(lora.LoraConfigError, match="tune_mm_mlp is true and lora target_modules match"):
        _apply(base, False, True, False, None, regex=r".*visual\.merger\.mlp\.0")
    with pytest.raises(lora.LoraConfigError, match="match no linear layer"):
        _apply(base, False, False, False, None, regex="nothing_here")
    with pytest.raises(lora.LoraConfigError, match="not a valid regular expression"):
        lora.resolve_targets(tune_mm_vision=False, tune_mm_mlp=False, tune_mm_llm=False, target_modules="(")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_torch_free_counts_equal_the_real_models_counts(tmp_path_factory, family):
    """parameter_report reads only safetensors headers; compare with the PEFT-wrapped model itself."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    m = AutoModelForImageTextToText.from_config(tiny_config(family))
    d = tmp_path_factory.mktemp(family)
    m.save_pretrained(d)
    total = qm.count_parameters(m)
    for targets, tune, dora in ((("llm",), (False, True, False), False), (("vision", "merger"), (False, False, True), True),
                                (("llm", "vision", "merger"), (False, False, False), False)):
        plan = lora.resolve_targets(tune_mm_vision=tune[0], tune_mm_mlp=tune[1], tune_mm_llm=tune[2],
                                    targets=",".join(targets))
        report = lora.parameter_report(d, plan=plan, tune={}, r=8, use_dora=dora)
        mm = copy.deepcopy(m)
        qm.apply_freezing(mm, tune_mm_vision=tune[0], tune_mm_mlp=tune[1], tune_mm_llm=tune[2])
        pm = lora.apply_lora(mm, plan, r=8, alpha=16, dropout=0.0, use_dora=dora)
        real = qm.trainable_counts(pm)
        assert {p: v["full"] + v["lora"] for p, v in report.items()} == real, (family, targets)
        assert {p: v["total"] for p, v in report.items()} == total
    full = lora.parameter_report(d, plan=None, tune={"merger": True, "llm": True})
    assert full["vision"]["full"] == 0 and full["merger"]["full"] == total["merger"]


def test_quantize_refused_without_cuda_and_its_config():
    assert "needs a CUDA GPU" in lora.quantize_problem("4bit", cuda=False, bitsandbytes=False)
    assert "pip install bitsandbytes" in lora.quantize_problem("8bit", cuda=True, bitsandbytes=False)
    assert lora.quantize_problem("4bit", cuda=True, bitsandbytes=True) is None
    assert lora.quantize_problem(None, cuda=False, bitsandbytes=False) is None
    plan = lora.resolve_targets(tune_mm_vision=False, tune_mm_mlp=False, tune_mm_llm=True, targets="vision")
    assert "tune_mm_llm trains in full" in lora.quantize_conflict("4bit", plan)
    kw = lora.quantization_kwargs("4bit", torch.bfloat16)["quantization_config"]
    assert kw.load_in_4bit and kw.bnb_4bit_quant_type == "nf4" and kw.bnb_4bit_compute_dtype == torch.bfloat16
    assert "visual" in kw.llm_int8_skip_modules and "lm_head" in kw.llm_int8_skip_modules
    assert lora.quantization_kwargs("8bit", torch.float32)["quantization_config"].load_in_8bit
    assert lora.quantization_kwargs(None, torch.float32) == {}


@pytest.mark.slow
def test_trainer_refuses_qlora_on_cpu_in_one_line_before_loading(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for CPU-only machines")
    p = subprocess.run([sys.executable, "-m", "qwenvl.train", "--model_name_or_path", str(tmp_path / "nomodel"),
                        "--dataset_dict", str(DICT), "--output_dir", str(tmp_path / "out"), "--lora_enable", "True",
                        "--lora_quantize", "4bit", "--report_to", "none"], capture_output=True, text=True, timeout=120,
                       cwd=REPO)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "QLoRA" in errors[0] and "CUDA" in errors[0] and "Traceback" not in p.stderr


def _yaml(tmp_path: Path, model: Path, lora_block: str, tune: str = "tune_mm_mlp: true") -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(f"""model:
  name_or_path: {model}
  {tune}
  lora:
{lora_block}
data:
  dictionary: {DICT}
output:
  dir: {tmp_path / "out"}
distributed: {{deepspeed: none}}
wandb: {{mode: disabled}}
""")
    return p


def _print_args(cfg: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([VLSFT, "print-args", "--config", str(cfg), *extra], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_print_args_shows_trainable_counts_per_part(tmp_path, tiny_model_dir):
    cfg = _yaml(tmp_path, tiny_model_dir, "    enabled: true\n    r: 8\n    targets: [llm, vision]")
    p = _print_args(cfg)
    assert p.returncode == 0, p.stderr
    assert "--lora_enable True" in p.stdout and "--lora_targets vision,llm" in p.stdout
    lines = {ln.split()[1]: ln for ln in p.stdout.splitlines() if ln.startswith("#   ") and " of " in ln}
    plan = lora.resolve_targets(tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=False, targets="llm,vision")
    report = lora.parameter_report(tiny_model_dir, plan=plan, tune={}, r=8)
    for part in ("vision", "merger", "llm"):
        assert f"{report[part]['full'] + report[part]['lora']:,} of" in lines[part], lines[part]
    assert "LoRA adapters" in lines["llm"] and "full" in lines["merger"] and "% of the model" in lines["total"]


@pytest.mark.parametrize("block,tune,needle", [
    ("    enabled: true", "tune_mm_llm: true", "[model.lora.targets] tune_mm_llm is true and lora targets include llm"),
    ("    enabled: true\n    targets: [vision]", "tune_mm_vision: true", "tune_mm_vision is true"),
    ("    enabled: true\n    quantize: 4bit", "tune_mm_mlp: true", "[model.lora.quantize] lora quantize 4bit (QLoRA)"),
    ("    enabled: true\n    targets: [llm, decoder]", "tune_mm_mlp: true", "decoder: unknown part"),
    ("    enabled: true\n    r: 0", "tune_mm_mlp: true", "[model.lora.r]"),
])
def test_front_door_refuses_lora_conflicts_in_one_line(tmp_path, tiny_model_dir, block, tune, needle):
    p = _print_args(_yaml(tmp_path, tiny_model_dir, block, tune))
    if "quantize" in block and torch.cuda.is_available():
        pytest.skip("CUDA present: QLoRA is not refused for lack of CUDA")
    assert p.returncode == 2, p.stdout
    errors = [x for x in p.stderr.splitlines() if ": error:" in x or x.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], p.stderr
    assert str(tmp_path / "run.yaml") in errors[0] and "Traceback" not in p.stderr


def _adapter_checkpoint(d: Path, parts: bool = True) -> Path:
    from safetensors.torch import save_file

    from qwenvl.runpolicy import TRAINER_STATE

    d.mkdir(parents=True)
    (d / TRAINER_STATE).write_text(json.dumps({"global_step": 2, "log_history": []}))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    save_file({"a.lora_A.weight": torch.zeros(2, 2)}, str(d / "adapter_model.safetensors"))
    files = []
    if parts:
        save_file({"model.visual.merger.mlp.0.weight": torch.zeros(4, 4)}, str(d / lora.PARTS_FILE))
        files.append(lora.PARTS_FILE)
    (d / lora.META).write_text(json.dumps({"files": files}))
    return d


def test_adapter_checkpoints_complete_only_with_manifest_and_whole_parts(tmp_path):
    from qwenvl.runpolicy import checkpoint_problem, decide_resume

    ok = _adapter_checkpoint(tmp_path / "run" / "checkpoint-2")
    assert checkpoint_problem(ok) is None
    assert decide_resume(str(tmp_path / "run"), "auto", False) == str(ok)
    newer = _adapter_checkpoint(tmp_path / "run" / "checkpoint-4")
    (newer / lora.META).unlink()  # the save stopped before the manifest
    assert "vlsft-lora.json" in checkpoint_problem(newer)
    warned = []
    assert decide_resume(str(tmp_path / "run"), "auto", False, warn=warned.append) == str(ok) and warned
    cut = _adapter_checkpoint(tmp_path / "cut")
    data = (cut / lora.PARTS_FILE).read_bytes()
    (cut / lora.PARTS_FILE).write_bytes(data[:-8])
    assert "truncated" in checkpoint_problem(cut)
    (cut / lora.PARTS_FILE).unlink()
    assert "missing" in checkpoint_problem(cut)
