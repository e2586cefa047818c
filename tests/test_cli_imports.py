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
