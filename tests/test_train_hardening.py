"""Trainer inputs found by the hardening review: argument handling, early one-line errors, processor fallback,
activation checkpointing with frozen parts. All in-process and fast (no training loop)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
DICT = REPO / "configs" / "demo" / "Dataset-Dictionary.json"


def _parse(argv: list[str], mode=None):
    from qwenvl.train import parse_args
    from qwenvl.train_args import TrainingArguments

    old = TrainingArguments._cpu_mode
    TrainingArguments._cpu_mode = mode
    try:
        return parse_args(argv)
    finally:
        TrainingArguments._cpu_mode = old


def test_official_gradient_checkpointing_name_is_accepted_without_futurewarning(tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gradient_checkpointing.*deprecated")
        _, _, ta = _parse(["--output_dir", str(tmp_path), "--gradient_checkpointing", "True"])
    assert ta.activation_checkpointing is True and ta.uses_activation_checkpointing
    assert ta.activation_checkpointing_kwargs == {"use_reentrant": False}
    _, _, ta = _parse(["--output_dir", str(tmp_path), "--gradient_checkpointing", "True",
                       "--gradient_checkpointing_kwargs", '{"use_reentrant": true}'])
    assert ta.activation_checkpointing_kwargs == {"use_reentrant": True}  # the user's choice is kept
    _, _, ta = _parse(["--output_dir", str(tmp_path), "--activation_checkpointing", "True"])
    assert ta.uses_activation_checkpointing
    _, _, ta = _parse(["--output_dir", str(tmp_path)])
    assert not ta.uses_activation_checkpointing


def test_bf16_on_one_cpu_process_without_deepspeed_is_accepted(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    _, _, ta = _parse(["--output_dir", str(tmp_path), "--bf16", "True"], mode="single")
    assert ta.bf16 and ta.use_cpu and ta.wants_bf16


def test_report_to_checked_before_loading(monkeypatch):
    from transformers import integrations

    from qwenvl.train import UserError, _check_report_to

    _check_report_to(["none"])
    with pytest.raises(UserError, match="not a known integration"):
        _check_report_to(["tensorbord"])
    monkeypatch.setattr(integrations, "is_tensorboard_available", lambda: False)
    with pytest.raises(UserError, match="pip install tensorboard"):
        _check_report_to(["tensorboard"])


def _main(argv, capsys) -> tuple[int, str]:
    from qwenvl.train import main

    rc = main(argv)
    return rc, capsys.readouterr().err


def test_nothing_to_train_is_one_line_before_loading(tmp_path, capsys):
    rc, err = _main(["--model_name_or_path", str(tmp_path / "no-model"), "--dataset_dict", str(DICT),
                     "--output_dir", str(tmp_path / "out"), "--report_to", "none"], capsys)
    assert rc == 2 and err.strip().splitlines() == [
        "error: nothing to train: set at least one of tune_mm_vision, tune_mm_mlp, tune_mm_llm to True"]


@pytest.mark.parametrize("resume", ["missing", "half"])
def test_resume_path_missing_or_incomplete_is_one_line(tmp_path, capsys, resume):
    cp = tmp_path / "out" / "checkpoint-4"
    if resume == "half":
        cp.mkdir(parents=True)
        (cp / "config.json").write_text("{}")
    rc, err = _main(["--model_name_or_path", str(tmp_path / "no-model"), "--dataset_dict", str(DICT),
                     "--tune_mm_llm", "True", "--output_dir", str(tmp_path / "out"), "--report_to", "none",
                     "--resume", str(cp)], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert ("does not exist" if resume == "missing" else "incomplete") in err



def test_deepspeed_by_name_and_missing_file(tmp_path):
    from qwenvl.train import UserError, resolve_deepspeed_arg

    argv = resolve_deepspeed_arg(["--deepspeed", "zero3", "--bf16", "True"])
    assert Path(argv[1]) == REPO / "configs" / "zero3.json" and argv[2:] == ["--bf16", "True"]
    assert resolve_deepspeed_arg(["--deepspeed=zero2"]) == [f"--deepspeed={REPO / 'configs' / 'zero2.json'}"]
    assert resolve_deepspeed_arg(["--deepspeed", "none"]) == ["--deepspeed", "none"]
    with pytest.raises(UserError, match="no such file"):
        resolve_deepspeed_arg(["--deepspeed", str(tmp_path / "ds.json")])


def test_official_warmup_ratio_is_accepted(tmp_path):
    _, _, ta = _parse(["--output_dir", str(tmp_path), "--warmup_ratio", "0.03"])
    assert ta.warmup_steps == pytest.approx(0.03) and ta.get_warmup_steps(1000) == 30
    from qwenvl.train import UserError

    with pytest.raises(UserError, match="warmup_ratio"):
        _parse(["--output_dir", str(tmp_path), "--warmup_ratio", "3"])


@pytest.mark.parametrize("extra,expected", [(["--eval_strategy", "steps"], "needs eval data"),
                                            (["--report_to", "tensorbord"], "not a known integration"),
                                            (["--lora_quantize", "4bit"], "needs --lora_enable True")])
def test_unsupported_combinations_are_one_line_before_loading(tmp_path, capsys, extra, expected):
    rc, err = _main(["--model_name_or_path", str(tmp_path / "no-model"), "--dataset_dict", str(DICT),
                     "--tune_mm_llm", "True", "--output_dir", str(tmp_path / "out"), *extra], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and expected in err

def test_model_folder_without_preprocessor_config_gets_family_defaults(tmp_path, tiny_model_dir):
    from qwenvl.model import ProcessorError, load_processor
    from qwenvl.tiny import ensure_tiny_model

    for family, patch, src in (("qwen2_5_vl", 14, Path(tiny_model_dir)),
                               ("qwen3_vl", 16, ensure_tiny_model(REPO / ".cache" / "tiny-qwen3_vl", family="qwen3_vl"))):
        d = tmp_path / family
        shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.safetensors", "preprocessor_config.json",
                                                              "processor_config.json", "video_preprocessor_config.json"))
        proc = load_processor(d)
        assert proc.image_processor.patch_size == patch
        assert proc.tokenizer.convert_tokens_to_ids("<|image_pad|>") == json.loads(
            (d / "config.json").read_text())["image_token_id"]
        assert proc.chat_template
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(Path(tiny_model_dir) / "config.json", bare / "config.json")
    with pytest.raises(ProcessorError, match="no tokenizer"):
        load_processor(bare)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_with_frozen_tower_and_embeddings_still_trains_the_merger(tiny_model_dir, reentrant):
    """Only the merger trainable (vision tower, embeddings and decoder frozen) with activation checkpointing:
    the gradient must still reach the merger through the checkpointed decoder layers."""
    from PIL import Image

    from qwenvl.model import apply_freezing, load_model, load_processor

    model = load_model(str(tiny_model_dir), dtype=torch.float32, attn_implementation="sdpa")
    proc = load_processor(tiny_model_dir)
    apply_freezing(model, tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=False)
    model.enable_input_require_grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    model.train()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True) + "red"
    batch = proc(text=[text], images=[Image.new("RGB", (56, 56), (255, 0, 0))], return_tensors="pt")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(n.startswith("model.visual.merger.") for n in grads)
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads.values())


@pytest.mark.slow
def test_half_bad_dataset_with_workers_stops_with_one_line(tmp_path, tiny_model_dir, cli_env):
    """~50 % of samples unreadable, two DataLoader workers: skipped samples (counted in the workers) reach the
    logs and the bad-sample limit ends the run with one line and exit status 2 (no traceback, no KeyError from
    a skipped sample stripped by HF's column removal)."""
    import subprocess
    import sys

    recs = [{"image": "red_square.png" if i % 2 == 0 else f"missing_{i}.png",
             "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                               {"from": "gpt", "value": f"red {i}"}]} for i in range(40)]
    (tmp_path / "half.json").write_text(json.dumps(recs))
    d = tmp_path / "dict.json"
    d.write_text(json.dumps({"half": {"data_path": str(REPO / "configs" / "demo" / "images"),
                                      "annotation_path": "half.json"}}))
    cmd = [sys.executable, "-m", "qwenvl.train", "--model_name_or_path", str(tiny_model_dir), "--dataset_dict",
           str(d), "--dataset_use", "half", "--tune_mm_mlp", "True", "--output_dir", str(tmp_path / "out"),
           "--max_steps", "20", "--per_device_train_batch_size", "20", "--logging_steps", "1", "--save_strategy",
           "no", "--report_to", "none", "--max_pixels", "3136", "--min_pixels", "3136",
           "--max_bad_sample_ratio", "0.3", "--dataloader_num_workers", "2"]
    env = {k: v for k, v in cli_env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "KeyError" not in out
    errors = [ln[ln.index("error:"):] for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "max_bad_sample_ratio 0.3" in errors[0], errors
    import re

    logged = [int(m) for m in re.findall(r"'skipped_samples': (\d+)", out)]
    assert logged and logged[-1] > 0 and logged == sorted(logged)


def test_the_official_sft_script_argument_line_parses(tmp_path):
    """scripts/sft.sh of the official repository (Qwen2.5-era, plus HEAD's cache_dir / lora flags)."""
    official = ("--model_name_or_path m --dataset_use a,b --data_flatten True --tune_mm_vision False "
                f"--tune_mm_mlp True --tune_mm_llm True --bf16 --output_dir {tmp_path} --num_train_epochs 0.5 "
                "--per_device_train_batch_size 4 --per_device_eval_batch_size 8 --gradient_accumulation_steps 4 "
                "--max_pixels 50176 --min_pixels 784 --eval_strategy no --save_strategy steps --save_steps 1000 "
                "--save_total_limit 1 --learning_rate 2e-7 --weight_decay 0 --warmup_ratio 0.03 --max_grad_norm 1 "
                "--lr_scheduler_type cosine --logging_steps 1 --model_max_length 8192 --gradient_checkpointing True "
                "--dataloader_num_workers 4 --run_name qwen2vl-baseline --report_to none --cache_dir /tmp "
                "--lora_enable False").split()
    mode = None if torch.cuda.is_available() else "single"
    m, d, ta = _parse(official, mode=mode)
    assert (m.tune_mm_mlp, d.data_flatten, d.model_max_length, ta.bf16) == (True, True, 8192, True)
    assert ta.activation_checkpointing and ta.warmup_steps == pytest.approx(0.03)
    _, _, lora_args = _parse(official[:-1] + ["True"], mode=mode)  # LoRA runs now (tests/test_lora_e2e.py)
    assert lora_args.lora_enable and (lora_args.lora_r, lora_args.lora_alpha) == (64, 128)


@pytest.mark.parametrize("flag, value", [("seed", "-1"), ("seed", str(2**32)), ("data_seed", "-3")])
def test_a_seed_out_of_range_is_one_line_before_loading(tmp_path, capsys, flag, value):
    rc, err = _main(["--model_name_or_path", str(tmp_path / "no-model"), "--dataset_dict", str(DICT),
                     "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--tune_mm_llm", "True",
                     f"--{flag}={value}"], capsys)
    assert rc == 2 and err.strip().splitlines() == [
        f"error: --{flag} {value} is out of range: seeds go from 0 to 4294967295 (run YAML: "
        f"{'training.seed' if flag == 'seed' else 'data.seed'})"], err


def test_output_dir_that_is_the_model_folder_is_one_line_before_loading(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    rc, err = _main(["--model_name_or_path", str(model), "--dataset_dict", str(DICT), "--output_dir",
                     str(tmp_path / "." / "model"), "--report_to", "none", "--tune_mm_llm", "True"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "is the model folder the run starts from" in err, err
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]  # nothing written there


def test_names_starting_with_a_dash_reach_the_trainer_as_values(tmp_path):
    """A dataset or run name starting with '-' passes the checks; the plan writes it as --flag=value, which the
    trainer's parser reads as the value (as --flag value it died in every rank: 'expected one argument')."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from plan_fixtures import make_project

    from vlsft.plan import plan_from_file

    path = make_project(tmp_path, sizes={"-shapes": (20, None)})
    plan = plan_from_file(path, ["output.run_name=-exp1", "training.max_steps=-1", "data.use=[-shapes]"], {})
    assert "--dataset_use=-shapes" in plan.trainer_args and "--run_name=-exp1" in plan.trainer_args
    assert plan.trainer_args[plan.trainer_args.index("--max_steps") + 1] == "-1"  # a number stays as it was
    m, d, ta = _parse(plan.trainer_args, mode="single")
    assert (d.dataset_use, ta.run_name, ta.max_steps) == ("-shapes", "-exp1", -1)
    rdzv = plan_from_file(path, ["output.run_name=-exp1", "distributed.rdzv_endpoint=head:29400"], {}).torchrun
    assert "--rdzv_id=-exp1" in rdzv


def test_broken_config_and_unknown_attention_kernel_are_one_line(tmp_path, capsys, tiny_model_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "qwen2_5_vl",')
    base = ["--dataset_dict", str(DICT), "--tune_mm_llm", "True", "--output_dir", str(tmp_path / "out"),
            "--report_to", "none"]
    rc, err = _main(["--model_name_or_path", str(bad), *base], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "config.json: unreadable" in err
    rc, err = _main(["--model_name_or_path", str(tiny_model_dir), "--attn_implementation", "flash_attn_9", *base],
                    capsys)
    assert rc == 2 and "cannot load the model" in err and "flash_attn_9" in err
    assert not [ln for ln in err.splitlines() if ln.startswith("Traceback")]


@pytest.mark.parametrize("max_steps,logging_steps,step,expect", [(5, 10, 5, True), (3, 2, 3, True), (3, 2, 2, False),
                                                                 (4, 2, 4, False), (5, 10, 4, False)])
def test_last_step_is_logged_when_not_a_multiple_of_logging_steps(tmp_path, max_steps, logging_steps, step, expect):
    from transformers import TrainerControl, TrainerState

    from qwenvl.trainer import LogLastStepCallback

    _, _, ta = _parse(["--output_dir", str(tmp_path), "--logging_steps", str(logging_steps)])
    state = TrainerState(max_steps=max_steps, global_step=step, logging_steps=logging_steps)
    control = TrainerControl()
    LogLastStepCallback().on_step_end(ta, state, control)
    assert control.should_log is expect


def test_resume_keywords_any_case_and_hf_resume_from_checkpoint_true(tmp_path, capsys):
    from qwenvl.train import decide_resume

    out = tmp_path / "out"
    from test_runpolicy import write_checkpoint

    cp = write_checkpoint(out / "checkpoint-3", 3)
    assert decide_resume(str(out), "Auto", False) == str(cp)
    assert decide_resume(str(out), "NEVER", True) is None
    (out / "model.safetensors").write_bytes(b"x")
    # --resume_from_checkpoint True (as some scripts pass it) means resume=auto, not a folder named "True"
    rc, err = _main(["--model_name_or_path", str(tmp_path / "no-model"), "--dataset_dict", str(DICT),
                     "--tune_mm_llm", "True", "--output_dir", str(tmp_path / "fresh"), "--report_to", "none",
                     "--resume_from_checkpoint", "True"], capsys)
    assert rc == 2 and "does not exist" not in err and "no config.json" in err
    rc, err = _main(["--model_name_or_path", str(tmp_path / "no-model"), "--dataset_dict", str(DICT),
                     "--tune_mm_llm", "True", "--output_dir", str(out), "--report_to", "none",
                     "--resume_from_checkpoint", "false"], capsys)
    assert rc == 2 and "already holds a run" in err


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_zero3_style_doubled_keys_are_standardised(tmp_path, family):
    """ZeRO-3's gathered state dict goes through a second key conversion (Qwen2/2.5-VL: model.model.layers.*,
    Qwen3-VL: model.language_model.model.layers.*); the saved file must carry save_pretrained's key names."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    from qwenvl.tiny import tiny_config
    from qwenvl.trainer import standardise_checkpoint_keys

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(tiny_config(family))
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    with safe_open(str(plain / "model.safetensors"), "pt") as fh:
        expected = {k: fh.get_tensor(k) for k in fh.keys()}

    def doubled(k: str) -> str:
        for prefix in ("model.language_model.", "model.layers.", "model.embed_tokens.", "model.norm."):
            if k.startswith(prefix):
                head = "model.language_model." if prefix == "model.language_model." else "model."
                return head + "model." + k[len(head):]
        return k

    odd = tmp_path / "odd"
    odd.mkdir()
    save_file({doubled(k): v.contiguous() for k, v in expected.items()}, str(odd / "model.safetensors"),
              metadata={"format": "pt"})
    assert standardise_checkpoint_keys(odd, model)  # something was renamed
    with safe_open(str(odd / "model.safetensors"), "pt") as fh:
        assert set(fh.keys()) == set(expected)
        assert all(torch.equal(fh.get_tensor(k), expected[k]) for k in expected)


def test_deepspeed_cannot_resume_a_checkpoint_without_its_state(tmp_path):
    from qwenvl.train import UserError, check_resumable

    cp = tmp_path / "checkpoint-2"
    cp.mkdir()
    check_resumable(str(cp), None)  # without DeepSpeed: weights (+ optimizer.pt when present) suffice
    check_resumable(None, "configs/zero3.json")
    with pytest.raises(UserError, match="no DeepSpeed state"):
        check_resumable(str(cp), "configs/zero3.json")
    (cp / "global_step2").mkdir()
    check_resumable(str(cp), "configs/zero3.json")


def test_zero_epochs_and_less_than_one_batch_are_one_line(tmp_path, capsys):
    from types import SimpleNamespace

    from qwenvl.train import UserError, _check_dataset_size

    rc, err = _main(["--model_name_or_path", str(tmp_path / "no-model"), "--dataset_dict", str(DICT),
                     "--tune_mm_llm", "True", "--output_dir", str(tmp_path / "out"), "--report_to", "none",
                     "--num_train_epochs", "0"], capsys)
    assert rc == 2 and err.strip().splitlines() == [err.strip()] and "num_train_epochs 0" in err

    def args(batch, world, drop):
        return SimpleNamespace(per_device_train_batch_size=batch, world_size=world, dataloader_drop_last=drop)

    _check_dataset_size(14, args(32, 1, False))  # one short batch is still a batch
    _check_dataset_size(5, args(3, 2, True))  # 3 + 2 (the sampler pads to 3 each)
    with pytest.raises(UserError, match="fewer than one batch"):
        _check_dataset_size(14, args(32, 1, True))
    with pytest.raises(UserError, match="no samples"):
        _check_dataset_size(0, args(1, 1, False))


def test_report_to_wandb_without_a_key_is_refused_before_loading(tmp_path, monkeypatch):
    from qwenvl.train import UserError, _check_report_to

    for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED", "WANDB_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    empty = tmp_path / "netrc"
    empty.write_text("")
    empty.chmod(0o600)
    monkeypatch.setenv("NETRC", str(empty))
    with pytest.raises(UserError, match="no W&B API key"):
        _check_report_to(["wandb"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    _check_report_to(["wandb"])
    monkeypatch.delenv("WANDB_MODE")
    empty.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    _check_report_to(["wandb"])  # `wandb login` wrote the key
    empty.write_text("")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    _check_report_to(["wandb"])


def test_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    rc, err = _main(["--model_name_or_path", str(tmp_path / "no-model"), "--dataset_dict", str(DICT),
                     "--tune_mm_llm", "True", "--output_dir", str(tmp_path / "out"), "--report_to", "none"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "is a file" in err


_EXIT_SCRIPT = r"""
import atexit, os, sys, threading, time
import torch, torch.distributed as dist
from qwenvl import train

out = sys.argv[1]
mode = sys.argv[2]
dist.init_process_group("gloo", init_method="file://" + os.path.join(out, "store"), rank=0, world_size=1)
dist.all_reduce(torch.ones(4))
atexit.register(lambda: open(os.path.join(out, "atexit"), "w").write("ran"))
def late():
    time.sleep(0.5)
    open(os.path.join(out, "thread"), "w").write("joined")
threading.Thread(target=late).start()  # not a daemon: a normal exit waits for it

class Finalized:  # a destructor that only interpreter finalization would run
    def __del__(self, _open=open, _path=os.path.join(out, "finalized")):  # bound now: globals go at shutdown
        _open(_path, "w").write("yes")
keep = Finalized()
if mode == "done":
    train._teardown()
    code = 0
else:  # a failed rank: the group still alive
    code = 2
train._exit_now(code)
sys.exit(code)
"""


@pytest.mark.parametrize("mode", ["done", "failed"])
def test_a_rank_leaves_without_interpreter_finalization(tmp_path, mode):
    """A finished rank that had a process group: exit handlers run and threads are joined as in a normal exit, but
    no C++ destructor runs at finalization (where gloo's leftover work objects abort the process now and then:
    status 134 after a run that saved everything). A failed rank keeps its own status and skips the handlers."""
    import subprocess
    import sys

    script = tmp_path / "rank.py"
    script.write_text(_EXIT_SCRIPT)
    p = subprocess.run([sys.executable, str(script), str(tmp_path), mode], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert p.returncode == (0 if mode == "done" else 2), p.stderr[-2000:]
    assert not (tmp_path / "finalized").exists()  # left before finalization
    assert (tmp_path / "atexit").exists() == (mode == "done")
    if mode == "done":
        assert (tmp_path / "thread").read_text() == "joined"
