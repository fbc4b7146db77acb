"""The Markdown/HTML report on a hand-made ranking: content, escaping, highlighting, plots."""

from __future__ import annotations

import base64
import html
import re

import numpy as np
import pyarrow as pa
import pytest

import msif
from msif.attribution.explain import predicted_token_scores
from msif.attribution.topk import RANKING_SCHEMA
from msif.core.loss import IGNORE
from msif.errors import DataError
from msif.evaluation.report import (
    HTML_TOKENS,
    Link,
    build_report,
    build_views,
    display_tokens,
    highlight_html,
    highlight_md,
    token_window,
    write_report,
)
from msif.version import __version__
from tests.support.tiny import make_batches, tiny_model

PLANT = "<script>alert('x')</script>"
TOKENS = ["<bos>", "Paris", "is", "the", "capital"]
TOKEN_SCORES = [0.0, 0.75, -0.375, 0.03125, 0.1875]  # binary fractions: exact in float32


def _ranking() -> pa.Table:
    rows = [
        ("multi-stage", "q1", 1, "fact-7", 0.59375, "Paris is the capital", TOKENS, TOKEN_SCORES),
        ("multi-stage", "q1", 2, "evil", 0.25, f"bad {PLANT} doc", [], [], False),
        ("multi-stage", "q2", 1, "fact-3", 0.125, "Rome is in Italy", [], [], True),
        ("bm25", "q1", 1, "evil", 3.5, f"bad {PLANT} doc", [], [], False),
        ("bm25", "q1", 2, "fact-7", 2.25, "Paris is the capital", [], [], True),
        ("bm25", "q2", 1, f"id{PLANT}", 1.5, "other", [], [], False),
    ]
    rows[0] = (*rows[0], True)
    return pa.table(list(zip(*rows, strict=True)), schema=RANKING_SCHEMA)


def _queries() -> pa.Table:
    return pa.table(
        {
            "id": ["q1", "q2"],
            "prompt": ["What is the capital of France?", f"Where is Rome? {PLANT}"],
            "completion": ["Paris", "Italy"],
            "relevant_ids": [["fact-7"], ["fact-3"]],
        }
    )


METRICS = {
    "methods": {
        "multi-stage": {"mrr": 0.75, "recall@10": 1.0, "num_queries": 2, "num_skipped": 0},
        "bm25": {"mrr": 0.25, "recall@10": 0.5, "num_queries": 2, "num_skipped": 0},
    },
    "top_k": 100,
}
RUN_INFO = {
    "methods": {
        "multi-stage": {
            "modules": ["gpt_neox.layers.0.mlp.dense_h_to_4h"],
            "left_out": {
                "embed_out": "shape or blocks differ from the pt factors",
                f"head{PLANT}": "not in the pt factors",
            },
            "damping": {
                "ft": {"gpt_neox.layers.0.mlp.dense_h_to_4h": 0.0125},
                "pt": {"gpt_neox.layers.0.mlp.dense_h_to_4h": 0.5},
            },
            "alpha": 0.05,
            "rank": None,
            "model": "/models/pt",
            "num_shards": 3,
        },
        "bm25": {"modules": [], "left_out": {}, "num_shards": 1},
    }
}
SPECTRA = {
    "pt": {"layer.0": np.geomspace(10.0, 1e-4, 3000), "layer.1": np.array([2.0, 1.0, 0.0])},
    "ft": {"layer.0": np.array([5.0, 0.5, 0.05])},
}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[str, str]:
    out = tmp_path_factory.mktemp("report")
    write_report(out, _ranking(), _queries(), METRICS, RUN_INFO, SPECTRA)
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]
    return (out / "report.html").read_text(), (out / "report.md").read_text()


def test_html_is_self_contained(report):
    page, md = report
    for text in (page, md):
        assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?!["']|data:|#)""", page)
    assert "url(" not in page and "@import" not in page
    assert "default-src 'none'" in page  # CSP: no script, no remote resource even if missed


