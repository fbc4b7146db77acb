"""Index lookup: preconditioned queries against a factored corpus index, then top-C candidates.

⟨W_q, U diag(S) Vᵀ⟩ = Σ_k s_k u_kᵀ W_q v_k per module, by batched matmuls over a chunk of
documents at a time; for low-rank queries W_q = U_q diag(S_q) V_qᵀ the same is
Σ_jk s_qj s_k (u_qjᵀ u_k)(v_qjᵀ v_k), which never forms W_q. No forward or backward pass:
the corpus model is not needed, only the index made at it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from msif.attribution.precondition import METHOD_INFO, PreconditionedQueries
from msif.core.artifact import specs_from_meta
from msif.core.fingerprint import check_fingerprint
from msif.errors import MismatchError, MsifError
from msif.index.factored import CorpusIndex
from msif.index.projected import (
    ProjectedIndex,
    check_factors,
    projected_module_scores,
    rotated_queries,
    work_dtype,
)

# Intermediate tensors are chunked over documents to about this many elements.
CHUNK_ELEMENTS = 1 << 24


def load_index(directory) -> CorpusIndex | ProjectedIndex:
    """The index artifact in directory, of either tier."""
    from pathlib import Path

    if (Path(directory) / f"{ProjectedIndex.stem}.json").exists():
        return ProjectedIndex.load(directory)
    return CorpusIndex.load(directory)


def check_pairing(
    queries: PreconditionedQueries, index: CorpusIndex | ProjectedIndex, where: str
) -> None:
    """Refuse an index that was not made at the queries' corpus model or lacks their modules."""
    corpus_model = METHOD_INFO[queries.method].corpus_model
    if corpus_model != "pt":
        raise MismatchError(
            f"{queries.method} queries pair with corpus gradients at θ_{corpus_model}, and "
            f"{where} holds them at the model it was built with (θ_pt): score the corpus instead"
        )
    for name, spec in queries.specs.items():
        have = index.specs.get(name)
        if have is None:
            raise MismatchError(f"{where} has no factors of module {name!r} the queries track")
        if (have.out_features, have.in_dim) != (spec.out_features, spec.in_dim):
            raise MismatchError(f"{where}: module {name!r} has another shape than the queries'")
    if queries.score_fingerprint is not None:
        fp = dict(queries.score_fingerprint)
        # The fingerprints hash the tracked modules: comparable only over the same set.
        if list(specs_from_meta(fp)) != list(index.specs):
            raise MismatchError(
                f"{where} tracks other modules than the queries' corpus model "
                f"({len(index.specs)} against {len(specs_from_meta(fp))}): build it with the "
                "module options of the pre-train factors"
            )
        check_fingerprint(fp, index.model_fingerprint, f"{where} (its model)")


def index_scores(
    queries: PreconditionedQueries,
    index: CorpusIndex | ProjectedIndex,
    where: str = "the index",
    factors=None,
    rotated: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scores (Q, N) of every indexed document on every query, summed over the queries' modules.

    factors: the pre-train factors a projected index was built in (it stores eigenbasis
    coordinates, into which the queries are rotated); unused by a factored index. rotated:
    those rotated queries, when already made (msif.index.projected.rotated_queries) by a
    caller that has checked the factors against this index.
    """
    check_pairing(queries, index, where)
    if isinstance(index, ProjectedIndex) and rotated is None:  # else the caller checked
        if factors is None:
            raise MsifError(f"{where} is a projected index: the lookup needs its pre-train factors")
        check_factors(index, factors, where)
        rotated = rotated_queries(queries, factors, work_dtype(index))
    total = torch.zeros(queries.num_queries, index.num_docs, dtype=torch.float64)
    for name in queries.specs:
        if isinstance(index, ProjectedIndex):
            total += projected_module_scores(rotated[name], index, name, CHUNK_ELEMENTS)
        else:
            u, s, v = index.factors[name]
            total += _module_scores(queries, name, u, s, v).double()
    return total


def _module_scores(queries, name, u, s, v) -> torch.Tensor:
    n, r, o = u.shape
    i = v.shape[-1]
    q = queries.num_queries
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    if name in queries.lowrank:
        uq, sq, vq = (x.to(work) for x in queries.lowrank[name])
        width = uq.shape[-1]
        step = max(1, CHUNK_ELEMENTS // max(1, q * width * r))
    else:
        w = queries.weight(name).to(work)
        step = max(1, CHUNK_ELEMENTS // max(1, q * r * min(o, i)))
    out = []
    for start in range(0, n, step):
        uc = u[start : start + step].to(work).reshape(-1, o)  # (n·r, out)
        vc = v[start : start + step].to(work).reshape(-1, i)
        if name in queries.lowrank:
            left = torch.matmul(uq.mT, uc.T)  # (Q, R, n·r)
            right = torch.matmul(vq.mT, vc.T)
            part = (left * right * sq[..., None]).sum(1)
        elif i <= o:  # contract through the smaller width
            part = (torch.matmul(uc, w) * vc).sum(-1)  # (Q, n·r)
        else:
            part = (torch.matmul(w, vc.T) * uc.T).sum(1)
        sc = s[start : start + step].to(work).reshape(-1)
        out.append((part * sc).reshape(q, -1, r).sum(-1))
    return torch.cat(out, dim=1) if out else torch.zeros(q, 0, dtype=work)


def top_candidates(
    queries: PreconditionedQueries,
    shards: Iterable[tuple[str, CorpusIndex | ProjectedIndex]],
    top_c: int,
    factors=None,
) -> dict[str, list[tuple[str, float]]]:
    """The top_c documents per query by index score over every shard: query id → [(doc, score)].

    shards: (where, index) pairs; where names a shard in errors. Ties keep shard order.
    """
    best_scores = torch.empty(queries.num_queries, 0, dtype=torch.float64)
    best_ids: list[list[str]] = [[] for _ in range(queries.num_queries)]
    rotated, basis = None, None  # made once for every projected shard
    for where, index in shards:
        if isinstance(index, ProjectedIndex) and factors is not None:
            if basis is None:
                from msif.ekfac.lambdas import eigenbasis_id

                basis = eigenbasis_id(factors)
                rotated = rotated_queries(queries, factors, work_dtype(index))
            check_factors(index, factors, where, basis)
        scores = index_scores(queries, index, where, factors, rotated)
        merged = torch.cat([best_scores, scores], dim=1)
        k = min(top_c, merged.shape[1])
        top = torch.topk(merged, k, dim=1, sorted=True)
        ids = [best_ids[q] + index.doc_ids for q in range(queries.num_queries)]
        best_ids = [[ids[q][j] for j in top.indices[q].tolist()] for q in range(len(ids))]
        best_scores = top.values
    return {
        qid: list(zip(best_ids[q], best_scores[q].tolist(), strict=True))
        for q, qid in enumerate(queries.query_ids)
    }
