"""Counterfactual attribution quality: remove each method's top proponents, retrain, re-measure.

python -m benchmarks.counterfactual [--quick] [--preset default] [--queries 10] [--k 5]
                                    [--methods multi-stage,single-stage,...] [--json out.json]
python -m benchmarks.counterfactual --report out.json [--noise filler.json]   # tables only

For held-out queries the fine-tuned model answers correctly, each method's top-k proponents
(highest positive scores) are removed from the pre-training corpus; both training stages are
redone with the world's own recipe, seeds and tokenizer (msif.world.pretrain / finetune), and
Δloss = ℓ(q, θ_ft without the documents) − ℓ(q, θ_ft on the full corpus), the summed completion
NLL. Positive Δloss means the removal hurt the answer, which is what proponents should do.

The reference θ_ft is retrained on the full corpus by the same code, and the run checks that it
reproduces the cached world's fine-tuned model bitwise, so Δloss measures the removal and not
training nondeterminism. Removing any documents still reshuffles every later minibatch (the
seeded permutation depends on the corpus size): the `random` (and optional `filler`) control
measures that floor; a `--methods filler` report passed as --noise gives every query one
noise sample per control retrain. Identical removal sets are retrained once.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

import msif
from benchmarks.common import machine
from benchmarks.sensitivity import fit, load_world
from msif.attribution.precondition import METHODS as INFLUENCE_METHOD_NAMES
from msif.core.loss import sequence_losses
from msif.data.examples import Example, batches, collate
from msif.ekfac.factors import DEFAULT_DAMPING_FACTOR, Damping
from msif.errors import MsifError
from msif.evaluation.bm25 import BM25Index
from msif.world import (
    Document,
    Fact,
    FactWorld,
    WorldConfig,
    completion_matches,
    finetune,
    generate_facts,
    pretrain,
)

INFLUENCE_METHODS = INFLUENCE_METHOD_NAMES
METHODS = (*INFLUENCE_METHODS, "bm25", "random", "filler")
CONTROL_METHODS = ("random", "filler")
DEFAULT_METHODS = (*INFLUENCE_METHODS, "bm25", "random")
QUICK_METHODS = ("multi-stage", "random")
# What `msif run` uses for the pre-train stage (0.1 until issue 14's damping defaults: the
# counterfactual tables in RESULTS.md were measured at 0.1).
PT_DAMPING_FACTOR = DEFAULT_DAMPING_FACTOR


class CounterfactualError(MsifError):
    """A counterfactual benchmark that cannot run as asked."""


@dataclass(frozen=True)
class Trial:
    """One query, one method: what was removed and how the retrained model's loss moved."""

    query_id: str
    method: str
    removed: tuple[str, ...]
    relevant_removed: int
    delta_loss: float
    still_answers: bool
    others_delta: float  # mean Δloss on the other selected queries: how targeted the removal is
    all_deltas: tuple[float, ...] = ()  # Δloss of every selected query under this removal


@dataclass
class Report:
    """Everything one run measured."""

    preset: str
    k: int
    seed: int
    alpha: float
    query_ids: list[str]
    methods: list[str]
    original_loss: dict[str, float]
    reproduced_loss: dict[str, float]
    weights_bitwise: bool
    trials: list[Trial] = field(default_factory=list)
    retrains: int = 0
    retrain_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def reproduction_max_abs_diff(self) -> float:
        """Largest |ℓ(full-corpus retrain) − ℓ(cached model)| over the selected queries."""
        return max(abs(self.reproduced_loss[q] - self.original_loss[q]) for q in self.query_ids)

    def to_dict(self) -> dict:
        """JSON-able content."""
        d = asdict(self)
        d["reproduction_max_abs_diff"] = self.reproduction_max_abs_diff
        return d

    @staticmethod
    def from_dict(d: dict) -> Report:
        """Inverse of to_dict (the derived fields are recomputed, not read)."""
        d = {k: v for k, v in d.items() if k != "reproduction_max_abs_diff"}
        trials = [
            Trial(
                **{
                    **t,
                    "removed": tuple(t["removed"]),
                    "all_deltas": tuple(t.get("all_deltas", ())),
                }
            )
            for t in d.pop("trials")
        ]
        return Report(**d, trials=trials)


