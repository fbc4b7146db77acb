"""The nodes read the user's own tables: other formats and column names give the same sums,
scores and rankings as the mini world's Parquet; chat data is scored through the template."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from msif.cli import main
from msif.config import DataOptions
from tests.data.formats import save_dataset, save_dataset_dict, write_jsonl
from tests.support.cli_helpers import COMMON, dag_settings
from tests.support.mini_world import build

RENAMED = DataOptions(
    text_column="body",
    id_column="key",
    prompt_column="question",
    completion_column="answer",
    split="eval",
)
FLAGS = ["--text-column", "body", "--id-column", "key", "--prompt-column", "question"]
FLAGS += ["--completion-column", "answer", "--split", "eval"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    return build(tmp_path_factory.mktemp("mini"))


@pytest.fixture(scope="module")
def theirs(world, tmp_path_factory) -> dict[str, str]:
    """The mini world's tables as a user might have them: a datasets folder, gzipped JSON
    Lines, a DatasetDict, all with their own column names."""
    root = tmp_path_factory.mktemp("theirs")
    names = {"id": "key", "text": "body", "prompt": "question", "completion": "answer"}

    def renamed(uri: str) -> pa.Table:
        table = pq.read_table(uri)
        return table.rename_columns([names.get(c, c) for c in table.column_names])

    queries = renamed(world["queries"])
    return {
        "pt_model": world["pt_model"],
        "ft_model": world["ft_model"],
        "corpus": save_dataset(renamed(world["corpus"]), root / "corpus", files=2, batch_rows=5),
        "finetune": write_jsonl(renamed(world["finetune"]).to_pylist(), root / "ft.jsonl.gz"),
        "queries": save_dataset_dict(
            {"train": queries.slice(0, 1), "eval": queries}, root / "queries"
        ),
    }


def run(*argv) -> None:
    assert main([str(a) for a in argv]) == 0, argv


def _tensors(directory: Path, name: str) -> dict:
    return load_file(directory / f"{name}.safetensors")


def _same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), k


@pytest.mark.parametrize(("stage", "table"), [("pt", "corpus"), ("ft", "finetune")])
def test_fit_covariance_reads_other_formats_and_columns_alike(
    stage, table, world, theirs, tmp_path
):
    model = world[f"{stage}_model"]
    common = ["fit-covariance", "--model", model, "--stage", stage, "--shard", 1]
    common += ["--num-shards", 2, *COMMON]
    run(*common, "--data", world[table], "--out", tmp_path / "ours")
    run(*common, "--data", theirs[table], "--out", tmp_path / "theirs", *FLAGS)
    _same_tensors(
        _tensors(tmp_path / "ours", "covariance"), _tensors(tmp_path / "theirs", "covariance")
    )
    info = json.loads((tmp_path / "theirs" / "covariance.json").read_text())["info"]
    base = json.loads((tmp_path / "ours" / "covariance.json").read_text())["info"]
    assert info["data_options"] == RENAMED.recorded() != base["data_options"]
    assert info["data_fingerprint"] != base["data_fingerprint"]
    assert info["rows"] == base["rows"]


def test_bm25_names_rows_without_ids_by_their_index(world, tmp_path):
    corpus = pq.read_table(world["corpus"])
    anonymous = write_jsonl(corpus.select(["text"]).to_pylist(), tmp_path / "c.jsonl")
    run("bm25", "--corpus", world["corpus"], "--queries", world["queries"], "--out", tmp_path / "a")
    run("bm25", "--corpus", anonymous, "--queries", world["queries"], "--out", tmp_path / "b")
    named = pq.read_table(tmp_path / "a" / "scores.parquet").to_pylist()
    indexed = pq.read_table(tmp_path / "b" / "scores.parquet").to_pylist()
    index = {f"row-{i}": d for i, d in enumerate(corpus.column("id").to_pylist())}
    # Equal scores are ordered by doc id, and row-10 sorts before row-2: compare the scores.
    assert len(indexed) == len(named)
    scores = {(r["query_id"], r["doc_id"]): r["score"] for r in named}
    assert {(r["query_id"], index[r["doc_id"]]): r["score"] for r in indexed} == scores


def _chat_model(world, tmp_path, template: str | None) -> str:
    """θ_ft with a chat template in its tokenizer (the weights are the world's)."""
    dest = tmp_path / "chat_model"
    dest.mkdir()
    for f in Path(world["ft_model"]).iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    tok = AutoTokenizer.from_pretrained(dest)
    tok.chat_template = template
    tok.save_pretrained(dest)
    return str(dest)


# Renders a conversation as its contents one after the other: the tokens of a prompt and a
# completion encoded apart, as msif does for pairs (the mini tokenizer adds no BOS).
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def test_chat_queries_and_data_equal_their_pairs(world, tmp_path):
    model = _chat_model(world, tmp_path, PLAIN_TEMPLATE)
    queries = pq.read_table(world["queries"]).to_pylist()
    for q in queries:
        q["messages"] = [
            {"role": "user", "content": q.pop("prompt")},
            {"role": "assistant", "content": q.pop("completion").strip()},
        ]
    chat = write_jsonl(queries, tmp_path / "queries.jsonl")
    argv = ["precondition-queries", "--model", model, "--method", "gradient-dot", *COMMON]
    run(*argv, "--queries", world["queries"], "--out", tmp_path / "pairs")
    run(*argv, "--queries", chat, "--out", tmp_path / "chat")
    _same_tensors(_tensors(tmp_path / "pairs", "queries"), _tensors(tmp_path / "chat", "queries"))
    pairs = pq.read_table(world["finetune"]).to_pylist()
    conversations = [
        {
            "messages": [
                {"role": "user", "content": p["prompt"]},
                {"role": "assistant", "content": p["completion"].strip()},
            ]
        }
        for p in pairs
    ]
    data = write_jsonl(conversations, tmp_path / "ft.jsonl")
    argv = ["fit-covariance", "--model", model, "--stage", "ft", *COMMON]
    run(*argv, "--data", world["finetune"], "--out", tmp_path / "cov-pairs")
    run(*argv, "--data", data, "--out", tmp_path / "cov-chat")
    _same_tensors(
        _tensors(tmp_path / "cov-pairs", "covariance"),
        _tensors(tmp_path / "cov-chat", "covariance"),
    )


def test_chat_data_needs_a_chat_template(world, tmp_path, capsys):
    chat = write_jsonl(
        [{"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}],
        tmp_path / "ft.jsonl",
    )
    argv = ["fit-covariance", "--model", world["ft_model"], "--data", chat, "--stage", "ft"]
    assert main([*argv, "--out", str(tmp_path / "out"), *COMMON]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the tokenizer has no chat template" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_the_whole_pipeline_reads_the_users_tables_alike(world, theirs, tmp_path):
    """The DAG in-process (components, pipeline parameters) on the renamed tables in other
    formats gives the mini world's ranking, scores, snippets and metrics."""
    import inspect

    import msif.components

    if "text_column" not in inspect.signature(msif.components.rank.python_func).parameters:
        pytest.skip("msif.components is another checkout's (an editable install elsewhere)")
    from msif.workflow.inprocess import primary_output, run_dag

    settings = dag_settings(2)
    ours = run_dag(settings.parameters(world), str(tmp_path / "ours"))
    mine = dataclasses.replace(settings, data=RENAMED)
    runs = run_dag(mine.parameters(theirs), str(tmp_path / "theirs"))
    a, b = (Path(primary_output(r, "rank")) for r in (ours, runs))
    assert pq.read_table(b / "ranking.parquet").equals(pq.read_table(a / "ranking.parquet"))
    assert json.loads((b / "metrics.json").read_text()) == json.loads(
        (a / "metrics.json").read_text()
    )
