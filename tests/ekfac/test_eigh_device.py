"""Eigendecomposition on a CUDA device: one matrix at a time, CPU fallback, same meaning.

This machine has no GPU, so the CUDA branch runs with msif.ekfac.eigenbasis._cuda_eigh
replaced: by an eigh that returns other, equally valid eigenvectors (signs flipped, the null
space rotated), as another LAPACK does, or by one that fails as cuSOLVER does. Results are
compared by what they mean (A = QΛQᵀ, the damped inverse), never by raw Q. The last test runs
the real CUDA eigh where a GPU is present.
"""

from __future__ import annotations

import logging

import pytest
import torch

import msif
from msif.cli import main
from msif.ekfac import eigenbasis as eb
from msif.ekfac.eigenbasis import EighRunner, eigh_device
from msif.errors import MsifError
from tests.support.tiny import make_batches, random_examples, tiny_model

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt_neox")


@pytest.fixture(scope="module")
def batches():
    # 3 sequences of ≤ 6 tokens: fewer tokens than A's width, so A has a null space.
    return make_batches(random_examples(3, seed=11, max_len=6), 3)


@pytest.fixture(scope="module")
def cov(model, batches):
    return msif.fit_covariance(model, batches)


def other_valid_eigh(matrix: torch.Tensor, seed: int = 0):
    """eigh with other valid eigenvectors: random signs, and a random rotation within the
    (degenerate) null space, as a different solver may return."""
    vals, vecs = torch.linalg.eigh(matrix.cpu())
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, vals.shape, generator=gen, dtype=torch.float64) * 2 - 1
    vecs = vecs * signs[..., None, :]
    flat_vals, flat_vecs = vals.reshape(-1, vals.shape[-1]), vecs.reshape(-1, *vecs.shape[-2:])
    for b in range(flat_vals.shape[0]):
        null = flat_vals[b].abs() <= 1e-12 * flat_vals[b].abs().max()
        k = int(null.sum())
        if k > 1:
            rot, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
            flat_vecs[b][:, null] = flat_vecs[b][:, null] @ rot
    return vals, flat_vecs.reshape(vecs.shape)


def reconstruction_error(vals, vecs, matrix) -> float:
    back = vecs @ torch.diag_embed(vals) @ vecs.mT
    return float((back - matrix).abs().max() / matrix.abs().max())


def test_device_choice():
    assert eigh_device("cpu") == torch.device("cpu")
    assert eigh_device("mps") == torch.device("cpu")  # MPS has no float64
    if not torch.cuda.is_available():
        assert eigh_device("auto") == torch.device("cpu")
        with pytest.raises(MsifError, match="'cuda' asked for, but no CUDA device"):
            eigh_device("cuda")


def test_cuda_branch_moves_one_matrix_at_a_time(monkeypatch, cov):
    resident, peak, calls = [0], [0], []

    def device_eigh(matrix, device):
        assert device == CUDA and matrix.device.type == "cpu" and matrix.dtype == torch.float64
        resident[0] += matrix.numel()
        peak[0] = max(peak[0], resident[0])
        calls.append(tuple(matrix.shape))
        try:
            return other_valid_eigh(matrix, len(calls))
        finally:
            resident[0] -= matrix.numel()

    monkeypatch.setattr(eb, "_cuda_eigh", device_eigh)
    monkeypatch.setattr(eb, "eigh_device", lambda device: CUDA)
    basis = msif.eigendecompose(cov, dtype=torch.float64, device="cuda")
    # Every module's A, then its G (all head blocks in one call), each alone on the device.
    expected = []
    for name in cov.specs:
        expected += [tuple(cov.activation[name].shape), tuple(cov.gradient[name].shape)]
    assert calls == expected
    largest = max(cov.activation[n].numel() for n in cov.specs)
    largest = max(largest, *(cov.gradient[n].numel() for n in cov.specs))
    assert peak[0] == largest
    assert basis.info["eigh_device"] == "cuda"
    for name in cov.specs:
        a = cov.activation[name] / cov.num_tokens
        g = cov.gradient[name] / cov.num_tokens
        assert basis.activation_eigvecs[name].device.type == "cpu"
        q_a, l_a = basis.activation_eigvecs[name], basis.activation_eigvals[name]
        assert reconstruction_error(l_a, q_a, a) < 1e-12
        q_g, l_g = basis.gradient_eigvecs[name], basis.gradient_eigvals[name]
        assert reconstruction_error(l_g, q_g, g) < 1e-12


