"""The projected tier of the corpus index: a fixed number of values per document, any model.

Each document keeps the k coordinates of its gradient in the pre-train Kronecker eigenbasis,
DW̃_z = Q_Gᵀ DW_z Q_A, that are largest in |DW̃_z| / (Λ + λ)^p, as (value, index) pairs; the
budget k is split over modules by their expected share, Σ Λ / (Λ + λ)^2p. A query is rotated
into the same basis and read at those coordinates, so a score is a sparse dot product.

Why this and not a random projection: multi-stage queries reach the corpus through
(F_pt + λI)⁻¹, which makes them too ill-conditioned for a Gaussian sketch at these sizes
(whitened JL: Spearman 0.21 at 4096 values on the fact world), while in the eigenbasis a
document's gradient is concentrated enough that its own largest coordinates carry most of
every query's score (0.58 at 2048 pairs; benchmarks/RESULTS.md). It is deterministic (no
seed) and biased toward zero, which a ranking does not mind; the exact rerank removes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from msif.core.artifact import Artifact, module_specs, per_module
from msif.core.fingerprint import model_fingerprint
from msif.core.hooks import hooked_batches
from msif.core.linalg import rotate_output
from msif.core.modules import ModuleSpec
from msif.errors import MismatchError, MsifError
from msif.index.factored import batch_doc_ids

TIER = "projected"


def module_budgets(
    lambdas: Mapping[str, torch.Tensor], damping: Mapping[str, float], total: int, power: float
) -> dict[str, int]:
    """Coordinates per module (at least 1 each, at most its size), summing to total."""
    if total < len(lambdas):
        raise MsifError(f"the projected tier needs at least one value per module ({len(lambdas)})")
    share = {
        n: float((lam.double() / (lam.double() + damping[n]) ** (2 * power)).sum())
        for n, lam in lambdas.items()
    }
    whole = sum(share.values()) or 1.0
    budget = {n: max(1, min(lambdas[n].numel(), int(total * s / whole))) for n, s in share.items()}
    for n in sorted(share, key=share.get, reverse=True):  # the rounding's remainder
        spare = total - sum(budget.values())
        if spare <= 0:
            break
        budget[n] += min(spare, lambdas[n].numel() - budget[n])
    return budget


def document_coordinates(
    a: torch.Tensor,
    g: torch.Tensor,
    q_a: torch.Tensor,
    q_g: torch.Tensor,
    denominator: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence the k coordinates of Q_Gᵀ DW Q_A largest in |·| / denominator.

    a (B, T, in'), g (B, T, out), q_g block-diagonal (blocks, bs, bs), denominator (out, in');
    returns values (B, k) and flat int32 indices (B, k) into the (out, in') grid.
    """
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    rotated = rotate_output(g.to(work), q_g.to(a.device, work)).mT @ (
        a.to(work) @ q_a.to(a.device, work)
    )
    flat = rotated.reshape(rotated.shape[0], -1)
    score = flat.abs() / denominator.to(a.device, work).reshape(1, -1)
    idx = score.topk(k, dim=1).indices
    return flat.gather(1, idx), idx.to(torch.int32)


@dataclass
class ProjectedIndex(Artifact):
    """One corpus shard's documents as per-module (value, index) pairs in the pt eigenbasis."""

    stem: ClassVar[str] = "projected_index"

    doc_ids: list[str]
    power: float
    eigenbasis: str  # msif.ekfac.lambdas.eigenbasis_id of the pre-train factors
    specs: dict[str, ModuleSpec] = module_specs()
    coordinates: dict[str, tuple[torch.Tensor, torch.Tensor]] = per_module("values", "indices")
    damping: dict[str, float] = field(default_factory=dict)
    tier: str = TIER
    model_fingerprint: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def num_docs(self) -> int:
        """Number of documents in this shard."""
        return len(self.doc_ids)

    def values_per_document(self) -> int:
        """Stored numbers per document: a value and an index per kept coordinate."""
        return 2 * sum(int(v.shape[1]) for v, _ in self.coordinates.values())


def build_projected_index(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    factors,
    values: int,
    power: float,
    damping: Mapping[str, float],
    *,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> ProjectedIndex:
    """Keep about values/2 coordinates per document (a value and an index each), at model."""
    from msif.ekfac.lambdas import eigenbasis_id

    specs = factors.specs
    budgets = module_budgets(factors.lambdas, damping, max(1, values // 2), power)
    denominators = {n: (factors.lambdas[n].double() + damping[n]) ** power for n in specs}
    doc_ids: list[str] = []
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in specs}
    for hb in hooked_batches(model, batches, specs, progress=progress, desc="index"):
        doc_ids += batch_doc_ids(hb.batch, len(doc_ids))
        for spec, a, g in hb.modules():
            q_a, q_g = factors.eigenvectors(spec.name, a)
            v, i = document_coordinates(a, g, q_a, q_g, denominators[spec.name], budgets[spec.name])
            parts[spec.name].append((v.to("cpu", dtype), i.cpu()))
    coords = {}
    for name, chunks in parts.items():
        if chunks:
            coords[name] = (torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]))
        else:
            k = budgets[name]
            coords[name] = (torch.zeros(0, k, dtype=dtype), torch.zeros(0, k, dtype=torch.int32))
    return ProjectedIndex(
        doc_ids=doc_ids,
        power=power,
        eigenbasis=eigenbasis_id(factors),
        specs=dict(specs),
        coordinates=coords,
        damping=dict(damping),
        model_fingerprint=model_fingerprint(model, specs),
    )


def check_factors(index: ProjectedIndex, factors, where: str, basis: str | None = None) -> None:
    """Refuse pre-train factors other than those the index was built in; basis: their
    eigenbasis_id when already computed (it hashes every eigenvector)."""
    from msif.ekfac.lambdas import eigenbasis_id

    if (basis or eigenbasis_id(factors)) != index.eigenbasis:
        raise MismatchError(f"{where} was built in another pre-train eigenbasis than these factors")


def rotated_queries(queries, factors) -> dict[str, torch.Tensor]:
    """Per module the queries in the pre-train eigenbasis, one row per coordinate: (out·in', Q)
    (row-major, so that a document's coordinates are read as whole rows)."""
    out = {}
    for name in queries.specs:
        w = factors.to_eigenbasis(name, queries.weight(name).double())
        out[name] = w.reshape(w.shape[0], -1).T.contiguous()
    return out


def projected_module_scores(
    rotated: torch.Tensor, index: ProjectedIndex, name: str, chunk_elements: int
) -> torch.Tensor:
    """Scores (Q, N) of one module: the rotated queries (out·in', Q) read at each document's
    coordinates, in float32 unless the index is float64."""
    values, indices = index.coordinates[name]
    work = torch.float64 if values.dtype == torch.float64 else torch.float32
    w = rotated.to(work)
    q = w.shape[1]
    n, k = values.shape
    step = max(1, chunk_elements // max(1, q * k))
    out = []
    for s in range(0, n, step):
        idx = indices[s : s + step].long().reshape(-1)
        picked = torch.index_select(w, 0, idx).reshape(-1, k, q)  # (n, k, Q)
        vals = values[s : s + step].to(work).unsqueeze(1)  # (n, 1, k)
        out.append(torch.bmm(vals, picked).squeeze(1).T.double())
    return torch.cat(out, dim=1) if out else torch.zeros(q, 0, dtype=torch.float64)
