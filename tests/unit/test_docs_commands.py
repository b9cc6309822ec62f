"""Every command line in README.md and docs/*.md that runs one of the project's scripts uses only flags that
script accepts: its ``--help`` (argparse) is the reference, so a renamed or removed flag fails here instead
of in a user's terminal.

Commands are read from fenced code blocks (backslash continuations joined) and inline code spans; the flags
checked are the ``--name`` tokens after the script up to the end of the command, a pipe, ``;``/``&&`` or a
bare ``--`` (what follows ``--`` is passed on to another program, e.g. ``bench/train_throughput.py ... --
--hidden-size 64`` to the trainer, which its own entry covers)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# script paths and modules whose flags are checked (console scripts are the same parsers as the launchers)
SCRIPT = re.compile(r"(?:^|\s)((?:launchers|bench)/[a-z_]+\.py|launchers/slurm/[a-z_]+\.sbatch"
                    r"|-m (?:data_prep|megatron_nbp)(?:\.[a-z_0-9]+)+)(?=\s|$)")
STOP = re.compile(r"\s(?:\||;|&&|>|2>|--(?=\s|$))")
FLAG = re.compile(r"(?:^|\s)(--[a-z][a-z0-9-]*)(?==|\s|$)")


def _commands(text: str) -> list[str]:
    """Command-like strings of a markdown text: code-block lines (continuations joined), inline code spans."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        found += [line for line in block.replace("\\\n", " ").splitlines()]
    outside = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    found += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", outside) if "\n\n" not in span]
    return found


def _uses() -> list[tuple[str, str, str | None, tuple[str, ...]]]:
    """(document:line-ish label, script, subcommand or None, flags) of every documented command."""
    uses = []
    for doc in DOCS:
        for command in _commands(doc.read_text()):
            for match in SCRIPT.finditer(command):
                rest = command[match.end():]
                stop = STOP.search(rest)
                rest = rest[: stop.start()] if stop else rest
                words = rest.split()
                sub = words[0] if words and re.fullmatch(r"[a-z][a-z_-]*", words[0]) else None
                flags = tuple(dict.fromkeys(FLAG.findall(rest)))
                if flags:
                    uses.append((f"{doc.name}: {command.strip()[:90]}", match[1], sub, flags))
    return uses


@lru_cache(maxsize=None)
def _help(script: str, sub: str | None) -> str:
    """``--help`` of ``script`` (with ``sub`` when that is one of its subcommands); a SLURM script passes
    its arguments on to the launcher of the same name, whose help it gets."""
    if script.endswith(".sbatch"):
        script = f"launchers/{Path(script).stem}.py"
    target = script.split()[1:] if script.startswith("-m ") else [script]
    cmd = [sys.executable, *(["-m"] if script.startswith("-m ") else []), *target]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    if sub is not None:
        out = subprocess.run([*cmd, sub, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        if out.returncode == 0:
            return out.stdout
    out = subprocess.run([*cmd, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{script} --help failed:\n{out.stderr[-2000:]}"
    return out.stdout


USES = _uses()


def test_the_documents_hold_commands_to_check():
    """The scan finds the documented commands (an empty scan would pass every check below)."""
    scripts = {script for _, script, _, _ in USES}
    assert len(USES) >= 40, len(USES)
    assert {"launchers/pretrain_nbp.py", "launchers/tokenize_videos.py", "launchers/eval_tokenizer.py",
            "launchers/slurm/pretrain_nbp.sbatch", "bench/tokenize_throughput.py"} <= scripts, scripts


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted({script for _, script, _, _ in USES}))
def test_documented_flags_exist(script):
    missing = []
    for where, used_script, sub, flags in USES:
        if used_script != script:
            continue
        accepted = set(re.findall(r"--[a-z][a-z0-9-]*", _help(script, sub)))
        missing += [f"{flag} in {where}" for flag in flags if flag not in accepted]
    assert not missing, f"{script}: flags not in its --help:\n" + "\n".join(missing)