@dataclass
class World:
    """The loaded fact world: models, tokenizer, tables and tokenised data."""

    preset: str
    config: WorldConfig
    alpha: float
    pt: torch.nn.Module
    ft: torch.nn.Module
    tokenizer: object
    corpus: pa.Table
    pairs: pa.Table
    queries: pa.Table
    docs: list[Example]
    ft_rows: list[Example]
    query_examples: list[Example]
    relevant: dict[str, list[str]]

    @property
    def pad(self) -> int:
        """The padding token id."""
        return self.tokenizer.pad_token_id or 0


def open_world(preset: str, seed: int | None = None) -> World:
    """Load (building if needed) the fact world of a preset (another world of it with seed)."""
    w, pt, ft, tok, docs, ft_rows, qs, relevant = load_world(preset, seed=seed)
    config = WorldConfig.preset(preset)
    return World(
        preset,
        config if seed is None else config.with_seed(seed),
        w["alpha"],
        pt,
        ft,
        tok,
        pq.read_table(w["corpus"]),
        pq.read_table(w["finetune"]),
        pq.read_table(w["queries"]),
        docs,
        ft_rows,
        qs,
        relevant,
    )


def select_queries(world: World, n: int, seed: int) -> list[int]:
    """Indices of n seeded-random queries the fine-tuned model answers exactly, in id order."""
    prompts = world.queries.column("prompt").to_pylist()
    completions = world.queries.column("completion").to_pylist()
    correct = [
        i
        for i, ok in enumerate(completion_matches(world.ft, world.tokenizer, prompts, completions))
        if ok
    ]
    if len(correct) < n:
        raise CounterfactualError(
            f"the fine-tuned model answers only {len(correct)} queries; asked for {n}"
        )
    return sorted(random.Random(seed).sample(correct, n))


@torch.no_grad()
def query_losses(model: torch.nn.Module, examples: Sequence[Example], pad: int) -> list[float]:
    """Summed completion-token NLL of each query under model (one fixed batch, so comparable)."""
    model.eval()
    batch = collate(list(examples), pad)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_losses(logits, batch["labels"]).tolist()


def fit_factors(world: World, modules: str = "blocks") -> tuple[msif.Factors, msif.Factors]:
    """The pre-train and fine-tune factors of the world's models, fitted in memory, over the
    benchmarks.sensitivity.TRACKING[modules] selection."""
    return (
        fit(world.pt, world.docs, "pt", world.pad, modules),
        fit(world.ft, world.ft_rows, "ft", world.pad, modules),
    )


def influence_scores(
    world: World,
    picked: Sequence[Example],
    methods: Sequence[str],
    *,
    damping_factor: float = PT_DAMPING_FACTOR,
    alpha: float | None = None,
    factors: tuple[msif.Factors, msif.Factors] | None = None,
) -> dict:
    """Scores (queries × documents) of each influence method, as `msif run` computes them.

    alpha None is the world's own proximity coefficient; factors (pt, ft) are fitted when not
    given, so a damping sweep can fit them once.
    """
    wanted = [m for m in INFLUENCE_METHODS if m in methods]
    if not wanted:
        return {}
    fpt, fft = factors if factors is not None else fit_factors(world)
    ids = [q.id for q in picked]
    out = {}
    for method in wanted:
        pre = msif.precondition_queries(
            world.ft,
            batches(picked, 16, world.pad),
            ids,
            method=method,
            ft_factors=fft,
            pt_factors=fpt,
            alpha=world.alpha if alpha is None else alpha,
            damping=Damping(damping_factor),
        )
        model = world.ft if method == "single-stage" else world.pt
        out[method] = msif.score(model, batches(world.docs, 16, world.pad), pre).values
    return out


