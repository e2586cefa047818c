"""Shared fixtures. Helpers: keep fixtures here small and append-only; heavy ones in their own modules."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN_ROOT = REPO / "tests" / "golden"  # in the repository: the suite needs nothing beside the checkout
GOLDEN = GOLDEN_ROOT / "official-qwen25"
CACHE = REPO / ".cache"

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on the cores: one OpenMP thread per
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # process (and its children) instead of threads spinning on both


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.exists():
        pytest.fail(f"golden data missing at {GOLDEN}: it ships with the repository (tests/golden/); "
                    "restore it with git")
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A tiny random Qwen2.5-VL with the real Qwen tokenizer, built once per machine (no hub)."""
    from qwenvl.tiny import ensure_tiny_model

    return ensure_tiny_model(CACHE / "tiny-qwen2_5_vl")


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """The rebuilt Qwen2.5-VL tokenizer + image-processor config (golden README recipe)."""
    from qwenvl.tiny import build_tokenizer_dir

    out = CACHE / "qwen25vl-tokenizer"
    if not (out / "chat_template.jinja").exists():  # its last file: a folder with it is complete
        tmp = CACHE / f".qwen25vl-tokenizer-{os.getpid()}"  # built aside, then renamed: a parallel worker never
        build_tokenizer_dir(tmp)                           # reads a half-written tokenizer.json
        try:
            tmp.rename(out)
        except OSError:  # another worker's finished folder is already there
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@pytest.fixture()
def cli_env(tmp_path) -> dict:
    """Environment for running the real `vlsft` command in a subprocess."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(CACHE / "torch_extensions"))
    env["WANDB_MODE"] = "disabled"
    return env


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir) -> dict:
    """One 2-rank ZeRO-3 packing run with eval data, shared by test_eval and test_chat_predict (eval_fixtures)."""
    from eval_fixtures import make_trained_run
    from runs import shared_run

    return shared_run(tmp_path_factory, "evalrun", lambda root: make_trained_run(root, tiny_model_dir))


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory, tiny_model_dir) -> dict:
    """One 8-step 2-rank ZeRO-3 full fine-tuning run over the demo data (runs.py), shared by every test reading it."""
    from runs import make_e2e_run, shared_run

    return shared_run(tmp_path_factory, "e2e", lambda root: make_e2e_run(root, tiny_model_dir))


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, tiny_model_dir) -> dict:
    """One 6-step 2-rank ZeRO-3 LoRA run over the demo data (runs.py), shared by every test reading it."""
    from runs import make_lora_run, shared_run

    return shared_run(tmp_path_factory, "lora-e2e", lambda root: make_lora_run(root, tiny_model_dir))
