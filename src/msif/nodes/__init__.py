"""One function per pipeline node; the CLI and the KFP components call exactly these."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from msif.attribution.precondition import PreconditionedQueries, precondition_queries
from msif.attribution.scoring import iter_scores
from msif.attribution.topk import RANKING_SCHEMA, TopK, merge_topk
from msif.core.modules import ModuleSelection
from msif.data.examples import Example, batches, pad_id_of
from msif.data.models import load_model
from msif.data.tables import TableOptions, iter_examples, require_queries, table_kind
from msif.ekfac.covariance import CovarianceSums, fit_covariance
from msif.ekfac.eigenbasis import Eigenbasis, eigendecompose
from msif.ekfac.factors import Damping, Factors
from msif.ekfac.lambdas import LambdaSums, fit_lambda
from msif.errors import DataError, MismatchError, MsifError

log = logging.getLogger("msif")


@dataclass(frozen=True)
class RunOptions:
    """Options shared by the model-running nodes."""

    max_length: int = 512
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    split_heads: bool = False
    progress: bool = True

    def selection(self) -> ModuleSelection:
        """The module selection these options describe."""
        return ModuleSelection(
            tuple(self.include), tuple(self.exclude), split_heads=self.split_heads
        )

    def table(self) -> TableOptions:
        """Tokenisation options."""
        return TableOptions(max_length=self.max_length)


def check_shard(shard: int, num_shards: int) -> None:
    """0 <= shard < num_shards."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise MsifError(f"shard {shard} of {num_shards} is not a valid shard index")


_STARTED: contextvars.ContextVar[float | None] = contextvars.ContextVar("started", default=None)


def timed(fn):
    """Record when a node started, so its output manifest can carry its wall time."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        token = _STARTED.set(time.perf_counter())
        try:
            return fn(*args, **kwargs)
        finally:
            _STARTED.reset(token)

    return wrapper


@contextlib.contextmanager
def published(out_uri: str, meta: dict) -> Iterator[Path]:
    """staged_output_dir whose manifest also records the node's wall time."""
    from msif.storage.gcs import staged_output_dir

    with staged_output_dir(out_uri, meta) as tmp:
        yield tmp
        started = _STARTED.get()
        if started is not None:
            meta["wall_s"] = round(time.perf_counter() - started, 3)