def top_proponents(scores: Sequence[float], doc_ids: Sequence[str], k: int) -> tuple[str, ...]:
    """The k highest-scoring documents with a positive score; ties by corpus order."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return tuple(doc_ids[j] for j in order[:k] if scores[j] > 0)


def filler_candidates(facts: FactWorld, query_index: int) -> list[str]:
    """Filler documents that mention neither the query's entity nor its answer."""
    query = facts.queries[query_index]
    value, entity = query.qa.fact.value, query.qa.fact.entity
    return [
        d.id
        for d in facts.documents
        if d.fact is None and value not in d.text and entity not in d.text
    ]


def removal_sets(
    world: World, chosen: Sequence[int], methods: Sequence[str], k: int, seed: int
) -> dict[tuple[str, str], tuple[str, ...]]:
    """(query id, method) -> the documents that method removes for that query."""
    picked = [world.query_examples[i] for i in chosen]
    doc_ids = [d.id for d in world.docs]
    scores = influence_scores(world, picked, methods)
    texts = world.corpus.column("text").to_pylist()
    bm25 = BM25Index.build(world.corpus.column("id").to_pylist(), texts)
    prompts = world.queries.column("prompt").to_pylist()
    completions = world.queries.column("completion").to_pylist()
    facts = generate_facts(world.config) if "filler" in methods else None
    rng = random.Random(seed)
    sets = {}
    for row, i in enumerate(chosen):
        qid = world.query_examples[i].id
        for method in methods:
            if method in INFLUENCE_METHODS:
                removed = top_proponents(scores[method][row].tolist(), doc_ids, k)
            elif method == "bm25":
                removed = top_proponents(
                    bm25.score(prompts[i] + completions[i]).tolist(), bm25.doc_ids, k
                )
            elif method == "random":
                removed = tuple(rng.sample(doc_ids, k))
            else:
                pool = filler_candidates(facts, i)
                if len(pool) < k:
                    raise CounterfactualError(
                        f"{qid}: only {len(pool)} filler documents avoid its entity and answer"
                    )
                removed = tuple(rng.sample(pool, k))
            sets[qid, method] = removed
    return sets


def retrain(world: World, removed: Sequence[str]) -> torch.nn.Module:
    """Both training stages redone on the corpus without `removed`: same seeds and tokenizer."""
    drop = set(removed)
    keep = [i for i, d in enumerate(world.corpus.column("id").to_pylist()) if d not in drop]
    pt, _ = pretrain(world.config, world.tokenizer, world.corpus.take(keep), progress=False)
    ft, _ = finetune(pt, world.tokenizer, world.pairs, world.config, progress=False)
    return ft


def answers(model: torch.nn.Module, world: World, chosen: Sequence[int]) -> list[bool]:
    """Whether model still answers each chosen query exactly."""
    prompts = world.queries.column("prompt").to_pylist()
    completions = world.queries.column("completion").to_pylist()
    return completion_matches(
        model, world.tokenizer, [prompts[i] for i in chosen], [completions[i] for i in chosen]
    )


def reproduce(world: World, picked: Sequence[Example]) -> tuple[list[float], bool]:
    """Query losses after retraining on the full corpus, and whether θ_ft came back bitwise."""
    reference = retrain(world, ())
    same = all(
        torch.equal(a, b)
        for a, b in zip(
            reference.state_dict().values(), world.ft.state_dict().values(), strict=True
        )
    )
    return query_losses(reference, picked, world.pad), same


