"""The ranking report: `report.md` (KFP Markdown view) and a self-contained `report.html`.

The HTML loads nothing: CSS is inline, plots are base64 PNGs rendered with matplotlib's Agg
canvas, and a Content-Security-Policy forbids scripts and remote resources as a second line of
defence behind escaping every string that comes from data (document text, ids, run info).

Token highlighting: a document's per-token scores (which sum to its score) are normalised by
the document's largest |score|; green marks proponent tokens (positive: they lower the query's
loss), red opponents. The Markdown report bolds the few most positive tokens instead.
"""

from __future__ import annotations

import base64
import codecs
import html
import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from msif.attribution.topk import RANKING_SCHEMA
from msif.errors import DataError
from msif.version import __version__

METHOD_ORDER = ("multi-stage", "single-stage", "gradient-dot", "bm25")
RANKING_REQUIRED = RANKING_SCHEMA.names[:5]  # text, tokens, scores and flags may be absent
QUERIES_REQUIRED = ("id", "prompt", "completion")
HTML_TOKENS = 256  # tokens shown per document in HTML (a window around the strongest token)
MD_TOKENS = 120
MD_BOLD = 5  # most positive tokens bolded per document in Markdown
MIN_ALPHA = 0.05  # weaker highlights are left plain, which keeps the HTML small
PLOT_POINTS = 400  # points per spectrum line; long spectra are sampled log-uniformly


@dataclass(frozen=True)
class RankedDoc:
    """One row of the ranking as the report shows it."""

    rank: int
    doc_id: str
    score: float
    text: str
    tokens: list[str]
    token_scores: list[float]
    relevant: bool


@dataclass(frozen=True)
class QueryView:
    """A query with its documents per method."""

    id: str
    prompt: str
    completion: str
    relevant_ids: list[str]
    docs: dict[str, list[RankedDoc]] = field(default_factory=dict)
    in_queries: bool = True


# --------------------------------------------------------------------------- input → views


def _column(table: pa.Table, name: str, default: Any) -> list:
    if name in table.column_names:
        return table.column(name).to_pylist()
    return [default] * table.num_rows


def _require(table: pa.Table, names: Sequence[str], what: str) -> None:
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise DataError(f"{what} lacks column(s) {', '.join(missing)}")


def order_methods(methods) -> list[str]:
    """Known methods in their fixed order, then any others alphabetically."""
    methods = set(methods)
    return [m for m in METHOD_ORDER if m in methods] + sorted(methods - set(METHOD_ORDER))


def _ranked_docs(ranking: pa.Table) -> dict[str, dict[str, list[RankedDoc]]]:
    _require(ranking, RANKING_REQUIRED, "the ranking table")
    cols = [
        ranking.column(n).to_pylist() for n in ("method", "query_id", "rank", "doc_id", "score")
    ]
    extra = [
        _column(ranking, "text", ""),
        _column(ranking, "tokens", None),
        _column(ranking, "token_scores", None),
    ]
    out: dict[str, dict[str, list[RankedDoc]]] = {}
    for method, qid, rank, doc, score, text, toks, ts in zip(*cols, *extra, strict=True):
        toks, ts = list(toks or []), [float(x) for x in ts or []]
        if len(toks) != len(ts):
            raise DataError(f"document {doc!r}: {len(toks)} tokens but {len(ts)} token scores")
        row = RankedDoc(int(rank), str(doc), float(score), str(text or ""), toks, ts, False)
        out.setdefault(str(qid), {}).setdefault(str(method), []).append(row)
    for per_method in out.values():
        for docs in per_method.values():
            docs.sort(key=lambda d: d.rank)
    return out


def build_views(ranking: pa.Table, queries: pa.Table) -> list[QueryView]:
    """Queries in table order (then unknown ranked query ids), each with its ranked docs."""
    _require(queries, QUERIES_REQUIRED, "the queries table")
    ranked = _ranked_docs(ranking)
    flags = _relevant_flags(ranking)
    views = []
    rel_col = _column(queries, "relevant_ids", None)
    for qid, prompt, completion, rel in zip(
        *(queries.column(n).to_pylist() for n in QUERIES_REQUIRED), rel_col, strict=True
    ):
        qid, rel_ids = str(qid), [str(x) for x in rel or []]
        docs = _mark(ranked.pop(qid, {}), set(rel_ids), flags, qid)
        views.append(QueryView(qid, str(prompt or ""), str(completion or ""), rel_ids, docs))
    for qid in sorted(ranked):
        docs = _mark(ranked[qid], set(), flags, qid)
        views.append(QueryView(qid, "", "", [], docs, in_queries=False))
    return views


