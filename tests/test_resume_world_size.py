"""Resume on a different world size (issue 21 item 4): qwenvl.reshard (DeepSpeed universal conversion) and
qwenvl.data.position (the data position kept in samples).

Fast: the default stream is what accelerate deals each rank; simulated resumes over many geometry changes train
every sample of the epoch exactly once, in the uninterrupted run's order; the record; the conversion's refusals.
Slow, through the real CLI on CPU (tiny model, 24 text records): ZeRO-3 2 ranks -> 1 rank -> 2 ranks (the same
per-sample order as the uninterrupted run, the same loss where the step holds the same samples, a partial first
step when the new batch does not divide the position), ZeRO-2 + packing_rows 2 -> 1 (every sample of the epoch
once, the epoch-based step total) and plain DDP 2 -> 1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from qwenvl.data import position
from qwenvl.problems import UserError

REPO = Path(__file__).resolve().parents[1]
VLSFT = str(Path(sys.executable).with_name("vlsft"))


# ---------------------------------------------------------------------------------------------------
# fast: the streams
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,pd,world,drop", [(24, 1, 2, False), (23, 2, 3, False), (10, 3, 2, True), (7, 1, 1, False),
                                             (5, 4, 2, False)])
def test_random_stream_is_what_accelerate_deals_each_rank(n, pd, world, drop):
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader, RandomSampler

    for epoch in (0, 1):
        per_rank = []
        for r in range(world):
            dl = DataLoader(list(range(n)), batch_size=pd, sampler=RandomSampler(range(n)), drop_last=drop,
                            collate_fn=lambda b: b)
            shard = prepare_data_loader(dl, num_processes=world, process_index=r, use_seedable_sampler=True,
                                        data_seed=42, put_on_device=False)
            shard.set_epoch(epoch)
            per_rank.append(list(shard))
        want = [per_rank[r][k] for k in range(len(per_rank[0])) for r in range(world)]
        assert position.random_stream(n, pd, world, drop, 42, epoch) == want


def test_random_stream_deals_the_end_of_an_epoch_as_batch_sampler_shard_does():
    import itertools

    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    for n, pd, world, drop in itertools.product(range(1, 26), (1, 2, 3, 5), (2, 3, 4), (False, True)):
        batches = BatchSampler(position.random_order(n, 1, 0), pd, drop)
        per_rank = [list(BatchSamplerShard(batches, num_processes=world, process_index=r)) for r in range(world)]
        want = [list(per_rank[r][k]) for k in range(len(per_rank[0])) for r in range(world)]
        assert position.random_stream(n, pd, world, drop, 1, 0) == want, (n, pd, world, drop)


def consumed(streams: position.EpochStreams, epoch: int, skip: int) -> list[list[int]]:
    """The samples of each optimizer step the Trainer takes from ``epoch``'s stream after ``skip`` batches."""
    stream, u = streams.stream(epoch), streams.geometry.unit
    return [[i for b in stream[s:s + u] for i in b] for s in range(skip, len(stream), u)]


GEOMETRIES = [(2, 1, 1), (1, 1, 2), (1, 3, 1), (2, 2, 1), (3, 1, 2), (4, 1, 1), (1, 1, 1)]


@pytest.mark.parametrize("old", GEOMETRIES)
@pytest.mark.parametrize("new", GEOMETRIES)
def test_simulated_resume_trains_every_sample_once_in_the_same_order(old, new):
    n = 24
    g_old, g_new = position.Geometry(*old), position.Geometry(*new)
    before = position.random_streams(g_old, n, seed=42, drop_last=False)
    order = position.random_order(n, 42, 0)
    for steps in range(1, len(consumed(before, 0, 0))):
        epoch, done = before.done_after(0, steps)
        taken = [i for s in consumed(before, 0, 0)[:steps] for i in s]
        assert epoch == 0 and sorted(np.flatnonzero(done)) == sorted(set(taken))
        after = position.random_streams(g_new, n, seed=42, drop_last=False)
        skip = after.resume(0, done)
        rest = consumed(after, 0, skip)
        assert skip % g_new.unit == 0 and all(rest), "no optimizer step without a sample"
        flat = [i for s in rest for i in s]
        assert taken + flat == order, (steps, taken, flat)  # every sample once, in the uninterrupted order
        assert after.step_sizes(0) == [len(x) for x in rest]


