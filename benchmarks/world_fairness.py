"""Are a fact world's labels true? Held-out accuracy with the held-out evidence cut four ways.

python -m benchmarks.world_fairness [--preset distractor] [--seed N] [--json out.json]

A query's `relevant_ids` claim that the fine-tuned model's answer comes from its fact's
statements. This checks the claim by retraining: for the held-out facts (those the queries ask
about) the pre-training corpus is cut four ways, both training stages are redone with the
world's own recipe, seeds and tokenizer (msif.world.pretrain / finetune, through
benchmarks.counterfactual.retrain), and the fine-tuned model's exact-match accuracy on the
held-out queries is measured:

  (a) full corpus (the cached world's own fine-tuned model, which a retrain reproduces bitwise)
  (b) held-out statements removed, held-out distractors kept
  (c) held-out distractors removed, held-out statements kept
  (d) both removed

The labels are true when (b) is near (d), about chance (one value of the attribute's pool):
the distractors alone do not teach the answer; and (c) near (a): the statements alone do.
Documents of the fine-tuning entities are kept in every condition, so fine-tuning sees the
same world each time. Identical corpora (in a world without distractors, (c) is (a) and (d)
is (b)) are trained once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.common import machine
from benchmarks.counterfactual import World, answers, open_world, query_losses, retrain
from msif.errors import MsifError
from msif.world import FactWorld, evaluate_accuracy, generate_facts


@dataclass(frozen=True)
class Condition:
    """One cut of the corpus: which kinds of held-out documents it removes."""

    name: str
    drop_statements: bool
    drop_distractors: bool


CONDITIONS = (
    Condition("(a) full corpus", False, False),
    Condition("(b) held-out statements removed", True, False),
    Condition("(c) held-out distractors removed", False, True),
    Condition("(d) both removed", True, True),
)


@dataclass(frozen=True)
class Row:
    """What the model retrained under one condition knows."""

    condition: str
    documents: int
    removed: int
    heldout_correct: int
    heldout_total: int
    heldout_nll: float  # mean summed completion NLL of the held-out answers
    finetune_accuracy: float

    @property
    def accuracy(self) -> float:
        """Share of held-out queries answered exactly."""
        return self.heldout_correct / self.heldout_total


def removed_ids(facts: FactWorld, condition: Condition) -> tuple[str, ...]:
    """Ids of the held-out statements and/or distractors the condition drops."""
    held = {q.qa.fact for q in facts.queries}
    return tuple(
        d.id
        for d in facts.documents
        if (condition.drop_statements and d.fact in held)
        or (condition.drop_distractors and d.distractor in held)
    )


def finetune_accuracy(model: torch.nn.Module, world: World) -> float:
    """Share of the fine-tuning pairs the model answers exactly (did fine-tuning work at all)."""
    return evaluate_accuracy(model, world.tokenizer, world.pairs)


def run(
    preset: str, seed: int | None = None, log: Callable[[str], None] = print
) -> tuple[World, list[Row]]:
    """Every condition's row, retraining once per distinct corpus."""
    world = open_world(preset, seed)
    facts = generate_facts(world.config)
    corpus_ids = world.corpus.column("id").to_pylist()
    texts = world.corpus.column("text").to_pylist()
    if [corpus_ids, texts] != [[d.id for d in facts.documents], [d.text for d in facts.documents]]:
        raise MsifError(
            "the cached world's corpus is not the generated one; rebuild it (a stale cache?)"
        )
    everyone = list(range(world.queries.num_rows))
    done: dict[frozenset, Row] = {}
    rows = []
    for condition in CONDITIONS:
        removed = removed_ids(facts, condition)
        key = frozenset(removed)
        if key not in done:
            tick = time.perf_counter()
            model = retrain(world, removed) if removed else world.ft
            ok = answers(model, world, everyone)
            done[key] = Row(
                condition.name,
                len(corpus_ids) - len(removed),
                len(removed),
                sum(ok),
                len(ok),
                statistics.fmean(query_losses(model, world.query_examples, world.pad)),
                finetune_accuracy(model, world),
            )
            log(f"{condition.name}: {done[key].accuracy:.1%} ({time.perf_counter() - tick:.0f}s)")
        rows.append(Row(**{**asdict(done[key]), "condition": condition.name}))
    return world, rows


def markdown(rows: Sequence[Row], chance: float) -> str:
    """The fairness table, then the two gaps that decide it."""
    lines = [
        "| condition | documents | held-out accuracy | held-out answer NLL (mean) | "
        "fine-tuning accuracy |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.condition} | {r.documents} | {r.accuracy:.1%} "
            f"({r.heldout_correct}/{r.heldout_total}) | {r.heldout_nll:.3f} | "
            f"{r.finetune_accuracy:.1%} |"
        )
    a, b, c, d = (r.accuracy for r in rows)
    lines.append(
        f"\nchance {chance:.1%}; (b) − (d) = {b - d:+.1%} (the distractors' own teaching), "
        f"(a) − (c) = {a - c:+.1%} (what the statements need the distractors for)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the four conditions and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="distractor")
    p.add_argument("--seed", type=int, help="another world of the preset (its generation seed)")
    p.add_argument("--json", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as msif.world trains: a retrain must match the cached model
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"world fairness, preset {args.preset}, seed {args.seed}, {stamp}; {machine()}")
    start = time.perf_counter()
    world, rows = run(args.preset, args.seed, log=lambda s: print(s, flush=True))
    print(markdown(rows, 1 / world.config.values_per_attribute))
    print(f"\ntotal {time.perf_counter() - start:.0f}s")
    if args.json:
        record = {"preset": args.preset, "seed": args.seed, "config": world.config.to_dict()}
        record["rows"] = [{**asdict(r), "accuracy": r.accuracy} for r in rows]
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    try:
        main()
    except MsifError as e:
        raise SystemExit(f"error: {e}") from None
