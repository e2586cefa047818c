"""The documentation is true: README.md and docs/**/*.md, checked as a reader would use them.

Conventions (also in docs/contributing.md):

* A ```bash block is run: every line (``\\`` continues a line, ``# ...`` is a comment) must be a ``vlsft``
  command that exits 0. The commands run in-process through the Typer app, in a fresh folder per block that
  links ``configs/`` and ``docs/`` of the checkout, so relative paths work as in the checkout and nothing is
  written into it. Commands that train or load a model are refused here: such a block carries
  ``<!-- not run: REASON -->`` on the line before it, and becomes a skipped test whose reason pytest lists
  (``-ra``), so every example that is not run is counted and named.
* A ```console block shows ``$ vlsft ...`` commands followed by their output; the output must match line for
  line (trailing spaces aside; a line ``...`` stands for any number of lines; ``/path/to/vlsft`` for the
  checkout).
* A ```yaml block that holds run YAML sections is valid: merged over a minimal run YAML, it passes
  ``load_run_config``. A ```json block is JSON (or JSON lines).
* Every relative link points at an existing file, and at an existing heading when it names one.
* The README stays at most 250 lines; every command of the CLI has a page in docs/commands/ that the README's
  command table links.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
README_MAX_LINES = 250
CHECKOUT = "/path/to/vlsft"  # how console blocks write the checkout's absolute path
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(?P<reason>.*?)\s*-->\s*$")
FENCE = re.compile(r"^\s*```(?P<lang>[\w-]*)\s*$")
# Commands that train, load a model or its tokenizer: never in a block this test runs.
HEAVY = (("train",), ("chat",), ("predict",), ("export",), ("datasets", "preview"))
# Linked into the work folder of a block (the examples read the demo data and docs/examples).
LINKED = ("configs", "docs")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    not_run: str | None  # the reason of a <!-- not run: ... --> marker on the line before

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
            j += 1
        indent = len(lines[start]) - len(lines[start].lstrip())
        body = "\n".join(line[indent:] for line in lines[start + 1 : j])
        prev = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marker = NOT_RUN.match(prev)
        out.append(Block(page, start + 1, m["lang"], body, marker["reason"] if marker else None))
        i = j + 1
    return out


def without_code(text: str) -> str:
    """The page without fenced blocks and inline code (links and headings are looked for in the rest)."""
    kept, inside = [], False
    for line in text.splitlines():
        if re.match(r"^\s*```", line):
            inside = not inside
            continue
        kept.append("" if inside else re.sub(r"(`+).*?\1", "", line))
    return "\n".join(kept)


ALL_BLOCKS = [b for page in PAGES for b in fenced_blocks(page)]
BASH = [b for b in ALL_BLOCKS if b.lang == "bash"]
CONSOLE = [b for b in ALL_BLOCKS if b.lang == "console"]


def commands(block: Block) -> list[str]:
    joined = block.text.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def argv_of(command: str, where: str) -> list[str]:
    words = shlex.split(command, comments=True)
    assert words and words[0] == "vlsft", (
        f"{where}: '{command}' is not a vlsft command; run only vlsft commands in a ```bash block, or put "
        "<!-- not run: REASON --> on the line before the block")
    assert not any(w in ("|", "&&", ";", ">", "<") for w in words), f"{where}: '{command}': no pipes or redirects"
    args = words[1:]
    assert not any(tuple(args[: len(h)]) == h for h in HEAVY), (
        f"{where}: '{command}' trains or loads a model: mark the block <!-- not run: REASON -->")
    return args


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder that looks like the checkout for the examples (configs/, docs/), with a neutral environment."""
    for name in LINKED:
        (tmp_path / name).symlink_to(REPO / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.startswith(("SLURM_", "PET_", "WANDB_", "AWS_")):
            monkeypatch.delenv(key)
    return tmp_path


def run_vlsft(args: list[str]):
    from vlsft.cli import app

    result = CliRunner().invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _id(block: Block) -> str:
    return block.where


@pytest.mark.parametrize("block", BASH, ids=_id)
def test_bash_examples_run(block: Block, workdir):
    if block.not_run is not None:
        pytest.skip(f"{block.where}: not run: {block.not_run}")
    cmds = commands(block)
    assert cmds, f"{block.where}: empty ```bash block"
    for command in cmds:
        result = run_vlsft(argv_of(command, block.where))
        assert result.exit_code == 0, f"{block.where}: '{command}' exited {result.exit_code}:\n{result.output}"


def console_steps(block: Block) -> list[tuple[str, list[str]]]:
    steps: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            assert steps, f"{block.where}: a ```console block starts with a '$ vlsft ...' line"
            steps[-1][1].append(line.rstrip())
    return steps


def matches(expected: list[str], actual: list[str]) -> bool:
    """``expected`` equals ``actual`` where each line '...' stands for any number of lines."""
    if not expected:
        return not actual
    if expected[0] == "...":
        return any(matches(expected[1:], actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and actual[0] == expected[0] and matches(expected[1:], actual[1:])


@pytest.mark.parametrize("block", CONSOLE, ids=_id)
def test_console_examples_show_the_real_output(block: Block, workdir):
    assert block.not_run is None, f"{block.where}: a ```console block shows real output; it is always run"
    for command, expected in console_steps(block):
        result = run_vlsft(argv_of(command, block.where))
        output = result.output
        for root in {str(REPO), str(REPO.resolve()), str(workdir), str(workdir.resolve())}:
            output = output.replace(root, CHECKOUT)
        actual = [line.rstrip() for line in output.splitlines()]
        while expected and expected[-1] == "":
            expected = expected[:-1]
        assert matches(expected, actual), (
            f"{block.where}: '{command}' printed something else; paste the real output:\n{output}")


def test_not_run_markers_stand_before_a_block_and_give_a_reason():
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            if "not run" not in line or not line.strip().startswith("<!--"):
                continue
            marker = NOT_RUN.match(line.strip())
            assert marker and marker["reason"], f"{page.relative_to(REPO)}:{n + 1}: write <!-- not run: REASON -->"
            nxt = next((x for x in lines[n + 1 :] if x.strip()), "")
            assert FENCE.match(nxt), f"{page.relative_to(REPO)}:{n + 1}: the marker must stand right before a block"
    not_run = [b for b in ALL_BLOCKS if b.not_run is not None]
    assert all(b.lang == "bash" for b in not_run), [b.where for b in not_run if b.lang != "bash"]
    assert len(not_run) < len(BASH) + len(CONSOLE)  # most examples run


_BASE_RUN = {"model": {"name_or_path": "/models/m", "tune_mm_mlp": True}, "data": {"dictionary": "/data/d.json"},
             "output": {"dir": "/runs/r"}}


def _merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang == "yaml"], ids=_id)
def test_yaml_examples_are_valid_run_yaml(block: Block, tmp_path):
    from vlsft.config import SECTIONS, load_run_config

    doc = yaml.safe_load(block.text)
    assert isinstance(doc, dict) and set(doc) <= set(SECTIONS), f"{block.where}: not run YAML sections"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_merged(_BASE_RUN, doc)), encoding="utf-8")
    load_run_config(path)  # raises ProblemsError with file:line problems


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang == "json"], ids=_id)
def test_json_examples_parse(block: Block):
    try:
        json.loads(block.text)
    except json.JSONDecodeError:  # JSON lines: one object per line
        for line in block.text.splitlines():
            if line.strip():
                json.loads(line)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def page_anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (outside fenced blocks; a repeated heading gets -1, -2, ...)."""
    kept, inside = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if re.match(r"^\s*```", line):
            inside = not inside
        elif not inside:
            kept.append(line)
    seen: dict[str, int] = {}
    out = set()
    for line in kept:
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            base = slug(m[1])
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_files_and_headings(page: Path):
    text = without_code(page.read_text(encoding="utf-8"))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in page_anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_readme_is_short():
    n = len((REPO / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move details into docs/"


def test_every_command_has_a_page_linked_from_the_readme():
    import typer

    from vlsft.cli import app

    root = typer.main.get_command(app)
    names = []
    for name, cmd in root.commands.items():
        if hasattr(cmd, "commands"):  # a group (datasets): one page per sub-command
            names += [f"{name}-{sub}" for sub in cmd.commands]
        else:
            names.append(name)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name in names:
        assert (REPO / "docs" / "commands" / f"{name}.md").is_file(), f"docs/commands/{name}.md missing"
        assert f"(docs/commands/{name}.md)" in readme, f"README's command table does not link {name}"


def test_the_readme_shows_what_ci_runs():
    """.ci/run runs `make test`: the README says so, in its Quick start and Tests sections."""
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "make test" in ci
    for section in ("## Quick start", "## Tests"):
        assert "make test" in readme.split(section, 1)[1].split("\n## ", 1)[0], section