def test_reports_contain_metric_table(report):
    page, md = report
    assert re.search(r"<td>multi-stage</td><td class=\"num\">0\.750</td>", page)
    assert '<td>bm25</td><td class="num">0.250</td><td class="num">0.500</td>' in page
    assert "| multi-stage | 0.750 | 1.000 | 2 | 0 |" in md
    assert "| bm25 | 0.250 | 0.500 | 2 | 0 |" in md
    # Known methods keep their fixed order, whatever order the metrics dict has.
    assert md.index("| multi-stage | 0.750") < md.index("| bm25 | 0.250")


def test_planted_script_is_escaped_everywhere(report):
    page, md = report
    assert "<script" not in page.lower() and "<script" not in md.lower()
    assert "bad &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; doc" in page
    assert "id&lt;script&gt;" in page  # doc id
    assert "Where is Rome? &lt;script&gt;" in page  # prompt
    assert "<td>head&lt;script&gt;" in page  # run info
    assert "bad &lt;script&gt;alert('x')&lt;/script&gt; doc" in md


def test_plots_are_embedded_pngs(report):
    page, _ = report
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2  # score histograms and Λ spectra
    for data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")


def test_token_highlights_for_hand_made_ranking(report):
    page, md = report
    # Normalised by the largest |score| 0.75: Paris 1.00 green, is 0.50 red, the 0.04 left
    # plain (below the 0.05 threshold), capital 0.25 green.
    assert (
        '&lt;bos&gt; <span style="background:rgba(22,163,74,1.00)" title="+7.500e-01">Paris'
        '</span> <span style="background:rgba(220,38,38,0.50)" title="-3.750e-01">is</span> '
        'the <span style="background:rgba(22,163,74,0.25)" title="+1.875e-01">capital</span>'
    ) in page
    assert "&lt;bos&gt; **Paris** is the **capital**" in md


def test_query_details_and_run_info(report):
    page, md = report
    assert "What is the capital of France?" in page and "<b>Answer</b>" in page
    assert "fact-7" in page and '<span class="mark">✓</span>' in page
    assert "embed_out" in page and "shape or blocks differ from the pt factors" in page
    assert "0.0125" in page and "/models/pt" in page and __version__ in page
    assert "modules left out: embed\\_out (shape or blocks differ from the pt factors)" in md
    assert "- relevant ids: fact-7" in md
    # First relevant rank per method: q1 multi-stage 1, bm25 2; q2 multi-stage 1, bm25 none.
    assert "| q1 | 1 | 2 |" in md and "| q2 | 1 | - |" in md


def _between(text: str, start: str, stop: str) -> str:
    return text.split(start, 1)[1].split(stop, 1)[0]


def _md_rows(block: str) -> list[list[str]]:
    # Pipe-table body rows, unescaped; escaped pipes (\|) stay inside their cell.
    lines = [x for x in block.splitlines() if x.startswith("| ")][1:]
    cells = [re.split(r"(?<!\\) \| ", x[2:-2]) for x in lines]
    return [[html.unescape(re.sub(r"\\(.)", r"\1", c)) for c in row] for row in cells]


def _html_rows(block: str) -> list[list[str]]:
    rows = re.findall(r"<tr(?: class=\"hit\")?>(.*?)</tr>", block)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in rows]
    return [[html.unescape(re.sub(r"<[^>]+>", "", c)) for c in row] for row in cells if row]


def _html_docs(page: str) -> dict[tuple[str, str], list[list[str]]]:
    out = {}
    for query in page.split('<div class="q" ')[1:]:
        qid = html.unescape(re.search(r"<h3>(.*?)</h3>", query).group(1))
        for part in query.split("<h4>")[1:]:
            method = html.unescape(part.split("</h4>")[0])
            out[qid, method] = [row[:4] for row in _html_rows(part)]
    return out


def _md_docs(md: str) -> dict[tuple[str, str], list[list[str]]]:
    out = {}
    for query in md.split("\n## Queries")[1].split("\n### ")[1:]:
        qid = html.unescape(query.split("\n")[0])
        for part in query.split("\n**")[1:]:
            method = part.split("**")[0]
            out[qid, method] = [row[:4] for row in _md_rows(part)]
    return out


