"""The ranking report: `report.md` (KFP Markdown view) and a self-contained `report.html`.

The HTML loads nothing: CSS is inline, plots are base64 PNGs rendered with matplotlib's Agg
canvas, and a Content-Security-Policy forbids scripts and remote resources as a second line of
defence behind escaping every string that comes from data (document text, ids, run info).

Token highlighting: a document's per-token scores (which sum to its score) are normalised by
the document's largest |score|; green marks proponent tokens (positive: they lower the query's
loss), red opponents. The Markdown report bolds the few most positive tokens instead. Score i
belongs to token i: it is the part of the score that comes from predicting token i from the
text before it (score-corpus splits the score exactly by predicted token; the report shifts
nothing), so the first token of a document is never shaded.

Both files come from one `Report` (tables of plain-text cells, facts, plots) built once by
`build_report`, so they cannot disagree; `_render` lays it out in one reading order and the two
small renderers `_Html` and `_Markdown` only format headings, tables and cells.
"""

from __future__ import annotations

import base64
import codecs
import html
import io
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from msif.attribution.precondition import METHODS
from msif.attribution.topk import RANKING_SCHEMA
from msif.errors import DataError
from msif.version import __version__

METHOD_ORDER = (*METHODS, "bm25")
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


# --------------------------------------------------------------------------- report model
# Both files are rendered from one Report, so they cannot disagree on a number or a document.
# Cells hold plain text; each renderer escapes it for its own format.


@dataclass(frozen=True)
class Link:
    """A cell naming a query; in HTML it links to the query's section."""

    text: str
    target: str


@dataclass(frozen=True)
class Mark:
    """A cell holding an emphasised symbol: the ✓ of a relevant document."""

    text: str = "✓"


Cell = str | Link | Mark | RankedDoc  # a RankedDoc cell shows the document's highlighted text


@dataclass(frozen=True)
class Row:
    """A table row; a hit (a relevant document's row) is shaded in HTML."""

    cells: tuple[Cell, ...]
    hit: bool = False


@dataclass(frozen=True)
class Table:
    """A table: header, rows and the indices of its numeric (right-aligned) columns."""

    header: tuple[str, ...]
    rows: list[Row]
    numeric: frozenset[int] = frozenset()


@dataclass(frozen=True)
class MethodRun:
    """What the run recorded about one method."""

    method: str
    facts: list[tuple[str, str]]
    left_out: Table | None  # module, reason; None: no module was left out
    modules: list[str]
    damping: Table | None  # module, λ fine-tune, λ pre-train; None: not preconditioned


@dataclass(frozen=True)
class QuerySection:
    """A query's part of the report: its texts and one document table per method."""

    anchor: str
    view: QueryView
    ranked: list[tuple[str, Table | None]]  # None: the method ranked no document


@dataclass(frozen=True)
class Report:
    """The whole content of report.html and report.md, format-free."""

    metrics: Table | None  # None: no method was evaluated
    facts: list[tuple[str, str]]
    runs: list[MethodRun]
    plots: list[tuple[str, str | None]]  # title, base64 PNG or None when nothing to plot
    first_hits: Table
    first_hits_note: str
    queries: list[QuerySection]
    hidden: int  # queries left out by max_queries


def _metric_columns(methods: Mapping[str, Mapping[str, Any]]) -> list[str]:
    recall = {k for m in methods.values() for k in m if k.startswith("recall@")}
    return ["mrr", *sorted(recall, key=lambda k: int(k[7:]) if k[7:].isdigit() else 0)]


def _metrics_table(methods: Mapping[str, Mapping[str, Any]]) -> Table | None:
    if not methods:
        return None
    cols = _metric_columns(methods)
    header = ("method", *(c.upper() if c == "mrr" else c for c in cols), "queries", "skipped")
    cols += ["num_queries", "num_skipped"]
    rows = [
        Row((m, *(fmt_metric(methods[m].get(c)) for c in cols))) for m in order_methods(methods)
    ]
    return Table(header, rows, frozenset(range(1, len(header))))


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


