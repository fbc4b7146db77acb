"""Every way a command can fail reaches the user as one line on stderr and an exit code:
usage errors (argparse and option values) exit 2, runtime errors 1, SIGINT 130, SIGTERM 143;
-v adds the traceback; nothing half-written is published."""

from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from msif.cli import build_parser, main, run_subcommand
from msif.config import (
    MAX_SEED,
    Bm25Options,
    EigenOptions,
    ModelOptions,
    PreconditionOptions,
    RankOptions,
    ScoreOptions,
    none_if_not_positive,
)
from msif.errors import MsifError, OptionError, SubcommandFailed, add_secret
from msif.storage.publish import staged_output_dir

BM25 = ["bm25", "--corpus", "c.parquet", "--queries", "q.parquet", "--out"]


def subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.fixture
def command(monkeypatch):
    """install(fn, name="bm25"): `msif NAME ...` calls fn(args) instead of the node."""

    def install(fn, name: str = "bm25") -> None:
        monkeypatch.setitem(subparser(name)._defaults, "run", fn)

    return install


def leftovers(parent: Path) -> list[str]:
    """Whatever a command left in parent: published outputs or staging directories."""
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


# ----------------------------------------------------------------------------- option values


@pytest.mark.parametrize(
    "cls, values, message",
    [
        (PreconditionOptions, {"damping_factor": 0.0}, "--damping-factor must be > 0, not 0.0; "),
        (PreconditionOptions, {"damping_factor": -1}, "--damping-factor must be > 0, not -1"),
        (PreconditionOptions, {"damping_factor": math.nan}, "--damping-factor must be a finite"),
        (PreconditionOptions, {"damping_factor": math.inf}, "--damping-factor must be a finite"),
        (PreconditionOptions, {"damping_factor": True}, "--damping-factor must be a finite"),
        (PreconditionOptions, {"alpha": math.nan}, "--alpha must be a finite number, not nan"),
        (PreconditionOptions, {"alpha": math.inf}, "--alpha must be a finite number, not inf"),
        (PreconditionOptions, {"alpha": -math.inf}, "--alpha must be a finite number, not -inf"),
        (PreconditionOptions, {"alpha": 0.0}, "--alpha must be > 0, not 0.0; for a plain"),
        (PreconditionOptions, {"damping": math.nan}, "--damping must be a finite number"),
        (PreconditionOptions, {"damping": 0}, "--damping must be > 0, not 0"),
        (PreconditionOptions, {"query_rank": -1}, "--query-rank must be at least 0, not -1"),
        (PreconditionOptions, {"query_rank": 2.5}, "--query-rank must be an integer, not 2.5"),
        (PreconditionOptions, {"method": "magic"}, "--method 'magic' is not one of"),
        (ModelOptions, {"seed": -1}, "--seed must be at least 0, not -1"),
        (ModelOptions, {"seed": 2**64}, f"--seed must be at most {MAX_SEED}, not {2**64}"),
        (ModelOptions, {"seed": True}, "--seed must be an integer, not True"),
        (ModelOptions, {"max_length": 1}, "--max-length must be at least 2, not 1"),
        (ModelOptions, {"max_length": False}, "--max-length must be an integer, not False"),
        (ModelOptions, {"batch_size": 0}, "--batch-size must be at least 1, not 0"),
        (ModelOptions, {"batch_size": 4.0}, "--batch-size must be an integer, not 4.0"),
        (ModelOptions, {"device": "tpu"}, "--device 'tpu' is not auto, cpu, mps, cuda or cuda:N"),
        (ModelOptions, {"dtype": "int8"}, "--dtype 'int8' is not one of"),
        (ModelOptions, {"include": ("(",)}, "--include '(' is not a regex: "),
        (ModelOptions, {"exclude": "mlp"}, "--exclude must be a list of regexes, not 'mlp'"),
        (EigenOptions, {"factor_dtype": "int8"}, "--factor-dtype 'int8' is not one of"),
        (ScoreOptions, {"top_k": 0}, "--top-k must be at least 1, not 0"),
        (ScoreOptions, {"explain_k": -1}, "--explain-k must be at least 0, not -1"),
        (ScoreOptions, {"contraction": "fast"}, "--contraction 'fast' is not one of"),
        (Bm25Options, {"top_k": True}, "--top-k must be an integer, not True"),
        (RankOptions, {"report_k": 0}, "--report-k must be at least 1, not 0"),
    ],
)
def test_bad_option_values_are_refused_naming_the_flag(cls, values, message):
    with pytest.raises(OptionError) as e:
        cls(**values)
    assert str(e.value).startswith(message)
    assert e.value.exit_code == 2 and isinstance(e.value, MsifError)


