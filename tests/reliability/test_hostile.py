"""Every hostile case of cases.py against the real CLI: one `msif: error:` line and the right
exit code, no traceback, nothing published; or, for a handled case, a right answer."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from msif.cli import main
from tests.reliability.cases import CASES, Case
from tests.reliability.world import Ctx, write_same_size
from tests.support.cli_helpers import run_nodes
from tests.support.mini_world import build

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> tuple[dict, dict]:
    """The mini world (corpus written so that same-length edits keep its size) and its run."""
    w = build(tmp_path_factory.mktemp("world"))
    write_same_size(pq.read_table(w["corpus"]), Path(w["corpus"]))
    out = tmp_path_factory.mktemp("run")
    p = run_nodes(w, out, num_shards=2)
    p.update(
        pre_gradient_dot=str(out / "precondition-queries-gradient-dot"),
        pre_single_stage=str(out / "precondition-queries-single-stage"),
        eigen_pt=str(out / "eigendecompose-pt"),
        eigen_ft=str(out / "eigendecompose-ft"),
        **{
            f"{kind}_{s}": [str(out / f"fit-{node}-{s}" / str(i)) for i in range(2)]
            for kind, node in (("cov", "covariance"), ("lambda", "lambda"))
            for s in ("pt", "ft")
        },
    )
    return w, p


def _state(path: Path) -> str | None:
    """A digest of everything under path (None when it does not exist)."""
    if not path.exists():
        return None
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def _run(argv: list) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        return int(e.code or 0)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_case(case: Case, shared, tmp_path, capsys):
    w, p = shared
    c = Ctx(w, p, tmp_path)
    try:
        if case.before is not None:
            case.before(c)
        argv = case.argv(c)
        capsys.readouterr()
        before = _state(c.out)
        rc = _run(argv)
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        if case.handled:
            assert rc == 0, err
            case.check(c)
            return
        lines = [line for line in err.strip().splitlines() if not _log_line(line)]
        assert rc == case.code, err
        assert len(lines) == 1 and lines[0].startswith("msif"), lines
        assert ": error: " in lines[0] and case.expect in lines[0], lines[0]
        assert _state(c.out) == before, "a refused command changed its --out"
        if case.check is not None:
            case.check(c)
    finally:
        for cleanup in c.cleanups:
            cleanup()


def _log_line(line: str) -> bool:
    # msif's log format, for records that reach the captured stream
    return any(f" {level} " in line[:40] for level in logging._nameToLevel)
