"""Linear datamodeling score (LDS) on the fact world: do summed scores predict retrained losses?

python -m benchmarks.lds [--quick] [--preset default] [--subsets 64] [--seeds 2]
                         [--queries all|answered] [--methods multi-stage,...]
                         [--damping-factor 0.01] [--alpha A] [--truth PATH] [--json out.json]
                         [--modules blocks|head|all]

Ground truth and evaluation are apart. The truth file (plain JSON, readable without msif)
holds M seeded random halves of the pre-training corpus to remove, the training seeds, and
for every (subset, seed) the summed completion NLL of every held-out query at θ_ft after both
training stages are redone without that half (msif.world.pretrain / finetune: the world's
recipe and tokenizer; the training seed changes only the initialisation and the minibatch
order, since the corpus and fine-tuning tables are passed explicitly). It is written after
every retrain and resumed on restart; more subsets or seeds extend it (the subsets are one
seeded stream and the seeds a fixed progression, so existing entries never change).

evaluate(truth, doc_ids, query_ids, scores) takes any (queries × documents) score matrix. The
predicted loss change of a subset is the sum of the scores of the documents it removes
(positive = proponent: removing it raises the loss, DESIGN §1); LDS of a query is the Spearman
correlation over the subsets between predicted and measured (seed-averaged) loss, and the
summary is the mean over queries with a seeded bootstrap 95 % interval (queries resampled).
The noise ceiling is the Spearman correlation between two training seeds' measured losses.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import random
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from benchmarks import counterfactual
from benchmarks.common import machine
from benchmarks.counterfactual import World, open_world, query_losses
from benchmarks.sensitivity import add_modules_option
from benchmarks.stats import spearman
from msif.ekfac.factors import DEFAULT_ALPHA
from msif.errors import MsifError
from msif.evaluation.bm25 import BM25Index
from msif.world import completion_matches

TRUTH_FORMAT = "msif-lds-truth/1"
LOSS_DEFINITION = (
    "summed completion-token NLL of each held-out query at the retrained fine-tuned model "
    "(all queries in one fixed batch)"
)
# pretrain seeds its initialisation and order with s and finetune its order with s + 1, so
# consecutive integers would share streams between two training seeds.
SEED_STRIDE = 1000
# "relevant" is the world's answer key, not a method: 1 on the documents that state the query's
# fact, 0 elsewhere. Its LDS is what knowing exactly which documents matter reaches, so it
# separates what the world allows from what an attribution method achieves.
METHODS = (*counterfactual.INFLUENCE_METHODS, "bm25", "relevant", "random")
BASELINE = "multi-stage"
RESAMPLES = 10_000
QUICK_SUBSETS = 6  # 12 retrains of the small world: a CI run, not a measurement
ROOT = Path(__file__).resolve().parents[1]


class LdsError(MsifError):
    """An LDS truth file or score matrix that cannot be used as asked."""


@dataclass
class Truth:
    """Retrained ground truth: removed halves, training seeds, per-(subset, seed) query losses."""

    preset: str
    world_fingerprint: str
    world_config: dict
    doc_ids: list[str]  # corpus order
    query_ids: list[str]
    answered_query_ids: list[str]  # those the cached fine-tuned model answers exactly
    reference_losses: list[float]  # the cached θ_ft, trained on the whole corpus
    subset_seed: int
    removed: list[list[str]]  # per subset, the documents left out (corpus order)
    training_seeds: list[int]
    losses: list[list[list[float] | None]]  # [subset][seed] -> per query, None until retrained
    retrain_seconds: list[list[float | None]]
    commits: list[str] = field(default_factory=list)  # every commit that added entries
    format: str = TRUTH_FORMAT
    loss: str = LOSS_DEFINITION

    def to_dict(self) -> dict:
        """JSON-able content."""
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Truth:
        """Inverse of to_dict, checking the shapes agree."""
        if d.get("format") != TRUTH_FORMAT:
            raise LdsError(f"not an LDS truth file (format {d.get('format')!r})")
        names = {f.name for f in dataclasses.fields(Truth)}
        missing = sorted(names - set(d) - {"commits", "loss"})
        if missing:
            raise LdsError(f"the truth file lacks {', '.join(missing)}")
        truth = Truth(**{k: v for k, v in d.items() if k in names})
        truth.check()
        return truth

    def check(self) -> None:
        """Raise LdsError if the subsets, seeds and losses do not fit together."""
        m, s, q = len(self.removed), len(self.training_seeds), len(self.query_ids)
        if len(self.losses) != m or any(len(row) != s for row in self.losses):
            raise LdsError(f"the truth file's losses are not {m} subsets × {s} seeds")
        if any(v is not None and len(v) != q for row in self.losses for v in row):
            raise LdsError(f"a truth entry does not hold one loss per query ({q})")
        known = set(self.doc_ids)
        for j, ids in enumerate(self.removed):
            if len(set(ids)) != len(ids) or not set(ids) <= known:
                raise LdsError(
                    f"subset {j} of the truth file removes unknown or repeated documents"
                )

    def seed_columns(self, seeds: Sequence[int] | None) -> list[int]:
        """Positions of the given training seeds (all when None)."""
        if seeds is None:
            return list(range(len(self.training_seeds)))
        unknown = [x for x in seeds if x not in self.training_seeds]
        if unknown or not seeds:
            raise LdsError(f"training seed(s) {unknown} not in the truth ({self.training_seeds})")
        return [self.training_seeds.index(x) for x in seeds]

    def complete(self, seeds: Sequence[int] | None = None) -> list[int]:
        """Subsets retrained under every one of the given seeds."""
        cols = self.seed_columns(seeds)
        return [j for j, row in enumerate(self.losses) if all(row[k] is not None for k in cols)]


def make_subsets(doc_ids: Sequence[str], m: int, seed: int) -> list[list[str]]:
    """m seeded random halves of doc_ids (corpus order); the first m never depend on m."""
    rng = random.Random(seed)
    n = len(doc_ids)
    return [[doc_ids[i] for i in sorted(rng.sample(range(n), n // 2))] for _ in range(m)]


def training_seeds(base: int, s: int) -> list[int]:
    """The first s training seeds of a world whose own seed is base (that one first)."""
    return [base + SEED_STRIDE * k for k in range(s)]


def current_commit() -> str:
    """HEAD of the checkout running this, '-dirty' when tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def new_truth(world: World, subset_seed: int) -> Truth:
    """An empty truth file for a world: no subsets or seeds yet."""
    prompts = world.queries.column("prompt").to_pylist()
    completions = world.queries.column("completion").to_pylist()
    answered = completion_matches(world.ft, world.tokenizer, prompts, completions)
    qids = [q.id for q in world.query_examples]
    return Truth(
        world.preset,
        world.config.fingerprint(),
        world.config.to_dict(),
        [d.id for d in world.docs],
        qids,
        [q for q, ok in zip(qids, answered, strict=True) if ok],
        query_losses(world.ft, world.query_examples, world.pad),
        subset_seed,
        [],
        [],
        [],
        [],
    )


