"""Hub ids as model.name_or_path (issue 23 item 4), against a hub served on loopback (tests/hub_server.py) that
serves the tiny Qwen2.5-VL as ``Qwen/Qwen2.5-VL-7B-Instruct`` and refuses requests without the token:

* print-args answers without a download: the family from a cached config.json, else from the id (said so), the
  memory estimate "unknown until downloaded"; nothing reaches the hub;
* ``vlsft train`` downloads into the standard HF cache (HF_HOME, HF_ENDPOINT, HF_TOKEN), plans from the snapshot and
  saves run.yaml pinned to the commit; offline it uses the cache, and offline without the files it stops in one line;
* the token appears in no output and no saved file.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import LoopbackHub
from plan_fixtures import make_project

from qwenvl import hub as H
from qwenvl.families import family_from_hub_id

REPO = Path(__file__).resolve().parents[1]
VLSFT = [sys.executable, "-m", "vlsft"]
QWEN = "Qwen/Qwen2.5-VL-7B-Instruct"
TOKEN = "hf_" + secrets.token_hex(16)


def cli(args, env, timeout=120, cwd=None):
    return subprocess.run([*VLSFT, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


def error_lines(run) -> list[str]:
    text = run.stdout + run.stderr
    assert "Traceback" not in text, text
    return [line for line in text.splitlines() if ": error: " in line or line.startswith("error:")]


@pytest.fixture(scope="module")
def hub(tiny_model_dir):
    with LoopbackHub(token=TOKEN) as server:
        server.commit = server.add(QWEN, tiny_model_dir)
        yield server


@pytest.fixture()
def env(hub, tmp_path, cli_env):
    e = {k: v for k, v in cli_env.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_OFFLINE"))}
    e.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN,
             NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return e


def cached(env) -> str:
    """Download QWEN into env's cache (in this process, as `vlsft train` does); the snapshot folder."""
    return H.download(QWEN, None, env)


# ------------------------------------------------------------------------------------------- ids, cache, families

@pytest.mark.parametrize(("name", "hub_id"), [
    ("Qwen/Qwen2.5-VL-7B-Instruct", True), ("my-org/model.v2_final", True), ("model", False), ("a/b/c", False),
    ("/models/qwen", False), ("./models", False), ("org/-x", False), ("org/x--y", False), ("org/x..y", False),
    ("org/x.git", False), ("org/x@main", False), ("~/x", False)])
def test_hub_ids_as_the_hub_spells_them(name, hub_id):
    assert H.is_hub_id(name) is hub_id


@pytest.mark.parametrize(("repo_id", "model_type"), [
    ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl"), ("Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl"),
    ("Qwen/QVQ-72B-Preview", "qwen2_vl"), ("Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl"),
    ("Qwen/Qwen3-VL-30B-A3B-Instruct", "qwen3_vl_moe"), ("Qwen/Qwen3-VL-235B-A22B-Thinking", "qwen3_vl_moe"),
    ("Qwen/Qwen3.5-9B", "qwen3_5"), ("Qwen/Qwen3.5-35B-A3B", "qwen3_5_moe"), ("Qwen/Qwen3.8-27B", "qwen3_5"),
    ("unsloth/qwen2.5-vl-3b-instruct-bnb-4bit", "qwen2_5_vl"), ("Qwen/Qwen3-VL-8B-Instruct-AWQ", "qwen3_vl"),
    ("Qwen/Qwen3-8B", None), ("meta-llama/Llama-3.2-11B-Vision", None)])
def test_the_family_a_hub_id_names(repo_id, model_type):
    fam = family_from_hub_id(repo_id)
    assert (fam.model_type if fam else None) == model_type


@pytest.mark.parametrize("extra", [{}, {"HF_HOME": "/srv/hf"}, {"XDG_CACHE_HOME": "/xdg"},
                                   {"HF_HOME": "~/hf", "HF_HUB_CACHE": "/fast/hub"},
                                   {"HUGGINGFACE_HUB_CACHE": "/legacy/hub"}])