def test_same_geometry_resume_is_the_uninterrupted_stream():
    g = position.Geometry(2, 2, 2)
    streams = position.random_streams(g, 23, seed=7, drop_last=False)
    uninterrupted = consumed(streams, 1, 0)
    epoch, done = streams.done_after(1, 2)
    again = position.random_streams(g, 23, seed=7, drop_last=False)
    skip = again.resume(epoch, done)
    assert skip == 2 * g.unit and consumed(again, 1, skip) == uninterrupted[2:]
    assert streams.done_after(1, len(uninterrupted))[0] == 2  # a finished epoch: the next one, nothing done


def test_token_budget_resume_on_another_world_size_trains_every_sample_once():
    from qwenvl.data.length_sampler import TokenBudgetBatchSampler

    rng = np.random.default_rng(3)
    lengths = rng.integers(20, 300, size=200)
    old = TokenBudgetBatchSampler(lengths, row_capacity=512, rows_per_step=2, world_size=2, seed=5)
    before = position.token_budget_streams(position.Geometry(2, 1, 1, 2, 512), old)
    for steps in (1, 5, 11):
        epoch, done = before.done_after(0, steps)
        new = TokenBudgetBatchSampler(lengths, row_capacity=512, rows_per_step=1, world_size=3, seed=5)
        after = position.token_budget_streams(position.Geometry(3, 1, 2, 1, 512), new)
        skip = after.resume(epoch, done)
        flat = [i for s in consumed(after, 0, skip) for i in s]
        assert sorted(flat + np.flatnonzero(done).tolist()) == list(range(200))
        assert all(consumed(after, 0, skip))


def test_record_round_trip_and_problems(tmp_path):
    done = np.zeros(1001, dtype=bool)
    done[[0, 5, 1000]] = True
    rec = position.make_record(position.Geometry(2, 1, 4), global_step=7, epoch=1, done=done, order="random",
                               seed=42)
    position.write_record(tmp_path, rec)
    back = position.read_record(tmp_path)
    assert back == json.loads(json.dumps(rec)) and back["trained_in_epoch"] == 3
    assert np.array_equal(position.decode_mask(back["trained"], 1001), done)
    assert position.record_problem(back, 1001) is None
    assert "1,001 samples per epoch then and has 999 now" in position.record_problem(back, 999)
    assert position.read_record(tmp_path / "nothing") is None
    assert position.Geometry(2, 1, 4).describe() == "8 samples per step (2 ranks x 1 per device x 4 accumulation)"