def run(
    preset: str,
    num_queries: int,
    methods: Sequence[str],
    k: int,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Report:
    """Select queries, find each method's removals, retrain per distinct removal, measure."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CounterfactualError(
            f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}"
        )
    if num_queries < 1 or k < 1:
        raise CounterfactualError("need at least one query and k >= 1")
    start = time.perf_counter()
    world = open_world(preset)
    chosen = select_queries(world, num_queries, seed)
    picked = [world.query_examples[i] for i in chosen]
    qids = [q.id for q in picked]
    original = query_losses(world.ft, picked, world.pad)
    tick = time.perf_counter()
    reproduced, bitwise = reproduce(world, picked)
    report = Report(
        preset,
        k,
        seed,
        world.alpha,
        qids,
        list(methods),
        dict(zip(qids, original, strict=True)),
        dict(zip(qids, reproduced, strict=True)),
        bitwise,
        retrains=1,
        retrain_seconds=time.perf_counter() - tick,
    )
    log(
        f"full-corpus retrain: weights bitwise equal to the cached model: {bitwise}; "
        f"max |Δ query loss| {report.reproduction_max_abs_diff:.3g} "
        f"({report.retrain_seconds:.0f}s)"
    )
    sets = removal_sets(world, chosen, methods, k, seed)
    done: dict[frozenset, tuple[list[float], list[bool]]] = {}
    for row, qid in enumerate(qids):
        for method in methods:
            removed = sets[qid, method]
            key = frozenset(removed)
            if key not in done:
                tick = time.perf_counter()
                model = retrain(world, removed)
                done[key] = (query_losses(model, picked, world.pad), answers(model, world, chosen))
                report.retrains += 1
                report.retrain_seconds += time.perf_counter() - tick
            losses, ok = done[key]
            deltas = [a - b for a, b in zip(losses, reproduced, strict=True)]
            others = [d for j, d in enumerate(deltas) if j != row]
            relevant = set(world.relevant[qid])
            trial = Trial(
                qid,
                method,
                removed,
                sum(d in relevant for d in removed),
                deltas[row],
                ok[row],
                statistics.fmean(others) if others else 0.0,
                tuple(deltas),
            )
            report.trials.append(trial)
            log(
                f"{qid} {method:>12}: Δloss {trial.delta_loss:+.4f}, relevant removed "
                f"{trial.relevant_removed}/{len(relevant)}, answers {trial.still_answers} "
                f"[{report.retrains} retrains, {time.perf_counter() - start:.0f}s]"
            )
    report.seconds = time.perf_counter() - start
    return report


def wins(report: Report, among: Sequence[str] | None = None) -> dict[str, int]:
    """Per method, the queries where its Δloss is the largest (every tied method counts)."""
    among = list(among if among is not None else report.methods)
    out = dict.fromkeys(among, 0)
    for qid in report.query_ids:
        rows = [t for t in report.trials if t.query_id == qid and t.method in among]
        best = max(t.delta_loss for t in rows)
        for t in rows:
            out[t.method] += t.delta_loss == best
    return out


def beats(report: Report, method: str, control: str) -> int:
    """Queries where method's removal raised the loss more than control's removal did."""
    by = {(t.query_id, t.method): t.delta_loss for t in report.trials}
    return sum(by[q, method] > by[q, control] for q in report.query_ids)


def summary_rows(report: Report) -> list[dict]:
    """Per method: Δloss mean/std, wins, relevant hits, answers lost, off-target Δloss."""
    won = wins(report)
    # BM25 reads the answer itself (prompt + completion), and in the fact world the relevant
    # documents are exactly those holding the name and the answer: rank the rest without it.
    rest = [m for m in report.methods if m != "bm25"]
    won_rest = wins(report, rest) if len(rest) < len(report.methods) else won
    rows = []
    for method in report.methods:
        ts = [t for t in report.trials if t.method == method]
        d = [t.delta_loss for t in ts]
        rows.append(
            {
                "method": method,
                "mean": statistics.fmean(d),
                "std": statistics.stdev(d) if len(d) > 1 else 0.0,
                "median": statistics.median(d),
                "wins": won[method],
                "wins_no_bm25": won_rest.get(method),
                "beats_random": (
                    beats(report, method, "random")
                    if "random" in report.methods and method != "random"
                    else None
                ),
                "hit": sum(t.relevant_removed > 0 for t in ts),
                "relevant_removed": statistics.fmean(t.relevant_removed for t in ts),
                "answers_lost": sum(not t.still_answers for t in ts),
                "others": statistics.fmean(t.others_delta for t in ts),
            }
        )
    return rows


def markdown(report: Report) -> str:
    """The results table."""
    n = len(report.query_ids)

    def count(v: int | None) -> str:
        return "–" if v is None else f"{v}/{n}"

    lines = [
        f"| method (top-{report.k} removed) | Δloss mean ± std | median | wins | "
        f"wins without BM25 | beats random | top-{report.k} ∋ relevant | "
        "relevant removed (mean) | answer lost | Δloss on the other queries (mean) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary_rows(report):
        lines.append(
            f"| {r['method']} | {r['mean']:+.3f} ± {r['std']:.3f} | {r['median']:+.3f} | "
            f"{count(r['wins'])} | {count(r['wins_no_bm25'])} | {count(r['beats_random'])} | "
            f"{count(r['hit'])} | {r['relevant_removed']:.2f} | {count(r['answers_lost'])} | "
            f"{r['others']:+.4f} |"
        )
    return "\n".join(lines)


def noise_floor(report: Report) -> dict[str, float]:
    """Per query, the std of its Δloss over the distinct control (random/filler) retrains.

    A control removal targets nothing, so how much it moves a query's loss is the
    reshuffling noise a targeted removal has to beat; a query's own control counts too.
    """
    seen, runs = set(), []
    for t in report.trials:
        # Reports written before all_deltas was recorded carry none.
        measured = len(t.all_deltas) == len(report.query_ids)
        if t.method in CONTROL_METHODS and measured and frozenset(t.removed) not in seen:
            seen.add(frozenset(t.removed))
            runs.append(t.all_deltas)
    if len(runs) < 2:
        return {}
    return {q: statistics.stdev([r[j] for r in runs]) for j, q in enumerate(report.query_ids)}


KINDS = ("relevant", "same entity", "same answer", "same attribute", "other fact", "filler")


def removed_kind(doc: Document, fact: Fact, relevant: Sequence[str]) -> str:
    """How a removed document relates to the query's fact (first matching kind of KINDS)."""
    if doc.id in relevant:
        return "relevant"
    if doc.fact is None:
        return "filler"
    if doc.fact.entity == fact.entity:
        return "same entity"
    if doc.fact.value == fact.value:
        return "same answer"
    return "same attribute" if doc.fact.attribute == fact.attribute else "other fact"


def breakdown_markdown(report: Report) -> str:
    """Per method, what kinds of documents it removed (counts over all its queries)."""
    facts = generate_facts(WorldConfig.preset(report.preset))
    docs = {d.id: d for d in facts.documents}
    queries = {q.id: q for q in facts.queries}
    lines = ["| method | " + " | ".join(KINDS) + " |", "|---|" + "---:|" * len(KINDS)]
    for method in report.methods:
        counts = dict.fromkeys(KINDS, 0)
        for t in report.trials:
            if t.method == method:
                q = queries[t.query_id]
                for d in t.removed:
                    counts[removed_kind(docs[d], q.qa.fact, q.relevant_ids)] += 1
        lines.append(f"| {method} | " + " | ".join(str(counts[k]) for k in KINDS) + " |")
    return "\n".join(lines)


def control_deltas(noise: Report, query_ids: Sequence[str]) -> dict[str, list[float]]:
    """Per query, its Δloss under every distinct control retrain of another report."""
    if list(noise.query_ids) != list(query_ids):
        raise CounterfactualError(
            "the noise report measured other queries; run it with the same preset and --seed"
        )
    seen, runs = set(), []
    for t in noise.trials:
        if t.method in CONTROL_METHODS and len(t.all_deltas) == len(query_ids):
            if frozenset(t.removed) not in seen:
                seen.add(frozenset(t.removed))
                runs.append(t.all_deltas)
    if not runs:
        raise CounterfactualError("the noise report holds no control retrains with all Δloss")
    return {q: [r[j] for r in runs] for j, q in enumerate(query_ids)}


def noise_markdown(report: Report, noise: Report) -> str:
    """Per method, how its Δloss compares with the same query's control-retrain Δloss."""
    controls = control_deltas(noise, report.query_ids)
    n, runs = len(report.query_ids), len(next(iter(controls.values())))
    lines = [
        f"| method | Δloss above all {runs} control retrains | median excess over the "
        "control median |",
        "|---|---:|---:|",
    ]
    for method in report.methods:
        ts = [t for t in report.trials if t.method == method]
        above = sum(t.delta_loss > max(controls[t.query_id]) for t in ts)
        excess = [t.delta_loss - statistics.median(controls[t.query_id]) for t in ts]
        lines.append(f"| {method} | {above}/{n} | {statistics.median(excess):+.3f} |")
    return "\n".join(lines)


def per_query_markdown(report: Report, noise: Report | None = None) -> str:
    """Δloss (relevant documents removed) of every (query, method); noise std when measured."""
    if noise is not None:
        controls = control_deltas(noise, report.query_ids)
        floor = {q: statistics.stdev(v) for q, v in controls.items() if len(v) > 1}
    else:
        floor = noise_floor(report)
    extra = ["noise std"] if floor else []
    head = "| query | loss before | " + " | ".join([*report.methods, *extra]) + " |"
    lines = [head, "|---|---:|" + "---:|" * (len(report.methods) + len(extra))]
    for qid in report.query_ids:
        by = {t.method: t for t in report.trials if t.query_id == qid}
        cells = [f"{by[m].delta_loss:+.3f} ({by[m].relevant_removed})" for m in report.methods]
        cells += [f"{floor[qid]:.3f}"] if floor else []
        lines.append(f"| {qid} | {report.reproduced_loss[qid]:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="small world, 2 queries, multi-stage and random only"
    )
    p.add_argument("--preset", default="default")
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--k", type=int, default=5)
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from {', '.join(METHODS)}",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the full report as JSON here")
    p.add_argument("--report", help="print the tables of a saved --json report; no training")
    p.add_argument(
        "--noise", help="a saved report of control retrains (--methods filler) to compare with"
    )
    return p.parse_args(argv)