def test_the_cache_folder_is_huggingface_hubs(extra):
    """qwenvl.hub reads the cache without importing huggingface_hub: the same folder as its constants."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "XDG_"))} | extra
    probe = "import huggingface_hub.constants as c; print(c.HF_HUB_CACHE)"
    theirs = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert theirs.stdout.strip() == H.cache_dir(env)
    assert H.offline({"HF_HUB_OFFLINE": "1"}) and H.offline({"TRANSFORMERS_OFFLINE": "yes"}) and not H.offline({})


def test_locate_agrees_with_huggingface_hub(hub, env):
    from huggingface_hub import try_to_load_from_cache

    assert H.locate(QWEN, None, env).folder is None and not H.locate(QWEN, None, env).complete
    folder = cached(env)
    for revision in (None, "main", hub.commit):
        found = H.locate(QWEN, revision, env)
        theirs = try_to_load_from_cache(QWEN, "config.json", cache_dir=H.cache_dir(env), revision=revision)
        assert found.folder == folder == os.path.dirname(theirs) and found.commit == hub.commit
        assert found.complete and found.missing == 0
    assert H.locate(QWEN, "v2", env).folder is None  # a revision never downloaded
    os.unlink(os.path.join(folder, "merges.txt"))  # an interrupted download: the listing knows
    partial = H.locate(QWEN, None, env)
    assert partial.missing == 1 and not partial.complete and "partly" in partial.state()
    with pytest.raises(H.HubError) as exc:  # offline, the incomplete snapshot is refused in one line
        H.download(QWEN, None, {**env, "HF_HUB_OFFLINE": "1"})
    assert "holds an incomplete snapshot" in str(exc.value) and "\n" not in str(exc.value)


# ------------------------------------------------------------------------------------------------ print-args

def test_print_args_with_an_uncached_id_downloads_nothing(hub, env, tmp_path):
    path = make_project(tmp_path)
    before = len(hub.requests)
    run = cli(["print-args", "--config", str(path), f"model.name_or_path={QWEN}"], env)
    assert run.returncode == 0, run.stderr
    text = run.stdout + run.stderr
    assert f"# Model: hub id {QWEN}, revision main: not in the Hugging Face cache ({tmp_path / 'hf-home' / 'hub'})" in text
    assert "family read from the id, not from a config.json" in text and "Qwen2.5-VL" in text
    assert "unknown until downloaded" in text and "the token in HF_TOKEN (masked)" in text
    assert f"--model_name_or_path {QWEN}" in text.replace(" \\\n  ", " ")
    run = cli(["print-args", "--config", str(path), f"model.name_or_path={QWEN}", "--json"], env)
    plan = json.loads(run.stdout)
    assert plan["family"] == "qwen2_5_vl" and plan["family_from_id"] and plan["memory_gib"] is None
    assert plan["model"]["hub_id"] == QWEN and not plan["model"]["complete"] and plan["model"]["token"] == "HF_TOKEN"
    assert len(hub.requests) == before, hub.requests[before:]  # not one request reached the hub
    assert not (tmp_path / "hf-home").exists()  # nor was anything written into the cache
    assert TOKEN not in text + run.stdout + run.stderr


def test_print_args_with_a_hub_id_stays_light(env, tmp_path):
    """The cache is read without huggingface_hub's download modules (~0.4 s of imports), torch or transformers."""
    path = make_project(tmp_path)
    probe = ("import sys\nfrom vlsft.cli import main\nsys.argv = ['vlsft', 'print-args', '--config', sys.argv[1], "
             f"'model.name_or_path={QWEN}']\ntry:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
             "heavy = [m for m in ('torch', 'transformers', 'huggingface_hub.file_download', 'httpx') "
             "if m in sys.modules]\nprint('PROBE', code, heavy)")
    run = subprocess.run([sys.executable, "-c", probe, str(path)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.stdout.splitlines()[-1] == "PROBE 0 []", run.stdout[-2000:] + run.stderr


def test_print_args_reads_a_cached_config_json(hub, env, tmp_path):
    folder = cached(env)
    path = make_project(tmp_path)
    before = len(hub.requests)
    for offline in ("0", "1"):
        run = cli(["print-args", "--config", str(path), f"model.name_or_path={QWEN}"],
                  {**env, "HF_HUB_OFFLINE": offline})
        assert run.returncode == 0, run.stderr
        text = run.stdout.replace(" \\\n  ", " ")
        assert f"in the Hugging Face cache at commit {hub.commit[:10]}" in text
        assert "config.json model_type qwen2_5_vl" in text and "read from the id" not in text
        assert f"--model_name_or_path {folder}" in text and "GPU memory per rank" in text
        assert ("HF_HUB_OFFLINE is on" in text) == (offline == "1")
    assert len(hub.requests) == before


def test_an_unknown_name_is_read_as_a_hub_id_with_a_warning(env, tmp_path):
    path = make_project(tmp_path)
    run = cli(["print-args", "--config", str(path), "model.name_or_path=models/qwen-typo"], env)
    assert run.returncode == 0, run.stderr
    assert "models/qwen-typo is not a folder" in run.stdout and "its family is unknown" in run.stdout


def test_revision_of_a_folder_is_refused(env, tmp_path):
    path = make_project(tmp_path)
    run = cli(["print-args", "--config", str(path), "model.revision=v1"], env)
    assert run.returncode == 2 and "model.revision v1 names a hub revision" in error_lines(run)[0]


# ----------------------------------------------------------------------------------------------------- train

def test_train_offline_and_not_cached_is_one_line(hub, env, tmp_path):
    path = make_project(tmp_path)
    before = len(hub.requests)
    run = cli(["train", "--config", str(path), f"model.name_or_path={QWEN}"], {**env, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2, run.stdout + run.stderr
    (line,) = error_lines(run)
    assert f"{QWEN} (revision main) is not in the Hugging Face cache" in line and "HF_HUB_OFFLINE is on" in line
    assert f"`hf download {QWEN}`" in line
    assert len(hub.requests) == before and not (tmp_path / "runs").exists()  # nothing asked, nothing written


@pytest.mark.parametrize(("override", "needle"), [
    (f"model.name_or_path={QWEN}-Nope", "was not found on http://127.0.0.1:"),
    ("model.revision=v9", "has no revision 'v9'"),
])
def test_train_names_a_hub_failure_in_one_line(env, tmp_path, override, needle):
    path = make_project(tmp_path)
    run = cli(["train", "--config", str(path), f"model.name_or_path={QWEN}", override], env)
    assert run.returncode == 2
    (line,) = error_lines(run)
    assert needle in line and TOKEN not in run.stdout + run.stderr
    assert ("(sent: the token in HF_TOKEN)" in line) == ("Nope" in override)


def test_offline_with_the_files_cached_plans_from_the_snapshot(hub, env, tmp_path):
    """What `vlsft train` does before launching, offline: no request, the ranks get the snapshot folder."""
    from vlsft.cmd_train import fetch_hub_model, saved_config
    from vlsft.config import load_run_config
    from vlsft.plan import build_plan

    folder = cached(env)
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    cfg = load_run_config(make_project(tmp_path), [f"model.name_or_path={QWEN}"])
    before = len(hub.requests)
    assert fetch_hub_model(build_plan(cfg, offline).hub, offline) == folder
    plan = build_plan(cfg, offline)
    assert len(hub.requests) == before
    assert plan.trainer_args[plan.trainer_args.index("--model_name_or_path") + 1] == folder
    assert plan.family == "qwen2_5_vl" and not plan.family_from_id and plan.memory is not None
    saved = saved_config(plan)
    assert (saved.model.name_or_path, saved.model.revision) == (QWEN, hub.commit)  # portable, pinned


@pytest.mark.slow
def test_train_from_a_hub_id_end_to_end(hub, env, tmp_path):
    """A real `vlsft train` (one rank, no DeepSpeed, 2 steps) from the hub id: downloaded with the token, trained
    from the snapshot, run.yaml pinned to the commit, and the token in no output and no file."""
    out = tmp_path / "out"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""# vlsft test: train from a hub id (loopback hub)
model: {{name_or_path: {QWEN}, tune_mm_mlp: true, tune_mm_llm: true, attn_implementation: sdpa}}
data: {{dictionary: {REPO / 'configs' / 'demo' / 'Dataset-Dictionary.json'}, use: [shapes, facts], max_pixels: 12544,
        min_pixels: 3136, model_max_length: 512}}
training: {{learning_rate: 1.0e-3, per_device_train_batch_size: 1, max_steps: 2, logging_steps: 1, save_steps: 100,
           report_to: none}}
distributed: {{nproc_per_node: 1, master_port: 29751, deepspeed: none}}
output: {{dir: {out}}}
""")
    run = cli(["train", "--config", str(cfg)], env, timeout=480, cwd=tmp_path)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-5000:]
    folder = H.locate(QWEN, None, env).folder
    assert folder and f"# model: {QWEN} (revision main) is in {folder}" in log and "Fetching" in log  # progress
    assert (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file()
    # the token went with every request for the model (huggingface_hub's own once-a-day GET /api/agent-harnesses,
    # best-effort telemetry for its user agent, is not one)
    asked = [r for r in hub.requests if QWEN in r[1]]
    assert asked and all(authorized for _, _, authorized in asked), hub.requests
    saved = (out / "vlsft" / "run.yaml").read_text()
    assert f"name_or_path: {QWEN}" in saved and f"revision: {hub.commit}" in saved
    assert folder in (out / "vlsft" / "launch.sh").read_text()
    files = [p for root in (out, tmp_path / "hf-home") for p in root.rglob("*") if p.is_file()]
    assert TOKEN not in log
    for p in files:
        assert TOKEN.encode() not in p.read_bytes(), p
    shutil.rmtree(tmp_path / "hf-home")
