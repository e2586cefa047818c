"""The torch-free modules that qwenvl/data/__init__.py lists import no torch, transformers or PIL (so the list
stays true, and the fast CLI may import them)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import qwenvl.data

HEAVY = ("torch", "transformers", "torchvision", "PIL", "accelerate", "deepspeed")


def listed() -> list[str]:
    doc = qwenvl.data.__doc__ or ""
    block = doc.split("Torch-free modules", 1)[1].split("(tests/", 1)[0]
    return re.findall(r"``(\w+)``", block)


def test_listed_torch_free_modules_import_no_torch():
    names = listed()
    assert len(names) >= 10 and "dictionary" in names, names
    for name in names:
        assert (Path(qwenvl.data.__file__).parent / f"{name}.py").is_file(), f"{name}: no such module"
    assert heavy_imports(names) == []


def heavy_imports(names: list[str]) -> list[str]:
    probe = (f"import json, sys\nfor n in {names!r}:\n    __import__('qwenvl.data.' + n)\n"
             f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_the_probe_sees_torch():
    assert "torch" in heavy_imports(["collate"])