# ---------------------------------------------------------------------------------------------------
# fast: the conversion's decisions and refusals
# ---------------------------------------------------------------------------------------------------
def fake_deepspeed_checkpoint(d: Path, ranks: list[int], world: int | None = None) -> Path:
    tag = d / "global_step4"
    tag.mkdir(parents=True)
    (d / "latest").write_text("global_step4")
    (d / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": []}))
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    for r in ranks:
        (tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"not a checkpoint")
    if world:
        (d / position.RECORD).write_text(json.dumps({"version": 1, "world_size": world}))
    return d


def args(tmp_path, world: int, rank: int = 0, deepspeed="configs/zero2.json"):
    return SimpleNamespace(deepspeed=deepspeed, world_size=world, process_index=rank, output_dir=str(tmp_path / "out"),
                           hf_deepspeed_config=SimpleNamespace(config={}), deepspeed_plugin=None)


def test_world_size_of_a_checkpoint_and_no_conversion_when_it_matches(tmp_path):
    from qwenvl import reshard

    ckpt = fake_deepspeed_checkpoint(tmp_path / "checkpoint-4", [0, 1])
    assert reshard.checkpoint_world_size(ckpt) == 2
    a = args(tmp_path, world=2)
    assert reshard.prepare_resume(str(ckpt), a) == str(ckpt) and a.hf_deepspeed_config.config == {}
    plain = tmp_path / "plain"
    plain.mkdir()
    for r in range(3):
        (plain / f"rng_state_{r}.pth").write_bytes(b"")
    assert reshard.checkpoint_world_size(plain) == 3
    assert reshard.prepare_resume(str(plain), args(tmp_path, world=1, deepspeed=None)) == str(plain)


def test_incomplete_checkpoint_is_one_line(tmp_path):
    from qwenvl import reshard

    ckpt = fake_deepspeed_checkpoint(tmp_path / "checkpoint-4", [0], world=2)  # rank 1's partition is missing
    with pytest.raises(UserError) as err:
        reshard.prepare_resume(str(ckpt), args(tmp_path, world=1))
    line = str(err.value)
    assert "\n" not in line and "incomplete" in line and "rank(s) 1 of the 2" in line
    assert not (tmp_path / "universal-checkpoint-4").exists()


def test_failed_conversion_is_one_line_and_leaves_the_checkpoint_alone(tmp_path):
    from qwenvl import reshard

    ckpt = fake_deepspeed_checkpoint(tmp_path / "checkpoint-4", [0, 1])
    before = sorted((p.relative_to(ckpt).as_posix(), p.stat().st_size) for p in ckpt.rglob("*"))
    with pytest.raises(UserError) as err:
        reshard.prepare_resume(str(ckpt), args(tmp_path, world=1))
    line = str(err.value)
    assert "\n" not in line and "cannot convert checkpoint" in line and "resume on the world size" in line
    assert sorted((p.relative_to(ckpt).as_posix(), p.stat().st_size) for p in ckpt.rglob("*")) == before
    assert not (tmp_path / "universal-checkpoint-4").exists()
    with pytest.raises(UserError, match="cannot convert checkpoint"):  # another rank: the same stop, no wait
        reshard.prepare_resume(str(ckpt), args(tmp_path, world=1, rank=1))


def test_the_universal_folder_is_no_checkpoint_for_resume_or_rotation(tmp_path):
    from qwenvl import reshard
    from qwenvl.runpolicy import list_checkpoints, run_markers

    ckpt = fake_deepspeed_checkpoint(tmp_path / "checkpoint-4", [0, 1])
    dest = reshard.universal_folder(ckpt, tmp_path)
    dest.mkdir()
    assert dest.parent == ckpt.parent and not dest.name.startswith("checkpoint-")  # HF rotates checkpoint-*
    assert [p.name for _, p in list_checkpoints(tmp_path)] == ["checkpoint-4"]
    assert run_markers(tmp_path) == ["checkpoint-4"]
    with pytest.raises(UserError, match="exists and is not its conversion"):
        reshard.prepare_resume(str(ckpt), args(tmp_path, world=1))


# ---------------------------------------------------------------------------------------------------
# slow: the real CLI
# ---------------------------------------------------------------------------------------------------
def write_data(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    words = "amber basil cedar delta ember fjord gravel harbor iris juniper kelp lumen maple nectar onyx".split()
    rng = np.random.default_rng(3)
    with open(d / "text.jsonl", "w") as f:
        for i in range(24):
            answer = " ".join(words[j] for j in rng.integers(0, len(words), 8))
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"Item {i}: say something."},
                                                  {"from": "gpt", "value": answer}]}) + "\n")
    (d / "dict.json").write_text(json.dumps({"text": {"data_path": str(d), "annotation_path": str(d / "text.jsonl")}}))
    return d / "dict.json"