def test_other_valid_eigenvectors_give_the_same_damped_inverse(monkeypatch, model, batches, cov):
    cpu_basis = msif.eigendecompose(cov, dtype=torch.float64, device="cpu")
    monkeypatch.setattr(eb, "_cuda_eigh", lambda m, d: other_valid_eigh(m, 5))
    monkeypatch.setattr(eb, "eigh_device", lambda device: CUDA)
    dev_basis = msif.eigendecompose(cov, dtype=torch.float64, device="cuda")
    name = next(iter(cov.specs))
    # The basis really differs (else this test would prove nothing) ...
    assert not torch.allclose(
        dev_basis.activation_eigvecs[name], cpu_basis.activation_eigvecs[name]
    )
    cpu = msif.Factors.build(cpu_basis, msif.fit_lambda(model, batches, cpu_basis))
    dev = msif.Factors.build(dev_basis, msif.fit_lambda(model, batches, dev_basis))
    gen = torch.Generator().manual_seed(3)
    for name, spec in cov.specs.items():
        v = torch.randn(2, spec.out_features, spec.in_dim, generator=gen, dtype=torch.float64)
        lam = cpu.damping_for(name, msif.Damping(0.1))
        assert dev.damping_for(name, msif.Damping(0.1)) == pytest.approx(lam, rel=1e-10)
        want = cpu.inverse_apply(name, v, lam)
        got = dev.inverse_apply(name, v, lam)
        # ... but the damped inverse, what msif uses the basis for, is the same.
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10 * float(want.abs().max()))


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.53 GiB"),
        RuntimeError("cusolver error: CUSOLVER_STATUS_INTERNAL_ERROR, when calling syevd"),
    ],
    ids=["out-of-memory", "cusolver"],
)
def test_failed_cuda_eigh_falls_back_to_cpu_and_warns_once(monkeypatch, caplog, cov, error):
    attempts = []

    def failing(matrix, device):
        attempts.append(tuple(matrix.shape))
        if len(attempts) % 2:  # every other matrix fails on the device
            raise error
        return other_valid_eigh(matrix, len(attempts))

    monkeypatch.setattr(eb, "_cuda_eigh", failing)
    monkeypatch.setattr(eb, "eigh_device", lambda device: CUDA)
    with caplog.at_level(logging.WARNING, logger="msif"):
        basis = msif.eigendecompose(cov, dtype=torch.float64, device="cuda")
    assert len(attempts) == 2 * len(cov.specs)  # the device was tried for every matrix
    assert basis.info["eigh_cpu_fallbacks"] == len(cov.specs)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "on cuda failed" in warnings[0].getMessage()
    assert str(error).splitlines()[0] in warnings[0].getMessage()
    first = next(iter(cov.specs))
    # The matrix that failed was done on the CPU: exactly the CPU's eigenvectors.
    want_vals, want_vecs = torch.linalg.eigh(cov.activation[first] / cov.num_tokens)
    assert torch.equal(basis.activation_eigvecs[first], want_vecs)
    assert torch.equal(basis.activation_eigvals[first], want_vals)
    for name in cov.specs:
        g = cov.gradient[name] / cov.num_tokens
        q_g, l_g = basis.gradient_eigvecs[name], basis.gradient_eigvals[name]
        assert reconstruction_error(l_g, q_g, g) < 1e-12


def test_runner_counts_fallbacks(monkeypatch):
    monkeypatch.setattr(eb, "_cuda_eigh", lambda m, d: (_ for _ in ()).throw(RuntimeError("x")))
    run = EighRunner(CUDA)
    m = torch.eye(3, dtype=torch.float64) * 2
    for _ in range(3):
        vals, _ = run(m)
        assert torch.equal(vals, torch.full((3,), 2.0, dtype=torch.float64))
    assert run.fallbacks == 3


def test_cli_device_option(tmp_path, capsys):
    assert (
        main(["eigendecompose", "--partials", "p", "--out", str(tmp_path / "e"), "--device", "tpu"])
        == 2
    )
    assert "--device 'tpu' is not auto, cpu, mps, cuda or cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        rc = main(
            ["eigendecompose", "--partials", "p", "--out", str(tmp_path / "e"), "--device", "cuda"]
        )
        assert rc == 1
        assert "'cuda' asked for, but no CUDA device is available" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_eigh_matches_cpu_in_meaning(model, batches, cov):  # pragma: no cover
    cpu_basis = msif.eigendecompose(cov, dtype=torch.float64, device="cpu")
    dev_basis = msif.eigendecompose(cov, dtype=torch.float64, device="cuda")
    assert dev_basis.info["eigh_device"].startswith("cuda")
    for name in cov.specs:
        a = cov.activation[name] / cov.num_tokens
        q, lam = dev_basis.activation_eigvecs[name], dev_basis.activation_eigvals[name]
        assert reconstruction_error(lam, q, a) < 1e-10
        torch.testing.assert_close(lam, cpu_basis.activation_eigvals[name], atol=1e-10, rtol=0)
