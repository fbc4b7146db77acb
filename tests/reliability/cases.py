"""The hostile-user cases: bad inputs, bad options, damaged models, forged artifacts, outputs
that would overwrite inputs. Each is run by test_hostile.py and listed in docs/reliability.md.

A case builds its command line from a Ctx (tests/reliability/world.py). `expect` is a piece of
the one `msif: error:` line it must end with; a case with `handled` instead must succeed, and
its `check` proves the answer right.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.reliability import world as W
from tests.reliability.world import Ctx


@dataclass(frozen=True)
class Case:
    """One hostile input and what msif must do with it."""

    id: str
    group: str  # the table section
    what: str  # the input, in words
    argv: Callable[[Ctx], list]
    expect: str = ""  # a piece of the error line
    code: int = 1  # 1 runtime, 2 usage
    handled: str = ""  # instead of an error: what msif does right
    check: Callable[[Ctx], None] | None = None
    before: Callable[[Ctx], None] | None = None  # runs first (e.g. a first, good run)


CASES: list[Case] = []


def case(*args, **kwargs) -> None:
    """Add a case."""
    CASES.append(Case(*args, **kwargs))


# ----------------------------------------------------------------------------- column types

G = "Input tables"
case(
    "text-list",
    G,
    "corpus `text` is list<string>",
    lambda c: W.fit_covariance(c, W.corpus_with(c, "t", text=[["w1", "w2"], ["w3"]])),
    "column `text` is list<string>; expected string",
)
case(
    "text-float",
    G,
    "corpus `text` is float",
    lambda c: W.fit_covariance(c, W.corpus_with(c, "t", text=[1.5, 2.5])),
    "column `text` is double; expected string",
)
case(
    "text-int",
    G,
    "corpus `text` is int",
    lambda c: W.fit_covariance(c, W.corpus_with(c, "t", text=[1, 2])),
    "column `text` is int64; expected string",
)
case(
    "text-null",
    G,
    "corpus `text` holds a null",
    lambda c: W.fit_covariance(c, W.corpus_with(c, "t", text=["w1 w2", None])),
    "(id 'd1'): `text` is null",
)
case(
    "text-empty",
    G,
    "a document is the empty string",
    lambda c: W.fit_covariance(c, W.corpus_with(c, "t", text=["w1 w2", ""])),
    "'d1' is empty",
)
case(
    "text-blank",
    G,
    "a document is only whitespace",
    lambda c: W.fit_covariance(c, W.corpus_with(c, "t", text=["w1 w2", " \n\t "])),
    "'d1' is empty",
)
case(
    "ids-float",
    G,
    "`input_ids` is list<double>",
    lambda c: W.fit_covariance(
        c, W.corpus_with(c, "t", text=None, input_ids=[[1.0, 2.5, 3.0], [4.0, 5.0]])
    ),
    "`input_ids` is list<double>; expected list of integers",
)
case(
    "ids-null-element",
    G,
    "`input_ids` holds a null element",
    lambda c: W.fit_covariance(
        c, W.corpus_with(c, "t", text=None, input_ids=[[3, None, 5], [4, 5]])
    ),
    "(id 'd0'): `input_ids` holds a null element",
)
case(
    "ids-null-row",
    G,
    "`input_ids` is null for a row",
    lambda c: W.fit_covariance(c, W.corpus_with(c, "t", text=None, input_ids=[[3, 4, 5], None])),
    "(id 'd1'): `input_ids` is null",
)
case(
    "ids-out-of-vocab",
    G,
    "`input_ids` holds an id beyond the vocabulary",
    lambda c: W.fit_covariance(
        c, W.corpus_with(c, "t", text=None, input_ids=[[3, 4, 10**6], [4, 5]])
    ),
    "outside the model's vocabulary",
)
case(
    "ids-negative",
    G,
    "`input_ids` holds a negative id",
    lambda c: W.fit_covariance(c, W.corpus_with(c, "t", text=None, input_ids=[[3, -4, 5], [4, 5]])),
    "token id -4 outside the model's vocabulary",
)
case(
    "ids-one-token",
    G,
    "a document of one token",
    lambda c: W.fit_covariance(c, W.corpus_with(c, "t", text=None, input_ids=[[3], [4, 5]])),
    "at least 2 are needed",
)
case(
    "id-null",
    G,
    "corpus `id` holds a null",
    lambda c: W.fit_covariance(c, W.corpus_with(c, "t", id=["d0", None])),
    "row 1: `id` is null",
)
case(
    "id-float",
    G,
    "corpus `id` is float",
    lambda c: W.fit_covariance(c, W.corpus_with(c, "t", id=[0.5, 1.5])),
    "`id` is double; expected string or integer",
)
case(
    "id-list",
    G,
    "corpus `id` is list<string>",
    lambda c: W.fit_covariance(c, W.corpus_with(c, "t", id=[["a"], ["b"]])),
    "`id` is list<string>; expected string or integer",
)
case(
    "columns-missing",
    G,
    "corpus without `id`/`text`",
    lambda c: W.fit_covariance(c, c.table("t", {"name": ["a"], "body": ["w1 w2"]})),
    "expected `text` (--text-column) or `input_ids` (corpus)",
)
case(
    "table-empty",
    G,
    "corpus with no rows",
    lambda c: W.fit_covariance(
        c, c.table("t", {"id": pa.array([], pa.string()), "text": pa.array([], pa.string())})
    ),
    "no rows",
)
case(
    "not-parquet",
    G,
    "a text file named .parquet",
    lambda c: W.fit_covariance(c, _write(c, "t.parquet", b"id,text\nd0,w1 w2\n")),
    "not a readable Parquet file",
)
case(
    "truncated-parquet",
    G,
    "a Parquet file cut in half",
    lambda c: W.fit_covariance(c, _write(c, "t.parquet", W.truncated(c.w["corpus"]))),
    "not a readable Parquet file",
)
case(
    "no-such-corpus",
    G,
    "corpus path that does not exist",
    lambda c: W.fit_covariance(c, str(c.tmp / "nope.parquet")),
    "no such file or directory",
)
case(
    "dir-without-parquet",
    G,
    "a corpus folder with no Parquet files",
    lambda c: W.fit_covariance(c, str(_mkdir(c, "empty"))),
    "holds no Parquet files",
)
case(
    "schemas-differ",
    G,
    "a corpus folder whose files have other columns",
    lambda c: W.fit_covariance(c, _two_schemas(c)),
    "has columns",
)
case(
    "ft-prompt-list",
    G,
    "fine-tune `prompt` is list<string>",
    lambda c: W.fit_covariance_ft(c, W.pairs_with(c, "t", prompt=[["w1"], ["w2"]])),
    "`prompt` is list<string>; expected string",
)
case(
    "ft-completion-null",
    G,
    "fine-tune `completion` holds a null",
    lambda c: W.fit_covariance_ft(c, W.pairs_with(c, "t", completion=[" w5", None])),
    "row 1: `completion` is null",
)
case(
    "ft-completion-empty",
    G,
    "fine-tune completion is empty",
    lambda c: W.fit_covariance_ft(c, W.pairs_with(c, "t", completion=[" w5", ""])),
    "empty completion",
)
case(
    "ft-completion-too-long",
    G,
    "a completion longer than --max-length",
    lambda c: W.fit_covariance_ft(c, W.pairs_with(c, "t", completion=[" w5" * 40, " w6"])),
    "max length is 32",
)
case(
    "query-prompt-list",
    G,
    "query `prompt` is list<string>",
    lambda c: W.precondition(c, W.queries_with(c, "q", prompt=[["w1"], ["w2"], ["w3"]])),
    "`prompt` is list<string>; expected string",
)
case(
    "query-id-null",
    G,
    "a query `id` is null",
    lambda c: W.precondition(c, W.queries_with(c, "q", id=["q0", None, "None"])),
    "row 1: `id` is null",
)
case(
    "query-id-repeated",
    G,
    "two queries share an id",
    lambda c: W.precondition(c, W.queries_with(c, "q", id=["q0", "q0", "q2"])),
    "repeat id 'q0' (rows 0, 1)",
)
case(
    "query-no-completion",
    G,
    "queries without `completion`",
    lambda c: W.precondition(c, W.queries_with(c, "q", completion=None)),
    "lack column(s) completion",
)
case(
    "relevant-ids-string",
    G,
    "`relevant_ids` is a string, not a list",
    lambda c: W.rank(c, queries=W.queries_with(c, "q", relevant_ids=["doc-001", "doc-002", ""])),
    "`relevant_ids` is string; expected list of strings",
)
case(
    "huge-document",
    G,
    "a 200 000-word document",
    lambda c: W.fit_covariance(c, W.corpus_with(c, "t", text=["w1 w2 " * 100_000, "w3 w4"])),
    handled="kept to its first --max-length tokens, as documented",
    check=lambda c: _recorded_rows(c, 2),
)
case(
    "positions-beyond-model",
    G,
    "default --max-length 512 on a 64-position model, 300-token documents",
    lambda c: [
        a if a != "32" else "512"
        for a in W.fit_covariance(c, W.corpus_with(c, "t", text=["w1 w2 " * 150, "w3 w4"]))
    ],
    handled="--max-length clamped to the model's 64 positions (said once in the log)",
    check=lambda c: _recorded_max_length(c, 64),
)

# ----------------------------------------------------------------------------- option values

G = "Option values"
for flag, value, expect in [
    ("--alpha", "0", "--alpha must be > 0"),
    ("--alpha", "-1", "--alpha must be > 0"),
    ("--alpha", "nan", "--alpha must be a finite number"),
    ("--alpha", "inf", "--alpha must be a finite number"),
    ("--damping", "0", "--damping must be > 0"),
    ("--damping", "-1", "--damping must be > 0"),
    ("--damping", "nan", "--damping must be a finite number"),
    ("--damping", "inf", "--damping must be a finite number"),
    ("--damping-factor", "0", "--damping-factor must be > 0"),
    ("--damping-factor", "-0.1", "--damping-factor must be > 0"),
    ("--damping-factor", "nan", "--damping-factor must be a finite number"),
    ("--damping-factor", "inf", "--damping-factor must be a finite number"),
    ("--query-rank", "-1", "--query-rank must be at least 0"),
    ("--refine-steps", "-1", "--refine-steps must be at least 0"),
    ("--refine-lanczos", "-1", "--refine-lanczos must be at least 0"),
    ("--refine-samples", "0", "--refine-samples must be at least 1"),
    ("--seed", str(2**64), "--seed must be at most 9223372036854775807"),
    ("--seed", "-1", "--seed must be at least 0"),
    ("--max-length", "1", "--max-length must be at least 2"),
    ("--max-length", "0", "--max-length must be at least 2"),
    ("--max-length", "-5", "--max-length must be at least 2"),
    ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--batch-size", "-2", "--batch-size must be at least 1"),
    ("--include", "(", "--include '(' is not a regex"),
    ("--exclude", "[", "--exclude '[' is not a regex"),
    ("--device", "tpu", "--device 'tpu' is not auto, cpu, mps, cuda or cuda:N"),
]:
    case(
        f"precondition{flag}={value}",
        G,
        f"precondition-queries {flag} {value}",
        lambda c, f=flag, v=value: W.precondition(c, None, f, v),
        expect,
        code=2,
    )
for argv, what, expect in [
    (lambda c: W.fit_covariance(c, None, None, "--dtype", "int8"), "--dtype int8", "int8"),
    (
        lambda c: W.eigendecompose(c, extra=("--factor-dtype", "int8")),
        "eigendecompose --factor-dtype int8",
        "int8",
    ),
    (lambda c: W.fit_covariance(c, None, None, "--max-length", "abc"), "--max-length abc", "abc"),
    (lambda c: W.fit_covariance(c, None, None, "--frobnicate"), "an unknown flag", "frobnicate"),
    (lambda c: ["score-corpus", "--out", c.out], "required flags left out", "required"),
    (lambda c: W.precondition(c, None, "--method", "nope"), "an unknown --method", "nope"),
    (
        lambda c: [a if a != "pt" else "xx" for a in W.fit_covariance(c)],
        "--stage xx",
        "xx",
    ),
]:
    case(f"usage:{what}", G, what, argv, expect, code=2)
for argv, what, expect in [
    (lambda c: W.score(c, None, "--explain-k", "-1"), "score-corpus --explain-k -1", "--explain-k"),
    (lambda c: W.score(c, None, "--top-k", "0"), "score-corpus --top-k 0", "--top-k"),
    (lambda c: W.rank(c, "--report-k", "0"), "rank --report-k 0", "--report-k"),
    (lambda c: W.rank(c, "--top-k", "-3"), "rank --top-k -3", "--top-k"),
    (lambda c: W.bm25(c, "--top-k", "0"), "bm25 --top-k 0", "--top-k"),
    (
        lambda c: W.fit_covariance(c, None, None, "--module-groups", "0"),
        "fit-covariance --module-groups 0",
        "--module-groups must be at least 1",
    ),
]:
    case(f"option:{what}", G, what, argv, expect, code=2)
for argv, what, expect in [
    (lambda c: W.score(c, None, "--shard", "3", "--num-shards", "2"), "--shard 3 of 2", "shard 3"),
    (lambda c: W.score(c, None, "--num-shards", "0"), "--num-shards 0", "shard 0 of 0"),
    (lambda c: W.score(c, None, "--shard", "-1", "--num-shards", "2"), "--shard -1", "shard -1"),
    (lambda c: W.fit_covariance(c, None, None, "--device", "cuda"), "--device cuda, none", "CUDA"),
    (
        lambda c: W.fit_covariance(c, None, None, "--include", "no-such-module"),
        "--include matching no module",
        "no module matched",
    ),
    (
        lambda c: W.fit_covariance(c, None, None, "--module-groups", "99"),
        "--module-groups 99, more groups than tracked modules",
        "cannot fit 99 module groups",
    ),
]:
    case(f"option:{what}", G, what, argv, expect)

for argv, what, expect in [
    (
        lambda c: ["run", "--num-shards", "0", "--out", c.out],
        "msif run --num-shards 0",
        "--num-shards",
    ),
    (lambda c: ["run", "--alpha", "-1", "--out", c.out], "msif run --alpha -1", "--alpha"),
    (lambda c: ["run", "--batch-size", "0", "--out", c.out], "msif run --batch-size 0", "--batch"),
]:
    case(f"main-job:{what}", G, what + " (refused before the world is built)", argv, expect, code=2)
for argv, what, expect in [
    (lambda c: ["run", "--preset", "huge", "--out", c.out], "msif run --preset huge", "huge"),
    (lambda c: ["run", "--runner", "k8s", "--out", c.out], "msif run --runner k8s", "k8s"),
    (lambda c: ["pipeline", "submit"], "msif pipeline submit without --host", "required"),
]:
    case(f"main-job-usage:{what}", G, what, argv, expect, code=2)

# ----------------------------------------------------------------------------- models

G = "Models and tokenizers"
case(
    "model-missing",
    G,
    "--model names no folder",
    lambda c: W.fit_covariance(c, None, str(c.tmp / "nope")),
    "no such model directory",
)
case(
    "model-no-config",
    G,
    "a model folder without config.json",
    lambda c: W.fit_covariance(c, None, W.model_with(c, "m", drop=["config.json"])),
    "no config.json",
)
case(
    "model-config-garbage",
    G,
    "config.json is not JSON",
    lambda c: W.fit_covariance(c, None, W.model_with(c, "m", write={"config.json": b"{nope"})),
    "config.json is not valid JSON",
)
case(
    "model-truncated",
    G,
    "model.safetensors cut in half",
    lambda c: W.fit_covariance(
        c,
        None,
        W.model_with(
            c,
            "m",
            write={"model.safetensors": W.truncated(c.w["pt_model"] + "/model.safetensors")},
        ),
    ),
    "its safetensors file is damaged or truncated",
)
case(
    "model-garbage",
    G,
    "model.safetensors is random bytes",
    lambda c: W.fit_covariance(
        c, None, W.model_with(c, "m", write={"model.safetensors": bytes(range(256)) * 64})
    ),
    "its safetensors file is damaged or truncated",
)
case(
    "model-pickle",
    G,
    "a pickle checkpoint (pytorch_model.bin) only",
    lambda c: W.fit_covariance(c, None, W.pickle_checkpoint(c, "m")),
    "only a pickle checkpoint (pytorch_model.bin)",
)
case(
    "model-pickle-payload",
    G,
    "a pickle checkpoint that runs code when unpickled",
    lambda c: W.fit_covariance(c, None, W.pickle_checkpoint(c, "m", c.tmp / "pwned")),
    "only a pickle checkpoint (pytorch_model.bin)",
    check=lambda c: _not_there(c.tmp / "pwned"),
)
case(
    "tokenizer-missing",
    G,
    "a model folder without tokenizer files",
    lambda c: W.fit_covariance(c, None, _without_tokenizer(c)),
    "cannot load a tokenizer",
)
case(
    "tokenizer-too-big",
    G,
    "a tokenizer with more ids than the embedding",
    lambda c: W.fit_covariance(c, None, _small_embedding(c)),
    "tokenizer has",
)
case(
    "tokenizer-other-ids",
    G,
    "θ_pt with a same-size tokenizer of other ids, scoring θ_ft's queries",
    lambda c: W.score(c, None, model=W.other_tokenizer_model(c, "m")),
    "used a tokenizer with another vocabulary than this model's",
)
case(
    "model-other-architecture",
    G,
    "scoring with a model of other shapes",
    lambda c: W.score(c, None, model=_wider_model(c)),
    "has shape (72, 24) here but (48, 16)",
)
case(
    "multi-stage-scored-with-ft",
    G,
    "multi-stage queries scored with θ_ft",
    lambda c: W.score(c, None, model=c.w["ft_model"]),
    "multi-stage queries' corpus model was computed with other model weights",
)
case(
    "gradient-dot-scored-with-ft",
    G,
    "gradient-dot queries scored with θ_ft",
    lambda c: W.score(c, None, model=c.w["ft_model"], pre=c.p["pre_gradient_dot"]),
    "gradient-dot queries' corpus model was computed with other model weights",
)
case(
    "gradient-dot-scored-with-other",
    G,
    "gradient-dot queries scored with another model of θ_pt's shape",
    lambda c: W.score(c, None, model=W.nudged_model(c, "m"), pre=c.p["pre_gradient_dot"]),
    "gradient-dot queries' corpus model was computed with other model weights",
)
case(
    "single-stage-scored-with-pt",
    G,
    "single-stage queries scored with θ_pt",
    lambda c: W.score(c, None, model=c.w["pt_model"], pre=c.p["pre_single_stage"]),
    "single-stage queries' corpus model was computed with other model weights",
)

# ----------------------------------------------------------------------------- artifacts

G = "Artifacts and shards"
case(
    "factors-swapped",
    G,
    "pre-train factors given as fine-tune ones and back",
    lambda c: [
        *W.precondition(c)[:5],
        "--ft-factors",
        c.p["pt_factors"],
        "--pt-factors",
        c.p["ft_factors"],
        "--out",
        c.out,
    ],
    "'pt' factors, expected 'ft'",
)
case(
    "factors-relabelled",
    G,
    "fine-tune factors relabelled pt, sidecar and manifest rehashed",
    lambda c: [*W.precondition(c), "--pt-factors", _relabelled(c)],
    "θ_pt = θ_ft",
)
case(
    "factors-modified",
    G,
    "a factor file changed after publishing",
    lambda c: [*W.precondition(c), "--pt-factors", _tampered(c, rehash=False)],
    "does not match its manifest",
)
case(
    "factors-no-marker",
    G,
    "factors without their completion marker",
    lambda c: [*W.precondition(c), "--pt-factors", _unmarked(c)],
    "incomplete",
)
case(
    "factors-garbage-marker",
    G,
    "a completion marker that is not JSON",
    lambda c: [*W.precondition(c), "--pt-factors", _garbage_marker(c)],
    "not a valid msif manifest",
)
case(
    "factors-no-modules",
    G,
    "a factors sidecar lacking `modules`, rehashed",
    lambda c: [*W.precondition(c), "--pt-factors", _sidecar_without(c, "factors", "modules")],
    "lacks its list of 'modules'",
)
case(
    "queries-no-method",
    G,
    "a preconditioned-queries sidecar lacking `method`, rehashed",
    lambda c: W.score(c, None, pre=_sidecar_without(c, "pre", "method", "queries.json")),
    "queries.json lacks 'method'",
)
case(
    "wrong-artifact",
    G,
    "an eigenbasis given where factors are expected",
    lambda c: [*W.precondition(c), "--pt-factors", c.p["eigen_pt"]],
    "is not a factors artifact",
)
case(
    "scores-no-method",
    G,
    "a scores.json lacking `method`, rehashed",
    lambda c: W.rank(c, scores=[_scores_without(c, "method"), c.p["shards"][1]]),
    "scores.json lacks method",
)
case(
    "scores-garbage",
    G,
    "a scores.parquet of random bytes, rehashed",
    lambda c: W.rank(c, scores=[_garbage_scores(c), c.p["shards"][1]]),
    "scores.parquet is not a readable Parquet file",
)
case(
    "scores-other-schema",
    G,
    "a scores.parquet of other columns, rehashed",
    lambda c: W.rank(c, scores=[_other_scores(c), c.p["shards"][1]]),
    "lacks column",
)
case(
    "shard-missing",
    G,
    "rank given one of two shards",
    lambda c: W.rank(c, scores=c.p["shards"][:1]),
    "shard 1 of 2 is missing",
)
case(
    "shard-twice",
    G,
    "eigendecompose given a shard twice",
    lambda c: W.eigendecompose(c, c.p["cov_pt"][0], c.p["cov_pt"][0]),
    "shard 0 was given twice",
)
case(
    "stages-mixed",
    G,
    "eigendecompose given pt and ft shards",
    lambda c: W.eigendecompose(c, c.p["cov_pt"][0], c.p["cov_ft"][1]),
    "different shardings or data",
)
case(
    "lambda-other-stage",
    G,
    "fit-lambda --stage pt with the fine-tune eigenbasis",
    lambda c: W.fit_lambda(c, eigenbasis=c.p["eigen_ft"]),
    "eigenbasis, not 'pt'",
)
case(
    "lambda-other-model",
    G,
    "fit-lambda with another model than its eigenbasis",
    lambda c: W.fit_lambda(c, model=W.nudged_model(c, "m")),
    "the eigenbasis was computed with other model weights",
)
case(
    "build-other-stage",
    G,
    "build-factors with the ft eigenbasis and pt Λ shards",
    lambda c: W.build_factors(c, eigenbasis=c.p["eigen_ft"]),
    "fitted in another eigenbasis",
)
case(
    "rank-other-corpus",
    G,
    "rank against a corpus of the same name, size, rows and schema but other text",
    lambda c: W.rank(c, corpus=_same_shape_corpus(c)),
    "multi-stage shard 0 was scored on another corpus",
)
case(
    "rank-other-queries",
    G,
    "rank against other queries",
    lambda c: W.rank(c, queries=W.queries_with(c, "queries", prompt=["w1 w2", "w3", "w4"])),
    "other queries",
)
case(
    "rerun-corpus-changed",
    G,
    "score-corpus rerun after the corpus changed under the same name, size and rows",
    lambda c: W.score(c, str(c.tmp / "corpus" / "corpus.parquet")),
    handled="not skipped: scored again on the new contents",
    before=lambda c: _first_score_then_change_corpus(c),
    check=lambda c: _same_as_fresh_score(c, str(c.tmp / "corpus" / "corpus.parquet")),
)
case(
    "rerun-model-changed",
    G,
    "score-corpus rerun after the model folder's weights were replaced",
    lambda c: W.score(c, None, model=str(c.tmp / "m")),
    "multi-stage queries' corpus model was computed with other model weights",
    before=lambda c: _first_score_then_change_model(c),
)

case(
    "bm25-no-text",
    G,
    "bm25 on a corpus of input_ids only",
    lambda c: W.bm25(c, corpus=W.corpus_with(c, "t", text=None, input_ids=[[3, 4], [5, 6]])),
    "expected `text` (--text-column)",
)
case(
    "bm25-text-list",
    G,
    "bm25 on a corpus whose `text` is list<string>",
    lambda c: W.bm25(c, corpus=W.corpus_with(c, "t", text=[["w1"], ["w2"]])),
    "column `text` is list<string>",
)
case(
    "score-pairs-as-corpus",
    G,
    "score-corpus given the fine-tune pairs as its corpus",
    lambda c: W.score(c, c.w["finetune"]),
    "not a corpus",
)
case(
    "scores-not-scores",
    G,
    "rank given factors where shard scores go",
    lambda c: W.rank(c, scores=[c.p["pt_factors"]]),
    "not a shard-scores directory",
)
case(
    "scores-missing",
    G,
    "rank given a shard path that does not exist",
    lambda c: W.rank(c, scores=[str(c.tmp / "nope")]),
    "no such directory",
)
case(
    "queries-not-queries",
    G,
    "score-corpus given factors as its preconditioned queries",
    lambda c: W.score(c, None, pre=c.p["pt_factors"]),
    "queries.safetensors is missing",
)
case(
    "single-stage-no-factors",
    G,
    "precondition-queries --method single-stage without --ft-factors",
    lambda c: [
        "precondition-queries",
        "--model",
        c.w["ft_model"],
        "--queries",
        c.w["queries"],
        "--method",
        "single-stage",
        "--out",
        c.out,
    ],
    "needs fine-tune factors",
)
case(
    "refine-without-corpus",
    G,
    "precondition-queries --refine-steps 2 (multi-stage) with the fine-tune data and θ_pt but "
    "no corpus",
    lambda c: W.precondition(
        c,
        None,
        "--refine-steps",
        "2",
        "--finetune-data",
        c.w["finetune"],
        "--pt-model",
        c.w["pt_model"],
    ),  # fmt: skip
    "--refine-steps 2 with --method multi-stage needs --corpus (the pre-training corpus)",
)
case(
    "refine-ft-as-pt",
    G,
    "precondition-queries --refine-steps 1 given θ_ft as --pt-model",
    lambda c: W.precondition(
        c,
        None,
        "--refine-steps",
        "1",
        "--finetune-data",
        c.w["finetune"],
        "--corpus",
        c.w["corpus"],
        "--pt-model",
        c.w["ft_model"],
    ),  # fmt: skip
    "the pt stage's refinement model",
)
case(
    "eigendecompose-lambda-shards",
    G,
    "eigendecompose given Λ shards",
    lambda c: W.eigendecompose(c, *c.p["lambda_pt"]),
    "is not a covariance artifact",
)
case(
    "build-covariance-shards",
    G,
    "build-factors given covariance shards as Λ shards",
    lambda c: W.build_factors(c, partials=c.p["cov_pt"]),
    "is not a lambda artifact",
)

# ----------------------------------------------------------------------------- outputs

G = "Outputs"
case(
    "out-is-input",
    G,
    "eigendecompose --partials X --out X",
    lambda c: ["eigendecompose", "--partials", _own_partial(c), "--out", c.tmp / "cov"],
    "is (or contains) the input",
    check=lambda c: _complete(c.tmp / "cov"),
)
case(
    "out-inside-input",
    G,
    "fit-covariance --out inside the model folder",
    lambda c: _out_inside_model(c),
    "lies inside the input",
)
case(
    "out-holds-input",
    G,
    "build-factors --out a folder that holds its inputs",
    lambda c: [*W.build_factors(c), "--out", str(Path(c.p["eigen_pt"]).parent)],
    "is (or contains) the input",
)
case(
    "out-user-folder",
    G,
    "--out a folder of the user's own files",
    lambda c: [*W.bm25(c), "--out", str(_user_folder(c))],
    "not a complete msif output",
    check=lambda c: _user_folder_intact(c),
)
case(
    "out-is-file",
    G,
    "--out an existing file",
    lambda c: [*W.bm25(c), "--out", _write(c, "file.txt", b"mine")],
    "not a complete msif output",
)
case(
    "out-scheme",
    G,
    "--out s3://bucket/x",
    lambda c: [*W.bm25(c), "--out", "s3://bucket/x"],
    "unsupported URI scheme",
)
case(
    "out-bad-bucket",
    G,
    "--out gs://Not_A_Bucket/x",
    lambda c: [*W.bm25(c), "--out", "gs://Not_A_Bucket/x"],
    "not a valid bucket name",
)
case(
    "disk-full",
    G,
    "--out on a 32 KiB file system (ENOSPC)",
    lambda c: [*W.fit_covariance(c), "--out", str(c.tmp / "full" / "sums")],
    "No space left on device",
    before=lambda c: _small_filesystem(c),
)


# ----------------------------------------------------------------------------- builders


def _write(c: Ctx, name: str, data: bytes) -> str:
    path = c.tmp / name
    path.write_bytes(data)
    return str(path)


def _mkdir(c: Ctx, name: str) -> Path:
    path = c.tmp / name
    path.mkdir()
    (path / "readme.txt").write_text("no tables here")
    return path


def _two_schemas(c: Ctx) -> str:
    d = _mkdir(c, "corpus")
    pq.write_table(pa.table({"id": ["a"], "text": ["w1 w2"]}), d / "a.parquet")
    pq.write_table(pa.table({"id": [1], "text": ["w1 w2"]}), d / "b.parquet")
    return str(d)


def _without_tokenizer(c: Ctx) -> str:
    dest = c.copy(c.w["pt_model"], "m")
    for f in dest.iterdir():
        if "token" in f.name:
            f.unlink()
    return str(dest)


def _small_embedding(c: Ctx) -> str:
    from tests.support.mini_world import save_model, tokenizer_for

    tok = tokenizer_for(["w1 w2 w3 w4 w5 w6 w7 w8"])
    save_model(c.tmp / "m", tok, 0, vocab=4)
    return str(c.tmp / "m")


def _wider_model(c: Ctx) -> str:
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    tok = AutoTokenizer.from_pretrained(c.w["pt_model"])
    cfg = GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    GPTNeoXForCausalLM(cfg).save_pretrained(c.tmp / "m")
    tok.save_pretrained(c.tmp / "m")
    return str(c.tmp / "m")


def _relabelled(c: Ctx) -> str:
    d = c.copy(c.p["ft_factors"], "forged")
    W.edit_json(d, "factors.json", stage="pt")
    W.rehash(d)
    return str(d)


def _tampered(c: Ctx, rehash: bool) -> str:
    from safetensors.torch import load_file, save_file

    d = c.copy(c.p["pt_factors"], "tampered")
    tensors = load_file(d / "factors.safetensors")
    name = next(k for k in tensors if k.endswith("lambda"))
    tensors[name] = tensors[name].flip(-1)
    save_file(tensors, d / "factors.safetensors")
    if rehash:
        W.rehash(d)
    return str(d)


def _unmarked(c: Ctx) -> str:
    from msif.storage.publish import MARKER

    d = c.copy(c.p["pt_factors"], "unmarked")
    (d / MARKER).unlink()
    return str(d)


def _garbage_marker(c: Ctx) -> str:
    from msif.storage.publish import MARKER

    d = c.copy(c.p["pt_factors"], "garbage")
    (d / MARKER).write_text("{not json")
    return str(d)


def _sidecar_without(c: Ctx, which: str, key: str, name: str = "factors.json") -> str:
    src = c.p["pt_factors"] if which == "factors" else c.p[which]
    d = c.copy(src, "forged")
    W.edit_json(d, name, **{key: None})
    W.rehash(d)
    return str(d)


def _scores_without(c: Ctx, key: str) -> str:
    d = c.copy(c.p["shards"][0], "shard")
    W.edit_json(d, "scores.json", **{key: None})
    W.rehash(d)
    return str(d)


def _garbage_scores(c: Ctx) -> str:
    d = c.copy(c.p["shards"][0], "shard")
    (d / "scores.parquet").write_bytes(bytes(range(256)) * 8)
    W.rehash(d)
    return str(d)


def _other_scores(c: Ctx) -> str:
    d = c.copy(c.p["shards"][0], "shard")
    pq.write_table(pa.table({"a": [1, 2]}), d / "scores.parquet")
    W.rehash(d)
    return str(d)


def _same_shape_corpus(c: Ctx) -> str:
    d = c.tmp / "elsewhere"
    d.mkdir()
    path = d / Path(c.w["corpus"]).name
    W.write_same_size(W.swapped_words(pq.read_table(c.w["corpus"])), path)
    assert path.stat().st_size == Path(c.w["corpus"]).stat().st_size
    return str(path)


def _first_score_then_change_corpus(c: Ctx) -> None:
    from msif.cli import main

    d = c.tmp / "corpus"
    d.mkdir()
    path = d / "corpus.parquet"
    table = pq.read_table(c.w["corpus"])
    W.write_same_size(table, path)
    assert main([str(a) for a in W.score(c, str(path))]) == 0
    W.write_same_size(W.swapped_words(table), path)


def _first_score_then_change_model(c: Ctx) -> None:
    from msif.cli import main

    c.copy(c.w["pt_model"], "m")
    assert main([str(a) for a in W.score(c, None, model=str(c.tmp / "m"))]) == 0
    nudged = Path(W.nudged_model(c, "m2"))
    shutil.copy(nudged / "model.safetensors", c.tmp / "m" / "model.safetensors")


def _out_inside_model(c: Ctx) -> list:
    model = c.copy(c.w["pt_model"], "m")
    return [*W.fit_covariance(c, None, str(model)), "--out", str(model / "sums")]


def _own_partial(c: Ctx) -> str:
    shutil.copytree(c.p["cov_pt"][0], c.tmp / "cov")
    return str(c.tmp / "cov")


def _user_folder(c: Ctx) -> Path:
    d = c.tmp / "mine"
    if not d.exists():
        d.mkdir()
        (d / "thesis.tex").write_text("years of work")
    return d


def _user_folder_intact(c: Ctx) -> None:
    assert (c.tmp / "mine" / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in (c.tmp / "mine").iterdir()) == ["thesis.tex"]


def _small_filesystem(c: Ctx) -> None:
    import subprocess

    import pytest

    (c.tmp / "full").mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(c.tmp / "full")]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs is not permitted here (needs root)")
    c.cleanups.append(lambda: subprocess.run(["umount", str(c.tmp / "full")], check=False))


# ----------------------------------------------------------------------------- checks


def _manifest_meta(path: Path) -> dict:
    from msif.storage.publish import MARKER

    return json.loads((path / MARKER).read_text())["metadata"]


def _covariance_info(c: Ctx) -> dict:
    return json.loads((c.out / "covariance.json").read_text())["info"]


def _recorded_rows(c: Ctx, rows: int) -> None:
    info = _covariance_info(c)
    assert info["rows"] == [0, rows], info


def _recorded_max_length(c: Ctx, n: int) -> None:
    assert _covariance_info(c)["options"]["max_length"] == n


def _not_there(path: Path) -> None:
    assert not path.exists(), "the pickle payload ran"


def _complete(path: Path) -> None:
    from msif.storage.cache import local_input_dir

    local_input_dir(str(path))  # still a verified, complete output


def _same_as_fresh_score(c: Ctx, corpus: str) -> None:
    from msif.cli import main

    fresh = c.tmp / "fresh"
    assert main([str(a) for a in [*W.score(c, corpus), "--out", fresh]]) == 0
    got, want = (pq.read_table(p / "scores.parquet") for p in (c.out, fresh))
    assert got.equals(want), "the rerun kept scores of the old corpus"


# ----------------------------------------------------------------------------- formats, chat

G = "Input formats, columns and chat"
_TURNS = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]


def _jsonl(c: Ctx, name: str, rows: list) -> str:
    path = c.tmp / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _corpus_as(c: Ctx, fmt: str) -> str:
    """The world's corpus as a datasets folder or JSON Lines (same rows, same columns)."""
    from tests.data.formats import save_dataset

    table = pq.read_table(c.w["corpus"])
    if fmt == "datasets":
        return save_dataset(table, c.tmp / "corpus-ds", files=2, batch_rows=3)
    return _jsonl(c, "corpus.jsonl", table.to_pylist())


