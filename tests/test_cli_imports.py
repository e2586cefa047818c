"""The front door stays light: `datasets check`, `datasets use` and `print-args --help` never import
torch or transformers, and answer in well under a second of CPU time on small inputs (CPU time, not wall time:
a loaded box stretches the wall clock, not the work; importing torch alone costs about 2 s of CPU)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

PROBE = r"""
import sys, time
t0 = time.perf_counter()
sys.argv = ["vlsft"] + sys.argv[1:]
from vlsft.cli import main
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code or 0
heavy = sorted(m for m in ("torch", "transformers", "torchvision", "deepspeed", "accelerate") if m in sys.modules)
import json
sys.stderr.write("\nPROBE " + json.dumps({"code": code, "heavy": heavy, "inside": time.perf_counter() - t0}) + "\n")
"""


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_probe(*args: str) -> tuple[int, list[str], float, float, str]:
    """Exit code, heavy modules imported, seconds inside main(), CPU seconds of the whole process, stdout."""
    c0 = _children_cpu()
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60)
    cpu = _children_cpu() - c0  # the interpreter's start, the imports and the command: user + system time
    lines = [x for x in r.stderr.splitlines() if x.startswith("PROBE ")]
    assert lines, r.stderr
    probe = json.loads(lines[-1][len("PROBE "):])
    return probe["code"], probe["heavy"], probe["inside"], cpu, r.stdout


@pytest.fixture()
def small_dict(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.jpg").write_bytes(b"x")
    rec = {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
    (tmp_path / "t.jsonl").write_text((json.dumps(rec) + "\n") * 50)
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"t": {"data_path": "m", "annotation_path": "t.jsonl", "length": 50, "sampling_rate": 0.5}}))
    return d


@pytest.mark.parametrize("args, want_code", [
    (("datasets", "check", "{d}"), 0),
    (("datasets", "check", "{d}", "--deep"), 0),
    (("datasets", "check", "{d}", "--json"), 0),
    (("datasets", "use", "{d}"), 0),
    (("datasets", "use", "{d}", "--integer-percent"), 0),
    (("print-args", "--help"), 0),
])
def test_no_torch_and_fast(small_dict, args, want_code):
    argv = [a.format(d=small_dict) for a in args]
    best = None
    for _ in range(2):  # the better of two runs
        code, heavy, inside, cpu, out = run_probe(*argv)
        assert code == want_code, out
        assert heavy == [], f"{' '.join(argv)} imported {heavy}"
        best = min(best or cpu, cpu)
        if best < 1.0:
            break
    assert best < 1.0, f"vlsft {' '.join(argv)} used {best:.2f} s of CPU (import + run)"


COUNT_PROBE = r"""
import sys, json
sys.argv = ["vlsft"] + sys.argv[1:]
from vlsft.cli import main
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("vlsft", "qwenvl"))
sys.stderr.write("\nCOUNT " + json.dumps({"total": len(sys.modules), "ours": ours, "all": sorted(sys.modules)}) + "\n")
"""
# What print-args must not load (issue 23 item 5: <= 0.25 s): Typer and its pydantic adapters (vlsft.print_args runs
# plain command lines itself), rich (errors only), the dataset scanner and its pool, the trainer's stack.
PRINT_ARGS_NEVER = ("typer", "click", "rich", "jinja2", "qwenvl.data.annotation_check", "qwenvl.data.media_exist",
                    "multiprocessing", "concurrent", "asyncio", "torch", "transformers", "numpy", "PIL", "pyarrow")


def test_print_args_imports_a_bounded_set_of_modules():
    """Counts, not seconds: what print-args imports decides its time on any machine (today 288 modules, 35 of them
    vlsft's / qwenvl's; before issue 23 item 5: 328 with Typer, its pydantic adapters and the dataset scanner)."""
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    r = subprocess.run([sys.executable, "-c", COUNT_PROBE, "print-args", "--config", str(demo)], capture_output=True,
                       text=True, timeout=60)
    lines = [x for x in r.stderr.splitlines() if x.startswith("COUNT ")]
    assert lines, r.stderr
    got = json.loads(lines[-1][len("COUNT "):])
    loaded = [m for m in got["all"] if m.split(".")[0] in PRINT_ARGS_NEVER or m in PRINT_ARGS_NEVER]
    assert loaded == [], loaded
    assert len(got["ours"]) <= 38, got["ours"]
    assert got["total"] <= 310, got["total"]