def test_html_and_markdown_show_the_same_metrics_and_documents(report):
    page, md = report
    # Read back from each file: the same metric values and, per query and method, the same
    # documents with the same rank, score and relevance mark.
    html_metrics = _html_rows(_between(page, "<h2>Metrics</h2>", "<h2>Run</h2>"))
    assert html_metrics == _md_rows(_between(md, "## Metrics", "## Run"))
    assert html_metrics == [
        ["multi-stage", "0.750", "1.000", "2", "0"],
        ["bm25", "0.250", "0.500", "2", "0"],
    ]
    docs = _html_docs(page)
    assert docs == _md_docs(md)
    assert sorted(docs) == [(q, m) for q in ("q1", "q2") for m in ("bm25", "multi-stage")]
    assert docs["q1", "bm25"] == [["1", "evil", "3.5", ""], ["2", "fact-7", "2.25", "✓"]]
    assert docs["q2", "multi-stage"] == [["1", "fact-3", "0.125", "✓"]]
    assert docs["q2", "bm25"] == [["1", f"id{PLANT}", "1.5", ""]]


def test_report_model_is_format_free():
    views = build_views(_ranking(), _queries())
    report = build_report(views, ["multi-stage", "bm25"], METRICS, RUN_INFO)
    assert report.metrics.rows[0].cells == ("multi-stage", "0.750", "1.000", "2", "0")
    run = report.runs[0]
    assert run.method == "multi-stage" and run.left_out.rows[1].cells == (
        f"head{PLANT}",
        "not in the pt factors",
    )
    assert run.damping.rows[0].cells == ("gpt_neox.layers.0.mlp.dense_h_to_4h", "0.0125", "0.5")
    assert report.first_hits.rows[1].cells == (Link("q2", "q1"), "1", "-")
    kept = '"-": no relevant document is in the top 100 kept per query.'
    assert report.first_hits_note.endswith(kept)
    method, table = report.queries[0].ranked[1]
    assert method == "bm25" and [r.hit for r in table.rows] == [False, True]


def test_bad_input_writes_nothing(tmp_path):
    with pytest.raises(DataError, match=r"ranking table lacks column\(s\) score"):
        write_report(tmp_path, _ranking().drop_columns(["score"]), _queries(), METRICS, {}, None)
    bad = _ranking().set_column(7, "token_scores", pa.array([[1.0]] * 6, pa.list_(pa.float32())))
    with pytest.raises(DataError, match="'fact-7': 5 tokens but 1 token scores"):
        write_report(tmp_path, bad, _queries(), METRICS, {}, None)
    assert list(tmp_path.iterdir()) == []


def test_max_queries_and_no_plots(tmp_path):
    ranking = RANKING_SCHEMA.empty_table()
    metrics = {"methods": {"bm25": {"mrr": None, "recall@10": None, "num_queries": 0}}}
    write_report(tmp_path, ranking, _queries(), metrics, {}, None, max_queries=1)
    page = (tmp_path / "report.html").read_text()
    assert "1 more queries are in ranking.parquet" in page
    assert "nothing to plot" in page and "data:image/png" not in page
    assert "n/a" in (tmp_path / "report.md").read_text()


def test_display_tokens_per_tokenizer_family():
    # Byte-level BPE: Ġ is a space, Ċ a newline; é is the two bytes Ã ©, here split in two.
    assert display_tokens(["Hello", "Ġw", "orld", "Ċ", "Ã", "©"]) == [
        "Hello",
        " w",
        "orld",
        "\n",
        "",
        "é",
    ]
    assert display_tokens(["▁The", "▁cat"]) == [" The", " cat"]
    assert display_tokens(["play", "##ing", "now", "."]) == ["play", "ing", " now", "."]
    assert display_tokens(["<bos>", "Paris", "is", "."]) == ["<bos>", " Paris", " is", "."]
    assert display_tokens([]) == []


def test_long_documents_show_a_window_around_the_strongest_token():
    assert token_window([0.0] * 10, 20) == (0, 10)
    scores = [0.0] * 1000
    scores[900] = -2.0
    assert token_window(scores, HTML_TOKENS) == (1000 - HTML_TOKENS, 1000)
    scores[900], scores[100] = 0.0, 1.0
    assert token_window(scores, 50) == (75, 125)
    tokens = [f"w{i}" for i in range(1000)]
    page = highlight_html(tokens, scores, limit=50)
    assert page.startswith("… w75") and page.endswith("w124 …") and ">w100</span>" in page
    assert highlight_md(tokens, scores, limit=50).startswith("… w75")


