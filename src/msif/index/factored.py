"""The factored tier of the corpus index: each document's gradient as its top-r singular triplets.

A document's weight gradient of one module is DW_z = Σ_t g_t a_tᵀ = Gᵀ A (G: T × out,
A: T × in'), of rank at most T. Its top-r singular triplets (u_k, s_k, v_k) keep r·(out + in' + 1)
values instead of out·in', and with r = rank(DW_z) they are exact. When T is below both
widths they come from QR factors of G and A and the SVD of a T × T core, without forming
DW_z; otherwise from DW_z itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from msif.core.artifact import Artifact, module_specs, per_module
from msif.core.fingerprint import model_fingerprint
from msif.core.hooks import hooked_batches
from msif.core.linalg import rotate_output
from msif.core.modules import ModuleSpec
from msif.errors import MsifError

TIER = "factored"


def document_factors(
    a: torch.Tensor, g: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-rank singular triplets of DW_n = g_nᵀ a_n for each sequence n of a batch.

    a (B, T, in'), g (B, T, out); returns U (B, r, out), S (B, r), V (B, r, in'), with
    U S Vᵀ summed over r the best rank-r approximation of DW_n (exact at full rank). Past a
    document's own rank the triplets are zero.
    """
    if rank < 1:
        raise MsifError(f"the index rank must be at least 1, not {rank}")
    b, t, i = a.shape
    o = g.shape[-1]
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, g = a.to(work), g.to(work)
    if t < min(o, i):
        # Gᵀ A = Q_g (R_g R_aᵀ) Q_aᵀ with Gᵀ = Q_g R_g, Aᵀ = Q_a R_a: an SVD of T × T.
        qg, rg = torch.linalg.qr(g.mT)  # (B, out, T), (B, T, T)
        qa, ra = torch.linalg.qr(a.mT)  # (B, in', T), (B, T, T)
        uc, s, vc = _core_svd(rg @ ra.mT, rank)
        u, v = qg @ uc, qa @ vc
    else:
        u, s, v = _core_svd(g.mT @ a, rank)
    k = min(rank, s.shape[-1])
    u, s, v = u[..., :k].mT, s[..., :k], v[..., :k].mT
    if k < rank:  # a document of fewer tokens than the rank: zero triplets fill the rest
        u = torch.cat([u, u.new_zeros(b, rank - k, o)], dim=1)
        v = torch.cat([v, v.new_zeros(b, rank - k, i)], dim=1)
        s = torch.cat([s, s.new_zeros(b, rank - k)], dim=1)
    return u.contiguous(), s.contiguous(), v.contiguous()