def _method_run(method: str, info: Mapping[str, Any]) -> MethodRun:
    left_out = info.get("left_out") or []
    if isinstance(left_out, Mapping):
        left = [Row((str(k), str(v))) for k, v in sorted(left_out.items())]
    else:
        left = [Row((str(k), "")) for k in left_out]
    damping = [Row(r) for r in _damping_rows(info.get("damping"))]
    return MethodRun(
        method,
        _method_facts(info),
        Table(("module", "reason"), left) if left else None,
        [str(m) for m in info.get("modules") or []],
        Table(("module", "λ fine-tune", "λ pre-train"), damping, frozenset({1, 2}))
        if damping
        else None,
    )


def _docs_table(docs: Sequence[RankedDoc]) -> Table | None:
    if not docs:
        return None
    rows = [
        Row(
            (str(d.rank), d.doc_id, fmt_score(d.score), Mark() if d.relevant else "", d), d.relevant
        )
        for d in docs
    ]
    return Table(("rank", "document", "score", "relevant", "text"), rows, frozenset({0, 2}))


def _shown(docs: Sequence[RankedDoc], shown_k: int | None) -> list[RankedDoc]:
    return [d for d in docs if shown_k is None or d.rank <= shown_k]


def _first_hit(docs: Sequence[RankedDoc]) -> str:
    # docs is the method's whole ranking for the query, not only the documents shown.
    first = next((d.rank for d in docs if d.relevant), None)
    return "-" if first is None else str(first)


def _first_hits_note(shown_k: int | None, kept_k: Any) -> str:
    shown = f"; each query's section below shows its top {shown_k}" if shown_k else ""
    kept = f"the top {kept_k} kept per query" if kept_k else "the documents ranked"
    return (
        f"Rank of the first relevant document in each method's ranking{shown}. "
        f'"-": no relevant document is in {kept}.'
    )


def build_report(
    views: Sequence[QueryView],
    methods: Sequence[str],
    metrics: Mapping[str, Any],
    run_info: Mapping[str, Any],
    plots: Sequence[tuple[str, str | None]] = (),
    hidden: int = 0,
    shown_k: int | None = None,
) -> Report:
    """The report's content, computed once for both renderers.

    The views hold each method's whole ranking; a query's section shows the documents ranked
    up to shown_k (None: all), the first-hit table finds relevant documents in all of them.
    """
    facts = [("msif version", __version__)]
    facts += [(k, _fmt_value(v)) for k, v in metrics.items() if k != "methods"]
    facts += [(k, _fmt_value(v)) for k, v in run_info.items() if k != "methods"]
    runs = run_info.get("methods") or {}
    queries = [
        QuerySection(
            f"q{i}", v, [(m, _docs_table(_shown(v.docs.get(m, []), shown_k))) for m in methods]
        )
        for i, v in enumerate(views)
    ]
    first_hits = [
        Row((Link(q.view.id, q.anchor), *(_first_hit(q.view.docs.get(m, [])) for m in methods)))
        for q in queries
    ]
    return Report(
        metrics=_metrics_table(metrics.get("methods") or {}),
        facts=facts,
        runs=[_method_run(m, runs[m] or {}) for m in order_methods(runs)],
        plots=list(plots),
        first_hits=Table(("query", *methods), first_hits, frozenset(range(1, len(methods) + 1))),
        first_hits_note=_first_hits_note(shown_k, metrics.get("top_k")),
        queries=queries,
        hidden=hidden,
    )


# --------------------------------------------------------------------------- layout

TITLE = "msif attribution report"
METRICS_NOTE = (
    "Means over queries with relevant ids; queries without any are skipped. "
    "Ties in score are ordered by ascending document id."
)


