"""Corpus scoring: ⟨W_q, ∇ℓ(z)⟩ per module from one forward and backward pass, no stored DW_z."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from msif.attribution.precondition import PreconditionedQueries
from msif.core.artifact import specs_from_meta
from msif.core.fingerprint import check_fingerprint, model_fingerprint
from msif.core.hooks import HookedBatch, hooked_batches
from msif.core.modules import ModuleSpec, matching_specs
from msif.errors import MismatchError, MsifError

PATHS = ("auto", "materialise", "per-token")
# Intermediate tensors of the per-token contraction are chunked over queries to this size.
CHUNK_ELEMENTS = 1 << 25


@dataclass
class BatchScores:
    """Scores (Q, B) of one batch, per-position contributions (Q, B, T) when asked for."""

    scores: torch.Tensor
    token_scores: torch.Tensor | None = None
    ids: list[str] | None = None


@dataclass
class Scores:
    """Scores (Q, N) of all documents, per-position scores per batch when asked for."""

    values: torch.Tensor
    query_ids: list[str]
    modules: list[str]
    left_out: dict[str, str]
    token_scores: list[torch.Tensor] | None = None
    paths: dict[str, str] = field(default_factory=dict)


def path_costs(spec: ModuleSpec, queries: PreconditionedQueries, b: int, t: int) -> dict:
    """Multiply-add counts of the two ways to score one module (DESIGN §1 "Scoring cost")."""
    q, o, i = queries.num_queries, spec.out_features, spec.in_dim
    if spec.name in queries.lowrank:
        r = queries.lowrank[spec.name][1].shape[-1]
        per_token = b * t * q * r * (i + o + 1)
    else:
        per_token = q * b * t * (min(o, i) * max(o, i) + min(o, i))
    return {"materialise": b * t * o * i + q * b * o * i, "per-token": per_token}


def choose_path(spec, queries, b, t, per_token: bool, path: str) -> str:
    """The cheaper path unless forced; per-token scores need the per-token path."""
    if per_token:
        return "per-token"
    if path != "auto":
        return path
    costs = path_costs(spec, queries, b, t)
    return min(costs, key=costs.get)


def _per_token_dense(a, g, w) -> torch.Tensor:
    # Plain matmuls: torch.einsum picks slow batched kernels for these shapes on CPU.
    q, o, i = w.shape
    b, t = a.shape[:2]
    a2, g2 = a.reshape(1, b * t, i), g.reshape(1, b * t, o)
    step = max(1, CHUNK_ELEMENTS // max(1, b * t * min(o, i)))
    out = []
    for s in range(0, q, step):
        wc = w[s : s + step]
        if i <= o:  # contract through the smaller width
            out.append((torch.matmul(g2, wc) * a2).sum(-1))
        else:
            out.append((torch.matmul(a2, wc.mT) * g2).sum(-1))
    return torch.cat(out).reshape(q, b, t)


def _per_token_lowrank(a, g, usv) -> torch.Tensor:
    u, s, v = usv
    b, t = a.shape[:2]
    gu = torch.matmul(g.reshape(1, b * t, -1), u)  # (Q, BT, r)
    av = torch.matmul(a.reshape(1, b * t, -1), v)
    return (gu * av * s[:, None, :]).sum(-1).reshape(-1, b, t)


def per_example_gradients(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """DW_n = Σ_t g_t a_tᵀ for every sequence: (B, out, in')."""
    return torch.bmm(g.mT, a)


def module_scores(a, g, queries: PreconditionedQueries, name: str, path: str, dense_cache: dict):
    """Scores (Q, B) or per-token (Q, B, T) of one module; dense_cache keeps the queries'
    tensors on a's device between batches (moved once per pass, not per batch)."""
    work = a.dtype
    if path == "per-token":
        key = (name, path)
        if key not in dense_cache:
            if name in queries.lowrank:
                dense_cache[key] = tuple(x.to(a.device, work) for x in queries.lowrank[name])
            else:
                dense_cache[key] = queries.dense[name].to(a.device, work)
        if name in queries.lowrank:
            return _per_token_lowrank(a, g, dense_cache[key])
        return _per_token_dense(a, g, dense_cache[key])
    if name not in dense_cache:
        w = queries.weight(name).to(a.device, work)
        dense_cache[name] = w.reshape(w.shape[0], -1)
    dw = per_example_gradients(a, g)
    return dense_cache[name] @ dw.reshape(dw.shape[0], -1).T


def _score_batch(hb: HookedBatch, queries, per_token, path, dense_cache, paths_used):
    b, t = hb.batch["input_ids"].shape
    total = None
    # Padding needs no mask here: its output gradient g is exactly zero.
    for spec, a, g in hb.modules():
        chosen = choose_path(spec, queries, b, t, per_token, path)
        paths_used[spec.name] = chosen
        s = module_scores(a, g, queries, spec.name, chosen, dense_cache)
        if per_token and s.dim() == 2:
            raise AssertionError("per-token path must give (Q, B, T)")
        if not per_token and s.dim() == 3:
            s = s.sum(-1)
        total = s if total is None else total + s
    ids = hb.batch.get("ids")
    finite = torch.isfinite(total.reshape(total.shape[0], total.shape[1], -1)).all(-1)
    hb.defer(_FiniteScores(ids, list(queries.query_ids)), finite)  # read a batch later
    if per_token:
        return BatchScores(total.sum(-1), total, ids)
    return BatchScores(total, None, ids)


@dataclass
class _FiniteScores:
    """Raises for the first non-finite score of a batch, from its (Q, B) host-side flags.

    a and g were checked by the hooked loop (first), so a non-finite score comes from the
    queries' W_q or a float32 overflow."""

    ids: list | None
    query_ids: list[str]

    def __call__(self, finite: torch.Tensor) -> None:
        if bool(finite.all()):
            return
        q, n = (~finite).nonzero()[0].tolist()
        ids = self.ids
        doc = repr(ids[n]) if ids is not None and n < len(ids) else f"{n} of its batch"
        raise MsifError(
            f"non-finite score (NaN or inf) of document {doc} on query {self.query_ids[q]!r}: "
            "the preconditioned queries or the model overflow"
        )


def scoring_modules(model: nn.Module, queries: PreconditionedQueries):
    """Modules scored with this model (present with equal shape) and those left out."""
    if queries.score_fingerprint is not None:
        fp = dict(queries.score_fingerprint)
        check_specs = specs_from_meta(fp)
        check_fingerprint(
            fp, model_fingerprint(model, check_specs), f"the {queries.method} queries' corpus model"
        )
    kept, left_out = matching_specs(model, queries.specs)
    if not kept:
        raise MismatchError("no module of the preconditioned queries is in the scoring model")
    return kept, {**queries.left_out, **left_out}


def score(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    queries: PreconditionedQueries,
    *,
    per_token: bool = False,
    path: str = "auto",
    progress: bool = False,
) -> Scores:
    """Influence scores (Q, N) of every document in batches on every query.

    per_token=True also splits each score by input position: position t gets
    Σ_modules g_tᵀ W_q a_t (the position split, which carries every later prediction that
    attends to t; msif.attribution.explain splits by predicted token instead).
    """
    specs, left_out = scoring_modules(model, queries)
    paths: dict[str, str] = {}
    results = list(_iter(model, batches, queries, specs, per_token, path, progress, paths))
    values = (
        torch.cat([r.scores for r in results], dim=1)
        if results
        else torch.zeros(queries.num_queries, 0)
    )
    tokens = [r.token_scores for r in results] if per_token else None
    return Scores(values, list(queries.query_ids), list(specs), left_out, tokens, paths)


def iter_scores(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    queries: PreconditionedQueries,
    *,
    per_token: bool = False,
    path: str = "auto",
    progress: bool = False,
    paths_used: dict | None = None,
    to_host: bool = False,
) -> Iterator[BatchScores]:
    """Yield BatchScores batch by batch (streaming; memory independent of corpus size).

    to_host: yield them on the CPU, each copied without blocking and handed out a batch later
    (the host never waits on the batch in flight); else on the model's device, at once.
    """
    specs, _ = scoring_modules(model, queries)
    used = paths_used if paths_used is not None else {}
    yield from _iter(model, batches, queries, specs, per_token, path, progress, used, to_host)


def _iter(model, batches, queries, specs, per_token, path, progress, used, to_host=False):
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}")
    cache: dict = {}
    desc = f"score ({queries.method})"
    ready: deque[BatchScores] = deque()
    for hb in hooked_batches(model, batches, specs, progress=progress, desc=desc):
        scores = _score_batch(hb, queries, per_token, path, cache, used)
        if not to_host:
            yield scores
            continue
        hb.defer(_Collect(ready, scores.ids), scores.scores, *_tokens(scores))
        while ready:
            yield ready.popleft()
    while ready:  # the last batches, collected when the loop ended
        yield ready.popleft()


def _tokens(scores: BatchScores) -> tuple[torch.Tensor, ...]:
    return () if scores.token_scores is None else (scores.token_scores,)


@dataclass
class _Collect:
    """Appends a batch's host-side scores to ready, once their copy has finished."""

    ready: deque
    ids: list[str] | None

    def __call__(self, scores: torch.Tensor, token_scores: torch.Tensor | None = None) -> None:
        self.ready.append(BatchScores(scores, token_scores, self.ids))