def write_yaml(path: Path, model: Path, dictionary: Path) -> Path:
    path.write_text(f"""
model: {{name_or_path: {model}, tune_mm_vision: false, tune_mm_mlp: true, tune_mm_llm: true,
        attn_implementation: sdpa}}
data: {{dictionary: {dictionary}, use: [text], model_max_length: 128}}
training: {{learning_rate: 1.0e-2, per_device_train_batch_size: 1, gradient_accumulation_steps: 1, bf16: true,
           logging_steps: 1, lr_scheduler_type: constant, report_to: none}}
distributed: {{nproc_per_node: 2, deepspeed: zero3}}
output: {{run_name: rws, resume: auto}}
wandb: {{mode: disabled}}
""")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("rws")
    cfg = write_yaml(d / "run.yaml", tiny_model_dir, write_data(d / "data"))
    env = dict(os.environ, WANDB_MODE="disabled", VLSFT_SAMPLE_LOG="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return {"dir": d, "cfg": cfg, "env": env}


def train(setup, out: Path, port: int, *overrides: str) -> str:
    p = subprocess.run([VLSFT, "train", "--config", str(setup["cfg"]), f"output.dir={out}",
                        f"distributed.master_port={port}", *overrides], env=setup["env"], capture_output=True,
                       text=True, timeout=400, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p.stdout + p.stderr


def continue_from(src: Path, out: Path) -> Path:
    """A new output folder holding only ``src`` (a run interrupted there); returns the copied checkpoint."""
    out.mkdir(parents=True)
    return Path(shutil.copytree(src, out / src.name))


def fingerprint(folder: Path) -> list:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*"))


def sample_order(out: Path, from_step: int = 0) -> list[int]:
    """Dataset indices in training order: by step, then micro-batch, then rank (the global stream)."""
    keyed = []
    for path in sorted((out / "logs").glob("samples-rank*.jsonl")):
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        firsts: dict[int, int] = {}
        for r in rows:
            firsts.setdefault(r["global_step"], r["micro_step"])
        for r in rows:
            for i, s in enumerate(r.get("sample_ids", [])):
                keyed.append(((r["global_step"], r["micro_step"] - firsts[r["global_step"]], r["rank"], i), s))
    return [s for k, s in sorted(keyed) if k[0] >= from_step]


def losses(out: Path) -> dict[int, float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


@pytest.mark.slow
def test_zero3_two_ranks_to_one_to_two_keeps_the_sample_order(setup):
    d = setup["dir"]
    train(setup, d / "u", 29861, "training.max_steps=6", "training.save_steps=2")
    rec = position.read_record(d / "u" / "checkpoint-2")
    assert (rec["world_size"], rec["epoch"], rec["trained_in_epoch"], rec["order"]) == (2, 0, 4, "random")
    r_ckpt = continue_from(d / "u" / "checkpoint-2", d / "r")  # interrupted at step 2 (4 samples)
    before = fingerprint(r_ckpt)
    log_r = train(setup, d / "r", 29863, "distributed.nproc_per_node=1", "training.gradient_accumulation_steps=2",
                  "training.max_steps=3", "training.save_steps=3")
    assert fingerprint(r_ckpt) == before  # the user's checkpoint is only read
    assert "was written by 2 rank(s), this run has 1: converted its DeepSpeed state" in log_r
    assert (d / "r" / "universal-checkpoint-2" / "vlsft-universal.json").is_file()
    assert ("effective batch 2 samples per step (2 ranks x 1 per device x 1 accumulation) -> 2 samples per step "
            "(1 rank x 1 per device x 2 accumulation)") in log_r
    # the same samples in step 3, so the same loss: weights and optimizer state came through the conversion
    assert losses(d / "r")[3] == pytest.approx(losses(d / "u")[3], rel=2e-3)

    continue_from(d / "r" / "checkpoint-3", d / "s")  # 6 samples done; 2 ranks x 2 per device next
    log_s = train(setup, d / "s", 29865, "training.per_device_train_batch_size=2", "training.max_steps=5")
    assert "was written by 1 rank(s), this run has 2" in log_s
    assert "the 18 samples left are not whole steps of 4: the first step after the resume trains 2, the last" in log_s
    chain = sample_order(d / "u")[:4] + sample_order(d / "r", 2) + sample_order(d / "s", 3)
    assert chain == sample_order(d / "u") and sorted(chain) == sorted(set(chain)) and len(chain) == 12
    assert json.loads((d / "s" / "trainer_state.json").read_text())["global_step"] == 5


@pytest.mark.slow
def test_zero2_packing_rows_two_ranks_to_one_trains_the_epoch_once(setup):
    d = setup["dir"]
    rows = ("data.packing=true", "data.packing_rows=1", "distributed.deepspeed=zero2")
    train(setup, d / "p", 29867, *rows, "training.max_steps=2", "training.save_steps=2")
    continue_from(d / "p" / "checkpoint-2", d / "q")
    log = train(setup, d / "q", 29869, *rows, "distributed.nproc_per_node=1", "training.max_steps=-1",
                "training.num_train_epochs=1", "training.save_steps=100")
    assert "this run has 1: converted" in log and "-> 128 tokens per step (1 rank x 1 rows of 128 tokens" in log
    seen = sample_order(d / "p") + sample_order(d / "q")
    assert sorted(seen) == list(range(24))  # the epoch: every sample once, then the run ends (epoch-based)
    state = json.loads((d / "q" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(1.0) and state["global_step"] == state["max_steps"]


@pytest.mark.slow
def test_plain_ddp_two_ranks_to_one(setup):
    d = setup["dir"]
    plain = ("distributed.deepspeed=none", "training.bf16=false")
    train(setup, d / "a", 29871, *plain, "training.max_steps=3", "training.save_steps=3")
    continue_from(d / "a" / "checkpoint-3", d / "b")
    log = train(setup, d / "b", 29873, *plain, "distributed.nproc_per_node=1",
                "training.per_device_train_batch_size=4", "training.max_steps=5")
    assert not list((d / "b").glob("universal-*")) and "trains 4, the last of the epoch 2" in log
    chain = sample_order(d / "a") + sample_order(d / "b")
    assert chain == position.random_order(24, 42, 0)[:6 + 2 * 4]  # 3 steps of 2, then 2 of 4