def _render(report: Report, fmt: _Html | _Markdown) -> str:
    # One reading order for both files; the renderer only decides how each block looks.
    blocks = [fmt.heading(1, TITLE), fmt.heading(2, "Metrics")]
    if report.metrics is None:
        blocks.append(fmt.para("No method was evaluated."))
    else:
        blocks += [fmt.table(report.metrics), fmt.para(METRICS_NOTE)]
    blocks += [fmt.heading(2, "Run"), fmt.facts(report.facts)]
    for run in report.runs:
        blocks += [fmt.heading(3, run.method), fmt.method_facts(run)]
        if run.modules:
            blocks.append(fmt.details("modules scored", fmt.items(run.modules)))
        if run.damping is not None:
            blocks.append(fmt.details("damping per module", fmt.table(run.damping)))
    blocks += fmt.plots(report.plots)
    blocks += [fmt.heading(2, "Queries"), fmt.para(report.first_hits_note)]
    blocks += [fmt.table(report.first_hits), fmt.legend]
    for query in report.queries:
        view = query.view
        note = "" if view.in_queries else "(not in the queries table)"
        parts = [fmt.heading(3, view.id, note), fmt.query_texts(view)]
        for method, table in query.ranked:
            parts.append(fmt.heading(4, method))
            empty = fmt.para("no documents ranked", muted=True)
            parts.append(empty if table is None else fmt.table(table))
        blocks.append(fmt.section(query.anchor, parts))
    if report.hidden:
        blocks.append(fmt.para(f"{report.hidden} more queries are in ranking.parquet.", True))
    return fmt.document(blocks)


def _highlight(
    tokens: Sequence[str], scores: Sequence[float], limit: int, piece: Callable[[int, str], str]
) -> str:
    # piece(i, text) formats token i; the window's cut ends are marked with an ellipsis.
    shown = display_tokens(tokens)
    start, stop = token_window(scores, limit)
    parts = ["…"] if start else []  # the next token brings its own space
    parts += [piece(i, shown[i]) for i in range(start, stop)]
    if stop < len(shown):
        parts.append(" …")
    return "".join(parts)


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


def highlight_html(tokens: Sequence[str], scores: Sequence[float], limit: int = HTML_TOKENS) -> str:
    """Escaped token text with a background per token: green positive, red negative."""
    top = max((abs(s) for s in scores), default=0.0)

    def piece(i: int, text: str) -> str:
        space, body = _split_space(text)
        alpha = abs(scores[i]) / top if top > 0 else 0.0
        if alpha < MIN_ALPHA or not body:
            return _e(text)
        rgb = "22,163,74" if scores[i] > 0 else "220,38,38"
        return (
            f'{_e(space)}<span style="background:rgba({rgb},{alpha:.2f})" '
            f'title="{scores[i]:+.3e}">{_e(body)}</span>'
        )

    return _highlight(tokens, scores, limit, piece)