def _dataset_dict(c: Ctx, splits: tuple[str, ...]) -> str:
    from tests.data.formats import save_dataset_dict

    table = pq.read_table(c.w["corpus"])
    return save_dataset_dict({s: table for s in splits}, c.tmp / "dd")


def _cut_arrow(c: Ctx) -> str:
    folder = Path(_corpus_as(c, "datasets"))
    data = folder / "data-00001-of-00002.arrow"
    data.write_bytes(data.read_bytes()[:200])
    return str(folder)


def _same_sums_as_the_pipeline(c: Ctx) -> None:
    from safetensors.torch import load_file

    got = load_file(c.out / "covariance.safetensors")
    want = load_file(Path(c.p["cov_pt"][0]) / "covariance.safetensors")
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in got)


def _row_ids_scored(c: Ctx) -> None:
    ids = set(pq.read_table(c.out / "scores.parquet").column("doc_id").to_pylist())
    assert ids == {"row-0", "row-1"}, ids


def _chat_ft(c: Ctx, messages) -> str:
    return _jsonl(c, "chat.jsonl", [{"messages": messages}, {"messages": _TURNS}])


def _with_template(c: Ctx, argv: list) -> list:
    """argv with θ_ft replaced by a copy whose tokenizer has a chat template."""
    from transformers import AutoTokenizer

    dest = c.copy(c.w["ft_model"], "chat_model")
    tok = AutoTokenizer.from_pretrained(dest)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} [EOS] {% endfor %}"
    tok.save_pretrained(dest)
    return [str(dest) if a == c.w["ft_model"] else a for a in argv]