def match_world(truth: Truth, world: World) -> None:
    """Refuse a truth file measured on another world, corpus or query set."""
    if truth.world_fingerprint != world.config.fingerprint():
        raise LdsError(
            f"the truth file was measured on world {truth.world_fingerprint}, not "
            f"{world.config.fingerprint()} (preset {world.preset})"
        )
    if truth.doc_ids != [d.id for d in world.docs]:
        raise LdsError("the truth file's documents are not this world's corpus")
    if truth.query_ids != [q.id for q in world.query_examples]:
        raise LdsError("the truth file's queries are not this world's held-out queries")


def extend(truth: Truth, m: int, s: int) -> None:
    """Grow the truth to at least m subsets and s seeds (new entries not yet retrained)."""
    if m > len(truth.removed):
        wanted = make_subsets(truth.doc_ids, m, truth.subset_seed)
        if wanted[: len(truth.removed)] != truth.removed:
            raise LdsError("the truth file's subsets do not follow its own seeded recipe")
        for ids in wanted[len(truth.removed) :]:
            truth.removed.append(ids)
            truth.losses.append([None] * len(truth.training_seeds))
            truth.retrain_seconds.append([None] * len(truth.training_seeds))
    if s > len(truth.training_seeds):
        wanted = training_seeds(truth.world_config["seed"], s)
        if wanted[: len(truth.training_seeds)] != truth.training_seeds:
            raise LdsError(
                f"the truth file's training seeds {truth.training_seeds} are not {wanted}"
            )
        extra = s - len(truth.training_seeds)
        truth.training_seeds = wanted
        for row, secs in zip(truth.losses, truth.retrain_seconds, strict=True):
            row += [None] * extra
            secs += [None] * extra