def inputs_key(**inputs) -> str:
    """A hash of everything an output depends on, to recognise a complete rerun."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def already_complete(out_uri: str, key: str) -> bool:
    """True when out_uri holds a complete output made from the same inputs."""
    from msif.storage.gcs import (
        BucketNotFoundError,
        StorageError,
        is_complete,
        read_manifest,
        split_gs,
    )

    try:
        if not is_complete(out_uri):
            return False
    except BucketNotFoundError:
        # Name the output, not the marker object this check happened to read.
        bucket, _ = split_gs(out_uri)
        raise StorageError(
            f"{out_uri}: checking the destination failed: no such bucket {bucket!r}"
        ) from None
    if read_manifest(out_uri).get("metadata", {}).get("inputs") != key:
        return False
    log.info("%s is complete for these inputs: skipped", out_uri)
    return True


def artifact_digest(uri: str) -> str:
    """Content digest of a published artifact (from its manifest's file hashes)."""
    from msif.storage.gcs import read_manifest

    files = read_manifest(uri).get("files", {})
    return inputs_key(files={k: v.get("sha256") for k, v in files.items()})


def _shard_examples(
    model,
    tokenizer,
    uri: str,
    shard: int,
    num_shards: int,
    opts: RunOptions,
    *,
    corpus: bool = False,
):
    """Examples of one shard of a table, with its source and row range."""
    from msif.data.parquet import ParquetSource

    check_shard(shard, num_shards)
    source = ParquetSource.open(uri)
    kind = table_kind(source.schema, uri)
    if corpus and kind != "corpus":
        raise DataError(f"{uri} is not a corpus: it needs `id` and `text` or `input_ids`")
    start, stop = source.shard_range(shard, num_shards)
    vocab = model.get_input_embeddings().num_embeddings
    examples = iter_examples(source, tokenizer, kind, opts.table(), vocab, start, stop)
    return examples, source, (start, stop)


def _stage_batches(
    model, tokenizer, data_uri: str, shard: int, num_shards: int, opts: RunOptions
) -> tuple[Iterator[dict], dict]:
    examples, source, (start, stop) = _shard_examples(
        model, tokenizer, data_uri, shard, num_shards, opts
    )
    info = {
        "data": data_uri,
        "data_fingerprint": source.fingerprint(),
        "shard": shard,
        "num_shards": num_shards,
        "rows": [start, stop],
        "options": _opts_info(opts),
    }
    return batches(examples, opts.batch_size, pad_id_of(tokenizer)), info


def _opts_info(opts: RunOptions) -> dict:
    d = asdict(opts)
    d.pop("progress")
    d.pop("device")
    return d


@timed
def fit_covariance_node(
    model_uri: str,
    data_uri: str,
    stage: str,
    shard: int,
    num_shards: int,
    out_uri: str,
    opts: RunOptions,
) -> None:
    """Covariance partial sums of one data shard."""

    _check_stage(stage)
    model, tokenizer = load_model(model_uri, device=opts.device, dtype=opts.dtype)
    data, info = _stage_batches(model, tokenizer, data_uri, shard, num_shards, opts)
    cov = fit_covariance(
        model, data, stage=stage, modules=opts.selection(), seed=opts.seed, progress=opts.progress
    )
    cov.info = {**info, "model": model_uri}
    with published(out_uri, {"node": "fit-covariance", "stage": stage}) as tmp:
        cov.save(tmp)


def _check_stage(stage: str) -> None:
    if stage not in ("pt", "ft"):
        raise MsifError(f"stage must be 'pt' or 'ft', not {stage!r}")


def _check_shard_set(infos: Sequence[dict], what: str) -> None:
    # Reducing an incomplete or mixed set of shards would silently give wrong factors.
    n = {i.get("num_shards") for i in infos}
    fps = {i.get("data_fingerprint") for i in infos}
    if len(n) != 1 or len(fps) != 1:
        raise MismatchError(f"{what} come from different shardings or data")
    total = n.pop()
    seen = sorted(i.get("shard") for i in infos)
    missing = sorted(set(range(total)) - set(seen))
    if missing:
        raise MsifError(f"{what}: shard {missing[0]} of {total} is missing")
    if len(seen) != len(set(seen)):
        raise MsifError(f"{what}: a shard was given twice")


def _load_dirs(uris: Sequence[str], loader):
    from msif.storage.gcs import local_input_dir

    if not uris:
        raise MsifError("no partial sums given")
    return [loader(local_input_dir(u)) for u in uris]


@timed
def eigendecompose_node(partial_uris: Sequence[str], out_uri: str, dtype: str = "float32") -> None:
    """Reduce covariance partial sums and eigendecompose them."""
    from msif.data.models import DTYPES

    parts = _load_dirs(partial_uris, CovarianceSums.load)
    _check_shard_set([p.info for p in parts], "covariance partial sums")
    basis = eigendecompose(parts, dtype=DTYPES[dtype])
    basis.info.update({k: parts[0].info.get(k) for k in ("data", "data_fingerprint", "model")})
    with published(out_uri, {"node": "eigendecompose", "stage": basis.stage}) as tmp:
        basis.save(tmp)


@timed
def fit_lambda_node(
    model_uri: str,
    data_uri: str,
    stage: str,
    eigenbasis_uri: str,
    shard: int,
    num_shards: int,
    out_uri: str,
    opts: RunOptions,
) -> None:
    """Λ partial sums of one data shard in a given eigenbasis."""
    from msif.storage.gcs import local_input_dir

    _check_stage(stage)
    basis = Eigenbasis.load(local_input_dir(eigenbasis_uri))
    if basis.stage != stage:
        raise MismatchError(f"{eigenbasis_uri} is a {basis.stage!r} eigenbasis, not {stage!r}")
    model, tokenizer = load_model(model_uri, device=opts.device, dtype=opts.dtype)
    data, info = _stage_batches(model, tokenizer, data_uri, shard, num_shards, opts)
    lam = fit_lambda(model, data, basis, seed=opts.seed, progress=opts.progress)
    lam.info.update(info)
    with published(out_uri, {"node": "fit-lambda", "stage": stage}) as tmp:
        lam.save(tmp)


@timed
def build_factors_node(eigenbasis_uri: str, partial_uris: Sequence[str], out_uri: str) -> None:
    """Reduce Λ partial sums into the stage's factors."""
    from msif.storage.gcs import local_input_dir

    basis = Eigenbasis.load(local_input_dir(eigenbasis_uri))
    parts = _load_dirs(partial_uris, LambdaSums.load)
    _check_shard_set([p.info for p in parts], "Λ partial sums")
    factors = Factors.build(basis, parts)
    factors.info.update({k: basis.info.get(k) for k in ("data", "model")})
    with published(out_uri, {"node": "build-factors", "stage": factors.stage}) as tmp:
        factors.save(tmp)


def table_fingerprint(table: pa.Table) -> str:
    """Content hash of a small table (queries)."""
    h = hashlib.sha256()
    for name in sorted(table.column_names):
        h.update(name.encode())
        h.update(json.dumps(table.column(name).to_pylist(), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


@timed
def query_gradients_node(
    model_uri: str,
    queries_uri: str,
    method: str,
    out_uri: str,
    opts: RunOptions,
    *,
    ft_factors_uri: str | None = None,
    pt_factors_uri: str | None = None,
    alpha: float | None = None,
    damping_factor: float = 0.1,
    damping: float | None = None,
    rank: int | None = None,
) -> None:
    """Precondition the queries' gradients at θ_ft for one method."""
    from msif.data.examples import tokenize_prompt_completion
    from msif.data.parquet import read_table
    from msif.storage.gcs import local_input_dir

    model, tokenizer = load_model(model_uri, device=opts.device, dtype=opts.dtype)
    table = read_table(queries_uri)
    require_queries(table, queries_uri)
    ids = [str(x) for x in table.column("id").to_pylist()]
    examples = tokenize_prompt_completion(
        tokenizer,
        ids,
        table.column("prompt").to_pylist(),
        table.column("completion").to_pylist(),
        opts.max_length,
    )
    ft = (
        Factors.load(local_input_dir(ft_factors_uri), model=model, stage="ft")
        if ft_factors_uri and method != "gradient-dot"
        else None
    )
    pt = (
        Factors.load(local_input_dir(pt_factors_uri), stage="pt")
        if pt_factors_uri and method == "multi-stage"
        else None
    )
    pq_ = precondition_queries(
        model,
        batches(examples, opts.batch_size, pad_id_of(tokenizer)),
        ids,
        method=method,
        ft_factors=ft,
        pt_factors=pt,
        alpha=alpha,
        damping=Damping(damping_factor, damping),
        rank=rank or None,
        modules=opts.selection(),
        progress=opts.progress,
    )
    pq_.info.update(
        {
            "queries": queries_uri,
            "queries_fingerprint": table_fingerprint(table),
            "model": model_uri,
            "max_length": opts.max_length,
        }
    )
    with published(out_uri, {"node": "query-gradients", "method": method}) as tmp:
        pq_.save(tmp)


@dataclass
class _Explained:
    """Token strings and per-token scores of the documents shown in reports."""

    tokens: dict[str, list[str]] = field(default_factory=dict)
    scores: dict[tuple[str, str], list[float]] = field(default_factory=dict)


def _explain(model, tokenizer, pq_, topk: TopK, explain_k: int, opts: RunOptions) -> _Explained:
    # A second, per-token pass over only the documents the report will show.
    wanted = sorted({d for q in range(topk.num_queries) for d, _ in topk.rows(q)[:explain_k]})
    out = _Explained()
    if not wanted:
        return out
    examples = {d: topk.extra(d) for d in wanted}
    stream = batches(list(examples.values()), opts.batch_size, pad_id_of(tokenizer))
    for bs in iter_scores(model, stream, pq_, per_token=True):
        for j, doc_id in enumerate(bs.ids):
            n = len(examples[doc_id].input_ids)
            out.tokens[doc_id] = tokenizer.convert_ids_to_tokens(examples[doc_id].input_ids)
            for q, qid in enumerate(pq_.query_ids):
                out.scores[(qid, doc_id)] = bs.token_scores[q, j, :n].float().tolist()
    return out


def _tracked(stream: Iterator[Example], seen: list[Example]) -> Iterator[Example]:
    for e in stream:
        seen.append(e)
        yield e


@timed
def score_node(
    model_uri: str,
    corpus_uri: str,
    preconditioned_uri: str,
    shard: int,
    num_shards: int,
    top_k: int,
    out_uri: str,
    opts: RunOptions,
    *,
    full: bool = False,
    explain_k: int = 10,
    path: str = "auto",
) -> None:
    """Score one corpus shard against the preconditioned queries; keep the top-k per query."""
    from msif.storage.gcs import local_input_dir

    if top_k < 1:
        raise MsifError("--top-k must be at least 1")
    from msif.data.parquet import ParquetSource

    # A rerun after a lost pod skips a shard whose complete output came from the same inputs.
    key = inputs_key(
        model=model_uri,
        corpus=ParquetSource.open(corpus_uri).fingerprint(),
        queries=artifact_digest(preconditioned_uri),
        shard=shard,
        num_shards=num_shards,
        top_k=top_k,
        explain_k=explain_k,
        full=full,
        path=path,
        options=_opts_info(opts),
    )
    if already_complete(out_uri, key):
        return
    pq_ = PreconditionedQueries.load(local_input_dir(preconditioned_uri))
    model, tokenizer = load_model(model_uri, device=opts.device, dtype=opts.dtype)
    examples, source, rows = _shard_examples(
        model, tokenizer, corpus_uri, shard, num_shards, opts, corpus=True
    )
    pending: list[Example] = []
    topk = TopK(top_k, pq_.num_queries)
    paths: dict[str, str] = {}
    num_docs = 0
    meta = {
        "node": "score",
        "method": pq_.method,
        "shard": shard,
        "num_shards": num_shards,
        "inputs": key,
    }
    with published(out_uri, meta) as tmp:
        writer = pq.ParquetWriter(tmp / "full_scores.parquet", _FULL_SCHEMA) if full else None
        stream = batches(_tracked(examples, pending), opts.batch_size, pad_id_of(tokenizer))
        for bs in iter_scores(
            model, stream, pq_, path=path, progress=opts.progress, paths_used=paths
        ):
            values = bs.scores.double().cpu().numpy()
            # The examples are kept only while they are in some query's top-k.
            topk.update(values, bs.ids, extras=pending[: len(bs.ids)])
            del pending[: len(bs.ids)]
            num_docs += len(bs.ids)
            if writer is not None:
                writer.write_table(_full_rows(pq_.query_ids, bs.ids, values))
        if writer is not None:
            writer.close()
        explained = _explain(model, tokenizer, pq_, topk, explain_k, opts)
        table = topk.to_table(pq_.query_ids, explained.tokens, explained.scores)
        pq.write_table(table, tmp / "scores.parquet")
        info = {
            **meta,
            "corpus": corpus_uri,
            "corpus_fingerprint": source.fingerprint(),
            "queries_fingerprint": pq_.info.get("queries_fingerprint"),
            "num_docs": num_docs,
            "rows": list(rows),
            "top_k": top_k,
            "modules": sorted(paths),
            "paths": paths,
            "left_out": pq_.left_out,
            "damping": pq_.damping,
            "alpha": pq_.info.get("alpha"),
            "rank": pq_.rank,
            "model": model_uri,
        }
        (tmp / "scores.json").write_text(json.dumps(info, indent=1, sort_keys=True))
    log.info("scored %d documents of shard %d/%d (%s)", num_docs, shard, num_shards, pq_.method)


_FULL_SCHEMA = pa.schema(
    [("query_id", pa.string()), ("doc_id", pa.string()), ("score", pa.float32())]
)


def _full_rows(query_ids, doc_ids, values: np.ndarray) -> pa.Table:
    q = np.repeat(np.asarray(query_ids, dtype=object), len(doc_ids))
    d = np.tile(np.asarray(doc_ids, dtype=object), len(query_ids))
    return pa.table(
        [
            pa.array(q, pa.string()),
            pa.array(d, pa.string()),
            pa.array(values.reshape(-1), pa.float32()),
        ],
        schema=_FULL_SCHEMA,
    )


@timed
def bm25_node(corpus_uri: str, queries_uri: str, top_k: int, out_uri: str) -> None:
    """BM25 baseline over the corpus text, written in the shard-scores format (shard 0 of 1)."""
    from msif.data.parquet import ParquetSource, read_table
    from msif.evaluation.bm25 import BM25Index

    source = ParquetSource.open(corpus_uri)
    if "text" not in source.schema.names or "id" not in source.schema.names:
        raise DataError(f"BM25 needs `id` and `text` columns in {corpus_uri}")
    ids, texts = [], []
    for b in source.iter_batches(["id", "text"]):
        ids += [str(x) for x in b.column("id").to_pylist()]
        texts += [str(x or "") for x in b.column("text").to_pylist()]
    table = read_table(queries_uri)
    require_queries(table, queries_uri)
    index = BM25Index.build(ids, texts)
    qids = [str(x) for x in table.column("id").to_pylist()]
    texts_q = [
        f"{p} {c}"
        for p, c in zip(
            table.column("prompt").to_pylist(), table.column("completion").to_pylist(), strict=True
        )
    ]
    topk = TopK(top_k, len(qids))
    topk.update(np.stack([index.score(t) for t in texts_q]), ids)
    meta = {"node": "bm25", "method": "bm25", "shard": 0, "num_shards": 1}
    with published(out_uri, meta) as tmp:
        pq.write_table(topk.to_table(qids), tmp / "scores.parquet")
        info = {
            **meta,
            "corpus": corpus_uri,
            "corpus_fingerprint": source.fingerprint(),
            "queries_fingerprint": table_fingerprint(table),
            "num_docs": len(ids),
            "top_k": top_k,
            "modules": [],
            "left_out": {},
        }
        (tmp / "scores.json").write_text(json.dumps(info, indent=1, sort_keys=True))


def _load_shard_scores(uris: Sequence[str]) -> dict[str, list[tuple[dict, pa.Table]]]:
    from msif.storage.gcs import local_input_dir

    by_method: dict[str, list[tuple[dict, pa.Table]]] = {}
    for uri in uris:
        d = local_input_dir(uri)
        if not (d / "scores.json").is_file() or not (d / "scores.parquet").is_file():
            raise MsifError(f"{uri} is not a shard-scores directory")
        info = json.loads((d / "scores.json").read_text())
        by_method.setdefault(info["method"], []).append((info, pq.read_table(d / "scores.parquet")))
    return by_method


def _check_scores(
    method: str, shards: list[tuple[dict, pa.Table]], corpus_fp: str, queries_fp: str
) -> None:
    infos = [i for i, _ in shards]
    for i in infos:
        if i.get("corpus_fingerprint") != corpus_fp:
            raise MismatchError(f"{method} shard {i.get('shard')} was scored on another corpus")
        if i.get("queries_fingerprint") != queries_fp:
            raise MismatchError(f"{method} shard {i.get('shard')} was scored for other queries")
    _check_shard_set(
        [{**i, "data_fingerprint": i.get("corpus_fingerprint")} for i in infos],
        f"{method} shard scores",
    )


def _snippets(corpus_uri: str, wanted: set[str], limit: int = 600) -> dict[str, str]:
    from msif.data.parquet import ParquetSource

    source = ParquetSource.open(corpus_uri)
    if "text" not in source.schema.names:
        return {}
    out = {}
    for b in source.iter_batches(["id", "text"]):
        for doc_id, text in zip(
            b.column("id").to_pylist(), b.column("text").to_pylist(), strict=True
        ):
            if str(doc_id) in wanted:
                out[str(doc_id)] = str(text or "")[:limit]
    return out


def _lambda_spectra(factor_uris: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    from msif.storage.gcs import local_input_dir

    spectra: dict[str, dict[str, np.ndarray]] = {}
    for uri in factor_uris:
        f = Factors.load(local_input_dir(uri))
        spectra[f.stage] = {
            k: np.sort(v.double().reshape(-1).numpy())[::-1] for k, v in f.lambdas.items()
        }
    return spectra


@timed
def rank_node(
    score_uris: Sequence[str],
    corpus_uri: str,
    queries_uri: str,
    top_k: int,
    out_uri: str,
    *,
    factor_uris: Sequence[str] = (),
    report_k: int = 5,
) -> dict:
    """Merge shard scores per method, evaluate against relevant_ids, write report + metrics."""
    from msif.data.parquet import ParquetSource, read_table
    from msif.evaluation.metrics import evaluate_rankings
    from msif.evaluation.report import write_report

    queries = read_table(queries_uri)
    require_queries(queries, queries_uri)
    corpus_fp = ParquetSource.open(corpus_uri).fingerprint()
    by_method = _load_shard_scores(score_uris)
    merged, run_info = {}, {"methods": {}}
    for method, shards in sorted(by_method.items()):
        _check_scores(method, shards, corpus_fp, table_fingerprint(queries))
        merged[method] = merge_topk([t for _, t in shards], top_k)
        info = shards[0][0]
        run_info["methods"][method] = {
            k: info.get(k)
            for k in ("modules", "left_out", "damping", "alpha", "rank", "model", "num_shards")
        }
    ranking = _ranking_table(merged, queries, corpus_uri)
    relevant = _relevant(queries)
    metrics = {"methods": {}, "top_k": top_k}
    for method, table in merged.items():
        lists = {}
        for q, d in zip(
            table.column("query_id").to_pylist(), table.column("doc_id").to_pylist(), strict=True
        ):
            lists.setdefault(q, []).append(d)
        metrics["methods"][method] = evaluate_rankings(lists, relevant, k=10)
    spectra = _lambda_spectra(factor_uris) if factor_uris else None
    with published(out_uri, {"node": "rank"}) as tmp:
        pq.write_table(ranking, tmp / "ranking.parquet")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
        shown = ranking.filter(pa.compute.less_equal(ranking.column("rank"), report_k))
        samples = {m: t.column("score").to_numpy() for m, t in merged.items()}
        write_report(Path(tmp), shown, queries, metrics, run_info, spectra, score_samples=samples)
    return metrics


def _relevant(queries: pa.Table) -> dict[str, list[str]]:
    if "relevant_ids" not in queries.column_names:
        return {}
    return {
        str(q): [str(x) for x in (r or [])]
        for q, r in zip(
            queries.column("id").to_pylist(),
            queries.column("relevant_ids").to_pylist(),
            strict=True,
        )
    }


def _ranking_table(merged: dict[str, pa.Table], queries: pa.Table, corpus_uri: str) -> pa.Table:
    wanted = {d for t in merged.values() for d in t.column("doc_id").to_pylist()}
    texts = _snippets(corpus_uri, wanted)
    relevant = {q: set(r) for q, r in _relevant(queries).items()}
    parts = []
    for method, t in sorted(merged.items()):
        q = t.column("query_id").to_pylist()
        d = t.column("doc_id").to_pylist()
        parts.append(
            pa.table(
                {
                    "method": [method] * t.num_rows,
                    "query_id": q,
                    "rank": t.column("rank"),
                    "doc_id": d,
                    "score": t.column("score"),
                    "text": [texts.get(x, "") for x in d],
                    "tokens": t.column("tokens"),
                    "token_scores": t.column("token_scores"),
                    "relevant": [x in relevant.get(qq, set()) for qq, x in zip(q, d, strict=True)],
                },
                schema=RANKING_SCHEMA,
            )
        )
    return pa.concat_tables(parts) if parts else RANKING_SCHEMA.empty_table()