def _relevant_flags(ranking: pa.Table) -> set[tuple[str, str]]:
    if "relevant" not in ranking.column_names:
        return set()
    rows = zip(
        ranking.column("query_id").to_pylist(),
        ranking.column("doc_id").to_pylist(),
        ranking.column("relevant").to_pylist(),
        strict=True,
    )
    return {(str(q), str(d)) for q, d, r in rows if r}


def _mark(
    per_method: dict[str, list[RankedDoc]], rel: set[str], flags: set, qid: str
) -> dict[str, list[RankedDoc]]:
    # A hit is a doc the ranking marked relevant or one listed in the query's relevant_ids.
    return {
        m: [replace(d, relevant=d.doc_id in rel or (qid, d.doc_id) in flags) for d in docs]
        for m, docs in per_method.items()
    }


# --------------------------------------------------------------------------- tokens


def _byte_decoder() -> dict[str, int]:
    # Byte-level BPE (GPT-2, GPT-NeoX) spells each byte as one printable character: printable
    # Latin-1 bytes as themselves, every other byte as U+0100 + its index among those others.
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(0x100 + i): b for i, b in enumerate(others)})
    return table


_BYTES = _byte_decoder()
_NO_SPACE_BEFORE = re.compile(r"^[.,;:!?%)\]}'\"]+$")


def display_tokens(tokens: Sequence[str]) -> list[str]:
    """The text each token stands for, leading space included, so that joining gives the text."""
    if not tokens:
        return []
    if any(("\u0120" in t or "\u010a" in t) for t in tokens) and all(
        c in _BYTES for t in tokens for c in t
    ):
        # Multi-byte characters split over tokens appear at the token that completes them.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out = [decoder.decode(bytes(_BYTES[c] for c in t)) for t in tokens]
        out[-1] += decoder.decode(b"", final=True)
        return out
    if any(t.startswith("\u2581") for t in tokens):
        return [t.replace("\u2581", " ") for t in tokens]
    out = [tokens[0].removeprefix("##")]
    for t in tokens[1:]:
        if t.startswith("##"):
            out.append(t[2:])
        elif _NO_SPACE_BEFORE.match(t):
            out.append(t)
        else:
            out.append(" " + t)
    return out