def retrain_losses(world: World, removed: Sequence[str], seed: int) -> list[float]:
    """Query losses after both stages are retrained without `removed`, training seed `seed`."""
    # Only the config's seed changes: the corpus, fine-tuning pairs and tokenizer are the
    # world's own tables, so the seed moves initialisation and minibatch order alone.
    seeded = dataclasses.replace(world, config=world.config.with_seed(seed))
    model = counterfactual.retrain(seeded, removed)
    return query_losses(model, world.query_examples, world.pad)


def dumps(truth: Truth) -> str:
    """The truth as JSON, one line per subset, so diffs and partial files stay readable."""
    lines = []
    for key, value in truth.to_dict().items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            body = "[\n" + ",\n".join(f"  {json.dumps(v)}" for v in value) + "\n ]"
        else:
            body = json.dumps(value)
        lines.append(f" {json.dumps(key)}: {body}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def save_truth(truth: Truth, path: str | Path) -> None:
    """Write atomically (beside, then rename): an interrupted run keeps the last whole file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(truth))
    tmp.replace(path)


def load_truth(path: str | Path) -> Truth:
    """A truth file written by save_truth."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise LdsError(f"cannot read an LDS truth file from {path}: {e}") from None
    if not isinstance(d, dict):
        raise LdsError(f"{path} does not hold a JSON object")
    try:
        return Truth.from_dict(d)
    except TypeError as e:
        raise LdsError(f"{path}: {e}") from None


def fill(
    truth: Truth,
    world: World,
    path: str | Path,
    m: int,
    s: int,
    log: Callable[[str], None] = print,
) -> int:
    """Retrain every missing entry of the first m subsets × s seeds, saving after each."""
    todo = [(j, k) for j in range(m) for k in range(s) if truth.losses[j][k] is None]
    commit = current_commit()
    if todo and commit not in truth.commits:
        truth.commits.append(commit)
    start = time.perf_counter()
    for n, (j, k) in enumerate(todo, 1):
        tick = time.perf_counter()
        losses = retrain_losses(world, truth.removed[j], truth.training_seeds[k])
        if not all(math.isfinite(v) for v in losses):
            raise LdsError(f"subset {j}, seed {truth.training_seeds[k]}: a non-finite query loss")
        truth.losses[j][k] = losses
        truth.retrain_seconds[j][k] = round(time.perf_counter() - tick, 2)
        save_truth(truth, path)
        log(
            f"subset {j + 1}/{m} seed {truth.training_seeds[k]}: mean query loss "
            f"{sum(losses) / len(losses):.3f} ({truth.retrain_seconds[j][k]:.1f}s) "
            f"[{n}/{len(todo)} retrains, {time.perf_counter() - start:.0f}s]"
        )
    return len(todo)


@dataclass(frozen=True)
class LdsResult:
    """Mean over queries with its bootstrap 95 % interval, and every query's value."""

    mean: float
    low: float
    high: float
    per_query: dict[str, float]

    def to_dict(self) -> dict:
        """JSON-able content."""
        return dataclasses.asdict(self)


def bootstrap(values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0) -> LdsResult:
    """Percentile 95 % interval of the mean, resampling the values (queries) with replacement.

    The resampled indices depend only on seed and len(values), so paired differences of two
    methods over the same queries see the same resamples as each method alone.
    """
    x = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    low, high = np.percentile(x[idx].mean(axis=1), [2.5, 97.5])
    return LdsResult(float(x.mean()), float(low), float(high), {})


def with_queries(result: LdsResult, query_ids: Sequence[str], values: Sequence[float]) -> LdsResult:
    """result carrying the per-query values."""
    return dataclasses.replace(result, per_query=dict(zip(query_ids, values, strict=True)))


def rank_correlation(predicted: torch.Tensor, measured: torch.Tensor) -> float:
    """Spearman correlation; 0 when predicted is constant (it ranks nothing)."""
    if bool((predicted == predicted[0]).all()):
        return 0.0
    if bool((measured == measured[0]).all()):
        raise LdsError("a query's measured loss is the same in every subset")
    return spearman(predicted, measured)


def measured_losses(
    truth: Truth, query_ids: Sequence[str], subsets: Sequence[int], seeds: Sequence[int] | None
) -> torch.Tensor:
    """(subsets × queries) measured loss, averaged over the given training seeds."""
    column = {q: i for i, q in enumerate(truth.query_ids)}
    unknown = [q for q in query_ids if q not in column]
    if unknown:
        raise LdsError(f"query {unknown[0]!r} is not in the truth file")
    cols = truth.seed_columns(seeds)
    missing = [j for j in subsets if any(truth.losses[j][k] is None for k in cols)]
    if missing:
        raise LdsError(f"subset {missing[0]} is not retrained under every seed asked for")
    losses = torch.tensor(
        [[truth.losses[j][k] for k in cols] for j in subsets], dtype=torch.float64
    )  # (subsets, seeds, all queries)
    return losses.mean(dim=1)[:, [column[q] for q in query_ids]]


def resolve_subsets(truth: Truth, subsets: Sequence[int] | None, seeds) -> list[int]:
    """The subsets to evaluate: given, else every one retrained under the seeds; at least 3."""
    chosen = list(subsets) if subsets is not None else truth.complete(seeds)
    if len(chosen) < 3:
        raise LdsError(f"LDS needs at least 3 retrained subsets; the truth has {len(chosen)}")
    if any(not 0 <= j < len(truth.removed) for j in chosen):
        raise LdsError(f"subset indices must lie in 0..{len(truth.removed) - 1}")
    return chosen


def evaluate(
    truth: Truth | str | Path,
    doc_ids: Sequence[str],
    query_ids: Sequence[str],
    scores: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
    *,
    seeds: Sequence[int] | None = None,
    subsets: Sequence[int] | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> LdsResult:
    """LDS of a (queries × documents) score matrix against the truth's retrained losses.

    Rows of scores are query_ids, columns doc_ids (every document of the truth's corpus must
    be there; others are ignored). seeds: training seeds to average the measured loss over
    (all by default); subsets: indices to use (every fully retrained one by default).
    """
    truth = truth if isinstance(truth, Truth) else load_truth(truth)
    s = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    if s.shape != (len(query_ids), len(doc_ids)):
        raise LdsError(
            f"scores are {tuple(s.shape)}, not {len(query_ids)} queries × {len(doc_ids)} documents"
        )
    if not bool(torch.isfinite(s).all()):
        raise LdsError("scores hold NaN or inf")
    position = {d: i for i, d in enumerate(doc_ids)}
    absent = [d for d in truth.doc_ids if d not in position]
    if absent:
        raise LdsError(f"document {absent[0]!r} of the truth's corpus has no score")
    chosen = resolve_subsets(truth, subsets, seeds)
    predicted = removal_matrix(truth, doc_ids, chosen) @ s.T  # Σ of the removed docs' scores
    measured = measured_losses(truth, query_ids, chosen, seeds)
    per_query = [rank_correlation(predicted[:, i], measured[:, i]) for i in range(len(query_ids))]
    return with_queries(bootstrap(per_query, resamples, seed), query_ids, per_query)


def removal_matrix(truth: Truth, doc_ids: Sequence[str], subsets: Sequence[int]) -> torch.Tensor:
    """(subsets × documents): 1 where the subset removes the document."""
    position = {d: i for i, d in enumerate(doc_ids)}
    removal = torch.zeros(len(subsets), len(doc_ids), dtype=torch.float64)
    for row, j in enumerate(subsets):
        removal[row, [position[d] for d in truth.removed[j]]] = 1.0
    return removal


def statement_share(
    truth: Truth,
    doc_ids: Sequence[str],
    scores: torch.Tensor,
    statements: torch.Tensor,
    subsets: Sequence[int],
) -> float:
    """Mean over queries of the share of the predicted change's variance owed to statements.

    A query's predicted change over the subsets is S = S_statements + S_rest; the share is
    Cov(S_statements, S) / Var(S), so the two parts' shares sum to one. statements is the
    answer key (queries × documents, 1 on the documents stating the query's fact). The measured
    loss depends mostly on those documents, so a method whose share is small spreads its
    prediction over documents that barely move the loss. Queries whose prediction is the same
    in every subset have no variance to apportion and are left out of the mean.
    """
    removal = removal_matrix(truth, doc_ids, subsets)
    total = removal @ scores.T
    part = removal @ (scores * statements).T
    total_c, part_c = total - total.mean(0), part - part.mean(0)
    var = (total_c * total_c).sum(0)
    varies = var > 0  # a constant prediction has no variance to apportion
    if not bool(varies.any()):
        return 0.0
    return float(((part_c * total_c).sum(0)[varies] / var[varies]).mean())


def seed_agreement(
    truth: Truth,
    query_ids: Sequence[str],
    subsets: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> LdsResult:
    """Noise ceiling: per query, Spearman between two seeds' losses over subsets (pair mean)."""
    seeds = list(truth.training_seeds if seeds is None else seeds)
    if len(seeds) < 2:
        raise LdsError("the noise ceiling needs at least two training seeds")
    chosen = resolve_subsets(truth, subsets, seeds)
    per_seed = [measured_losses(truth, query_ids, chosen, [x]) for x in seeds]
    pairs = list(itertools.combinations(per_seed, 2))
    per_query = [
        sum(rank_correlation(a[:, i], b[:, i]) for a, b in pairs) / len(pairs)
        for i in range(len(query_ids))
    ]
    return with_queries(bootstrap(per_query, resamples, seed), query_ids, per_query)


def difference(a: LdsResult, b: LdsResult, resamples: int = RESAMPLES, seed: int = 0) -> LdsResult:
    """Paired bootstrap of a − b over the same queries."""
    if a.per_query.keys() != b.per_query.keys():
        raise LdsError("a paired difference needs both results on the same queries")
    qids = list(a.per_query)
    diff = [a.per_query[q] - b.per_query[q] for q in qids]
    return with_queries(bootstrap(diff, resamples, seed), qids, diff)


def method_scores(
    world: World,
    methods: Sequence[str],
    *,
    damping_factor: float,
    alpha: float | None,
    seed: int = 0,
    factors: tuple | None = None,
) -> dict[str, torch.Tensor]:
    """(held-out queries × corpus documents) scores of each method, corpus order.

    factors: (pt, ft) from counterfactual.fit_factors, to fit them once for a sweep.
    """
    out = counterfactual.influence_scores(
        world,
        world.query_examples,
        methods,
        damping_factor=damping_factor,
        alpha=alpha,
        factors=factors,
    )
    out = {m: v.double() for m, v in out.items()}
    ids = world.corpus.column("id").to_pylist()
    if "bm25" in methods:
        index = BM25Index.build(ids, world.corpus.column("text").to_pylist())
        prompts = world.queries.column("prompt").to_pylist()
        completions = world.queries.column("completion").to_pylist()
        out["bm25"] = torch.as_tensor(
            np.stack([index.score(p + c) for p, c in zip(prompts, completions, strict=True)])
        )
    if "relevant" in methods:
        out["relevant"] = relevant_scores(world, ids)
    if "random" in methods:
        g = torch.Generator().manual_seed(seed)
        out["random"] = torch.randn(len(world.query_examples), len(ids), generator=g).double()
    return {m: out[m] for m in methods}


def relevant_scores(world: World, doc_ids: Sequence[str]) -> torch.Tensor:
    """(held-out queries × documents): 1 where the document states the query's fact."""
    position = {d: i for i, d in enumerate(doc_ids)}
    relevant = world.queries.column("relevant_ids").to_pylist()
    out = torch.zeros(len(relevant), len(doc_ids), dtype=torch.float64)
    for row, docs in enumerate(relevant):
        out[row, [position[d] for d in docs]] = 1.0
    return out


def implied_ceiling(r: float, seeds: int) -> float:
    """Approximate LDS of an exact predictor of the expected loss against an s-seed mean.

    With seed noise independent of the subset, the reliability of an s-seed mean is
    s·r / (1 + (s − 1)·r) (Spearman–Brown) and a perfect predictor correlates with it by its
    square root; rank correlations follow this only approximately.
    """
    if r <= 0:
        return 0.0
    return math.sqrt(seeds * r / (1 + (seeds - 1) * r))


def interval(r: LdsResult) -> str:
    """'mean [low, high]' with three decimals."""
    return f"{r.mean:+.3f} [{r.low:+.3f}, {r.high:+.3f}]"


def markdown(results: dict, n_seeds: int, first_seed: int) -> str:
    """The LDS table: every method against the seed mean, one seed, and multi-stage."""
    shares = all("statement_share" in r for r in results["methods"].values())
    head = (
        f"| method | LDS, {n_seeds}-seed mean [95 %] | LDS, seed {first_seed} only [95 %] | "
        f"{BASELINE} − method, paired [95 %] |"
    )
    lines = [head + (" statements' share |" if shares else ""), "|---|---:|---:|---:|"]
    lines[1] += "---:|" if shares else ""
    for method, r in results["methods"].items():
        diff = results["differences"].get(method)
        share = f" {r['statement_share']:.0%} |" if shares else ""
        lines.append(
            f"| {method} | {interval(r['lds'])} | {interval(r['single_seed'])} | "
            f"{interval(diff) if diff else '–'} |{share}"
        )
    ceiling = results.get("noise_ceiling")
    if ceiling:
        lines.append(f"| noise ceiling (seed vs seed) | {interval(ceiling)} | | |" + " |" * shares)
    return "\n".join(lines)


def target_met(results: dict) -> dict[str, bool]:
    """Per baseline present, whether multi-stage's interval lies wholly above its interval."""
    methods = results["methods"]
    if BASELINE not in methods:
        return {}
    low = methods[BASELINE]["lds"].low
    return {
        m: low > methods[m]["lds"].high
        for m in ("single-stage", "gradient-dot", "bm25")
        if m in methods
    }


def run_evaluation(
    truth: Truth,
    scores: dict[str, torch.Tensor],
    doc_ids: Sequence[str],
    query_ids: Sequence[str],
    subsets: Sequence[int],
    seeds: Sequence[int],
    statements: torch.Tensor | None = None,
) -> dict:
    """Every method's LDS (seed mean and first seed), the paired gaps, the noise ceiling.

    statements: the answer key (truth's queries × doc_ids); with it each method also gets its
    statements' share of the predicted variance.
    """
    rows = [truth.query_ids.index(q) for q in query_ids]
    results: dict = {"methods": {}, "differences": {}}
    for method, values in scores.items():
        picked = values[rows]
        results["methods"][method] = {
            "lds": evaluate(truth, doc_ids, query_ids, picked, seeds=seeds, subsets=subsets),
            "single_seed": evaluate(
                truth, doc_ids, query_ids, picked, seeds=seeds[:1], subsets=subsets
            ),
        }
        if statements is not None:
            share = statement_share(truth, doc_ids, picked, statements[rows], subsets)
            results["methods"][method]["statement_share"] = share
    if BASELINE in scores:
        base = results["methods"][BASELINE]["lds"]
        for method, r in results["methods"].items():
            if method != BASELINE:
                results["differences"][method] = difference(base, r["lds"])
    if len(seeds) >= 2:
        results["noise_ceiling"] = seed_agreement(truth, query_ids, subsets, seeds)
    return results


def to_json(results: dict) -> dict:
    """results with every LdsResult as a plain dict."""
    if isinstance(results, LdsResult):
        return results.to_dict()
    if isinstance(results, dict):
        return {k: to_json(v) for k, v in results.items()}
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help=f"small world, {QUICK_SUBSETS} subsets, 2 seeds"
    )
    p.add_argument("--preset", default="default")
    p.add_argument(
        "--subsets", type=int, help="random halves to retrain (default: the truth's, else 64)"
    )
    p.add_argument(
        "--seeds", type=int, help="training seeds per subset (default: the truth's, else 2)"
    )
    p.add_argument("--subset-seed", type=int, default=0, help="seed of a new truth's subsets")
    p.add_argument(
        "--queries",
        choices=("all", "answered"),
        default="all",
        help="held-out queries to evaluate: all, or those the fine-tuned model answers",
    )
    p.add_argument("--methods", default=",".join(METHODS), help=f"from {', '.join(METHODS)}")
    p.add_argument("--damping-factor", type=float, default=counterfactual.PT_DAMPING_FACTOR)
    p.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help=f"fine-tune damping α (default {DEFAULT_ALPHA}, msif's; 0: the world's proximity "
        "coefficient)",
    )
    p.add_argument(
        "--truth",
        help="truth file to reuse and extend, created when absent (default "
        "benchmarks/results/lds-truth-<preset>.json; --quick: a temporary file)",
    )
    p.add_argument("--json", help="also write the results (with per-query LDS) here")
    add_modules_option(p)
    return p.parse_args(argv)


def open_truth(path: Path, world: World, subset_seed: int) -> Truth:
    """The truth at path, checked against the world, or a new one."""
    if not path.exists():
        return new_truth(world, subset_seed)
    truth = load_truth(path)
    match_world(truth, world)
    return truth


def main(argv: Sequence[str] | None = None) -> dict:
    """Retrain what the truth lacks, score every method, print the LDS table."""
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LdsError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    preset = "small" if args.quick else args.preset
    if args.truth:
        return _main(args, preset, methods, Path(args.truth))
    if args.quick:  # quick runs never touch the committed truth
        with tempfile.TemporaryDirectory() as tmp:
            return _main(args, preset, methods, Path(tmp) / "lds-truth-small.json")
    return _main(
        args, preset, methods, ROOT / "benchmarks" / "results" / f"lds-truth-{preset}.json"
    )


def _main(args: argparse.Namespace, preset: str, methods: list[str], path: Path) -> dict:
    torch.set_num_threads(1)  # as msif.world trains: bitwise reproduction needs the same threads
    start = time.perf_counter()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"LDS, world {preset}, truth {path}, {stamp}; {machine()}", flush=True)
    world = open_world(preset)
    truth = open_truth(path, world, args.subset_seed)
    m = args.subsets or len(truth.removed) or (QUICK_SUBSETS if args.quick else 64)
    s = args.seeds or len(truth.training_seeds) or 2
    if m < 3 or s < 1:
        raise LdsError("need at least 3 subsets and 1 training seed")
    extend(truth, m, s)
    retrains = fill(truth, world, path, m, s, log=lambda x: print(x, flush=True))
    retrain_s = sum(v for row in truth.retrain_seconds[:m] for v in row[:s] if v is not None)
    seeds = truth.training_seeds[:s]
    qids = truth.answered_query_ids if args.queries == "answered" else truth.query_ids
    tick = time.perf_counter()
    alpha = args.alpha or None  # 0: the world's own α
    factors = None
    if any(m in counterfactual.INFLUENCE_METHODS for m in methods):
        factors = counterfactual.fit_factors(world, args.modules)
    scores = method_scores(
        world, methods, damping_factor=args.damping_factor, alpha=alpha, factors=factors
    )
    score_s = time.perf_counter() - tick
    statements = relevant_scores(world, truth.doc_ids)
    results = run_evaluation(truth, scores, truth.doc_ids, qids, list(range(m)), seeds, statements)
    print(
        f"\n{m} subsets (half the corpus removed each) × {s} seeds {seeds}; "
        f"{len(qids)} {args.queries} held-out queries; damping factor {args.damping_factor}, "
        f"α {world.alpha if alpha is None else alpha}; modules {args.modules}"
    )
    print(markdown(results, s, seeds[0]))
    print(
        "statements' share: Cov(S_statements, S) / Var(S) of the predicted change S over the "
        "subsets, S_statements its part from the documents stating the query's fact"
    )
    ceiling = results.get("noise_ceiling")
    if ceiling:
        print(
            f"\nA perfect predictor of the expected loss would reach ≈ "
            f"{implied_ceiling(ceiling.mean, s):.3f} against the {s}-seed mean and ≈ "
            f"{implied_ceiling(ceiling.mean, 1):.3f} against one seed (Spearman–Brown)."
        )
    met = target_met(results)
    if met:
        verdict = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in met.items())
        print(f"{BASELINE} interval wholly above: {verdict}")
    mean_loss = torch.tensor(
        [truth.losses[j][k] for j in range(m) for k in range(s)], dtype=torch.float64
    ).mean()
    print(
        f"mean query loss: {sum(truth.reference_losses) / len(truth.reference_losses):.3f} on "
        f"the whole corpus, {float(mean_loss):.3f} with half removed; {retrains} retrains now, "
        f"{retrain_s:.0f}s retraining in the truth in all; scoring {score_s:.0f}s; "
        f"total {time.perf_counter() - start:.0f}s"
    )
    out = {
        "preset": preset,
        "truth": str(path),
        "subsets": m,
        "seeds": seeds,
        "queries": args.queries,
        "query_ids": list(qids),
        "damping_factor": args.damping_factor,
        "alpha": world.alpha if alpha is None else alpha,
        "modules": args.modules,
        "retrains": retrains,
        "retrain_seconds": retrain_s,
        "seconds": time.perf_counter() - start,
        **to_json(results),
        "target_met": met,
    }
    if args.json:
        tmp = Path(f"{args.json}.tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(args.json)
    out["results"] = results
    return out


if __name__ == "__main__":
    try:
        main()
    except MsifError as e:
        raise SystemExit(f"error: {e}") from None
