"""The `msif` command line: one subcommand per pipeline node, the main job, the pipeline.

`main(argv)` runs any subcommand in-process; `run_subcommand` is how the KFP components call
it, so a pod, a local run and a test execute the same code.
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import logging
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from msif.errors import (
    MsifError,
    SubcommandFailed,
    Terminated,
    redact,
    redacted_logging,
)
from msif.version import __version__

DESCRIPTION = """\
msif traces what a fine-tuned language model says back to the pre-training documents that
made it say so (multi-stage influence functions with EK-FAC curvature).

Run `msif` (or `msif run`) with no arguments to build a small synthetic fact world, train a
tiny model on it, and run the whole pipeline locally. The other subcommands are the pipeline's
nodes, in data-flow order: fit-covariance → eigendecompose → fit-lambda → build-factors
(once per stage: pt = pre-training, ft = fine-tuning), precondition-queries, score-corpus,
bm25, rank. Every path may be a local path or a gs:// URI."""


_VERBOSE: contextvars.ContextVar[bool] = contextvars.ContextVar("msif_verbose", default=False)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `msif: error: ...`, and exit code 2.

    Subparsers are made by the parser's own class, so every subcommand inherits this.
    """

    def error(self, message: str) -> NoReturn:
        """Print the one-line usage error, pointing at the subcommand's --help; exit 2."""
        self.exit(2, f"msif: error: {message} (see {self.prog} --help)\n")


@functools.cache
def build_parser() -> ArgumentParser:
    """The full argument parser (built once: run_subcommand and main both need it)."""
    from msif.main_job import add_parsers as add_main_job_parsers
    from msif.nodes import NODES
    from msif.workflow.cli import add_pipeline_parser
    from msif.workflow.plan import add_plan_parser

    parser = ArgumentParser(
        prog="msif", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"msif {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging; tracebacks of errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for node in NODES:
        node.add_parser(sub)
    add_main_job_parsers(sub)
    add_pipeline_parser(sub)
    add_plan_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; errors become one line on stderr and a non-zero exit code.

    Exit codes: 0 success, 1 runtime error, 2 usage error (argparse exits with SystemExit(2)),
    130 interrupted (SIGINT), 143 terminated (SIGTERM).
    """
    from msif.config import check_options

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv or ["run"])
    if getattr(args, "run", None) is None:  # only global flags (`msif -v`): the main job
        args = parser.parse_args([*argv, "run"])
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    def run() -> Any:
        check_options(args)  # every bad option value fails before any work starts
        return args.run(args)

    return execute(run, verbose=args.verbose)


def execute(run: Callable[[], Any], *, verbose: bool = False) -> int:
    """Call run() as a command: its int result (else 0) or its failure as one stderr line.

    While it runs, SIGTERM raises Terminated and every log record is redacted. With verbose
    the (redacted) traceback is printed before the line.
    """
    verbose = verbose or _VERBOSE.get()  # a nested command (run_subcommand) inherits -v
    token = _VERBOSE.set(verbose)
    try:
        with redacted_logging(), _sigterm_raises():
            result = run()
    except (Exception, KeyboardInterrupt, SubcommandFailed) as exc:
        return report(exc, verbose=verbose)
    finally:
        _VERBOSE.reset(token)
    return result if isinstance(result, int) else 0


def report(exc: BaseException, *, verbose: bool = False) -> int:
    """Print exc as one line on stderr (after its traceback when verbose); its exit code."""
    if isinstance(exc, SubcommandFailed):  # a nested `msif` call has printed its own line
        return exc.exit_code
    code, line = _describe(exc, verbose)
    if verbose:
        sys.stderr.write(redact("".join(traceback.format_exception(exc))))
    print(redact(line), file=sys.stderr)
    return code


_WRITE_FAILED = re.compile(
    # torch.save on a full disk: "PytorchStreamWriter failed writing file data/0: file write
    # failed" or "unexpected pos 576 vs 534"; safetensors: "... No space left on device".
    r"PytorchStreamWriter failed writing file|unexpected pos \d+ vs \d+|No space left on device"
)


def _describe(exc: BaseException, verbose: bool) -> tuple[int, str]:
    if isinstance(exc, Terminated):
        return 143, "msif: terminated"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "msif: interrupted"
    if isinstance(exc, MsifError):
        return exc.exit_code, f"msif: error: {_one_line(str(exc))}"
    if isinstance(exc, OSError):
        return 1, f"msif: error: {_os_error(exc)}"
    first = _first_line(exc)
    if _WRITE_FAILED.search(first):
        # torch prefixes its C++ check: "[enforce fail at inline_container.cc:672] . ".
        detail = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", first)
        return 1, f"msif: error: writing a file failed; is the disk full? ({detail})"
    hint = "" if verbose else " (run with -v for the traceback)"
    what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return 1, f"msif: error: unexpected {what}{hint}"


def _os_error(exc: OSError) -> str:
    """`FILE: strerror` when the error names its file, else its own first line."""
    if exc.filename is not None and exc.strerror:
        where = f"{exc.filename}" if exc.filename2 is None else f"{exc.filename} → {exc.filename2}"
        return f"{where}: {exc.strerror}"
    return _first_line(exc) or type(exc).__name__


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else ""


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text.strip())


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While a command runs, SIGTERM raises Terminated, as Ctrl-C raises KeyboardInterrupt.

    Kubernetes sends SIGTERM when it pre-empts a pod; as an exception, it lets context
    managers remove their staging directories (and a pod's PID 1 ignores SIG_DFL anyway).
    Only the main thread may set handlers; a nested command keeps its caller's handler, and
    a SIGTERM the caller ignores stays ignored.
    """
    unset = threading.current_thread() is not threading.main_thread()
    if unset or signal.getsignal(signal.SIGTERM) in (_terminate, signal.SIG_IGN):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _terminate(signum: int, frame: Any) -> NoReturn:
    # Ignore a second SIGTERM so the cleanup the first one started finishes (SIGKILL follows).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


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
    """Run `msif command` in-process from keyword arguments; raise SubcommandFailed (a
    SystemExit, so a KFP task fails with its exit code) if it exits non-zero, after its one
    error line."""
    argv = subcommand_argv(command, **arguments)
    rc = main(argv)
    if rc != 0:
        raise SubcommandFailed(command, rc)


if __name__ == "__main__":
    sys.exit(main())
