"""`msif fit-covariance` and `msif fit-lambda` with --module-groups N write the tensors of one
pass byte for byte, re-reading their shard once per group, and record the group count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from msif.cli import main
from tests.support.cli_helpers import COMMON
from tests.support.mini_world import build

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build(tmp_path_factory.mktemp("mini"))


def _fit(node: str, w: dict, out: Path, groups: int, *extra) -> int:
    argv = [node, "--model", w["pt_model"], "--data", w["corpus"], "--stage", "pt"]
    argv += ["--shard", "1", "--num-shards", "2", *extra, "--out", str(out), *COMMON]
    return main([*map(str, argv), "--module-groups", str(groups)])


def _sidecar(path: Path, stem: str) -> dict:
    return json.loads((path / f"{stem}.json").read_text())


def test_groups_write_the_one_pass_tensors(world, tmp_path):
    outs = {}
    for groups in (1, 2, 3):
        outs[groups] = tmp_path / f"cov{groups}"
        assert _fit("fit-covariance", world, outs[groups], groups) == 0
    tensors = {g: (p / "covariance.safetensors").read_bytes() for g, p in outs.items()}
    assert tensors[2] == tensors[1] and tensors[3] == tensors[1]
    meta = {g: _sidecar(p, "covariance") for g, p in outs.items()}
    assert [meta[g]["info"].pop("module_groups") for g in (1, 2, 3)] == [1, 2, 3]
    assert meta[2] == meta[1] and meta[3] == meta[1]  # all else recorded is the one pass's
    # Λ in the eigenbasis of these sums (the other shard is fitted in one pass, as a pipeline
    # may mix them: the partials are the same).
    other = tmp_path / "cov-shard0"
    argv = ["fit-covariance", "--model", world["pt_model"], "--data", world["corpus"]]
    argv += ["--stage", "pt", "--shard", "0", "--num-shards", "2", "--out", other, *COMMON]
    assert main([*map(str, argv)]) == 0
    basis = tmp_path / "eig"
    argv = ["eigendecompose", "--partials", other, outs[2], "--out", basis]
    assert main([*map(str, argv)]) == 0
    lams = {}
    for groups in (1, 2):
        lams[groups] = tmp_path / f"lam{groups}"
        assert _fit("fit-lambda", world, lams[groups], groups, "--eigenbasis", basis) == 0
    a, b = ((lams[g] / "lambda.safetensors").read_bytes() for g in (1, 2))
    assert a == b
    assert _sidecar(lams[2], "lambda")["info"]["module_groups"] == 2


def test_too_many_groups_is_one_line_and_writes_nothing(world, tmp_path, capsys):
    out = tmp_path / "cov"
    assert _fit("fit-covariance", world, out, 99) == 1
    err = capsys.readouterr().err
    assert err == "msif: error: cannot fit 99 module groups: only 8 modules are tracked\n"
    assert not out.exists()
    assert _fit("fit-covariance", world, out, 0) == 2  # a usage error, before any work
    assert capsys.readouterr().err.startswith("msif: error: --module-groups must be at least 1")
    assert not out.exists()


def test_the_pipeline_passes_module_groups_and_fits_the_same_factors(world, tmp_path):
    from msif.workflow.inprocess import primary_output, run_dag
    from tests.support.cli_helpers import dag_settings

    factors = {}
    for groups in (1, 2):
        params = {**dag_settings().parameters(world), "module_groups": groups}
        runs = run_dag(params, str(tmp_path / f"run{groups}"))
        factors[groups] = {
            s: (Path(primary_output(runs, f"build-factors-{s}")) / "factors.safetensors")
            for s in ("pt", "ft")
        }
        for shard in runs["fit-lambda-ft"].outputs:
            info = _sidecar(Path(next(iter(shard.values())).path), "lambda")["info"]
            assert info["module_groups"] == groups
    for stage in ("pt", "ft"):
        assert factors[2][stage].read_bytes() == factors[1][stage].read_bytes(), stage
