"""Module groups: covariance and Λ fitted in N passes, each tracking one group of modules, are
the one-pass sums bit for bit; groups are contiguous and balanced; merges refuse mismatches."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import msif
from msif.core.artifact import merge_modules
from msif.core.modules import ModuleSelection
from msif.ekfac.groups import covariance_bytes, lambda_bytes, split_modules
from msif.errors import MismatchError, MsifError
from tests.support.tiny import make_batches, perturbed, random_examples, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt_neox")


@pytest.fixture(scope="module")
def data():
    # Prompt-masked rows and padding: the sampled labels sit at some positions only.
    return make_batches(random_examples(10, seed=7, prompt=True), 4)


@pytest.fixture(scope="module")
def one_pass(model, data):
    cov = msif.fit_covariance(model, data, seed=5)
    basis = msif.eigendecompose(cov, dtype=torch.float64)
    return cov, basis, msif.fit_lambda(model, data, basis)


def _equal_covariance(a, b) -> None:
    assert list(a.specs) == list(b.specs) and a.specs == b.specs
    assert (a.num_tokens, a.num_sequences, a.fingerprint, a.seed, a.stage) == (
        b.num_tokens,
        b.num_sequences,
        b.fingerprint,
        b.seed,
        b.stage,
    )
    for k in a.specs:
        assert torch.equal(a.activation[k], b.activation[k]), k
        assert torch.equal(a.gradient[k], b.gradient[k]), k


@pytest.mark.parametrize("groups", [2, 3])
def test_groups_give_the_one_pass_sums_bit_for_bit(model, data, one_pass, groups):
    cov, basis, lam = one_pass
    grouped = msif.fit_covariance(model, data, seed=5, module_groups=groups)
    _equal_covariance(grouped, cov)
    # A callable returning a fresh one-shot iterator per pass does as well as a list.
    lam_grouped = msif.fit_lambda(model, lambda: iter(data), basis, module_groups=groups)
    assert list(lam_grouped.specs) == list(lam.specs) and lam_grouped.info == lam.info
    assert (lam_grouped.num_tokens, lam_grouped.num_sequences) == (
        lam.num_tokens,
        lam.num_sequences,
    )
    for k in lam.specs:
        assert torch.equal(lam_grouped.sums[k], lam.sums[k]), k


def test_groups_sample_the_labels_of_one_pass(model, data, one_pass):
    # G depends on the sampled labels (another seed changes it): equal G in every group
    # means every pass sampled exactly the labels the one pass did.
    cov = one_pass[0]
    other = msif.fit_covariance(model, data, seed=6, module_groups=3)
    assert all(not torch.equal(other.gradient[k], cov.gradient[k]) for k in cov.specs)
    assert all(torch.equal(other.activation[k], cov.activation[k]) for k in cov.specs)


def test_head_blocks_and_saved_files_are_identical(tmp_path):
    # Grouped-query attention with split heads: G in blocks; the saved tensors are byte-equal.
    model = tiny_model("llama_gqa")
    data = make_batches(random_examples(9, seed=3), 3)
    sel = ModuleSelection(split_heads=True)
    one = msif.fit_covariance(model, data, modules=sel)
    two = msif.fit_covariance(model, data, modules=sel, module_groups=2)
    one.save(tmp_path / "one")
    two.save(tmp_path / "two")
    name = "covariance.safetensors"
    assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    basis = msif.eigendecompose(one, dtype=torch.float32)
    msif.fit_lambda(model, data, basis).save(tmp_path / "l1")
    msif.fit_lambda(model, data, basis, module_groups=4).save(tmp_path / "l4")
    name = "lambda.safetensors"
    assert (tmp_path / "l1" / name).read_bytes() == (tmp_path / "l4" / name).read_bytes()
    assert (tmp_path / "l1" / "lambda.json").read_text() == (
        tmp_path / "l4" / "lambda.json"
    ).read_text()


def test_groups_fitted_apart_merge_into_the_whole(model, data, one_pass):
    cov, basis, lam = one_pass
    names = list(cov.specs)
    parts = [
        msif.fit_covariance(model, data, seed=5, group=names[:3]),
        msif.fit_covariance(model, data, seed=5, group=names[3:]),
    ]
    assert list(parts[0].specs) == names[:3] and parts[0].fingerprint == cov.fingerprint
    _equal_covariance(merge_modules(parts), cov)
    lam_parts = [msif.fit_lambda(model, data, basis, group=g) for g in (names[5:], names[:5])]
    merged = merge_modules(lam_parts)
    assert list(merged.specs) == names[5:] + names[:5]  # the parts' order
    assert all(torch.equal(merged.sums[k], lam.sums[k]) for k in names)


def test_merge_refusals_name_what_differs(model, data, one_pass):
    cov, basis, _ = one_pass
    names = list(cov.specs)
    a = msif.fit_covariance(model, data, seed=5, group=names[:2])
    cases = [
        (msif.fit_covariance(model, data, seed=5, group=names[1:3]), "module 'gpt_neox"),
        (msif.fit_covariance(model, data[:2], seed=5, group=names[2:]), "different data"),
        (msif.fit_covariance(model, data, seed=6, group=names[2:]), "stage or seed differs"),
        (
            msif.fit_covariance(model, data, stage="ft", seed=5, group=names[2:]),
            "stage or seed differs",
        ),
        (msif.fit_covariance(perturbed(model), data, seed=5, group=names[2:]), "different models"),
    ]
    for other, message in cases:
        with pytest.raises(MismatchError, match=message) as err:
            merge_modules([a, other])
        assert "\n" not in str(err.value)
    with pytest.raises(MismatchError, match="is in parts 1 and 2"):
        merge_modules([a, cases[0][0]])
    # Equal counts but other recorded facts (a node's data fingerprint or shard).
    b = msif.fit_covariance(model, data, seed=5, group=names[2:])
    a.info, b.info = {"shard": 0}, {"shard": 1}
    with pytest.raises(MismatchError, match="record different 'shard'"):
        merge_modules([a, b])
    lam = msif.fit_lambda(model, data, basis, group=names[:2])
    other_basis = msif.eigendecompose(cov, dtype=torch.float32)
    with pytest.raises(MismatchError, match="different eigenbases"):
        merge_modules([lam, msif.fit_lambda(model, data, other_basis, group=names[2:])])
    with pytest.raises(MismatchError, match="cannot merge covariance partial sums with Λ"):
        merge_modules([b, lam])


def test_bad_groups_and_data_are_refused(model, data):
    n = len(msif.find_modules(model))
    with pytest.raises(MsifError, match=f"cannot fit {n + 1} module groups: only {n} modules"):
        msif.fit_covariance(model, data, module_groups=n + 1)
    with pytest.raises(MsifError, match="give a list of batches or a zero-argument callable"):
        msif.fit_covariance(model, iter(data), module_groups=2)
    msif.fit_covariance(model, iter(data))  # one pass reads a one-shot iterator as before
    passes = iter([data, data[::-1]])  # a source whose second pass is in another order
    with pytest.raises(MsifError, match="module group 2 of 2 read other batches than group 1"):
        msif.fit_covariance(model, lambda: next(passes), module_groups=2)
    with pytest.raises(MsifError, match="module 'nope' of the group is not a tracked module"):
        msif.fit_covariance(model, data, group=["nope"])


def test_groups_are_contiguous_balanced_and_exactly_n():
    rng = random.Random(0)
    for trial in range(200):
        weights = [rng.randint(1, 50) for _ in range(rng.randint(1, 9))]
        specs = {f"m{i}": _spec(f"m{i}", w) for i, w in enumerate(weights)}
        for n in range(1, len(weights) + 1):
            groups = split_modules(specs, n, lambda s: s.in_features)
            assert len(groups) == n and all(groups)
            assert [k for g in groups for k in g] == list(specs)  # contiguous, in order
            # The largest group is the least any contiguous cut into n groups achieves.
            best = min(
                max(sum(weights[a:b]) for a, b in itertools.pairwise((0, *cut, len(weights))))
                for cut in itertools.combinations(range(1, len(weights)), n - 1)
            )
            assert max(sum(s.in_features for s in g.values()) for g in groups) == best, trial
    assert split_modules(specs, 3, lambda s: s.in_features) == split_modules(
        dict(specs), 3, lambda s: s.in_features
    )


def test_group_weights_are_the_bytes_a_pass_holds():
    spec = msif.ModuleSpec("m", "linear", 6, 8, True, 4)  # in' 7, two blocks of 4
    assert covariance_bytes(spec) == 8 * (7 * 7 + 2 * 4 * 4)
    assert lambda_bytes(spec) == 8 * 8 * 7 + 4 * (7 * 7 + 2 * 4 * 4)
    assert lambda_bytes(spec, vector_bytes=8) == 8 * 8 * 7 + 8 * (7 * 7 + 2 * 4 * 4)


def _spec(name: str, weight: int) -> msif.ModuleSpec:
    return msif.ModuleSpec(name, "linear", weight, 1, False, 1)


def test_fit_factors_in_groups_is_the_same(model, data):
    one = msif.fit_factors(model, lambda: data, stage="pt", dtype=torch.float64)
    three = msif.fit_factors(model, lambda: data, stage="pt", dtype=torch.float64, module_groups=3)
    for k in one.specs:
        for field in ("activation_eigvecs", "gradient_eigvecs", "lambdas"):
            assert torch.equal(getattr(one, field)[k], getattr(three, field)[k]), (field, k)
