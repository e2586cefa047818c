"""The output lock never writes through a link (issue "Trust, round 3", item 1).

``<output_dir>/vlsft/lock`` (or the ``vlsft/`` folder) that is a symbolic link, a lock that is not a regular
file or that has another name (a hard link): refused in one ``error:`` line naming it and saying "remove",
and the file it points to stays byte for byte as it was, also when it holds a stale lock record (the
takeover path) and through ``python -m qwenvl.train`` and ``vlsft train`` (exit 2, nothing launched).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from plan_fixtures import make_project

from qwenvl.problems import UserError
from qwenvl.runpolicy import OutputLock


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def _precious(tmp_path: Path, text: str = "years of work\n") -> tuple[Path, bytes]:
    f = tmp_path / "mine" / "thesis.txt"
    f.parent.mkdir(exist_ok=True)
    f.write_text(text)
    return f, f.read_bytes()


def _refused(out: Path, *needles: str) -> str:
    with pytest.raises(UserError) as err:
        OutputLock(out, "vlsft train").acquire()
    lines = err.value.lines()
    assert len(lines) == 1 and "remove" in lines[0], lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_lock_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    mine, before = _precious(tmp_path)
    out = tmp_path / "out"
    (out / "vlsft").mkdir(parents=True)
    lock = out / "vlsft" / "lock"
    lock.symlink_to(mine)
    line = _refused(out, str(lock), "symbolic link", str(mine))
    assert "nothing was written" in line
    assert mine.read_bytes() == before and lock.is_symlink()


def test_stale_takeover_does_not_follow_a_link(tmp_path):
    """The target holds a stale lock record of a dead process on this host: the takeover path would rewrite it."""
    stale = json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started": 0, "command": "old"}) + "\n"
    mine, before = _precious(tmp_path, stale)
    out = tmp_path / "out"
    (out / "vlsft").mkdir(parents=True)
    (out / "vlsft" / "lock").symlink_to(mine)
    _refused(out, "symbolic link")
    assert mine.read_bytes() == before
    # a hard link to it: the same data under two names, refused as well
    (out / "vlsft" / "lock").unlink()
    os.link(mine, out / "vlsft" / "lock")
    _refused(out, "hard links")
    assert mine.read_bytes() == before


def test_dangling_lock_link_creates_nothing(tmp_path):
    out = tmp_path / "out"
    (out / "vlsft").mkdir(parents=True)
    target = tmp_path / "elsewhere" / "new-file"
    target.parent.mkdir()
    (out / "vlsft" / "lock").symlink_to(target)
    _refused(out, "symbolic link")
    assert not target.exists()


def test_vlsft_folder_that_is_a_symlink_or_a_file_is_refused(tmp_path):
    theirs = tmp_path / "their-folder"
    theirs.mkdir()
    (theirs / "lock").write_text("their own lock\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "vlsft").symlink_to(theirs)
    _refused(out, str(out / "vlsft"), "symbolic link")
    assert (theirs / "lock").read_text() == "their own lock\n" and sorted(os.listdir(theirs)) == ["lock"]
    (out / "vlsft").unlink()
    (out / "vlsft").write_text("x")
    _refused(out, "is a file, not a folder")
    assert (out / "vlsft").read_text() == "x"


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_lock_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    out = tmp_path / "out"
    (out / "vlsft").mkdir(parents=True)
    lock = out / "vlsft" / "lock"
    if kind == "folder":
        lock.mkdir()
        _refused(out, "is a folder, not a regular file")
    else:
        os.mkfifo(lock)
        _refused(out, "is a named pipe, not a regular file")


def test_a_normal_lock_still_works_and_is_removed(tmp_path):
    out = tmp_path / "out"
    lock = OutputLock(out, "first").acquire()
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock.path.exists() and (out / "vlsft").is_dir()


def test_qwenvl_train_refuses_early_with_exit_2(tmp_path, monkeypatch, capsys):
    from qwenvl import train

    for k in ("RANK", "VLSFT_OUTPUT_LOCK"):
        monkeypatch.delenv(k, raising=False)
    mine, before = _precious(tmp_path)
    out = tmp_path / "out"
    (out / "vlsft").mkdir(parents=True)
    (out / "vlsft" / "lock").symlink_to(mine)
    assert train.main(["--output_dir", str(out)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and "symbolic link" in err[0], err
    assert mine.read_bytes() == before


@pytest.mark.parametrize("name,needle", [("lock", "remove"), ("launch.sh", "launch.sh")])
def test_vlsft_train_refuses_a_link_in_its_folder_with_exit_2(tmp_path, monkeypatch, name, needle):
    """A link in <out>/vlsft/ (to a user's file) - the lock, or one of the run's record files written by temp +
    rename - is refused in one line before torchrun starts, and the user's file keeps its bytes."""
    from typer.testing import CliRunner

    import vlsft.launch
    from vlsft.cli import app

    def no_launch(*_a, **_k):
        raise AssertionError(f"vlsft train launched torchrun through a linked {name}")

    monkeypatch.setattr(vlsft.launch, "launch", no_launch)
    config = make_project(tmp_path)
    mine, before = _precious(tmp_path)
    (tmp_path / "runs" / "first" / "vlsft").mkdir(parents=True)
    (tmp_path / "runs" / "first" / "vlsft" / name).symlink_to(mine)
    result = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2, result.output
    errors = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "link" in errors[0] and needle in errors[0], result.output
    if name == "lock":
        assert "symbolic link" in errors[0]
    assert "Traceback" not in result.output
    assert mine.read_bytes() == before