case(
    "datasets-folder",
    G,
    "the corpus as a `datasets` save_to_disk folder (2 Arrow files), shard 0 of 2",
    lambda c: W.fit_covariance(c, _corpus_as(c, "datasets"), None, "--num-shards", "2"),
    handled="read like the Parquet corpus: the pipeline's shard-0 sums, bit for bit",
    check=_same_sums_as_the_pipeline,
)
case(
    "jsonl-corpus",
    G,
    "the corpus as JSON Lines, shard 0 of 2",
    lambda c: W.fit_covariance(c, _corpus_as(c, "jsonl"), None, "--num-shards", "2"),
    handled="read like the Parquet corpus: the pipeline's shard-0 sums, bit for bit",
    check=_same_sums_as_the_pipeline,
)
case(
    "jsonl-no-ids",
    G,
    "bm25 on a JSON Lines corpus without an `id` column",
    lambda c: W.bm25(c, corpus=_jsonl(c, "t.jsonl", [{"text": "w1 w2"}, {"text": "w3 w4"}])),
    handled="documents named row-0, row-1 by their index in the table",
    check=_row_ids_scored,
)
case(
    "jsonl-array",
    G,
    "a `.json` file holding one JSON array",
    lambda c: W.fit_covariance(c, _write(c, "t.json", b'[{"id": "d0", "text": "w1 w2"}]')),
    "holds a JSON array; msif reads JSON Lines",
)
case(
    "jsonl-broken-line",
    G,
    "a JSON Lines corpus whose second line is cut",
    lambda c: W.fit_covariance(
        c, _write(c, "t.jsonl", b'{"id": "d0", "text": "w1 w2"}\n{"id": "d1", "te\n')
    ),
    "line 2 is not valid JSON",
)
case(
    "jsonl-not-object",
    G,
    "a JSON Lines line that is a list",
    lambda c: W.fit_covariance(c, _write(c, "t.jsonl", b'{"id": "d0", "text": "w1"}\n[1, 2]\n')),
    "line 2 (row 1) is a JSON list, not an object",
)
case(
    "jsonl-type-changes",
    G,
    "`text` a string in the first 1000 rows, a number later",
    lambda c: W.fit_covariance(
        c,
        _jsonl(
            c,
            "t.jsonl",
            [{"id": f"d{i}", "text": "w1 w2"} for i in range(1000)] + [{"id": "x", "text": 5}],
        ),
    ),
    "line 1001 (row 1000): `text` is an integer but the first rows make it string",
)
case(
    "dict-no-split",
    G,
    "a DatasetDict of splits a and b, no --split",
    lambda c: W.fit_covariance(c, _dataset_dict(c, ("a", "b"))),
    "has splits [a, b]; choose one with --split",
)
case(
    "dict-unknown-split",
    G,
    "a DatasetDict without the --split asked for",
    lambda c: W.fit_covariance(c, _dataset_dict(c, ("train", "test")), None, "--split", "valid"),
    "no split 'valid' (--split)",
)
case(
    "arrow-truncated",
    G,
    "a datasets folder with a cut Arrow file",
    lambda c: W.fit_covariance(c, _cut_arrow(c)),
    "is not a readable Arrow file",
)
case(
    "text-column-missing",
    G,
    "--text-column naming no column of the corpus",
    lambda c: W.fit_covariance(c, None, None, "--text-column", "body"),
    "expected `body` (--text-column) or `input_ids` (corpus)",
)
case(
    "id-column-missing",
    G,
    "--id-column naming no column of the corpus",
    lambda c: W.fit_covariance(c, None, None, "--id-column", "key"),
    "has no id column `key` (--id-column)",
)
case(
    "completion-column-missing",
    G,
    "--completion-column naming no column of the queries",
    lambda c: W.precondition(c, None, "--completion-column", "answer"),
    "lack column(s) answer (--completion-column)",
)
case(
    "messages-string",
    G,
    "fine-tune `messages` holding JSON strings, not lists",
    lambda c: W.fit_covariance_ft(c, _jsonl(c, "t.jsonl", [{"messages": json.dumps(_TURNS)}])),
    "column `messages` is string; expected list of {role, content} strings",
)
case(
    "messages-unknown-role",
    G,
    "a conversation with a `human` turn",
    lambda c: _with_template(
        c, W.fit_covariance_ft(c, _chat_ft(c, [{"role": "human", "content": "w1"}, *_TURNS]))
    ),
    "message 0 has role 'human'; expected one of system, user, assistant, tool",
)
case(
    "messages-no-assistant",
    G,
    "a conversation without an assistant turn",
    lambda c: _with_template(c, W.fit_covariance_ft(c, _chat_ft(c, _TURNS[:1]))),
    "has no assistant turn: nothing to score",
)
case(
    "messages-null-content",
    G,
    "a message whose content is null",
    lambda c: _with_template(
        c, W.fit_covariance_ft(c, _chat_ft(c, [{"role": "user", "content": None}, _TURNS[1]]))
    ),
    "message 0 (user) has no content",
)
case(
    "chat-without-template",
    G,
    "chat fine-tune data with a tokenizer that has no chat template",
    lambda c: W.fit_covariance_ft(c, _chat_ft(c, _TURNS)),
    "the tokenizer has no chat template",
)
case(
    "chat-query-no-assistant",
    G,
    "chat queries, one without an assistant turn",
    lambda c: W.precondition(
        c,
        _jsonl(
            c, "q.jsonl", [{"id": "a", "messages": _TURNS}, {"id": "b", "messages": _TURNS[:1]}]
        ),
    ),
    "row 'b': `messages` has no assistant turn",
)
for flag, value, expect in [
    ("--append-eos", "maybe", "invalid choice: 'maybe'"),
    ("--split", "../x", "--split '../x' is not a split name"),
    ("--text-column", "", "--text-column must be a column name"),
    ("--completion-column", "prompt", "--prompt-column and --completion-column both name"),
]:
    case(
        f"option{flag}={value or 'empty'}",
        G,
        f"fit-covariance {flag} {value!r}",
        lambda c, f=flag, v=value: W.fit_covariance(c, None, None, f, v),
        expect,
        code=2,
    )

