"""README.md's commands run as printed, it stays one page, and every relative link in the docs leads somewhere.

The convention (README.md states it above its commands):
- In a fenced block tagged ```sh every line is a command (a line ending in `\\` continues on the next one).
- A line whose comment starts with "needs" (`# needs the lab: …`, `# needs root: …`, `# needs Vault: …`) needs
  what it says, and is not run here. For a `spark` line its command and options are still checked: run with
  `--help` appended, click refuses an unknown command or option before it prints the help.
- Every other line is run with bash, in order within its block: cwd the repository, the venv's `bin` first on
  PATH, a temporary state directory per environment (`SPARK_STATE_DIR`, as `~/.local/state/primespark/<env>/`
  is per environment), a temporary HOME, no Vault or Prefect settings from the caller, and a timeout. It must
  exit 0 without a traceback.
Blocks tagged otherwise (```text, ```yaml, ```console …) are not commands.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BIN = Path(sys.executable).parent
MAX_README_LINES = 150
COMMAND_TIMEOUT = 180  # seconds: `spark plan` runs the Pulumi program, on a shared 2-core machine
# Settings of the caller that would point a command at a real server or another environment.
CALLER_SETTINGS = ("SPARK_ENV", "SPARK_STATE_DIR", "SPARK_STATE_HOME", "SPARK_SECRET_BACKEND", "VAULT_ADDR",
                   "VAULT_TOKEN", "PREFECT_API_URL", "XDG_STATE_HOME")

FENCE = re.compile(r"^(```+|~~~+)\s*(\S*)")
NEEDS = re.compile(r"#\s*needs\b")
# Commands that change the lab, hosts or a cloud: a README line running one without saying what it needs is an
# error, never run (it would start the lab as root, or reach for real hosts).
NEVER_RUN = ("make lab", "make test", "make setup", "make bench", "spark lab up", "spark lab down", "spark up",
             "spark preview", "spark destroy", "spark backup", "spark drill run", "spark mesh check",
             "spark mesh rotate", "spark preflight", "spark secrets migrate", "ansible-playbook", "ansible ")
ENV_OPTION = re.compile(r"(?:--env|-e)[= ](\S+)")


@dataclass(frozen=True)
class Command:
    line: int  # where it starts in the file
    text: str

    @property
    def needs_something(self) -> bool:
        return bool(NEEDS.search(self.text))

    @property
    def words(self) -> list[str]:
        """The command's words, comment left out; the program by its name (`.venv/bin/spark` is `spark`)."""
        words = shlex.split(self.text, comments=True)
        return [Path(words[0]).name, *words[1:]] if words else []

    @property
    def env(self) -> str:
        found = ENV_OPTION.search(self.text.split("#", 1)[0])
        return found.group(1) if found else "lab"


@dataclass(frozen=True)
class Block:
    line: int
    commands: tuple[Command, ...]


def shell_blocks(markdown: str) -> list[Block]:
    """The ```sh blocks of a markdown text, each as its commands (continuations joined, comments kept)."""
    blocks: list[Block] = []
    fence: str | None = None
    tag = ""
    start = 0
    commands: list[Command] = []
    pending: tuple[int, str] | None = None
    for number, line in enumerate(markdown.splitlines(), start=1):
        opening = FENCE.match(line)
        if fence is None:
            if opening:
                fence, tag, start, commands = opening.group(1), opening.group(2), number, []
            continue
        if line.strip().startswith(fence):
            if tag == "sh":
                assert pending is None, f"line {pending[0] if pending else 0}: a continuation runs past its block"
                blocks.append(Block(start, tuple(commands)))
            fence = None
            continue
        if tag != "sh":
            continue
        text = line.strip() if pending is None else f"{pending[1]} {line.strip()}"
        first = number if pending is None else pending[0]
        if text.endswith("\\"):
            pending = (first, text[:-1].rstrip())
            continue
        pending = None
        if text and not text.startswith("#"):
            commands.append(Command(first, text))
    assert fence is None, f"line {start}: a fenced block is never closed"
    return blocks


def readme_blocks() -> list[Block]:
    return shell_blocks(README.read_text(encoding="utf-8"))


def command_env(root: Path, env: str) -> dict[str, str]:
    """The environment of one README command: the venv first, nothing of the caller's state or servers."""
    out = {k: v for k, v in os.environ.items() if k not in CALLER_SETTINGS}
    state = root / "state" / re.sub(r"[^A-Za-z0-9_.-]", "_", env)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    home = root / "home"
    home.mkdir(exist_ok=True)
    out.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", SPARK_STATE_DIR=str(state), HOME=str(home))
    return out


def run_command(command: Command, root: Path) -> subprocess.CompletedProcess[str]:
    if command.needs_something:  # not run: its command and options are checked against the CLI only
        argv = [*shlex.split(command.text, comments=True), "--help"]
        return subprocess.run(argv, cwd=REPO, env=command_env(root, command.env), capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT, check=False)
    return subprocess.run(["bash", "-c", command.text], cwd=REPO, env=command_env(root, command.env),
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)


def unsafe(command: Command) -> bool:
    """A command that changes the lab, hosts or a cloud, with no word of what it needs."""
    return not command.needs_something and (" ".join(command.words) + " ").startswith(NEVER_RUN)


def checked(command: Command) -> bool:
    return not command.needs_something or command.words[:1] == ["spark"]