class _Html:
    """Formats the report's blocks as HTML; every string from data is escaped here."""

    legend = (
        '<p class="legend">Token highlighting: <span style="background:rgba(22,163,74,.6)">'
        "proponent</span> (positive contribution: lowers the query loss) "
        '<span style="background:rgba(220,38,38,.6)">opponent</span>, intensity relative to '
        "the strongest token of the document. Each token is shaded by the part of the score "
        "that comes from predicting it from the text before it; a document's first token is "
        "predicted from nothing and is never shaded.</p>"
    )

    def heading(self, level: int, text: str, note: str = "") -> str:
        """A heading, with an optional muted note after it."""
        muted = f' <span class="muted">{_e(note)}</span>' if note else ""
        return f"<h{level}>{_e(text)}{muted}</h{level}>"

    def para(self, text: str, muted: bool = False) -> str:
        return f'<p class="muted">{_e(text)}</p>' if muted else f"<p>{_e(text)}</p>"

    def cell(self, cell: Cell) -> str:
        if isinstance(cell, RankedDoc):
            text = highlight_html(cell.tokens, cell.token_scores) if cell.tokens else _e(cell.text)
            return f'<div class="doc">{text}</div>'
        if isinstance(cell, Link):
            return f'<a href="#{_e(cell.target)}">{_e(cell.text)}</a>'
        if isinstance(cell, Mark):
            return f'<span class="mark">{_e(cell.text)}</span>'
        return _e(cell)

    def table(self, table: Table) -> str:
        """A table with numeric columns right-aligned and hit rows shaded."""
        head = "".join(f"<th>{_e(h)}</th>" for h in table.header)
        num = ' class="num"'
        body = "".join(
            ('<tr class="hit">' if row.hit else "<tr>")
            + "".join(
                f"<td{num if i in table.numeric else ''}>{self.cell(c)}</td>"
                for i, c in enumerate(row.cells)
            )
            + "</tr>"
            for row in table.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def facts(self, facts: Sequence[tuple[str, str]]) -> str:
        """Settings and their values as a two-column table."""
        return self.table(Table(("setting", "value"), [Row(f) for f in facts]))

    def method_facts(self, run: MethodRun) -> str:
        """A method's settings, then the modules it left out with the reasons."""
        if run.left_out is None:
            return self.facts(run.facts) + self.para("Modules left out: none.")
        return self.facts(run.facts) + self.para("Modules left out:") + self.table(run.left_out)

    def items(self, items: Sequence[str]) -> str:
        return "<ul>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>"

    def details(self, summary: str, body: str) -> str:
        """A collapsed section, since per-module lists run long."""
        return f"<details><summary>{_e(summary)}</summary>{body}</details>"

    def plots(self, plots: Sequence[tuple[str, str | None]]) -> list[str]:
        """The plots as inline PNGs."""
        out = [self.heading(2, "Plots")]
        for title, png in plots:
            if png is None:
                out.append(self.para(f"{title}: nothing to plot.", muted=True))
            else:
                img = f'<img src="data:image/png;base64,{png}" alt="{_e(title)}">'
                out.append(self.heading(3, title) + img)
        return out

    def query_texts(self, view: QueryView) -> str:
        """A query's prompt, answer and relevant ids."""
        rel = _e(", ".join(view.relevant_ids)) or '<span class="muted">none given</span>'
        return (
            f'<p><b>Prompt</b></p><div class="doc">{_e(view.prompt)}</div>'
            f'<p><b>Answer</b></p><div class="doc">{_e(view.completion)}</div>'
            f"<p><b>Relevant ids</b>: {rel}</p>"
        )

    def section(self, anchor: str, parts: Sequence[str]) -> str:
        """A query's boxed section, the target of its link in the first-hit table."""
        return f'<div class="q" id="{_e(anchor)}">' + "".join(parts) + "</div>"

    def document(self, blocks: Sequence[str]) -> str:
        """The self-contained page around the blocks."""
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            f"<title>{_e(TITLE)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(b for b in blocks if b)
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
    top = max((abs(s) for s in scores), default=0.0)
    # Only tokens that would also be highlighted in HTML qualify, so noise is never bold.
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    strong = [int(i) for i in order if scores[i] > 0 and scores[i] >= MIN_ALPHA * top]
    bold = set(strong[:MD_BOLD])

    def piece(i: int, text: str) -> str:
        space, body = _split_space(text.replace("\n", " "))
        if i in bold and body.strip():
            return f"{md_escape(space)}**{md_escape(body)}**"
        return md_escape(text)

    return _highlight(tokens, scores, limit, piece)


def _md_line(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


class _Markdown:
    """Formats the report's blocks as Markdown for the KFP viewer; blocks are paragraphs."""

    legend = (
        "Bold tokens contribute most to a document's score: each token is shaded by the part "
        "of the score that comes from predicting it from the text before it. Plots are in "
        "report.html."
    )

    def heading(self, level: int, text: str, note: str = "") -> str:
        """A heading; below the query level a bold line, which reads better than ####."""
        text = md_escape(f"{text} {note}" if note else text)
        return f"{'#' * level} {text}" if level <= 3 else f"**{text}**"

    def para(self, text: str, muted: bool = False) -> str:
        return md_escape(text)  # Markdown has no muted style

    def cell(self, cell: Cell) -> str:
        if isinstance(cell, RankedDoc):
            if cell.tokens:
                return highlight_md(cell.tokens, cell.token_scores)
            return md_escape(cell.text)
        return md_escape(cell.text if isinstance(cell, (Link, Mark)) else cell)

    def table(self, table: Table) -> str:
        lines = [_md_line(map(md_escape, table.header)), "|" + "---|" * len(table.header)]
        lines += [_md_line(map(self.cell, row.cells)) for row in table.rows]
        return "\n".join(lines)

    def facts(self, facts: Sequence[tuple[str, str]]) -> str:
        """Settings and their values as a bulleted list."""
        return "\n".join(f"- {md_escape(k)}: {md_escape(v)}" for k, v in facts)

    def method_facts(self, run: MethodRun) -> str:
        """A method's settings, the modules it left out (with the reasons) as one more."""
        rows = [row.cells for row in run.left_out.rows] if run.left_out else []
        names = [f"{module} ({why})" if why else str(module) for module, why in rows]
        return self.facts([*run.facts, ("modules left out", ", ".join(names) or "none")])

    def items(self, items: Sequence[str]) -> str:
        return md_escape(", ".join(items))

    def details(self, summary: str, body: str) -> str:
        """A labelled section (Markdown cannot collapse it)."""
        return f"{self.heading(4, summary)}\n\n{body}"

    def plots(self, plots: Sequence[tuple[str, str | None]]) -> list[str]:
        """Nothing: the KFP viewer shows no data: images, and the legend points to report.html."""
        return []

    def query_texts(self, view: QueryView) -> str:
        """A query's prompt, answer and relevant ids."""
        rel = md_escape(", ".join(view.relevant_ids)) or "none given"
        return (
            f"- prompt: {md_escape(view.prompt)}\n- answer: {md_escape(view.completion)}\n"
            f"- relevant ids: {rel}"
        )

    def section(self, anchor: str, parts: Sequence[str]) -> str:
        """A query's section (headings are its anchors in Markdown)."""
        return "\n\n".join(parts)

    def document(self, blocks: Sequence[str]) -> str:
        return "\n\n".join(b for b in blocks if b) + "\n"


_HTML, _MARKDOWN = _Html(), _Markdown()


def render_html(
    views: Sequence[QueryView],
    methods: Sequence[str],
    metrics: Mapping[str, Any],
    run_info: Mapping[str, Any],
    plots: Sequence[tuple[str, str | None]],
    hidden: int,
    shown_k: int | None = None,
) -> str:
    """The complete, self-contained report.html; plots are (title, base64 PNG or None)."""
    report = build_report(views, methods, metrics, run_info, plots, hidden, shown_k)
    return _render(report, _HTML)


def render_markdown(
    views: Sequence[QueryView],
    methods: Sequence[str],
    metrics: Mapping[str, Any],
    run_info: Mapping[str, Any],
    hidden: int,
    shown_k: int | None = None,
) -> str:
    """The complete report.md (plots are in report.html only)."""
    report = build_report(views, methods, metrics, run_info, (), hidden, shown_k)
    return _render(report, _MARKDOWN)


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
    shown_k: int | None = None,
) -> None:
    """Write report.md and a self-contained report.html for a ranking into out_dir.

    ranking has the ranking.parquet columns (docs/CONTRACTS.md; `text`, `tokens`,
    `token_scores` and `relevant` may be absent), queries the query table columns. At most
    max_queries queries are shown (None: all), each with the documents ranked up to shown_k
    per method (None: all); the first-hit table looks for a relevant document in the whole
    ranking, so give it every rank kept. The score histograms show score_samples
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
    report = build_report(views, methods, metrics, run_info or {}, plots, hidden, shown_k)
    page, md = _render(report, _HTML), _render(report, _MARKDOWN)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "report.md", md)
    _write_text(out / "report.html", page)
