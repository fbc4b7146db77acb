"""The `msif` command line: one subcommand per pipeline node, the main job, the pipeline.

`main(argv)` runs any subcommand in-process; `run_subcommand` is how the KFP components call
it, so a pod, a local run and a test execute the same code.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Sequence
from typing import Any

from msif.errors import MsifError
from msif.version import __version__

DESCRIPTION = """\
msif traces what a fine-tuned language model says back to the pre-training documents that
made it say so (multi-stage influence functions with EK-FAC curvature).

Run `msif` (or `msif run`) with no arguments to build a small synthetic fact world, train a
tiny model on it, and run the whole pipeline locally. The other subcommands are the pipeline's
nodes, in data-flow order: fit-covariance → eigendecompose → fit-lambda → build-factors
(once per stage: pt = pre-training, ft = fine-tuning), precondition-queries, score-corpus,
bm25, rank. Every path may be a local path or a gs:// URI."""


@functools.cache
def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (built once: run_subcommand and main both need it)."""
    from msif.main_job import add_parsers as add_main_job_parsers
    from msif.nodes import NODES
    from msif.workflow.cli import add_pipeline_parser

    parser = argparse.ArgumentParser(
        prog="msif", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"msif {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for node in NODES:
        node.add_parser(sub)
    add_main_job_parsers(sub)
    add_pipeline_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; errors become one line on stderr and a non-zero exit code."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv) or ["run"])
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.run(args)
    except MsifError as e:
        print(f"msif: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("msif: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


def subcommand_argv(command: str, **arguments: Any) -> list[str]:
    """argv for `msif command` from keyword arguments named like the subcommand's flags.

    Artifacts (anything with a `.path`) become their paths, None is left out, booleans set or
    leave their flag, lists fill nargs flags, and ints arrive as ints even when kfp.local
    delivered ParallelFor items as floats. An argument the subcommand lacks is refused, so a
    component and the CLI cannot drift apart.
    """
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = {a.dest: a for a in sub.choices[command]._actions if a.option_strings}
    argv = [command]
    for name, value in arguments.items():
        if name not in actions:
            raise MsifError(f"msif {command} has no option for {name!r}")
        action, flag = actions[name], actions[name].option_strings[0]
        value = _path_of(value)
        if value is None or value == []:
            continue
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            if bool(value) != action.default:
                argv.append(flag)
        elif isinstance(value, list | tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(int(value) if action.type is int else value)]
    return argv


def _path_of(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_path_of(v) for v in value]
    return getattr(value, "path", value)


def run_subcommand(command: str, **arguments: Any) -> None:
    """Run `msif command` in-process from keyword arguments; raise if it fails."""
    argv = subcommand_argv(command, **arguments)
    rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"msif {command} failed with exit code {rc}")


if __name__ == "__main__":
    sys.exit(main())