@pytest.mark.slow
@pytest.mark.parametrize("block", readme_blocks(), ids=lambda b: f"README.md:{b.line}")
def test_readme_commands_run_as_printed(block: Block, tmp_path: Path) -> None:
    for command in block.commands:
        if not checked(command):
            continue
        assert not unsafe(command), \
            f"README.md:{command.line}: `{command.text}` must say what it needs (`# needs the lab: …`)"
        done = run_command(command, tmp_path)
        output = done.stdout + done.stderr
        what = "its --help (it needs something)" if command.needs_something else "it"
        assert done.returncode == 0, f"README.md:{command.line}: `{command.text}`: {what} exited " \
                                     f"{done.returncode}:\n{output[-3000:]}"
        assert "Traceback" not in output, f"README.md:{command.line}: `{command.text}`:\n{output[-3000:]}"


def test_the_commands_a_newcomer_tries_are_run_and_the_lab_is_not_started() -> None:
    commands = [c for b in readme_blocks() for c in b.commands]
    run = {c.text.split("#", 1)[0].strip() for c in commands if not c.needs_something}
    for expected in ("spark --help", "spark validate --env homelab", "spark show --env lab",
                     "spark inventory --env lab --host pi-1", "spark plan --env homelab", "spark mesh plan --env lab"):
        assert expected in run, f"README.md no longer runs `{expected}` as a command that needs nothing"
    for needs in ("make lab", "make test", "spark lab up --env lab", "spark backup now pi-1 --env lab"):
        found = [c for c in commands if c.text.split("#", 1)[0].strip() == needs]
        assert found, f"README.md does not show `{needs}`"
        assert all(c.needs_something for c in found), f"`{needs}` must say what it needs, so that it is not run"
    first_lines = README.read_text(encoding="utf-8").splitlines()[:20]
    assert any(line.startswith("make lab ") for line in first_lines), "`make lab` is in the README's first lines"
    assert any(line.startswith("make test ") for line in first_lines), "`make test` is in the README's first lines"


def test_every_spark_command_in_the_readme_names_its_environment() -> None:
    for block in readme_blocks():
        for command in block.commands:
            words = command.words
            if words[:1] == ["spark"] and words[1:] != ["--help"]:
                assert ENV_OPTION.search(command.text), f"README.md:{command.line}: `{command.text}` lacks --env"


def test_the_readme_is_one_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move depth into docs/"


def test_blocks_are_read_by_the_convention() -> None:
    markdown = "\n".join([
        "```sh", "spark validate --env lab   # a comment", "spark lab up --env lab   # needs the lab: …",
        "# a comment line", "", "spark mesh plan \\", "  --env lab", "```",
        "```text", "error: not a command", "```",
        "```console", "$ spark lab status", "```",
    ])
    (block,) = shell_blocks(markdown)
    assert [(c.line, c.text, c.needs_something) for c in block.commands] == [
        (2, "spark validate --env lab   # a comment", False),
        (3, "spark lab up --env lab   # needs the lab: …", True),
        (6, "spark mesh plan --env lab", False),
    ]


def test_a_line_that_changes_the_lab_without_saying_so_is_refused_not_run() -> None:
    assert unsafe(Command(1, ".venv/bin/spark lab up --env lab   # brings it up"))
    assert unsafe(Command(1, "make lab"))
    assert not unsafe(Command(1, "spark lab up --env lab   # needs root and Docker"))
    assert not unsafe(Command(1, "spark lab status --env lab --no-ssh"))
    assert not unsafe(Command(1, "ansible-inventory -i inventory/lab.fleet.yml --graph"))


def test_a_spark_line_that_needs_the_lab_is_still_checked_against_the_cli(tmp_path: Path) -> None:
    good = run_command(Command(1, "spark mesh rotate core-1 --env lab   # needs the lab"), tmp_path)
    assert good.returncode == 0, good.stderr
    wrong = run_command(Command(2, "spark mesh rotate core-1 --environment lab   # needs the lab"), tmp_path)
    assert wrong.returncode != 0


# --- links -------------------------------------------------------------------------------------------------------

CODE_BLOCK = re.compile(r"^(```+|~~~+).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for title in HEADING.findall(CODE_BLOCK.sub("", markdown)):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def broken_links(path: Path) -> list[str]:
    """Each relative link of a markdown file that does not lead to a file, folder or heading that exists."""
    markdown = path.read_text(encoding="utf-8")
    prose = INLINE_CODE.sub("", CODE_BLOCK.sub("", markdown))
    problems = []
    for target in INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: …: not ours to check
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{path.name}: {target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text(encoding="utf-8")):
            problems.append(f"{path.name}: {target}: no heading #{anchor} in {linked.name}")
    return problems


def documents() -> list[Path]:
    return [README, *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]


@pytest.mark.parametrize("document", documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_lead_to_files_that_exist(document: Path) -> None:
    assert document.is_file(), f"{document.relative_to(REPO)} is missing"
    assert broken_links(document) == []


def test_the_readme_links_every_document() -> None:
    readme = README.read_text(encoding="utf-8")
    for document in documents()[1:]:
        assert f"]({document.relative_to(REPO)})" in readme, f"README.md does not link {document.relative_to(REPO)}"


def test_the_link_checker_finds_what_is_broken(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A title, with punctuation!\n\n## A title, with punctuation!\n")
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "[ok](there.md) [ok](there.md#a-title-with-punctuation) [ok](there.md#a-title-with-punctuation-1)",
        "[ok](#here) [web](https://example.org/missing) `[code](nowhere.md)`",
        "[gone](nowhere.md) [bad anchor](there.md#nowhere)",
        "```", "[in a block](nowhere-either.md)", "```",
        "[ref]: missing/ref.md",
        "## Here",
    ]))
    assert broken_links(page) == [
        "page.md: nowhere.md: no such file",
        "page.md: there.md#nowhere: no heading #nowhere in there.md",
        "page.md: missing/ref.md: no such file",
    ]