def _core_svd(c: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (B, m, k), S (B, k), V (B, n, k) of c (B, m, n), singular values descending.

    For a few triplets of a larger core, the eigenvectors of c cᵀ in float64 cost a fraction
    of a full SVD; squaring the condition number is harmless there, as the triplets kept are
    the large ones (float64 keeps 1e-8 of the largest). Near full rank: the SVD, exact.
    """
    m, n = c.shape[-2:]
    if 2 * rank > min(m, n):
        u, s, vh = torch.linalg.svd(c, full_matrices=False)
        return u, s, vh.mT
    small = c.double()
    gram = small @ small.mT if m <= n else small.mT @ small
    vals, vecs = torch.linalg.eigh(gram)  # ascending
    vals, vecs = vals.flip(-1)[..., :rank].clamp_min(0), vecs.flip(-1)[..., :rank]
    s = vals.sqrt()
    keep = s > s[..., :1] * 1e-8  # a document of lower rank: its extra triplets are zero
    inv = torch.where(keep, 1.0 / torch.where(keep, s, 1.0), 0.0)
    if m <= n:
        u, v = vecs, (small.mT @ vecs) * inv[..., None, :]
    else:
        u, v = (small @ vecs) * inv[..., None, :], vecs
    s = torch.where(keep, s, 0.0)
    return u.to(c.dtype), s.to(c.dtype), v.to(c.dtype)


@dataclass(frozen=True)
class Metric:
    """The norm a module's truncation minimises: ‖D_G^-p Q_Gᵀ X Q_A D_A^-p‖_F.

    Q_A, Q_G are the pre-train eigenbasis; D_G d_Aᵀ is a rank-1 fit of Λ + λ. Queries reach
    the corpus through (F_pt + λI)⁻¹, which weights directions of low curvature most: a plain
    SVD keeps the high-energy (high-curvature) directions of DW_z, which that inverse shrinks.
    power 0 is the plain Frobenius norm.
    """

    q_a: torch.Tensor
    q_g: torch.Tensor
    d_a: torch.Tensor
    d_g: torch.Tensor
    power: float

    def on(self, device: torch.device, dtype: torch.dtype) -> Metric:
        """This metric with its tensors on device in dtype (moved once per pass)."""
        move = lambda t: t.to(device, dtype)  # noqa: E731
        return Metric(move(self.q_a), move(self.q_g), move(self.d_a), move(self.d_g), self.power)


def pt_metric(factors, name: str, lambda_: float, power: float) -> Metric:
    """The metric of one module from pre-train factors and the damping λ of the queries."""
    d = factors.lambdas[name].double() + lambda_
    d_g = d.mean(1)
    d_a = d.mean(0) / d.mean()
    return Metric(
        factors.activation_eigvecs[name].double(),
        factors.gradient_eigvecs[name].double(),
        d_a,
        d_g,
        power,
    )


def whitening_metrics(factors, power: float, damping_factor: float) -> dict[str, Metric] | None:
    """Per module of the pre-train factors the metric of power p, λ by the relative damping
    rule damping_factor · mean(Λ); None for power 0 (plain SVD)."""
    from msif.ekfac.factors import Damping

    if power == 0:
        return None
    rule = Damping(damping_factor)
    return {n: pt_metric(factors, n, factors.damping_for(n, rule), power) for n in factors.specs}


def on_model_device(metrics: Mapping[str, Metric], model: nn.Module) -> dict[str, Metric]:
    """metrics moved once to the model's device, in its work dtype."""
    from msif.core.device import model_device, work_dtype

    device, work = model_device(model), work_dtype(next(model.parameters()).dtype)
    return {name: m.on(device, work) for name, m in metrics.items()}


def collect_into(chunks: list) -> Callable[..., None]:
    """A deferred callback appending a batch's host tensors to chunks, as one tuple."""
    return lambda *host: chunks.append(host)


def batch_doc_ids(batch: Mapping, seen: int) -> list[str]:
    """The batch's document ids; rows without ids are named row-N after the seen ones."""
    ids = batch.get("ids")
    if ids is not None:
        return list(ids)
    return [f"row-{seen + j}" for j in range(batch["input_ids"].shape[0])]


def eigenbasis_factors(
    a: torch.Tensor, g: torch.Tensor, rank: int, metric: Metric
) -> tuple[torch.Tensor, ...]:
    """document_factors of the whitened eigenbasis gradient X = D_G^-p Q_Gᵀ DW Q_A D_A^-p:
    U, S, V of X, and the scales D_G^p (out,) and D_A^p (in',) that unwhiten U and V."""
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    q_a, q_g = metric.q_a.to(a.device, work), metric.q_g.to(a.device, work)
    sa = metric.d_a.to(a.device, work) ** metric.power
    sg = metric.d_g.to(a.device, work) ** metric.power
    u, s, v = document_factors((a.to(work) @ q_a) / sa, rotate_output(g.to(work), q_g) / sg, rank)
    return u, s, v, sg, sa


def whitened_document_factors(
    a: torch.Tensor, g: torch.Tensor, rank: int, metric: Metric
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """document_factors, truncated in the metric's norm; U S Vᵀ stays in weight coordinates
    (exact at full rank), so a lookup needs nothing but the factors."""
    u, s, v, sg, sa = eigenbasis_factors(a, g, rank, metric)
    q_a, q_g = metric.q_a.to(u.device, u.dtype), metric.q_g.to(u.device, u.dtype)
    return rotate_output(u * sg, q_g.mT), s, (v * sa) @ q_a.T


@dataclass
class CorpusIndex(Artifact):
    """One corpus shard's documents as per-module factors U (N, r, out), S (N, r), V (N, r, in').

    model_fingerprint is that of the model the gradients were taken at (θ_pt): queries are
    scored against the index only when their corpus model is that one.
    """

    stem: ClassVar[str] = "index"

    doc_ids: list[str]
    rank: int
    specs: dict[str, ModuleSpec] = module_specs()
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = per_module("U", "S", "V")
    tier: str = TIER
    model_fingerprint: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def num_docs(self) -> int:
        """Number of documents in this shard."""
        return len(self.doc_ids)

    def values_per_document(self) -> int:
        """Stored values per document, over every module."""
        return sum(self.rank * (s.out_features + s.in_dim + 1) for s in self.specs.values())


def build_index(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    specs: dict[str, ModuleSpec],
    rank: int,
    *,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    metrics: dict[str, Metric] | None = None,
) -> CorpusIndex:
    """Factor every document's loss gradient (true labels) at model, module by module;
    metrics: per module the norm the truncation minimises (default: Frobenius)."""
    doc_ids: list[str] = []
    parts: dict[str, list[tuple[torch.Tensor, ...]]] = {name: [] for name in specs}
    metrics = on_model_device(metrics or {}, model)
    # lag 0: the SVDs synchronise per batch anyway, and a/g are checked before they run.
    for hb in hooked_batches(model, batches, specs, progress=progress, desc="index", lag=0):
        doc_ids += batch_doc_ids(hb.batch, len(doc_ids))
        # Padding needs no mask: its g is exactly zero, so it adds nothing to Gᵀ A.
        for spec, a, g in hb.modules():
            metric = metrics.get(spec.name)
            usv = (
                document_factors(a, g, rank)
                if metric is None
                else whitened_document_factors(a, g, rank, metric)
            )
            hb.defer(collect_into(parts[spec.name]), *(x.to(dtype) for x in usv))
    factors = {
        name: tuple(
            torch.cat([p[j] for p in chunks]) if chunks else _empty(specs[name], rank, j, dtype)
            for j in range(3)
        )
        for name, chunks in parts.items()
    }
    return CorpusIndex(
        doc_ids=doc_ids,
        rank=rank,
        specs=dict(specs),
        factors=factors,
        model_fingerprint=model_fingerprint(model, specs),
    )


def _empty(spec: ModuleSpec, rank: int, j: int, dtype: torch.dtype) -> torch.Tensor:
    shape = [(0, rank, spec.out_features), (0, rank), (0, rank, spec.in_dim)][j]
    return torch.zeros(shape, dtype=dtype)
