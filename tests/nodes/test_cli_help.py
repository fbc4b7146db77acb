"""Every subcommand answers --help: its help strings pass through argparse's % formatting."""

from __future__ import annotations

import argparse

import pytest

from msif.cli import build_parser


def subcommands() -> list[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(sub.choices)


def test_there_are_subcommands():
    assert {"run", "precondition-queries", "score-corpus", "plan"} <= set(subcommands())


@pytest.mark.parametrize("command", subcommands())
def test_help_answers(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: msif {command}")
    # A literal percent sign in an option's help survives (the index-rank help has some).
    if command == "run":
        assert "5 % rerank" in " ".join(out.split())
