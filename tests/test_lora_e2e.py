"""LoRA end to end through the real CLI: `vlsft train` -> torchrun -> qwenvl.train, 2 CPU ranks.

The suite's shared 6-step ZeRO-3 LoRA run (conftest ``lora_run``, runs.py: LoRA on the language model + fully
trained merger, demo data with images, a video and text-only samples) feeds most assertions; its resume to a new
max_steps (on a copy), a short ZeRO-2 + packing + gradient-checkpointing run and the official LoRA script's argument
line (one process, no DeepSpeed) are separate, small runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from plan_fixtures import DEMO_DICT as DICT
from runs import VLSFT, cli_env, copy_run, lora_yaml

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env():
    return cli_env()


def train(args: list[str], env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([VLSFT, "train", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture()
def run(lora_run):
    return lora_run


def losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def test_zero3_lora_run_finishes_on_two_ranks_and_loss_falls(run):
    ranks = [[json.loads(x) for x in (run["out"] / "logs" / f"samples-rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]
    assert {x["world_size"] for x in ranks[0] + ranks[1]} == {2}
    assert [s for x in ranks[0] for s in x["samples"]] != [s for x in ranks[1] for s in x["samples"]]
    assert any(x["videos"] for x in ranks[0] + ranks[1]) and any(x["images"] == x["videos"] == 0
                                                                  for x in ranks[0] + ranks[1])
    loss = losses(run["out"])
    assert len(loss) == 6
    # step 1 is the random model's ~ln(151936) = 11.93; 5 LoRA steps on unseen samples lower it (measured ~0.3;
    # a tiny random model with a frozen tied lm_head moves slowly, unlike the full run's embeddings)
    assert sum(loss[1:]) / 5 < loss[0] - 0.2, loss
    assert "Trainable parameters (LoRA r=16" in run["proc"].stdout and "LoRA adapters" in run["proc"].stdout


def test_checkpoint_layout_adapter_parts_processor(run):
    from qwenvl.runpolicy import checkpoint_problem

    for folder in (run["out"], run["out"] / "checkpoint-3", run["out"] / "checkpoint-6"):
        for f in ("adapter_config.json", "adapter_model.safetensors", "trained_parts.safetensors", "vlsft-lora.json",
                  "tokenizer.json", "chat_template.jinja", "processor_config.json"):
            assert (folder / f).is_file(), folder / f
        assert not (folder / "model.safetensors").exists()  # no full copy of the base
    assert checkpoint_problem(run["out"] / "checkpoint-3") is None
    meta = json.loads((run["out"] / "vlsft-lora.json").read_text())
    assert meta["targets"] == ["llm"] and meta["trained_in_full"] == ["merger"] and meta["r"] == 16


def test_only_adapters_and_the_merger_changed_base_bit_identical(run, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    base = load_file(str(tiny_model_dir / "model.safetensors"))
    adapter = load_file(str(run["out"] / "adapter_model.safetensors"))
    parts = load_file(str(run["out"] / "trained_parts.safetensors"))
    # adapters: exactly lora_A/B of every linear layer of the language model, and B moved away from its zero init
    linears = {k[: -len(".weight")] for k, v in base.items() if k.startswith("model.layers.") and v.dim() == 2}
    assert {k.rsplit(".", 2)[0].replace("base_model.model.model.language_model.", "model.") for k in adapter} == linears
    assert all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if ".lora_B." in k)
    # fully trained: exactly the merger's tensors, all changed
    assert {k.replace("model.visual.", "visual.") for k in parts} == {k for k in base if k.startswith("visual.merger.")}
    for k, v in parts.items():
        assert not torch.equal(v.float(), base[k.replace("model.visual.", "visual.")].to(v.dtype).float()), k
    # the merged export: every frozen weight without an adapter is the base's, bit for bit
    out = tmp_path / "merged"
    p = subprocess.run([VLSFT, "export", str(run["out"]), "--out", str(out), "--merge"], capture_output=True,
                       text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    merged = load_file(str(out / "model.safetensors"))
    frozen = [k for k in base if not k.startswith("visual.merger.") and k[: -len(".weight")] not in linears]
    assert frozen and all(torch.equal(merged[k], base[k]) for k in frozen)
    assert all(not torch.equal(merged[f"{m}.weight"], base[f"{m}.weight"]) for m in linears)


def test_resume_continues_to_a_new_max_steps(run, env, tmp_path):
    out = copy_run(run, tmp_path)  # the shared run stays as it is
    p = train(["--config", str(run["cfg"]), f"output.dir={out}", "training.max_steps=8",
               "distributed.master_port=29683"], env)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "continuing from" in p.stdout and "checkpoint-6" in p.stdout
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and len(losses(out)) == 8


def test_zero2_with_packing_and_gradient_checkpointing(tmp_path, tiny_model_dir, env):
    out = tmp_path / "out"
    cfg = lora_yaml(tmp_path / "run.yaml", tiny_model_dir, out, steps=2, port=29685, deepspeed="zero2",
                    data={"packing": True}, training={"gradient_checkpointing": True})
    p = train(["--config", str(cfg)], env)
    assert p.returncode == 0, p.stderr[-4000:]
    assert len(losses(out)) == 2 and (out / "adapter_model.safetensors").is_file()
    assert (out / "trained_parts.safetensors").is_file()


def test_official_lora_script_argument_line_runs(tmp_path, tiny_model_dir, env):
    """sft_30a3b_lora.sh's LoRA flags (with a dense tiny model, one process, no DeepSpeed)."""
    args = (f"--model_name_or_path {tiny_model_dir} --dataset_dict {DICT} --dataset_use shapes,facts "
            "--data_flatten True --tune_mm_vision False --tune_mm_mlp True --tune_mm_llm True --bf16 "
            f"--output_dir {tmp_path / 'out'} --max_steps 2 --per_device_train_batch_size 1 "
            "--gradient_accumulation_steps 1 --max_pixels 12544 --min_pixels 3136 --eval_strategy no "
            "--save_strategy steps --save_steps 2 --learning_rate 1e-5 --weight_decay 0 --warmup_ratio 0.03 "
            "--max_grad_norm 1 --lr_scheduler_type cosine --logging_steps 1 --model_max_length 512 "
            "--gradient_checkpointing True --dataloader_num_workers 0 --report_to none "
            "--lora_enable True --lora_r 64 --lora_alpha 128 --lora_dropout 0.0").split()
    p = subprocess.run([sys.executable, "-m", "qwenvl.train", *args], env=env, capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "the language model is trained through its LoRA adapters" in p.stderr
    meta = json.loads((tmp_path / "out" / "vlsft-lora.json").read_text())
    assert (meta["r"], meta["alpha"], meta["dropout"], meta["targets"]) == (64, 128, 0.0, ["llm"])
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["lora_dropout"] == 0.0 and cfg["r"] == 64  # 0.0 honoured (the official code turns it into 0.05)
