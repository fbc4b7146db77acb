"""Node `rank` (CPU): merge every method's shard scores, evaluate them, write the report."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from msif.config import DataOptions, RankOptions, add_options, from_namespace
from msif.errors import DataError, MismatchError, MsifError
from msif.nodes import runtime

NAME = "rank"


def add_parser(sub) -> None:
    """`msif rank`."""
    p = runtime.subparser(
        sub,
        NAME,
        "merge shard scores, evaluate, write the report",
        "Merge the shards' top-k per method, compute MRR and recall@10 against the queries'\n"
        "relevant_ids, write ranking.parquet, metrics.json and a Markdown/HTML report.\n"
        "Needs no model; the factors are optional and only plot their Λ spectra.",
    )
    p.add_argument("--scores", nargs="+", required=True, help="score-corpus and bm25 outputs")
    p.add_argument("--corpus", required=True, help="the scored corpus (for snippets)")
    p.add_argument("--queries", required=True, help="the queries (relevant_ids for metrics)")
    p.add_argument("--factors", nargs="*", default=[], help="factors whose Λ spectra to plot")
    runtime.add_out_argument(p, "where the ranking and report go")
    add_options(p, RankOptions)
    add_options(p, DataOptions, skip=("append_eos",))  # rank tokenises nothing
    p.set_defaults(
        run=lambda a: run(
            a.scores,
            a.corpus,
            a.queries,
            a.out,
            from_namespace(RankOptions, a),
            factor_uris=a.factors,
            data=from_namespace(DataOptions, a),
        )
    )


@runtime.timed
def run(
    score_uris: Sequence[str],
    corpus_uri: str,
    queries_uri: str,
    out_uri: str,
    options: RankOptions,
    *,
    factor_uris: Sequence[str] = (),
    data: DataOptions | None = None,
) -> dict:
    """Merge shard scores per method, evaluate against relevant_ids, write report + metrics."""
    import pyarrow.parquet as pq

    from msif.attribution.topk import merge_topk
    from msif.evaluation.metrics import evaluate_rankings
    from msif.evaluation.report import write_report

    runtime.check_output(out_uri, score_uris, corpus_uri, queries_uri, factor_uris)
    data = data or DataOptions()
    read = runtime.read_queries(queries_uri, data)
    queries = read.view()  # id, prompt, completion (text), relevant_ids
    queries_fp = runtime.table_fingerprint(read.canonical())
    corpus = runtime.open_table(corpus_uri, data)
    corpus_fp = corpus.fingerprint()
    merged, run_info = {}, {"methods": {}}
    for method, shards in sorted(_load_shard_scores(score_uris).items()):
        _check_scores(method, shards, corpus_fp, queries_fp)
        merged[method] = merge_topk([t for _, t in shards], options.top_k)
        info = shards[0][0]
        run_info["methods"][method] = {
            k: info.get(k)
            for k in (
                "modules",
                "left_out",
                "damping",
                "alpha",
                "rank",
                "model",
                "num_shards",
                "refinement",
            )  # fmt: skip
        }
    ranking = _ranking_table(merged, queries, corpus, data)
    relevant = _relevant(queries)
    metrics = {"methods": {}, "top_k": options.top_k}
    for method, table in merged.items():
        lists: dict[str, list[str]] = {}
        for q, d in zip(
            table.column("query_id").to_pylist(), table.column("doc_id").to_pylist(), strict=True
        ):
            lists.setdefault(q, []).append(d)
        metrics["methods"][method] = evaluate_rankings(lists, relevant, k=10)
    spectra = _lambda_spectra(factor_uris) if factor_uris else None
    with runtime.published(out_uri, {"node": NAME}) as tmp:
        pq.write_table(ranking, tmp / "ranking.parquet")
        runtime.write_json(tmp / "metrics.json", metrics)
        samples = {m: t.column("score").to_numpy() for m, t in merged.items()}
        write_report(
            Path(tmp),
            ranking,
            queries,
            metrics,
            run_info,
            spectra,
            score_samples=samples,
            shown_k=options.report_k,
        )
    return metrics


SIDECAR_KEYS = ("method", "shard", "num_shards", "corpus_fingerprint", "queries_fingerprint")


def _load_shard_scores(uris: Sequence[str]) -> dict[str, list[tuple[dict, pa.Table]]]:
    by_method: dict[str, list[tuple[dict, pa.Table]]] = {}
    for uri in uris:
        d = runtime.input_dir(uri)
        if not (d / "scores.json").is_file() or not (d / "scores.parquet").is_file():
            raise MsifError(f"{uri} is not a shard-scores directory")
        info = _sidecar(d / "scores.json", uri)
        by_method.setdefault(info["method"], []).append((info, _scores(d / "scores.parquet", uri)))
    return by_method


def _sidecar(path: Path, uri: str) -> dict:
    try:
        info = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{uri}: scores.json is not JSON") from None
    if not isinstance(info, dict):
        raise DataError(f"{uri}: scores.json is not a JSON object")
    missing = [k for k in SIDECAR_KEYS if k not in info]
    if missing:
        raise DataError(f"{uri}: scores.json lacks {', '.join(missing)}")
    return info


def _scores(path: Path, uri: str) -> pa.Table:
    import pyarrow.parquet as pq

    # Its columns and values are checked where the shards are merged (topk.merge_topk).
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{uri}: scores.parquet is not a readable Parquet file ({e})") from None


def _check_scores(
    method: str, shards: list[tuple[dict, pa.Table]], corpus_fp: str, queries_fp: str
) -> None:
    infos = [i for i, _ in shards]
    for i in infos:
        if i.get("corpus_fingerprint") != corpus_fp:
            raise MismatchError(f"{method} shard {i.get('shard')} was scored on another corpus")
        if i.get("queries_fingerprint") != queries_fp:
            raise MismatchError(f"{method} shard {i.get('shard')} was scored for other queries")
        if i.get("refinement") != infos[0].get("refinement"):
            raise MismatchError(
                f"{method} shard {i.get('shard')} was scored with queries refined otherwise "
                f"({i.get('refinement') or 'EK-FAC alone'}) than shard {infos[0].get('shard')} "
                f"({infos[0].get('refinement') or 'EK-FAC alone'}): rescore every shard with "
                "the same preconditioned queries"
            )
    runtime.check_shard_set(
        [{**i, "data_fingerprint": i.get("corpus_fingerprint")} for i in infos],
        f"{method} shard scores",
    )


def _snippets(source, data: DataOptions, wanted: set[str], limit: int = 600) -> dict[str, str]:
    from msif.data.tables import iter_texts

    if data.text_column not in source.schema.names:
        return {}
    out = {}
    for ids, texts in iter_texts(source, opts=data.table(512)):
        out.update({d: t[:limit] for d, t in zip(ids, texts, strict=True) if d in wanted})
    return out


def _lambda_spectra(factor_uris: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    from msif.ekfac.factors import Factors

    spectra: dict[str, dict[str, np.ndarray]] = {}
    for uri in factor_uris:
        f = Factors.load(runtime.input_dir(uri))
        spectra[f.stage] = {
            k: np.sort(v.double().reshape(-1).numpy())[::-1] for k, v in f.lambdas.items()
        }
    return spectra


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


def _ranking_table(
    merged: dict[str, pa.Table], queries: pa.Table, corpus, data: DataOptions
) -> pa.Table:
    from msif.attribution.topk import RANKING_SCHEMA

    wanted = {d for t in merged.values() for d in t.column("doc_id").to_pylist()}
    texts = _snippets(corpus, data, wanted)
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