def test_histogram_of_given_score_samples(tmp_path):
    samples = {"bm25": np.arange(50.0), "multi-stage": np.array([])}
    write_report(tmp_path, _ranking(), _queries(), METRICS, {}, None, score_samples=samples)
    page = (tmp_path / "report.html").read_text()
    assert "Score distribution per method (given scores)" in page
    assert page.count('<img src="data:image/png;base64,') == 1  # no spectra given
    assert "Λ spectrum per stage (sorted eigenvalues per module): nothing to plot" in page


def test_the_answer_token_is_shaded_by_its_own_loss_term():
    # The query is the document's own prediction of "kapetu" from "born in the town of", so
    # W_q = ∇ℓ_kapetu(z) and the score comes from predicting "kapetu": its share is
    # ‖∇ℓ_kapetu‖² exactly. The position split would put that on "of", and spread it over
    # every earlier position the prediction attends to.
    tokens = ["<bos>", "born", "in", "the", "town", "of", "kapetu", "."]
    ids = [1, 3, 4, 5, 6, 7, 8, 9]
    model = tiny_model("gpt_neox")
    query = msif.Example("q", ids[:7], [IGNORE] * 6 + [ids[6]])
    pre = msif.precondition_queries(model, make_batches([query], 1), ["q"], method="gradient-dot")
    pre.score_fingerprint = None  # one model stands for θ_pt and θ_ft
    scores = predicted_token_scores(model, [(0, msif.Example("d", ids, ids))], pre)[0]
    assert scores[0] == 0.0  # the first token predicts nothing and is never shaded
    squared_norm = sum(float((pre.weight(k) ** 2).sum()) for k in pre.specs)
    assert scores[6] == pytest.approx(squared_norm, rel=1e-12)
    page = highlight_html(tokens, scores)
    spans = re.findall(r"rgba\(22,163,74,([\d.]+)\)\" title=\"[^\"]*\">([^<]*)</span>", page)
    assert max(spans) == ("1.00", "kapetu")  # the strongest shade, in green (seeded model)
    assert "<bos>" not in "".join(t for _, t in spans)
    assert "of **kapetu**" in highlight_md(tokens, scores)


def _long_ranking() -> pa.Table:
    # q1: the relevant document is 7th of 8 kept; q2: none of its 8 kept is relevant.
    rows = [
        ("multi-stage", q, r, f"{q}-d{r}", 1.0 / r, "", [], [], r == 7 and q == "q1")
        for q in ("q1", "q2")
        for r in range(1, 9)
    ]
    return pa.table(list(zip(*rows, strict=True)), schema=RANKING_SCHEMA)


def test_first_hit_rank_past_the_shown_documents(tmp_path):
    queries = _queries().set_column(3, "relevant_ids", pa.array([["q1-d7"], ["elsewhere"]]))
    metrics = {"methods": {"multi-stage": METRICS["methods"]["multi-stage"]}, "top_k": 8}
    write_report(tmp_path, _long_ranking(), queries, metrics, {}, None, shown_k=5)
    page, md = (tmp_path / "report.html").read_text(), (tmp_path / "report.md").read_text()
    # The rank is known though the section stops at 5; "-" only when no kept doc is relevant.
    assert "| q1 | 7 |" in md and "| q2 | - |" in md
    assert '"-": no relevant document is in the top 8 kept per query.' in md
    assert "shows its top 5" in md and "&quot;-&quot;: no relevant document" in page
    docs = _md_docs(md)
    assert docs == _html_docs(page)
    assert [row[0] for row in docs["q1", "multi-stage"]] == ["1", "2", "3", "4", "5"]
    assert "<td>q1-d6</td>" not in page and "<td>q1-d7</td>" not in page


def test_legends_say_which_token_a_score_shades(report):
    page, md = report
    says = "each token is shaded by the part of the score that comes from predicting it"
    assert "Each" + says.removeprefix("each") in page and says in md
    assert "term at the position" not in page + md  # the split is exact, no qualifier