def test_option_messages_say_what_to_do():
    with pytest.raises(OptionError) as e:
        PreconditionOptions(alpha=-0.5)
    assert str(e.value) == (
        "--alpha must be > 0, not -0.5; for a plain fine-tune without a proximity term give a "
        "small positive damping such as --alpha 1e-3 (any value from 1e-4 to 1 ranks alike)"
    )
    with pytest.raises(OptionError, match=r"0 leaves the inverse undamped \(near-zero"):
        PreconditionOptions(damping_factor=0)


def test_edge_values_are_accepted():
    assert ModelOptions(seed=MAX_SEED, max_length=2, batch_size=1).seed == MAX_SEED
    assert PreconditionOptions(alpha=1, damping=1e-12, damping_factor=5e-324).alpha == 1
    assert PreconditionOptions(query_rank=0).query_rank == 0  # 0 = dense
    assert ScoreOptions(explain_k=0, top_k=1).explain_k == 0
    assert RankOptions(report_k=1).report_k == 1


def test_kfp_unset_floats_become_none_but_nan_stays_to_be_refused():
    assert none_if_not_positive(0.0) is None and none_if_not_positive(-1.0) is None
    assert none_if_not_positive(0.5) == 0.5
    assert math.isnan(none_if_not_positive(math.nan))
    with pytest.raises(OptionError, match="--alpha must be a finite number, not nan"):
        PreconditionOptions(alpha=none_if_not_positive(math.nan))


# ----------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit-covariance", "--max-length", "abc"], "argument --max-length: invalid int value"),
        (["eigendecompose", "--factor-dtype", "int8"], "argument --factor-dtype: invalid choice"),
        (["score-corpus", "--model", "m"], "the following arguments are required: "),
        (["bm25", "--top-k", "1.5"], "argument --top-k: invalid int value: '1.5'"),
        (["no-such-command"], "argument COMMAND: invalid choice: 'no-such-command'"),
    ],
)
def test_argparse_errors_are_one_line_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    (line,) = stderr_lines(capsys)
    assert line.startswith(f"msif: error: {message}")
    assert line.endswith(f"(see msif {argv[0]} --help)") or argv[0] == "no-such-command"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "tpu"], "--device 'tpu' is not auto, cpu, mps, cuda or cuda:N"),
        (["--include", "("], "--include '(' is not a regex: missing ), unterminated subpattern"),
        (["--damping-factor", "0"], "--damping-factor must be > 0, not 0.0; 0 leaves"),
        (["--alpha", "nan"], "--alpha must be a finite number, not nan"),
        (["--alpha", "inf"], "--alpha must be a finite number, not inf"),
        (["--seed", str(2**64)], f"--seed must be at most {MAX_SEED}"),
        (["--query-rank", "-1"], "--query-rank must be at least 0, not -1"),
    ],
)
def test_bad_option_values_are_usage_errors_before_any_work(
    tmp_path, capsys, command, flags, message
):
    command(lambda args: pytest.fail("the node ran"), "precondition-queries")
    out = tmp_path / "out"
    argv = ["precondition-queries", "--model", "m", "--queries", "q", "--out", str(out)]
    assert main([*argv, *flags]) == 2
    (line,) = stderr_lines(capsys)
    assert line.startswith(f"msif: error: {message}")
    assert leftovers(tmp_path) == []


