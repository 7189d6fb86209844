"""Reads the `temporal` CLI cookbook (``temporal-config/queries.md``) into runnable blocks and runs
them with bash, the way an operator pastes them (see the top of queries.md for the rules)."""

from __future__ import annotations

import asyncio
import re
import shlex
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

FENCE = re.compile(r"^```(\S*)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*cookbook:\s*(\w+)\s*(.*?)\s*-->$")
EXPECT = re.compile(r"^#\s*expect:\s*(.+?)\s*$")
SHELLS = ("sh", "bash")
# Shell words that open and close a compound command spanning lines (for/while/until, if).
OPENS = re.compile(r"\b(do|then)\b")
CLOSES = re.compile(r"\b(done|fi)\b")
QUOTED = re.compile(r"'[^']*'|\"(?:\\.|[^\"\\])*\"")


class CookbookError(ValueError):
    """queries.md breaks the cookbook's rules (an unknown directive, an untested block)."""


@dataclass(frozen=True)
class Command:
    line: int  # of the command's first line in queries.md
    text: str
    expects: tuple[str, ...] = ()


@dataclass
class Block:
    line: int  # of the opening fence
    section: str
    commands: list[Command]
    skip: str | None = None
    needs: list[str] = field(default_factory=list)

    def where(self) -> str:
        return f"queries.md:{self.line} ({self.section})"


def split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of one shell line: a ``#`` outside quotes, at the start or after a
    blank, begins the comment."""
    quote = ""
    escaped = False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i:]
    return line.rstrip(), ""


def split_commands(lines: list[str], first_line: int) -> list[Command]:
    """One command per logical line: ``\\``, a trailing ``|``/``&&``/``||`` and an open
    ``for``/``until``/``if`` carry it on to the next line."""
    commands: list[Command] = []
    current: list[str] = []
    expects: list[str] = []
    start = depth = 0
    for offset, line in enumerate(lines):
        code, comment = split_comment(line)
        if not current and not code.strip():
            continue  # a comment or a blank line between commands
        if not current:
            start = first_line + offset
        current.append(line)
        found = EXPECT.match(comment)
        if found:
            expects.append(found.group(1))
        words = QUOTED.sub("''", code)
        depth += len(OPENS.findall(words)) - len(CLOSES.findall(words))
        if depth > 0 or code.rstrip().endswith(("\\", "|", "&&", "||")):
            continue
        commands.append(Command(start, "\n".join(current), tuple(expects)))
        current, expects = [], []
    if current:
        raise CookbookError(
            f"queries.md:{start}: a command is not finished at the end of its block"
        )
    return commands


def parse(text: str) -> list[Block]:
    blocks: list[Block] = []
    section = ""
    pending: dict[str, list[str]] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("#") and not pending:
            section = line.lstrip("#").strip()
        directive = DIRECTIVE.match(line)
        fence = FENCE.match(line)
        if directive:
            name, arg = directive.groups()
            if name not in ("skip", "needs") or not arg:
                raise CookbookError(f"queries.md:{i + 1}: unknown directive {line!r}")
            pending.setdefault(name, []).append(arg)
        elif fence:
            if fence.group(1) not in SHELLS:
                raise CookbookError(
                    f"queries.md:{i + 1}: a ```{fence.group(1)} block; the cookbook's blocks are "
                    f"shell ({', '.join(SHELLS)}) and each one is run by tests/test_cookbook.py"
                )
            end = i + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            skip = pending.get("skip")
            blocks.append(
                Block(
                    line=i + 1,
                    section=section,
                    commands=split_commands(lines[i + 1 : end], i + 2),
                    skip="; ".join(skip) if skip else None,
                    needs=pending.get("needs", []),
                )
            )
            pending = {}
            i = end
        elif line and pending:
            raise CookbookError(f"queries.md:{i + 1}: a directive must come right before a block")
        i += 1
    return blocks


@dataclass
class Ran:
    command: Command
    output: str


class CommandFailed(AssertionError):
    pass


async def run_block(
    block: Block, *, env: Mapping[str, str], cwd: Path, timeout: float = 30.0
) -> list[Ran]:
    """Run the block in one ``bash -euo pipefail`` (shell variables carry from one command to
    the next, as in an operator's terminal); fail on the first command that exits non-zero or
    whose output (stdout and stderr) lacks one of its ``# expect:`` texts, expanded by the
    shell right after the command ran."""
    marker = f"@@cookbook-{uuid.uuid4().hex}@@"
    with tempfile.TemporaryDirectory() as scratch:
        expanded = Path(scratch) / "expects"
        script = ["set -euo pipefail", f"exec 3>{shlex.quote(str(expanded))}"]
        for n, command in enumerate(block.commands):
            script += [f"printf '\\n%s %d\\n' '{marker}' {n}", command.text]
            script += [f'printf "%d\\t%s\\n" {n} {_double_quoted(e)} >&3' for e in command.expects]
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            "\n".join(script),
            cwd=cwd,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,  # a command that asks for confirmation is refused
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            raw, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            raw, _ = await proc.communicate()
            status: int | None = None
        else:
            status = proc.returncode
        expects = [
            (int(index), wanted)
            for index, wanted in (
                line.split("\t", 1) for line in expanded.read_text().splitlines() if "\t" in line
            )
        ]
    text = "\n" + raw.decode(errors="replace")
    outputs = re.split(rf"\n{re.escape(marker)} \d+\n", text)[1:]
    ran = [Ran(c, out) for c, out in zip(block.commands, outputs, strict=False)]
    if status != 0:
        last = ran[-1] if ran else Ran(block.commands[0], text)
        why = f"did not finish within {timeout:g}s" if status is None else f"exited {status}"
        raise CommandFailed(_report(block, last, why))
    for index, wanted in expects:
        if wanted not in ran[index].output:
            raise CommandFailed(_report(block, ran[index], f"printed no {wanted!r}"))
    return ran


def _double_quoted(text: str) -> str:
    """``text`` as a bash double-quoted word: its ``$VARIABLES`` expand, nothing else does."""
    return '"' + re.sub(r'([\\"`])', r"\\\1", text) + '"'


def _report(block: Block, ran: Ran, why: str) -> str:
    return (
        f"{block.where()}, the command at line {ran.command.line} {why}:\n"
        f"{ran.command.text}\n--- its output ---\n{ran.output.strip()}"
    )