def print_report(report: Report, noise: Report | None = None) -> None:
    """The summary and per-query tables, the noise floor and the retraining cost."""
    print(markdown(report))
    print()
    print(per_query_markdown(report, noise))
    print()
    print(breakdown_markdown(report))
    if noise is not None:
        print()
        print(noise_markdown(report, noise))
    floor = noise_floor(report)
    if floor:
        print(f"\nmean noise std over queries {statistics.fmean(floor.values()):.3f}")
    if report.retrains:
        print(
            f"\n{report.retrains} retrains in {report.retrain_seconds:.0f}s "
            f"({report.retrain_seconds / report.retrains:.1f}s each); "
            f"total {report.seconds:.0f}s"
        )


def load_report(path: str) -> Report:
    """A report saved with --json."""
    try:
        return Report.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CounterfactualError(f"cannot read a counterfactual report from {path}: {e}") from None


def main(argv: Sequence[str] | None = None) -> Report:
    """Run the benchmark (or re-read a saved report) and print the tables."""
    args = parse_args(argv)
    noise = load_report(args.noise) if args.noise else None  # read first: fail before training
    if args.report:
        report = load_report(args.report)
        print_report(report, noise)
        return report
    torch.set_num_threads(1)  # as msif.world trains: bitwise reproduction needs the same threads
    if args.quick:
        preset, n, methods = "small", 2, list(QUICK_METHODS)
    else:
        preset, n = args.preset, args.queries
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"counterfactual retraining, world {preset}, {n} queries, k={args.k}, {stamp}; {machine()}",
        flush=True,
    )
    report = run(preset, n, methods, args.k, args.seed, log=lambda s: print(s, flush=True))
    print_report(report, noise)
    if not all(math.isfinite(t.delta_loss) for t in report.trials):
        raise CounterfactualError("a retrained model gave a non-finite query loss")
    if args.json:
        # Written beside and renamed, so an interrupted run leaves no half-written report.
        tmp = Path(f"{args.json}.tmp")
        tmp.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        tmp.replace(args.json)
    return report


if __name__ == "__main__":
    try:
        main()
    except MsifError as e:
        raise SystemExit(f"error: {e}") from None