def test_main_job_options_are_checked_before_the_world_is_built(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--cache", str(tmp_path / "cache"), "--damping-factor", "0"]
    assert main(argv) == 2
    assert stderr_lines(capsys)[0].startswith("msif: error: --damping-factor must be > 0")
    assert leftovers(tmp_path) == []


def test_pipeline_without_an_action_is_one_line(capsys):
    assert main(["pipeline"]) == 2
    assert stderr_lines(capsys) == [
        "msif: error: choose an action: compile, submit or schedule (see msif pipeline --help)"
    ]


def test_global_flags_alone_run_the_main_job(command):
    ran = []
    command(lambda args: ran.append(args.verbose), "run")
    assert main(["-v"]) == 0 and ran == [True]


# ----------------------------------------------------------------------------- runtime errors


def fail_with(exc: BaseException, out: Path):
    """A command that starts publishing out, writes a file and raises exc."""

    def run(args):
        with staged_output_dir(str(out)) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise exc

    return run


DISK_FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/y")
TORCH_FULL = RuntimeError(
    "[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file "
    "data/0: file write failed"
)


@pytest.mark.parametrize(
    "exc, code, line",
    [
        (MsifError("bad input\n  on two lines"), 1, "msif: error: bad input on two lines"),
        (
            DISK_FULL,
            1,
            "msif: error: {out}: writing the output failed: /x/y: No space left on device; "
            "nothing published",
        ),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "/a", None, "/b"),
            1,
            "msif: error: /a → /b: No such file or directory",
        ),
        (ConnectionResetError(), 1, "msif: error: ConnectionResetError"),
        (
            TORCH_FULL,
            1,
            "msif: error: writing a file failed; is the disk full? (PytorchStreamWriter failed "
            "writing file data/0: file write failed)",
        ),
        (
            ValueError("weights of shape (3,)\nsecond line"),
            1,
            "msif: error: unexpected ValueError: weights of shape (3,) "
            "(run with -v for the traceback)",
        ),
        (AssertionError(), 1, "msif: error: unexpected AssertionError (run with -v for the "
         "traceback)"),
        (KeyboardInterrupt(), 130, "msif: interrupted"),
    ],
)  # fmt: skip
def test_failures_are_one_line_and_publish_nothing(tmp_path, capsys, command, exc, code, line):
    out = tmp_path / "out"
    command(fail_with(exc, out))
    assert main([*BM25, str(out)]) == code
    assert stderr_lines(capsys) == [line.format(out=out)]
    assert leftovers(tmp_path) == []


def test_verbose_prints_the_traceback_first(tmp_path, capsys, command):
    command(fail_with(ValueError("boom"), tmp_path / "out"))
    assert main(["-v", *BM25, str(tmp_path / "out")]) == 1
    lines = stderr_lines(capsys)
    assert lines[0] == "Traceback (most recent call last):"
    assert "ValueError: boom" in lines and lines[-1] == "msif: error: unexpected ValueError: boom"


