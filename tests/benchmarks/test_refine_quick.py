"""The refinement benchmark's --quick mode: K = 0 is EK-FAC, residuals fall, scores exposed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # plain `pytest` puts only tests/ on the path
    sys.path.insert(0, str(ROOT))

import msif  # noqa: E402
from benchmarks import refine  # noqa: E402
from msif.data.examples import batches  # noqa: E402

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def restore_threads():
    """The benchmark pins torch to one thread; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_refine_quick_starts_at_ekfac_and_reduces_the_residuals(capsys):
    rows = refine.main(["--quick"])
    out = capsys.readouterr().out
    assert "| K | multi-stage MRR | recall@10 | single-stage MRR |" in out
    assert [r.steps for r in rows] == list(refine.QUICK_STEPS)
    for r in rows:
        assert 0.0 <= r.multi_mrr <= 1.0 and 0.0 <= r.single_mrr <= 1.0
    first, last = rows[0], rows[-1]
    assert last.ft_residual < 0.5 * first.ft_residual
    assert last.pt_residual < 0.5 * first.pt_residual
    assert first.single_seconds == 0.0 and last.multi_seconds > 0.0
    # K = 0 scores are EK-FAC's: the node's eigenbasis path, here in weight coordinates.
    state = refine.world_state("small")
    for method in ("multi-stage", "single-stage"):
        doc_ids, query_ids, got = refine.refined_scores("small", method, 0)
        model = state.ft if method == "single-stage" else state.pt
        want = msif.score(model, batches(state.docs, 16, state.pad), state.ekfac[method]).values
        assert got.shape == (len(query_ids), len(doc_ids)) == tuple(want.shape)
        torch.testing.assert_close(
            got, want.double(), rtol=1e-4, atol=1e-5 * float(want.abs().max())
        )
        assert doc_ids == [d.id for d in state.docs] and query_ids == state.query_ids
    _, _, dot0 = refine.refined_scores("small", "gradient-dot", 0)
    _, _, dot5 = refine.refined_scores("small", "gradient-dot", 5)
    assert torch.equal(dot0, dot5)  # no curvature, nothing to refine


def test_refine_quick_lanczos_correction_lowers_every_residual(capsys):
    plain = refine.main(["--quick"])
    corrected = refine.main(["--quick", "--lanczos", "30"])
    out = capsys.readouterr().out
    assert "pt Lanczos: 30 steps," in out and "moved to 1" in out
    for p, c in zip(plain, corrected, strict=True):
        assert c.steps == p.steps
        assert c.ft_residual < p.ft_residual and c.pt_residual < p.pt_residual


def test_refine_quick_tracks_the_head_and_embeddings_when_asked(capsys):
    rows = refine.main(["--quick", "--modules", "all", "--steps", "0", "2"])
    out = capsys.readouterr().out
    assert "modules all;" in out
    state = refine.world_state("small", refine.PT_DAMPING_FACTOR, refine.DEFAULT_ALPHA, "all")
    kinds = {name: s.kind for name, s in state.specs.items()}
    blocks = refine.world_state("small").specs
    assert set(blocks) < set(kinds) and "embedding" in kinds.values()
    head = state.pt.get_output_embeddings()
    assert next(n for n, m in state.pt.named_modules() if m is head) in kinds
    assert rows[-1].ft_residual < rows[0].ft_residual
    assert rows[-1].pt_residual < rows[0].pt_residual
