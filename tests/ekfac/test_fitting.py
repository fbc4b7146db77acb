"""EK-FAC fitting: shard additivity, determinism, masking, artifacts and their refusals."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import msif
from msif.core.modules import ModuleSelection
from msif.data.examples import collate
from msif.ekfac.covariance import CovarianceSums
from msif.ekfac.lambdas import LambdaSums
from msif.errors import MismatchError, MsifError
from tests.support.tiny import make_batches, perturbed, random_examples, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt_neox")


@pytest.fixture(scope="module")
def examples():
    return random_examples(10, seed=7)


def test_covariance_and_lambda_are_additive_over_shards(model, examples):
    whole = msif.fit_covariance(model, make_batches(examples, 4))
    parts = [
        msif.fit_covariance(model, make_batches(examples[:3], 2)),
        msif.fit_covariance(model, make_batches(examples[3:], 5)),
    ]
    total = parts[0] + parts[1]
    assert (total.num_tokens, total.num_sequences) == (whole.num_tokens, whole.num_sequences)
    for k in whole.specs:
        torch.testing.assert_close(total.activation[k], whole.activation[k])
        torch.testing.assert_close(total.gradient[k], whole.gradient[k])
    basis = msif.eigendecompose(whole, dtype=torch.float64)
    lam_whole = msif.fit_lambda(model, make_batches(examples, 4), basis)
    lam_sum = msif.fit_lambda(model, make_batches(examples[:6], 3), basis) + msif.fit_lambda(
        model, make_batches(examples[6:], 4), basis
    )
    for k in whole.specs:
        torch.testing.assert_close(lam_sum.sums[k], lam_whole.sums[k])


def test_same_seed_same_bits_other_seed_other_samples(model, examples):
    data = make_batches(examples, 4)
    a = msif.fit_covariance(model, data, seed=3)
    b = msif.fit_covariance(model, data, seed=3)
    c = msif.fit_covariance(model, data, seed=4)
    name = next(iter(a.specs))
    assert torch.equal(a.gradient[name], b.gradient[name])
    assert not torch.equal(a.gradient[name], c.gradient[name])
    assert torch.equal(a.activation[name], c.activation[name])  # inputs do not depend on labels


def test_factors_applied_twice_give_identical_results(model, examples):
    data = make_batches(examples, 5)
    basis = msif.eigendecompose(msif.fit_covariance(model, data), dtype=torch.float64)
    factors = msif.Factors.build(basis, msif.fit_lambda(model, data, basis))
    queries = make_batches(random_examples(2, seed=8, prompt=True), 2)
    p1 = msif.precondition_queries(
        model, queries, ["a", "b"], method="single-stage", ft_factors=_as_stage(factors, "ft")
    )
    p2 = msif.precondition_queries(
        model, queries, ["a", "b"], method="single-stage", ft_factors=_as_stage(factors, "ft")
    )
    for k in p1.dense:
        assert torch.equal(p1.dense[k], p2.dense[k])


def _as_stage(factors, stage):
    factors.stage = stage
    return factors


def test_mismatched_partial_sums_are_refused(model, examples):
    data = make_batches(examples, 5)
    a = msif.fit_covariance(model, data)
    other = msif.fit_covariance(perturbed(model), data)
    with pytest.raises(MismatchError, match="different models"):
        a + other
    fewer = msif.fit_covariance(model, data, modules=ModuleSelection(exclude=("mlp",)))
    with pytest.raises(MismatchError, match="different modules"):
        a + fewer
    basis = msif.eigendecompose(a, dtype=torch.float64)
    other_basis = msif.eigendecompose(a + a, dtype=torch.float32)  # same data, other bits
    lam = msif.fit_lambda(model, data, basis)
    with pytest.raises(MsifError, match="fitted in different eigenbases"):
        lam + msif.fit_lambda(model, data, other_basis)
    with pytest.raises(MismatchError, match="fitted in another eigenbasis"):
        msif.Factors.build(other_basis, lam)


def test_prompt_and_padding_contribute_nothing(model):
    # Masked and padded positions get no scored-token weight in the covariance.
    short = msif.Example("q", [5, 6, 7, 8], [-100, -100, 7, 8])
    long = msif.Example("r", [3, 4, 9, 10, 11, 12, 13], [-100, 4, 9, 10, 11, 12, 13])
    cov_pad = msif.fit_covariance(model, [collate([short, long], 0)])
    cov_sep = msif.fit_covariance(model, [collate([short], 0)]) + msif.fit_covariance(
        model, [collate([long], 0)]
    )
    assert cov_pad.num_tokens == 2 + 6  # long: labels at positions 1..6
    for k in cov_pad.specs:
        torch.testing.assert_close(cov_pad.activation[k], cov_sep.activation[k])
        torch.testing.assert_close(cov_pad.gradient[k], cov_sep.gradient[k])


def test_fit_factors_equals_the_step_by_step_result(model, examples):
    data = make_batches(examples, 4)
    sel = ModuleSelection(split_heads=True)
    cov = msif.fit_covariance(model, data, stage="ft", modules=sel, seed=5)
    basis = msif.eigendecompose(cov, dtype=torch.float64)
    steps = msif.Factors.build(basis, msif.fit_lambda(model, data, basis))
    calls = []

    def batches_fn():
        calls.append(1)
        return iter(data)  # a one-shot iterable: each pass needs a fresh one

    got = msif.fit_factors(model, batches_fn, stage="ft", modules=sel, seed=5, dtype=torch.float64)
    assert len(calls) == 2
    assert (got.stage, got.specs, got.seed, got.info) == ("ft", steps.specs, 5, steps.info)
    assert (got.num_tokens, got.num_sequences) == (steps.num_tokens, steps.num_sequences)
    assert got.fingerprint == steps.fingerprint
    for k in steps.specs:
        assert torch.equal(got.activation_eigvecs[k], steps.activation_eigvecs[k])
        assert torch.equal(got.gradient_eigvecs[k], steps.gradient_eigvecs[k])
        assert torch.equal(got.lambdas[k], steps.lambdas[k])
    with pytest.raises(TypeError, match="zero-argument callable"):
        msif.fit_factors(model, data, stage="pt")


def test_factors_round_trip_and_refuse_wrong_model(tmp_path, model, examples):
    data = make_batches(examples, 5)
    basis = msif.eigendecompose(msif.fit_covariance(model, data))
    factors = msif.Factors.build(basis, msif.fit_lambda(model, data, basis))
    factors.save(tmp_path / "f")
    loaded = msif.Factors.load(tmp_path / "f", model=model, stage="pt")
    for k in factors.specs:
        assert torch.equal(loaded.lambdas[k], factors.lambdas[k])
        assert torch.equal(loaded.gradient_eigvecs[k], factors.gradient_eigvecs[k])
    meta = json.loads((tmp_path / "f" / "factors.json").read_text())
    assert meta["stage"] == "pt" and meta["fingerprint"] and meta["msif_version"]
    with pytest.raises(MismatchError, match="other model weights"):
        msif.Factors.load(tmp_path / "f", model=perturbed(model))
    with pytest.raises(MismatchError, match="another model architecture|not in this model"):
        msif.Factors.load(tmp_path / "f", model=tiny_model("gpt2"))
    with pytest.raises(MismatchError, match="expected 'ft'"):
        msif.Factors.load(tmp_path / "f", stage="ft")
    blob = tmp_path / "f" / "factors.safetensors"
    blob.write_bytes(blob.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(MsifError, match="corrupt"):
        msif.Factors.load(tmp_path / "f")
    with pytest.raises(MsifError, match="not a factors artifact"):
        msif.Factors.load(tmp_path / "nothing")


def test_artifact_files_keep_their_tensor_keys_and_metadata(tmp_path, model, examples):
    # The on-disk format: these stems, tensor keys and JSON keys are what other runs read.
    data = make_batches(examples, 5)
    cov = msif.fit_covariance(model, data)
    basis = msif.eigendecompose(cov)
    lam = msif.fit_lambda(model, data, basis)
    header = {"kind", "msif_version", "sha256", "stage", "modules", "num_tokens"}
    header |= {"num_sequences", "fingerprint", "seed", "info"}
    for artifact, stem, suffixes in [
        (cov, "covariance", ("activation", "gradient")),
        (basis, "eigenbasis", ("Q_A", "Q_G", "eig_A", "eig_G")),
        (lam, "lambda", ("lambda",)),
        (msif.Factors.build(basis, lam), "factors", ("Q_A", "Q_G", "lambda")),
    ]:
        artifact.save(tmp_path / stem)
        keys = set(load_file(str(tmp_path / stem / f"{stem}.safetensors")))
        assert keys == {f"{m}.{s}" for m in cov.specs for s in suffixes}
        meta = json.loads((tmp_path / stem / f"{stem}.json").read_text())
        assert set(meta) == header and meta["kind"] == stem
        assert [d["name"] for d in meta["modules"]] == list(cov.specs)
    assert json.loads((tmp_path / "lambda" / "lambda.json").read_text())["info"] == lam.info
    blob = tmp_path / "factors" / "factors.safetensors"
    tensors = load_file(str(blob))
    first = next(iter(cov.specs))
    del tensors[f"{first}.lambda"]
    save_file(tensors, str(blob))
    sidecar = tmp_path / "factors" / "factors.json"
    meta = json.loads(sidecar.read_text())
    meta["sha256"] = hashlib.sha256(blob.read_bytes()).hexdigest()  # re-signed: only incomplete
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(MsifError, match=f"incomplete factors artifact: {first}.lambda is missing"):
        msif.Factors.load(tmp_path / "factors")


def test_partial_sums_round_trip(tmp_path, model, examples):
    cov = msif.fit_covariance(model, make_batches(examples, 5))
    cov.save(tmp_path / "c")
    back = CovarianceSums.load(tmp_path / "c")
    assert back.num_tokens == cov.num_tokens and back.specs == cov.specs
    basis = msif.eigendecompose(back)
    basis.save(tmp_path / "e")
    lam = msif.fit_lambda(model, make_batches(examples, 5), msif.Eigenbasis.load(tmp_path / "e"))
    lam.save(tmp_path / "l")
    assert torch.equal(
        LambdaSums.load(tmp_path / "l").sums[next(iter(cov.specs))], lam.sums[next(iter(cov.specs))]
    )
    with pytest.raises(MismatchError, match="holds a 'covariance' artifact"):
        _rename(tmp_path / "c", "covariance", "lambda")
        LambdaSums.load(tmp_path / "c")


def _rename(directory, old, new):
    for ext in ("safetensors", "json"):
        (directory / f"{old}.{ext}").rename(directory / f"{new}.{ext}")


def test_scoring_refuses_queries_made_for_another_corpus_model(model, examples):
    data = make_batches(examples, 5)
    ft = perturbed(model)
    fits = {}
    for stage, m in (("pt", model), ("ft", ft)):
        basis = msif.eigendecompose(msif.fit_covariance(m, data, stage=stage))
        fits[stage] = msif.Factors.build(basis, msif.fit_lambda(m, data, basis))
    q = make_batches(random_examples(2, seed=1, prompt=True), 2)
    pq = msif.precondition_queries(ft, q, ["a", "b"], ft_factors=fits["ft"], pt_factors=fits["pt"])
    with pytest.raises(MismatchError, match="corpus model"):
        msif.score(ft, data, pq)
    with pytest.raises(MismatchError, match="fine-tune factors"):
        msif.precondition_queries(
            model, q, ["a", "b"], ft_factors=fits["ft"], pt_factors=fits["pt"]
        )


def test_module_left_out_when_missing_from_pre_training_factors(model, examples):
    data = make_batches(examples, 5)
    ft = perturbed(model)
    basis = msif.eigendecompose(
        msif.fit_covariance(
            model, data, stage="pt", modules=ModuleSelection(exclude=(r"layers\.1\.mlp",))
        )
    )
    fpt = msif.Factors.build(basis, msif.fit_lambda(model, data, basis))
    basis = msif.eigendecompose(msif.fit_covariance(ft, data, stage="ft"))
    fft = msif.Factors.build(basis, msif.fit_lambda(ft, data, basis))
    pq = msif.precondition_queries(
        ft,
        make_batches(random_examples(1, 2, prompt=True), 1),
        ["q"],
        ft_factors=fft,
        pt_factors=fpt,
    )
    assert set(pq.left_out) == {
        "gpt_neox.layers.1.mlp.dense_h_to_4h",
        "gpt_neox.layers.1.mlp.dense_4h_to_h",
    }
    scores = msif.score(model, data, pq)
    assert scores.left_out == pq.left_out and len(scores.modules) == 6