def test_tracebacks_and_lines_never_show_a_secret(tmp_path, capsys, command):
    add_secret("s3cr3t-value")

    def leak(args):
        raise RuntimeError("sent Authorization: Bearer s3cr3t-value to https://u:pw@h/x")

    command(leak)
    for verbose in ([], ["-v"]):
        assert main([*verbose, *BM25, str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert "s3cr3t" not in err and "pw@" not in err
        assert err.splitlines()[-1].startswith("msif: error: unexpected RuntimeError: sent ")


def _has_dev_full() -> bool:
    return Path("/dev/full").exists() and stat.S_ISCHR(os.stat("/dev/full").st_mode)


@pytest.mark.skipif(not _has_dev_full(), reason="needs the /dev/full device")
def test_a_real_full_disk_is_one_line(tmp_path, capsys, command):
    """/dev/full fails every write with ENOSPC, as a full disk does (only ever opened and
    written in place here: a writer that replaced it by a file would break the device)."""
    import torch

    def save(target: str):
        def run(args):
            torch.save(torch.zeros(10_000), target)

        return run

    command(save("/dev/full"))  # every write to /dev/full fails with ENOSPC
    assert main([*BM25, str(tmp_path / "out")]) == 1
    (line,) = stderr_lines(capsys)
    assert line.startswith("msif: error: writing a file failed; is the disk full? (")

    def write(args):
        with open("/dev/full", "wb") as f:
            f.write(b"x" * 100_000)

    command(write)
    assert main([*BM25, str(tmp_path / "out")]) == 1
    assert stderr_lines(capsys) == ["msif: error: [Errno 28] No space left on device"]


def test_a_nested_command_prints_its_line_once(tmp_path, capsys, command):
    command(fail_with(MsifError("inner failure"), tmp_path / "inner"))
    command(lambda args: run_subcommand("bm25", corpus="c", queries="q", out="o"), "rank")
    argv = ["rank", "--scores", "s", "--corpus", "c", "--queries", "q", "--out", "o"]
    assert main(argv) == 1
    assert stderr_lines(capsys) == ["msif: error: inner failure"]
    with pytest.raises(SubcommandFailed, match="msif bm25 failed with exit code 1") as e:
        run_subcommand("bm25", corpus="c", queries="q", out="o")
    assert e.value.exit_code == 1 and e.value.code == 1 and isinstance(e.value, SystemExit)


def test_a_nested_command_inherits_verbose(tmp_path, capsys, command):
    command(fail_with(ValueError("inner"), tmp_path / "inner"))
    command(lambda args: run_subcommand("bm25", corpus="c", queries="q", out="o"), "rank")
    argv = ["-v", "rank", "--scores", "s", "--corpus", "c", "--queries", "q", "--out", "o"]
    assert main(argv) == 1
    lines = stderr_lines(capsys)
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "msif: error: unexpected ValueError: inner"


# ----------------------------------------------------------------------------- SIGTERM


def send_sigterm_after(seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    return timer


def test_sigterm_cleans_up_and_exits_143(tmp_path, capsys, command):
    out, cleaned = tmp_path / "out", []

    def slow(args):
        try:
            with staged_output_dir(str(out)) as tmp:
                (tmp / "half.bin").write_bytes(b"x")
                send_sigterm_after(0.2)
                time.sleep(30)
        finally:
            # A second SIGTERM during cleanup is ignored: this cleanup still finishes.
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            cleaned.append(True)

    before = signal.getsignal(signal.SIGTERM)
    command(slow)
    start = time.monotonic()
    assert main([*BM25, str(out)]) == 143
    assert time.monotonic() - start < 10
    assert stderr_lines(capsys) == ["msif: terminated"]
    assert cleaned == [True] and leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is before  # restored once the command ends


def test_sigterm_in_a_nested_command_ends_the_outer_one(tmp_path, capsys, command):
    def slow(args):
        send_sigterm_after(0.2)
        time.sleep(30)

    command(slow)
    command(lambda args: run_subcommand("bm25", corpus="c", queries="q", out="o"), "rank")
    argv = ["rank", "--scores", "s", "--corpus", "c", "--queries", "q", "--out", "o"]
    assert main(argv) == 143
    assert stderr_lines(capsys) == ["msif: terminated"]


def test_commands_run_outside_the_main_thread(tmp_path, command):
    # Signal handlers can only be set in the main thread: elsewhere main leaves them alone.
    command(lambda args: 7)
    codes = []
    thread = threading.Thread(target=lambda: codes.append(main([*BM25, str(tmp_path)])))
    thread.start()
    thread.join(timeout=30)
    assert codes == [7]


SLOW_COMMAND = textwrap.dedent(
    """
    import argparse, sys, time
    from msif.cli import build_parser, main
    from msif.storage.publish import staged_output_dir

    def slow(args):
        with staged_output_dir(args.out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            print("ready", flush=True)
            time.sleep(60)

    actions = build_parser()._actions
    sub = next(a for a in actions if isinstance(a, argparse._SubParsersAction))
    sub.choices["bm25"].set_defaults(run=slow)
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_real_process_terminated_by_sigterm(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_COMMAND, *BM25, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout.readline() == "ready\n"
        assert any(p.name.startswith(".out.msif-") for p in tmp_path.iterdir())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143
    assert err.splitlines()[-1] == "msif: terminated"
    assert leftovers(tmp_path) == []
