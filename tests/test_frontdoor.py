"""The front door catches before any rank starts what would fail inside the ranks (issue "trust", items 5, 6, 8
and 9): each bad config is ONE error line and exit 2 from `vlsft print-args` and from `vlsft train` (which
never starts torchrun for it), bounded YAML parsing, secrets never echoed, W&B mode precedence."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time

import pytest
from plan_fixtures import RUN_YAML, make_project

VLSFT = [sys.executable, "-m", "vlsft"]


def cli(args, env, timeout=60):
    return subprocess.run([*VLSFT, *args], capture_output=True, text=True, env=env, timeout=timeout)


def one_error(run) -> str:
    """The run failed with exit 2 and exactly one error line, no traceback."""
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    text = run.stdout + run.stderr
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if ": error: " in line or line.startswith("error:")]
    assert len(errors) == 1, text
    return errors[0]


def _bad_deepspeed(root):
    (root / "ds.json").write_text('{"zero_optimization": {"stage": 3},}\n')
    return ["distributed.deepspeed=ds.json"]


def _no_config_json(root):
    (root / "model" / "config.json").unlink()
    return []


def _unsupported_family(root):
    (root / "model" / "config.json").write_text('{"model_type": "llama"}')
    return []


CASES = {
    "deepspeed_not_json": (_bad_deepspeed, "ds.json:1:36 is not valid JSON"),
    "bf16_and_fp16": (lambda r: ["training.bf16=true", "training.extra.fp16=true"], "bf16 and fp16 are both on"),
    "report_to_typo": (lambda r: ["training.report_to=wandbb"], "[training.report_to] report_to 'wandbb' is not a "
                       "known integration (hint: did you mean 'wandb'?)"),
    "model_missing": (lambda r: [f"model.name_or_path={r / 'nowhere'}"], "is not a local directory"),
    "revision_of_a_folder": (lambda r: ["model.revision=main"], "model.revision main names a hub revision"),
    "model_without_config": (_no_config_json, "no config.json"),
    "model_unsupported": (_unsupported_family, "model_type 'llama' is not supported"),
    "nothing_trainable": (lambda r: ["model.tune_mm_mlp=false", "model.tune_mm_llm=false"], "nothing is trainable"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_print_args_refuses_what_the_ranks_would_fail_on(tmp_path, cli_env, case):
    make_overrides, needle = CASES[case]
    path = make_project(tmp_path)
    line = one_error(cli(["print-args", "--config", str(path), *make_overrides(tmp_path)], cli_env))
    assert needle in line, line


def test_train_refuses_the_same_before_launching(tmp_path, cli_env):
    path = make_project(tmp_path)
    for overrides in (["training.report_to=wandbb"], _bad_deepspeed(tmp_path)):
        start = time.perf_counter()
        run = cli(["train", "--config", str(path), *overrides], cli_env)
        one_error(run)
        assert time.perf_counter() - start < 30 and "torchrun" not in run.stdout
        assert not (tmp_path / "runs" / "first").exists()  # nothing written, nothing started


def test_wandb_online_without_a_key_is_refused(tmp_path, cli_env):
    path = make_project(tmp_path)
    (tmp_path / "netrc").write_text("")
    env = {k: v for k, v in cli_env.items() if not k.startswith("WANDB_")}
    env["NETRC"] = str(tmp_path / "netrc")
    line = one_error(cli(["print-args", "--config", str(path), "wandb.project=p"], env))
    assert "W&B is online but no API key" in line and "wandb.mode: offline" in line
    run = cli(["print-args", "--config", str(path), "wandb.project=p", "--json"], {**env, "WANDB_API_KEY": "k" * 40})
    assert run.returncode == 0 and json.loads(run.stdout)["env"]["WANDB_API_KEY"] == "***"


def test_wandb_mode_yaml_beats_environment_beats_default(tmp_path, cli_env):
    path = make_project(tmp_path)
    env = {k: v for k, v in cli_env.items() if not k.startswith("WANDB_")}

    def mode(overrides, **extra):
        run = cli(["print-args", "--config", str(path), "--json", *overrides], {**env, **extra})
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)["env"]["WANDB_MODE"]

    assert mode(["wandb.project=p"], WANDB_MODE="offline") == "offline"  # the user's offline is kept (no key)
    assert mode(["wandb.project=p", "wandb.mode=disabled"], WANDB_MODE="offline") == "disabled"  # YAML wins
    assert mode([], WANDB_MODE="offline") == "offline"
    assert mode([]) == "disabled"  # default without a project


def test_parser_bombs_are_one_line_and_fast(tmp_path, cli_env):
    path = make_project(tmp_path)
    base = path.read_text()
    deep = tmp_path / "deep.yaml"
    deep.write_text(base + "x-deep: " + "[" * 600 + "]" * 600 + "\n")
    line = one_error(cli(["print-args", "--config", str(deep)], cli_env))
    assert "nested more than 64 levels deep" in line and "deep.yaml:" in line
    rows = ["training:", "  extra:", "    l0: &l0 [x, x, x, x, x, x, x, x, x]"] + [
        f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(base.replace("training:\n", "training_:\n") + "\n".join(rows) + "\n")
    start = time.perf_counter()
    line = one_error(cli(["print-args", "--config", str(bomb)], cli_env))
    assert "aliases expand to" in line and time.perf_counter() - start < 10
    big = tmp_path / "big.yaml"
    big.write_text(base + "x-data: [" + ", ".join(["123456789"] * 5_000_000) + "]\n")  # ~50 MB
    start = time.perf_counter()
    line = one_error(cli(["print-args", "--config", str(big)], cli_env))
    assert "a run YAML is at most 1 MiB" in line and time.perf_counter() - start < 10
    line = one_error(cli(["print-args", "--config", str(path), "training.extra.x=" + "[" * 600 + "]" * 600], cli_env))
    assert "nested more than 64 levels" in line


def test_secret_values_never_echoed_on_error_paths(tmp_path, cli_env):
    value = f"sk-{secrets.token_hex(12)}"
    path = make_project(tmp_path)
    for override in (f"storage.secret_acces_key={value}", f"storage.sessoin_token={value}",
                     f"training.extra.hub_tokn={value}"):
        run = cli(["print-args", "--config", str(path), override], cli_env)
        assert run.returncode == 2 and value not in run.stdout + run.stderr, override
    typo = tmp_path / "typo.yaml"
    typo.write_text(path.read_text() + f"storage:\n  secret_acces_key: {value}\n")
    run = cli(["print-args", "--config", str(typo)], cli_env)
    assert run.returncode == 2 and value not in run.stdout + run.stderr and "secret_acces_key" in run.stderr


def test_secret_reached_through_a_reference_is_masked(tmp_path, cli_env):
    value = f"s3-{secrets.token_hex(12)}"
    path = make_project(tmp_path, run_yaml=RUN_YAML + "storage:\n  endpoint_url: ${AWS_SECRET_ACCESS_KEY}\n")
    env = {**cli_env, "AWS_SECRET_ACCESS_KEY": value}
    for extra in ([], ["--json"]):
        run = cli(["print-args", "--config", str(path), *extra], env)
        assert run.returncode == 0, run.stderr
        assert value not in run.stdout + run.stderr and "AWS_ENDPOINT_URL" in run.stdout


def test_pytorchjob_topology_is_taken_like_slurms(tmp_path, cli_env):
    no_dist = RUN_YAML.split("distributed:")[0] + "distributed:\n  deepspeed: none\noutput:\n  dir: runs/first\n"
    path = make_project(tmp_path, run_yaml=no_dist)
    env = {**cli_env, "PET_NNODES": "2", "PET_NPROC_PER_NODE": "4", "PET_NODE_RANK": "1",
           "PET_MASTER_ADDR": "trainer-master-0", "PET_MASTER_PORT": "23456"}
    run = cli(["print-args", "--config", str(path), "--json"], env)
    assert run.returncode == 0, run.stderr
    argv = json.loads(run.stdout)["torchrun"]
    got = {argv[i]: argv[i + 1] for i in range(1, len(argv) - 1) if argv[i].startswith("--")}
    assert {k: got[k] for k in ("--nnodes", "--nproc_per_node", "--node_rank", "--master_addr", "--master_port")} \
        == {"--nnodes": "2", "--nproc_per_node": "4", "--node_rank": "1", "--master_addr": "trainer-master-0",
            "--master_port": "23456"}
    text = cli(["print-args", "--config", str(path)], env).stdout
    assert "# From PyTorchJob (PET_*): distributed.nnodes=2" in text
    explicit = cli(["print-args", "--config", str(path), "--json", "distributed.nnodes=1", "distributed.node_rank=0"],
                   env)
    assert json.loads(explicit.stdout)["torchrun"][1:3] == ["--nnodes", "1"]  # the YAML / override wins


def test_child_environment_cannot_be_shadowed_and_caches_per_environment(tmp_path):
    from plan_fixtures import make_project as project

    from vlsft.plan import child_environment, extensions_cache, plan_from_file

    plan = plan_from_file(project(tmp_path / "p"), [], {})
    env = child_environment(plan.env, {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert env["PYTHONSAFEPATH"] == "1" and env["PYTHONUNBUFFERED"] == "1" and env["WANDB_MODE"] == "disabled"
    assert extensions_cache("/envs/a") != extensions_cache("/envs/b") and "/.cache/vlsft/" in extensions_cache()
    mine = child_environment(plan.env, {"TORCH_EXTENSIONS_DIR": "/x"})
    assert mine["TORCH_EXTENSIONS_DIR"] == "/x"  # the user's choice is kept
    official = tmp_path / "qwen-vl-finetune"  # an official checkout: its own qwenvl/ package, no train/__main__
    (official / "qwenvl" / "train").mkdir(parents=True)
    (official / "qwenvl" / "__init__.py").write_text("")
    (official / "qwenvl" / "train" / "__init__.py").write_text("")
    import os

    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a relative PYTHONPATH would mean the cwd
    run = subprocess.run([sys.executable, "-c", "import qwenvl.train, qwenvl; print(qwenvl.__file__)"],
                         cwd=official, capture_output=True, text=True, env={**base, **env}, timeout=120)
    assert run.returncode == 0 and str(official) not in run.stdout, run.stdout + run.stderr
    bare = subprocess.run([sys.executable, "-c", "import qwenvl; print(qwenvl.__file__)"], cwd=official,
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in base.items() if k != "PYTHONSAFEPATH"})
    assert str(official) in bare.stdout  # the negative control: without it the official folder wins
