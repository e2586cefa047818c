"""The launch plan: argv, environment, batch and step arithmetic, trap warnings, secrets."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from plan_fixtures import RUN_YAML, make_project

from qwenvl.problems import ProblemsError
from vlsft.config import load_run_config
from vlsft.plan import REPO_CONFIGS, build_plan, deepspeed_path, plan_from_file, render_value


def pairs(argv: list[str]) -> dict[str, str]:
    """``--name value`` pairs of a trainer argv (every option takes exactly one value)."""
    assert len(argv) % 2 == 0
    out = {}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        assert flag.startswith("--") and flag not in out, flag
        out[flag[2:]] = value
    return out


def plan_for(tmp_path: Path, overrides=(), environ=None, **project):
    return plan_from_file(make_project(tmp_path, **project), overrides, environ or {})


def test_plan_argv_and_paths(tmp_path):
    plan = plan_for(tmp_path)
    exe = Path(sys.executable).parent / "torchrun"
    assert plan.torchrun[0] == (str(exe) if exe.exists() else "torchrun")
    assert plan.torchrun[1:13] == ["--nnodes", "2", "--nproc_per_node", "8", "--node_rank", "0", "--master_addr",
                                   "10.1.2.3", "--master_port", "29500", "-m", "qwenvl.train"]
    assert plan.torchrun[13:] == plan.trainer_args
    args = pairs(plan.trainer_args)
    assert args["model_name_or_path"] == str(tmp_path / "model")
    assert args["dataset_dict"] == str(tmp_path / "data" / "dict.json")
    assert args["dataset_use"] == plan.dataset_use == "docs%50,charts%250"
    assert args["output_dir"] == str(tmp_path / "runs" / "first")
    assert args["learning_rate"] == "2e-05" and float(args["learning_rate"]) == 2e-5
    assert args["tune_mm_vision"] == "False" and args["tune_mm_mlp"] == "True" and args["tune_mm_llm"] == "True"
    assert args["max_pixels"] == "100352" and args["gradient_accumulation_steps"] == "4"
    assert args["resume"] == "auto" and args["overwrite_output_dir"] == "False"
    assert args["report_to"] == "none" and args["warmup_steps"] == "0" and args["save_steps"] == "500"
    assert args["seed"] == "42" and args["data_seed"] == "42" and args["data_flatten"] == "False"
    assert "deepspeed" not in args  # deepspeed: none
    assert plan.warnings == []
    assert plan.config.output.dir == args["output_dir"]  # the resolved config


def test_every_trainer_data_and_model_argument_is_passed(tmp_path):
    from qwenvl.arguments import ModelArguments
    from qwenvl.data.arguments import DataArguments

    # the HEAD video arguments default to None (= the family's own default) and are passed once set
    plan = plan_for(tmp_path, ["model.attn_implementation=sdpa", "data.video_fps=1", "data.video_max_pixels=1000000",
                               "data.video_min_pixels=3136"])
    args = pairs(plan.trainer_args)
    for dc in (ModelArguments, DataArguments):
        for f in dataclasses.fields(dc):
            if f.name in ("eval_dataset_use", "eval_split") and f.name not in args:
                continue  # eval arguments are passed only with eval data (tests/test_eval.py)
            if f.name == "chat_template" and f.name not in args:
                continue  # passed when model.chat_template is set, else detected (tests/test_print_args_chat.py)
            assert f.name in args, f"--{f.name} missing from the trainer argv"


def test_deepspeed_resolution(tmp_path):
    assert deepspeed_path("zero3", tmp_path) == str(REPO_CONFIGS / "zero3.json")
    assert REPO_CONFIGS == Path(__file__).resolve().parents[1] / "configs"
    assert deepspeed_path("none", tmp_path) is None
    assert deepspeed_path("ds/my.json", tmp_path) == str(tmp_path / "ds" / "my.json")
    (tmp_path / "my.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    plan = plan_for(tmp_path, ["distributed.deepspeed=my.json"])
    assert pairs(plan.trainer_args)["deepspeed"] == str(tmp_path / "my.json")
    with pytest.raises(ProblemsError) as info:
        plan_for(tmp_path, ["distributed.deepspeed=missing.json"])
    (line,) = [p.render() for p in info.value.problems]
    assert "[distributed.deepspeed] DeepSpeed config" in line and "missing.json not found" in line


def test_batch_formula_and_steps(tmp_path):
    plan = plan_for(tmp_path)
    assert plan.world_size == 16
    assert plan.effective_batch_size == 256
    assert plan.batch_formula == "effective batch = 4 × 4 × 8 × 2 = 256"
    assert [(s.name, s.records, s.samples) for s in plan.datasets] == [("docs", 1000, 500), ("charts", 300, 750)]
    assert plan.samples_per_epoch == 1250
    assert plan.steps_per_epoch == 5  # ceil(1250 / 256)
    assert plan.total_steps == 15  # 3 epochs (the transformers default)
    half = plan_for(tmp_path, ["training.num_train_epochs=0.5"])
    assert half.total_steps == 3  # ceil(0.5 x 5)
    fixed = plan_for(tmp_path, ["training.max_steps=7"])
    assert fixed.total_steps == 7
    solved = plan_for(tmp_path, ["training.gradient_accumulation_steps=null", "training.global_batch_size=128"])
    assert pairs(solved.trainer_args)["gradient_accumulation_steps"] == "2" and solved.steps_per_epoch == 10


@given(n=st.integers(1, 10**6), world=st.integers(1, 64), per_device=st.integers(1, 16), accum=st.integers(1, 32))
def test_hf_nested_ceil_equals_plan_formula(n, world, per_device, accum):
    """transformers: per-rank samples ceil(N/W) -> batches ceil(./B) -> steps ceil(./G); the plan uses ceil(N/WBG)."""
    per_rank = -(-n // world)
    batches = -(-per_rank // per_device)
    hf_steps = max(batches // accum + int(batches % accum > 0), 1)
    assert hf_steps == math.ceil(n / (world * per_device * accum))


def test_dataset_use_from_yaml_overrides_rates(tmp_path):
    plan = plan_for(tmp_path, ["data.use=[charts, docs%12.5]"])
    assert plan.dataset_use == "charts%250,docs%12.5"  # no percent -> the dictionary's rate
    assert plan.samples_per_epoch == 750 + 125


def test_unknown_dataset_name_points_at_yaml_line(tmp_path):
    path = make_project(tmp_path, run_yaml=RUN_YAML.replace("  max_pixels: 100352\n", "  use: [docs, chart]\n"))
    with pytest.raises(ProblemsError) as info:
        plan_from_file(path, (), {})
    (line,) = [p.render() for p in info.value.problems]
    assert line.startswith(f"{path}:8:15: error: [data.use[1]] dataset 'chart' is not in ")
    assert line.endswith("(hint: did you mean 'charts'?)")


def test_dictionary_errors_stop_the_plan(tmp_path):
    path = make_project(tmp_path)
    (tmp_path / "data" / "dict.json").write_text('{\n  "docs": {"annotation_path": "docs.jsonl", "sampleing_rate": 0.5},\n}\n')
    with pytest.raises(ProblemsError) as info:
        plan_from_file(path, (), {})
    lines = [p.render() for p in info.value.problems]
    assert any("dict.json:2:" in line and "sampleing_rate" in line and "sampling_rate" in line for line in lines)
    assert any("dict.json:3:" in line or "trailing comma" in line.lower() for line in lines), lines


def test_env_wandb_and_storage(tmp_path):
    environ = {"WANDB_API_KEY": "k-123", "MY_SECRET": "s-456", "MY_ID": "id-789"}
    run_yaml = RUN_YAML + ("wandb:\n  project: vl\n  entity: lab\n  mode: offline\n"
                           "storage:\n  endpoint_url: http://rgw:7480\n  addressing_style: path\n"
                           "  access_key_id: ${MY_ID}\n  secret_access_key: ${MY_SECRET}\n"
                           "  session_token: ${UNSET_TOKEN_VAR}\n")
    plan = plan_from_file(make_project(tmp_path, run_yaml=run_yaml), ["output.run_name=try1"], environ)
    assert plan.env == {"WANDB_MODE": "offline", "WANDB_PROJECT": "vl", "WANDB_ENTITY": "lab", "WANDB_API_KEY": "k-123",
                        "AWS_ENDPOINT_URL": "http://rgw:7480", "AWS_ACCESS_KEY_ID": "id-789",
                        "AWS_SECRET_ACCESS_KEY": "s-456", "VLSFT_S3_ADDRESSING_STYLE": "path"}
    shown = plan.display_env()
    assert shown["WANDB_API_KEY"] == shown["AWS_SECRET_ACCESS_KEY"] == shown["AWS_ACCESS_KEY_ID"] == "***"
    assert shown["AWS_ENDPOINT_URL"] == "http://rgw:7480"
    args = pairs(plan.trainer_args)
    assert args["report_to"] == "wandb" and args["run_name"] == "try1"
    assert any("${UNSET_TOKEN_VAR}" in w for w in plan.warnings)
    dumped = json.dumps(plan.to_json()) + plan.config.to_saveable_yaml()
    for secret in ("k-123", "s-456", "id-789"):
        assert secret not in dumped
    assert not any(secret in " ".join(plan.torchrun) for secret in ("k-123", "s-456", "id-789"))


def test_wandb_defaults(tmp_path):
    plan = plan_for(tmp_path, environ={"WANDB_API_KEY": "k"})
    assert plan.env == {"WANDB_MODE": "disabled"} and pairs(plan.trainer_args)["report_to"] == "none"
    online = plan_for(tmp_path, ["wandb.project=p"], {"WANDB_API_KEY": "k"})
    assert online.env["WANDB_MODE"] == "online" and pairs(online.trainer_args)["report_to"] == "wandb"


WARNING_CASES = {
    "low_lr": (["training.learning_rate=2e-7"], "2e-07 is tiny"),
    "vision_lr_frozen": (["training.vision_tower_lr=1e-6"], "vision_tower_lr is set but model.tune_mm_vision is false"),
    "projector_lr_frozen": (["training.mm_projector_lr=1e-5", "model.tune_mm_mlp=false"],
                            "mm_projector_lr is set but model.tune_mm_mlp is false"),
    "short_context": (["data.model_max_length=150"], "model_max_length 150 is below the 128 tokens"),
    "packing": (["data.packing=true"], "steps per epoch are an upper-bound estimate"),
}


@pytest.mark.parametrize("case", sorted(WARNING_CASES))
def test_each_warning(tmp_path, case):
    overrides, needle = WARNING_CASES[case]
    plan = plan_for(tmp_path, overrides)
    assert len(plan.warnings) == 1 and needle in plan.warnings[0], plan.warnings


def test_image_and_video_warning_needs_both(tmp_path):
    sizes = {"pics": (10, "image"), "clips": (10, "video")}
    mixed = plan_for(tmp_path / "a", ["model.tune_mm_vision=true"], sizes=sizes, rates={})
    assert any("mixes images and videos" in w for w in mixed.warnings)
    images_only = plan_for(tmp_path / "b", ["model.tune_mm_vision=true"], sizes={"pics": (10, "image")}, rates={})
    assert not any("mixes images and videos" in w for w in images_only.warnings)
    frozen = plan_for(tmp_path / "c", sizes=sizes, rates={})
    assert not any("mixes images and videos" in w for w in frozen.warnings)


def test_existing_run_warnings(tmp_path):
    run = tmp_path / "runs" / "first"
    (run / "checkpoint-1000").mkdir(parents=True)
    never = plan_for(tmp_path, ["output.resume=never"])
    assert any("already holds a run (checkpoint-1000)" in w and "new output.dir" in w for w in never.warnings)
    assert not plan_for(tmp_path, ["output.resume=never", "output.overwrite=true"]).warnings
    auto = plan_for(tmp_path)
    assert any("resume auto continues" in w for w in auto.warnings)
    explicit = plan_for(tmp_path, ["output.resume=runs/first/checkpoint-1000"])
    assert pairs(explicit.trainer_args)["resume"] == str(run / "checkpoint-1000")
    with pytest.raises(ProblemsError, match="checkpoint .*nope not found"):
        plan_for(tmp_path, ["output.resume=nope"])


def test_deepspeed_optimizer_block_warning(tmp_path):
    (tmp_path / "off.json").write_text(json.dumps({"optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"}}))
    plan = plan_for(tmp_path, ["distributed.deepspeed=off.json", "training.mm_projector_lr=1e-5"])
    assert any("defines its own optimizer" in w for w in plan.warnings)
    assert any("defines its own scheduler" in w for w in plan.warnings)


def test_extra_passed_through_and_rendering(tmp_path):
    plan = plan_for(tmp_path, ["training.extra.optim=adamw_torch_fused", "training.extra.adam_beta2=0.95",
                               "training.extra.tf32=true"])
    assert plan.trainer_args[-6:] == ["--optim", "adamw_torch_fused", "--adam_beta2", "0.95", "--tf32", "True"]
    assert [render_value(v) for v in (True, 1000.0, 2e-7, 0.03, 5, "x")] == ["True", "1000", "2e-07", "0.03", "5", "x"]


def test_rdzv_endpoint_replaces_master(tmp_path):
    plan = plan_for(tmp_path, ["distributed.rdzv_endpoint=head:29400", "output.run_name=r1"])
    launcher = plan.torchrun[: plan.torchrun.index("-m")]
    assert "--master_addr" not in launcher and launcher[-6:] == ["--rdzv_backend", "c10d", "--rdzv_endpoint",
                                                                 "head:29400", "--rdzv_id", "r1"]


def test_build_plan_leaves_input_config_untouched(tmp_path):
    cfg = load_run_config(make_project(tmp_path))
    before = cfg.model_dump()
    build_plan(cfg, {})
    assert cfg.model_dump() == before


SLURM = {"SLURM_JOB_ID": "9", "SLURM_NNODES": "4", "SLURM_NODEID": "3", "SLURM_JOB_NODELIST": "gpu[01,03-05]"}


def test_round2_multinode_needs_master_addr_unless_slurm(tmp_path):
    single = RUN_YAML.replace("  nnodes: 2\n  master_addr: 10.1.2.3\n", "")
    path = make_project(tmp_path, run_yaml=single)
    with pytest.raises(ProblemsError) as info:
        plan_from_file(path, ["distributed.nnodes=2"], {})
    (line,) = [p.render() for p in info.value.problems]
    assert "[distributed.master_addr] nnodes is 2 but distributed.master_addr is not set" in line
    assert "hint: set distributed.master_addr=" in line
    # one machine, no port or address chosen: torchrun --standalone takes a free port (two runs never collide)
    assert plan_from_file(path, [], {}).torchrun[1:7] == ["--nnodes", "1", "--nproc_per_node", "8", "--standalone",
                                                          "-m"]
    for chosen, port in (("distributed.master_port=29533", "29533"), ("distributed.master_addr=127.0.0.1", "29500")):
        assert plan_from_file(path, [chosen], {}).torchrun[5:11] == [  # a choice is kept: the static launch
            "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", port]
    plan = plan_from_file(path, [], SLURM)  # print-args shows what `vlsft train` runs under SLURM
    assert plan.torchrun[1:11] == ["--nnodes", "4", "--nproc_per_node", "8", "--node_rank", "3",
                                   "--master_addr", "gpu01", "--master_port", "29509"]
    assert plan.slurm == ["distributed.nnodes=4", "distributed.node_rank=3", "distributed.master_addr=gpu01",
                          "distributed.master_port=29509"]
    # a one-node SLURM job is one machine: --standalone, so two jobs sharing a node never fight over a port
    one = {"SLURM_JOB_ID": "9", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu07"}
    assert plan_from_file(path, [], one).torchrun[1:7] == ["--nnodes", "1", "--nproc_per_node", "8",
                                                           "--standalone", "-m"]
    assert plan_from_file(path, ["distributed.master_port=29533"], one).torchrun[5:11] == [
        "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", "29533"]  # a chosen port is kept
    assert plan_from_file(path, ["distributed.master_port=29533"], SLURM).torchrun[9:11] == ["--master_port",
                                                                                            "29533"]
    assert plan.world_size == 32 and plan.effective_batch_size == 4 * 4 * 8 * 4
    # explicit YAML/override values win over SLURM; an inconsistent result is an error, not a hang
    with pytest.raises(ProblemsError, match=r"node_rank 3 must be below nnodes 2 \(from SLURM\)"):
        plan_from_file(path, ["distributed.nnodes=2", "distributed.master_addr=h"], SLURM)
    assert plan_from_file(path, ["distributed.master_addr="], SLURM).torchrun[7:9] == ["--master_addr", "gpu01"]
    loop = plan_from_file(path, ["distributed.nnodes=2", "distributed.master_addr=localhost"], {})
    assert any("loopback" in w for w in loop.warnings)


def test_round2_rdzv_conflict_wandb_and_deepspeed_hints(tmp_path):
    plan = plan_for(tmp_path, ["distributed.rdzv_endpoint=head:29400"])
    assert any("distributed.master_addr is ignored" in w for w in plan.warnings)
    plan = plan_for(tmp_path, ["training.report_to=wandb"])
    assert any("W&B is disabled" in w for w in plan.warnings)
    for typed, hint in (("ZeRO3", "did you mean 'zero3'?"), ("zero-2", "did you mean 'zero2'?")):
        with pytest.raises(ProblemsError) as info:
            plan_for(tmp_path, [f"distributed.deepspeed={typed}"])
        assert hint in info.value.problems[0].render()


def test_round2_storage_references(tmp_path):
    from vlsft.plan import resolve_reference

    env = {"EP": "http://rgw:7480", "EMPTY": ""}
    assert resolve_reference("${EP}", env) == ("http://rgw:7480", "EP")
    assert resolve_reference("$EP", env) == ("http://rgw:7480", "EP")
    assert resolve_reference("${NOPE:-http://d}", env) == ("http://d", "NOPE")
    assert resolve_reference("${EMPTY:-x}", env) == ("x", "EMPTY")
    assert resolve_reference("${NOPE}", env) == (None, "NOPE")
    assert resolve_reference("http://plain", env) == ("http://plain", None)
    plan = plan_for(tmp_path, ["storage.endpoint_url=${EP:-http://fallback}", "storage.region=$REGION"],
                    {"REGION": "eu-1"})
    assert plan.env["AWS_ENDPOINT_URL"] == "http://fallback" and plan.env["AWS_DEFAULT_REGION"] == "eu-1"


@pytest.mark.parametrize("overrides, samples, per_epoch, total", [
    (["training.num_train_epochs=0.5"], 1250, 5, 3),  # 500 + 750 samples / (4 x 4 x 8 x 2 = 256)
    (["training.num_train_epochs=0.01"], 1250, 5, 1),
    (["training.num_train_epochs=2.5", "training.max_steps=7"], 1250, 5, 7),  # max_steps wins
    (["training.global_batch_size=256", "training.gradient_accumulation_steps=null"], 1250, 5, 15),
])
def test_round2_step_arithmetic(tmp_path, overrides, samples, per_epoch, total):
    plan = plan_for(tmp_path, overrides)
    assert (plan.samples_per_epoch, plan.steps_per_epoch, plan.total_steps) == (samples, per_epoch, total)


def test_round2_extra_list_becomes_several_tokens(tmp_path):
    plan = plan_for(tmp_path, ["training.extra={label_names: [labels, other], include_for_metrics: [], "
                               "lr_scheduler_kwargs: {min_lr: 1.0e-6}}"])
    i = plan.trainer_args.index("--label_names")
    assert plan.trainer_args[i:i + 4] == ["--label_names", "labels", "other", "--lr_scheduler_kwargs"]
    assert plan.trainer_args[i + 4] == '{"min_lr":1e-06}' and "--include_for_metrics" not in plan.trainer_args


def test_round2_output_dir_url_is_an_error(tmp_path):
    with pytest.raises(ProblemsError, match=r"\[output.dir\] output.dir s3://b/run is a URL"):
        plan_for(tmp_path, ["output.dir=s3://b/run"])


def test_round2_global_batch_resolved_after_slurm(tmp_path):
    yaml_text = RUN_YAML.replace("  nnodes: 2\n  master_addr: 10.1.2.3\n", "").replace(
        "  gradient_accumulation_steps: 4\n", "  global_batch_size: 128\n")
    path = make_project(tmp_path, run_yaml=yaml_text)
    assert pairs(plan_from_file(path, [], {}).trainer_args)["gradient_accumulation_steps"] == "4"
    plan = plan_from_file(path, [], SLURM)  # 4 nodes: 128 / (4 x 8 x 4) = 1
    assert pairs(plan.trainer_args)["gradient_accumulation_steps"] == "1" and plan.effective_batch_size == 128
    with pytest.raises(ProblemsError, match=r"global_batch_size 128 is not a multiple of .* = 256 \(from SLURM\)"):
        plan_from_file(path, ["training.per_device_train_batch_size=8"], SLURM)


def test_round2_resume_relative_to_output_dir_and_urls(tmp_path):
    (tmp_path / "runs" / "first" / "checkpoint-7").mkdir(parents=True)
    plan = plan_for(tmp_path, ["output.resume=checkpoint-7"])
    assert pairs(plan.trainer_args)["resume"] == str(tmp_path / "runs" / "first" / "checkpoint-7")
    for value, message in (("checkpoint-8", "checkpoint-8 not found"), ("s3://b/checkpoint-7", "is a URL")):
        with pytest.raises(ProblemsError, match=message):
            plan_for(tmp_path, [f"output.resume={value}"])


def test_round2_secret_value_masked_under_any_variable(tmp_path):
    plan = plan_for(tmp_path, ["storage.endpoint_url=${AWS_SECRET_ACCESS_KEY}",
                               "storage.secret_access_key=${AWS_SECRET_ACCESS_KEY}"], {"AWS_SECRET_ACCESS_KEY": "s3cr"})
    assert plan.env["AWS_ENDPOINT_URL"] == "s3cr" and "s3cr" not in json.dumps(plan.to_json())


def test_round2_output_dir_blocked_by_a_file_and_unwritable(tmp_path):
    from typer.testing import CliRunner

    from vlsft.cli import app

    (tmp_path / "afile").write_text("x")
    for value in ("afile", "afile/sub"):
        with pytest.raises(ProblemsError, match=f"cannot be a folder: {tmp_path / 'afile'} is a file"):
            plan_for(tmp_path, [f"output.dir={value}"])
    path = make_project(tmp_path)
    if Path("/proc/self").is_dir():  # Linux: nothing can be created under /proc
        result = CliRunner().invoke(app, ["train", "--config", str(path), "output.dir=/proc/vlsft-nope"])
        assert result.exit_code == 2 and result.exception is None or isinstance(result.exception, SystemExit)
        assert "error: cannot write the run files into output.dir /proc/vlsft-nope" in result.output
        assert "Traceback" not in result.output


def test_round2_unknown_attention_warns_with_suggestion(tmp_path):
    plan = plan_for(tmp_path, ["model.attn_implementation=flash_attention2"])
    assert any("'flash_attention2' is not one transformers knows" in w and "did you mean 'flash_attention_2'" in w
               for w in plan.warnings)
    assert not any("attn_implementation" in w for w in plan_for(tmp_path, ["model.attn_implementation=sdpa"]).warnings)


@pytest.mark.parametrize("override", ["training.seed=-1", "training.seed=4294967296", "data.seed=-5"])
def test_a_seed_out_of_range_is_refused_by_the_plan(tmp_path, override):
    path = make_project(tmp_path)
    with pytest.raises(ProblemsError) as info:
        plan_from_file(path, [override], {})
    (line,) = [p.render() for p in info.value.problems]
    assert override.split("=")[0] in line and ("greater than or equal to 0" in line or "less than or equal" in line)


def test_output_dir_that_is_the_model_folder_is_refused(tmp_path):
    """The final save would write over the weights the run starts from (a user 'continuing in place')."""
    path = make_project(tmp_path)
    for out in ("model", str(tmp_path / "model"), str(tmp_path / "data" / ".." / "model")):
        with pytest.raises(ProblemsError) as info:
            plan_from_file(path, [f"output.dir={out}"], {})
        (line,) = [p.render() for p in info.value.problems]
        assert "[output.dir]" in line and "is the model folder the run starts from" in line
    (tmp_path / "link").symlink_to(tmp_path / "model")
    with pytest.raises(ProblemsError, match="is the model folder"):
        plan_from_file(path, [f"output.dir={tmp_path / 'link'}"], {})
    plan_from_file(path, [f"output.dir={tmp_path / 'model-ft'}"], {})  # beside it: fine


def test_overwrite_refuses_a_model_inside_the_output_dir(tmp_path):
    """output.overwrite sets the earlier run aside: a model.name_or_path inside it (say its checkpoint-4) would move
    away before it loads."""
    path = make_project(tmp_path)
    out = tmp_path / "out"
    (out / "checkpoint-4").mkdir(parents=True)
    for f in (tmp_path / "model").iterdir():
        (out / "checkpoint-4" / f.name).write_bytes(f.read_bytes())
    args = [f"output.dir={out}", f"model.name_or_path={out / 'checkpoint-4'}", "output.resume=never"]
    with pytest.raises(ProblemsError) as info:
        plan_from_file(path, [*args, "output.overwrite=true"], {})
    (line,) = [p.render() for p in info.value.problems]
    assert "[output.overwrite]" in line and "is inside output.dir" in line


def test_a_relaunch_keeps_the_earlier_run_record(tmp_path):
    """vlsft train saves run.yaml / launch.sh / the dictionary copy at each launch: a resume with other settings
    moves the earlier launch's record to vlsft/launches/<time>/ instead of writing over it."""
    from vlsft.cmd_train import save_run_files

    path = make_project(tmp_path)
    out = tmp_path / "out"
    save_run_files(plan_from_file(path, ["training.learning_rate=0.001"], {}), out, str(path),
                   ["training.learning_rate=0.001"])
    save_run_files(plan_from_file(path, ["training.learning_rate=0.05"], {}), out, str(path),
                   ["training.learning_rate=0.05"])
    save_run_files(plan_from_file(path, ["training.learning_rate=0.07"], {}), out, str(path), [])
    assert "learning_rate: 0.07" in (out / "vlsft" / "run.yaml").read_text()
    earlier = sorted((out / "vlsft" / "launches").iterdir())
    assert len(earlier) == 2
    texts = sorted((e / "run.yaml").read_text() for e in earlier)
    assert any("learning_rate: 0.001" in t for t in texts) and any("learning_rate: 0.05" in t for t in texts)
    assert all(sorted(p.name for p in e.iterdir()) == sorted(["run.yaml", "launch.sh", "dataset_use.txt",
                                                              "Dataset-Dictionary.json"]) for e in earlier)


def test_overwrite_with_resume_auto_over_a_checkpoint_says_it_does_nothing(tmp_path):
    path = make_project(tmp_path)
    (tmp_path / "out" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    plan = plan_from_file(path, [f"output.dir={tmp_path / 'out'}", "output.overwrite=true"], {})
    assert any("overwrite does nothing" in w and "output.resume: never" in w for w in plan.warnings), plan.warnings