def token_window(scores: Sequence[float], limit: int) -> tuple[int, int]:
    """[start, stop) of at most limit tokens, centred on the largest |score|."""
    n = len(scores)
    if n <= limit:
        return 0, n
    peak = int(np.argmax(np.abs(np.asarray(scores, np.float64))))
    start = min(max(peak - limit // 2, 0), n - limit)
    return start, start + limit


def _split_space(text: str) -> tuple[str, str]:
    body = text.lstrip()
    return text[: len(text) - len(body)], body


# --------------------------------------------------------------------------- plots


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(n: int, width: float = 4.0, height: float = 3.0):
    from matplotlib.figure import Figure

    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def score_histogram_png(scores: Mapping[str, np.ndarray]) -> str | None:
    """Base64 PNG: one histogram of scores per method; None without any score."""
    methods = [m for m in order_methods(scores) if len(scores[m])]
    if not methods:
        return None
    fig, axes = _grid(len(methods))
    for ax, method in zip(axes, methods, strict=False):
        values = np.asarray(scores[method], np.float64)
        ax.hist(values[np.isfinite(values)], bins=30, color="#4c72b0")
        ax.set_title(method)
        ax.set_xlabel("score")
        ax.set_ylabel("documents")
    return _png(fig)


def order_stages(stages) -> list[str]:
    """Pre-training first, then fine-tuning, then any other stage names alphabetically."""
    stages = set(stages)
    return [s for s in ("pt", "ft") if s in stages] + sorted(stages - {"pt", "ft"})


def _sampled(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.sort(values[np.isfinite(values) & (values > 0)])[::-1]
    if len(v) <= PLOT_POINTS:
        return np.arange(1, len(v) + 1), v
    idx = np.unique(np.geomspace(1, len(v), PLOT_POINTS).astype(np.int64)) - 1
    return idx + 1, v[idx]


def spectra_png(spectra: Mapping[str, Mapping[str, np.ndarray]]) -> str | None:
    """Base64 PNG: sorted Λ per module, log-log, one panel per stage; None if nothing to plot."""
    stages = [s for s in order_stages(spectra) if spectra[s]]
    if not stages:
        return None
    from matplotlib import colormaps

    fig, axes = _grid(len(stages), width=5.0, height=3.5)
    for ax, stage in zip(axes, stages, strict=False):
        modules = sorted(spectra[stage])
        colours = colormaps["viridis"](np.linspace(0, 0.9, len(modules)))
        for name, colour in zip(modules, colours, strict=True):
            x, y = _sampled(np.asarray(spectra[stage][name], np.float64).reshape(-1))
            if len(y):
                ax.plot(x, y, color=colour, linewidth=1, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        plural = "" if len(modules) == 1 else "s"
        ax.set_title(f"Λ spectrum, stage {stage} ({len(modules)} module{plural})")
        ax.set_xlabel("eigenvalue rank")
        ax.set_ylabel("Λ")
        if 0 < len(modules) <= 10:
            ax.legend(fontsize=6)
    return _png(fig)


# --------------------------------------------------------------------------- formatting


def fmt_metric(value: Any) -> str:
    """A metric value for a table: 3 decimals, `n/a` for None or NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def fmt_score(value: float) -> str:
    """A score with 4 significant digits."""
    return f"{value:.4g}"


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_value(v) for v in value) or "none"
    if value is None:
        return "none"
    return str(value)


def _metric_columns(methods: Mapping[str, Mapping[str, Any]]) -> list[str]:
    recall = {k for m in methods.values() for k in m if k.startswith("recall@")}
    return ["mrr", *sorted(recall, key=lambda k: int(k[7:]) if k[7:].isdigit() else 0)]


def _damping_rows(damping: Any) -> list[tuple[str, str, str]]:
    # Preconditioned queries record damping as {"ft": {module: λ}, "pt": {module: λ}}.
    if not isinstance(damping, Mapping):
        return []
    stages = [s for s in ("ft", "pt") if isinstance(damping.get(s), Mapping)]
    modules = sorted({m for s in stages for m in damping[s]})
    return [
        (m, *(_fmt_value(damping.get(s, {}).get(m)) if s in stages else "" for s in ("ft", "pt")))
        for m in modules
    ]


def _method_facts(info: Mapping[str, Any]) -> list[tuple[str, str]]:
    modules = info.get("modules") or []
    facts = [("model", _fmt_value(info.get("model"))), ("modules scored", str(len(modules)))]
    for key in ("alpha", "rank", "num_shards"):
        if key in info:
            facts.append((key, _fmt_value(info[key])))
    for key, value in info.items():
        if key not in {"model", "modules", "left_out", "damping", "alpha", "rank", "num_shards"}:
            facts.append((str(key), _fmt_value(value)))
    return facts


def _hits(docs: Sequence[RankedDoc]) -> str:
    first = next((d.rank for d in docs if d.relevant), None)
    return "-" if first is None else str(first)


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222;
max-width:1200px}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;vertical-align:top;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.hit{background:#f0f7ff}.mark{color:#0a6;font-weight:bold}
.doc{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;
max-width:800px;overflow-wrap:anywhere}
.q{border:1px solid #ddd;border-radius:6px;padding:.5em 1em;margin:1em 0}
.legend span{padding:0 .4em}.muted{color:#777}img{max-width:100%}
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric=()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def highlight_html(tokens: Sequence[str], scores: Sequence[float], limit: int = HTML_TOKENS) -> str:
    """Escaped token text with a background per token: green positive, red negative."""
    shown = display_tokens(tokens)
    top = max((abs(s) for s in scores), default=0.0)
    start, stop = token_window(scores, limit)
    parts = ["…"] if start else []  # the next token brings its own space
    for text, score in zip(shown[start:stop], scores[start:stop], strict=True):
        space, body = _split_space(text)
        alpha = abs(score) / top if top > 0 else 0.0
        if alpha < MIN_ALPHA or not body:
            parts.append(_e(text))
            continue
        rgb = "22,163,74" if score > 0 else "220,38,38"
        parts.append(
            f'{_e(space)}<span style="background:rgba({rgb},{alpha:.2f})" '
            f'title="{score:+.3e}">{_e(body)}</span>'
        )
    if stop < len(shown):
        parts.append(" …")
    return "".join(parts)


def _doc_html(doc: RankedDoc) -> str:
    if doc.tokens:
        return f'<div class="doc">{highlight_html(doc.tokens, doc.token_scores)}</div>'
    return f'<div class="doc">{_e(doc.text)}</div>'


def _metrics_html(metrics: Mapping[str, Any]) -> str:
    methods = metrics.get("methods") or {}
    if not methods:
        return "<p>No method was evaluated.</p>"
    cols = _metric_columns(methods)
    rows = [
        [_e(m)]
        + [_e(fmt_metric(methods[m].get(c))) for c in cols]
        + [_e(fmt_metric(methods[m].get(k))) for k in ("num_queries", "num_skipped")]
        for m in order_methods(methods)
    ]
    header = ["method", *(c.upper() if c == "mrr" else c for c in cols), "queries", "skipped"]
    note = (
        "<p>Means over queries with relevant ids; queries without any are skipped. "
        "Ties in score are ordered by ascending document id.</p>"
    )
    numeric = set(range(1, len(header)))
    return _html_table(header, rows, numeric) + note


def _run_html(run_info: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    facts = [("msif version", __version__)]
    facts += [(k, _fmt_value(v)) for k, v in metrics.items() if k != "methods"]
    facts += [(k, _fmt_value(v)) for k, v in run_info.items() if k != "methods"]
    out = [_html_table(["setting", "value"], [[_e(k), _e(v)] for k, v in facts])]
    methods = run_info.get("methods") or {}
    for method in order_methods(methods):
        info = methods[method] or {}
        out.append(f"<h3>{_e(method)}</h3>")
        out.append(
            _html_table(["setting", "value"], [[_e(k), _e(v)] for k, v in _method_facts(info)])
        )
        out.append(_left_out_html(info.get("left_out")))
        modules = info.get("modules") or []
        if modules:
            items = "".join(f"<li>{_e(m)}</li>" for m in modules)
            out.append(f"<details><summary>modules scored</summary><ul>{items}</ul></details>")
        damping = _damping_rows(info.get("damping"))
        if damping:
            rows = [[_e(c) for c in r] for r in damping]
            table = _html_table(["module", "λ fine-tune", "λ pre-train"], rows, {1, 2})
            out.append(f"<details><summary>damping per module</summary>{table}</details>")
    return "".join(out)


def _left_out_html(left_out: Any) -> str:
    if not left_out:
        return "<p>Modules left out: none.</p>"
    if isinstance(left_out, Mapping):
        rows = [[_e(k), _e(v)] for k, v in sorted(left_out.items())]
    else:
        rows = [[_e(k), ""] for k in left_out]
    return "<p>Modules left out:</p>" + _html_table(["module", "reason"], rows)


def _plots_html(plots: Sequence[tuple[str, str | None]]) -> str:
    out = []
    for title, png in plots:
        if png is None:
            out.append(f'<p class="muted">{_e(title)}: nothing to plot.</p>')
        else:
            img = f'<img src="data:image/png;base64,{png}" alt="{_e(title)}">'
            out.append(f"<h3>{_e(title)}</h3>{img}")
    return "".join(out)


def _doc_row_html(doc: RankedDoc) -> str:
    row = '<tr class="hit">' if doc.relevant else "<tr>"
    mark = '<span class="mark">✓</span>' if doc.relevant else ""
    return (
        f'{row}<td class="num">{doc.rank}</td><td>{_e(doc.doc_id)}</td>'
        f'<td class="num">{_e(fmt_score(doc.score))}</td><td>{mark}</td>'
        f"<td>{_doc_html(doc)}</td></tr>"
    )


def _query_html(i: int, view: QueryView, methods: Sequence[str]) -> str:
    rel = ", ".join(_e(r) for r in view.relevant_ids) or '<span class="muted">none given</span>'
    missing = "" if view.in_queries else ' <span class="muted">(not in the queries table)</span>'
    out = [
        f'<div class="q" id="q{i}"><h3>{_e(view.id)}{missing}</h3>',
        f'<p><b>Prompt</b></p><div class="doc">{_e(view.prompt)}</div>',
        f'<p><b>Answer</b></p><div class="doc">{_e(view.completion)}</div>',
        f"<p><b>Relevant ids</b>: {rel}</p>",
    ]
    for method in methods:
        docs = view.docs.get(method, [])
        out.append(f"<h4>{_e(method)}</h4>")
        if not docs:
            out.append('<p class="muted">no documents ranked</p>')
            continue
        rows = "".join(_doc_row_html(d) for d in docs)
        head = "<tr><th>rank</th><th>document</th><th>score</th><th>relevant</th><th>text</th></tr>"
        out.append(f"<table><thead>{head}</thead><tbody>{rows}</tbody></table>")
    out.append("</div>")
    return "".join(out)


def _first_hits_html(views: Sequence[QueryView], methods: Sequence[str]) -> str:
    rows = [
        [f'<a href="#q{i}">{_e(v.id)}</a>', *(_e(_hits(v.docs.get(m, []))) for m in methods)]
        for i, v in enumerate(views)
    ]
    return "<p>Rank of the first relevant document shown, per method.</p>" + _html_table(
        ["query", *methods], rows, set(range(1, len(methods) + 1))
    )


def render_html(
    views: Sequence[QueryView],
    methods: Sequence[str],
    metrics: Mapping[str, Any],
    run_info: Mapping[str, Any],
    plots: Sequence[tuple[str, str | None]],
    hidden: int,
) -> str:
    """The complete, self-contained report.html; plots are (title, base64 PNG or None)."""
    legend = (
        '<p class="legend">Token highlighting: <span style="background:rgba(22,163,74,.6)">'
        "proponent</span> (positive contribution: lowers the query loss) "
        '<span style="background:rgba(220,38,38,.6)">opponent</span>, intensity relative to '
        "the strongest token of the document.</p>"
    )
    more = f'<p class="muted">{hidden} more queries are in ranking.parquet.</p>' if hidden else ""
    body = [
        "<h1>msif attribution report</h1>",
        f"<h2>Metrics</h2>{_metrics_html(metrics)}",
        f"<h2>Run</h2>{_run_html(run_info, metrics)}",
        f"<h2>Plots</h2>{_plots_html(plots)}",
        f"<h2>Queries</h2>{_first_hits_html(views, methods)}{legend}",
        *(_query_html(i, v, methods) for i, v in enumerate(views)),
        more,
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f"<title>msif attribution report</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


# --------------------------------------------------------------------------- Markdown

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def md_escape(text: str) -> str:
    """Text safe inside a Markdown table cell: specials backslashed, HTML escaped, one line."""
    text = _MD_SPECIAL.sub(r"\\\1", str(text))
    return html.escape(text, quote=False).replace("\r", " ").replace("\n", " ")


def highlight_md(tokens: Sequence[str], scores: Sequence[float], limit: int = MD_TOKENS) -> str:
    """Token text with the few most positive tokens in bold."""
    shown = display_tokens(tokens)
    top = max((abs(s) for s in scores), default=0.0)
    # Only tokens that would also be highlighted in HTML qualify, so noise is never bold.
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    strong = [int(i) for i in order if scores[i] > 0 and scores[i] >= MIN_ALPHA * top]
    bold = set(strong[:MD_BOLD])
    start, stop = token_window(scores, limit)
    parts = ["…"] if start else []  # the next token brings its own space
    for i in range(start, stop):
        space, body = _split_space(shown[i].replace("\n", " "))
        if i in bold and body.strip():
            parts.append(f"{md_escape(space)}**{md_escape(body)}**")
        else:
            parts.append(md_escape(shown[i]))
    if stop < len(shown):
        parts.append(" …")
    return "".join(parts)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _metrics_md(metrics: Mapping[str, Any]) -> list[str]:
    methods = metrics.get("methods") or {}
    if not methods:
        return ["No method was evaluated.", ""]
    cols = _metric_columns(methods)
    header = ["method", *(c.upper() if c == "mrr" else c for c in cols), "queries", "skipped"]
    rows = [
        [md_escape(m)]
        + [fmt_metric(methods[m].get(c)) for c in [*cols, "num_queries", "num_skipped"]]
        for m in order_methods(methods)
    ]
    return _md_table(header, rows)


def _run_md(run_info: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[str]:
    facts = [("msif version", __version__)]
    facts += [(k, _fmt_value(v)) for k, v in metrics.items() if k != "methods"]
    facts += [(k, _fmt_value(v)) for k, v in run_info.items() if k != "methods"]
    lines = [f"- {md_escape(k)}: {md_escape(v)}" for k, v in facts] + [""]
    methods = run_info.get("methods") or {}
    for method in order_methods(methods):
        info = methods[method] or {}
        lines.append(f"### {md_escape(method)}")
        lines.append("")
        lines += [f"- {md_escape(k)}: {md_escape(v)}" for k, v in _method_facts(info)]
        left_out = info.get("left_out") or {}
        if isinstance(left_out, Mapping):
            left = [f"{k} ({v})" for k, v in sorted(left_out.items())]
        else:
            left = [str(x) for x in left_out]
        lines.append(f"- modules left out: {md_escape(', '.join(left) or 'none')}")
        damping = _damping_rows(info.get("damping"))
        lines.append("")
        if damping:
            rows = [[md_escape(c) for c in r] for r in damping]
            lines += _md_table(["module", "λ fine-tune", "λ pre-train"], rows)
    return lines


def _query_md(view: QueryView, methods: Sequence[str]) -> list[str]:
    rel = ", ".join(md_escape(r) for r in view.relevant_ids) or "none given"
    lines = [
        f"### {md_escape(view.id)}",
        "",
        f"- prompt: {md_escape(view.prompt)}",
        f"- answer: {md_escape(view.completion)}",
        f"- relevant ids: {rel}",
        "",
    ]
    for method in methods:
        docs = view.docs.get(method, [])
        lines += [f"**{md_escape(method)}**", ""]
        if not docs:
            lines += ["no documents ranked", ""]
            continue
        rows = [
            [
                str(d.rank),
                md_escape(d.doc_id),
                fmt_score(d.score),
                "✓" if d.relevant else "",
                highlight_md(d.tokens, d.token_scores) if d.tokens else md_escape(d.text),
            ]
            for d in docs
        ]
        lines += _md_table(["rank", "document", "score", "relevant", "text"], rows)
    return lines


def render_markdown(
    views: Sequence[QueryView],
    methods: Sequence[str],
    metrics: Mapping[str, Any],
    run_info: Mapping[str, Any],
    hidden: int,
) -> str:
    """The complete report.md (plots are in report.html only)."""
    lines = ["# msif attribution report", "", "## Metrics", "", *_metrics_md(metrics)]
    lines += ["## Run", "", *_run_md(run_info, metrics), "## Queries", ""]
    lines += [
        "Bold tokens contribute most to a document's score; plots are in report.html.",
        "",
    ]
    first = [[md_escape(v.id), *(_hits(v.docs.get(m, [])) for m in methods)] for v in views]
    lines += _md_table(["query (first relevant rank)", *map(md_escape, methods)], first)
    for view in views:
        lines += _query_md(view, methods)
    if hidden:
        lines += [f"{hidden} more queries are in ranking.parquet.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry point


def _all_scores(ranking: pa.Table) -> dict[str, np.ndarray]:
    if ranking.num_rows == 0:
        return {}
    methods = np.asarray(ranking.column("method").to_pylist(), dtype=object)
    scores = np.asarray(ranking.column("score").to_pylist(), dtype=np.float64)
    return {str(m): scores[methods == m] for m in np.unique(methods)}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(
    out_dir: Path,
    ranking: pa.Table,
    queries: pa.Table,
    metrics: dict,
    run_info: dict,
    lambda_spectra: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    *,
    max_queries: int | None = 200,
    score_samples: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write report.md and a self-contained report.html for a ranking into out_dir.

    ranking has the ranking.parquet columns (docs/CONTRACTS.md; `text`, `tokens`,
    `token_scores` and `relevant` may be absent), queries the query table columns. At most
    max_queries queries are shown (None: all). The score histograms show score_samples
    (method → scores, e.g. the whole top-k or full scores) when given, else the scores of the
    ranking's rows. Both files are rendered before either is written.
    """
    views = build_views(ranking, queries)
    methods = order_methods(
        {m for v in views for m in v.docs} | set((metrics.get("methods") or {}).keys())
    )
    hidden = 0
    if max_queries is not None and len(views) > max_queries:
        views, hidden = views[:max_queries], len(views) - max_queries
    which = "given scores" if score_samples is not None else "documents in this report"
    hist = score_histogram_png(_all_scores(ranking) if score_samples is None else score_samples)
    plots = [
        (f"Score distribution per method ({which})", hist),
        ("Λ spectrum per stage (sorted eigenvalues per module)", spectra_png(lambda_spectra or {})),
    ]
    page = render_html(views, methods, metrics, run_info or {}, plots, hidden)
    md = render_markdown(views, methods, metrics, run_info or {}, hidden)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "report.md", md)
    _write_text(out / "report.html", page)