# ----------------------------------------------------------------------------- corpus index

G = "Corpus index"
case(
    "index-rank-negative",
    G,
    "index --index-rank -1",
    lambda c: W.index(c, "--index-rank", "-1"),
    "--index-rank must be at least 0",
    code=2,
)
case(
    "index-whitening-nan",
    G,
    "index --index-whitening nan",
    lambda c: W.index(c, "--index-whitening", "nan"),
    "--index-whitening must be in [0, 2]",
    code=2,
)
case(
    "index-ft-model",
    G,
    "index given the fine-tuned model as θ_pt",
    lambda c: [*W.index(c)[:2], c.w["ft_model"], *W.index(c)[3:]],
    "was computed with other model weights",
)
case(
    "lookup-missing-shard",
    G,
    "lookup given one shard of a 2-shard index",
    lambda c: W.lookup(c, [W.built_index(c, "ix0", shard=0, num_shards=2)]),
    "index shard 1 of 2 is missing",
)
case(
    "lookup-single-stage",
    G,
    "lookup with single-stage queries (their corpus side is θ_ft)",
    lambda c: W.lookup(c, [W.built_index(c, "ix")], pre=c.p["pre_single_stage"]),
    "single-stage queries pair with corpus gradients at θ_ft",
)
case(
    "lookup-projected-no-factors",
    G,
    "lookup of a projected index without --pt-factors",
    lambda c: W.lookup(c, [W.built_index(c, "ixp", "--index-tier", "projected")]),
    "needs --pt-factors",
)
case(
    "lookup-corrupt-index",
    G,
    "lookup of an index shard whose tensor file was altered",
    lambda c: W.lookup(c, [_altered_index(c)]),
    "does not match its manifest (sha256 differs)",
)
case(
    "rerank-candidates-not-candidates",
    G,
    "score-corpus --candidates given factors",
    lambda c: W.score(c, None, "--candidates", c.p["pt_factors"]),
    "holds no candidates.parquet",
)


def _altered_index(c: Ctx) -> str:
    shard = Path(W.built_index(c, "ixc"))
    data = bytearray((shard / "index.safetensors").read_bytes())
    data[-4:] = b"\x01\x02\x03\x04"
    (shard / "index.safetensors").write_bytes(bytes(data))
    return str(shard)
