"""The distractor world: lexical decoys for BM25; the existing presets left exactly as they were."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import statistics

import pytest

from msif.evaluation.bm25 import BM25Index, tokenize
from msif.evaluation.metrics import evaluate_rankings
from msif.world import ATTRIBUTES, FactWorld, WorldConfig, WorldConfigError, generate_facts
from msif.world.build import world_texts
from msif.world.tokenizer import train_tokenizer

DISTRACTOR = WorldConfig.preset("distractor")
PRESET_DEFAULT = WorldConfig.preset("default")
WORD = re.compile(r"\w+|[^\w\s]+")

# Measured on the code before distractors existed (commit 3d299ca): cached worlds and every
# recorded benchmark number are keyed by these.
PINNED = {
    "default": ("60a4bd7b7e7f", "1371b96fff22984969b16db01b03792c2ade52f043314186930666e8193cfacb"),
    "small": ("2805d808591a", "34fc63cace6154bc5827621765d234aa4fa488dfbe668bf9792f0306a85564fc"),
}


def world_sha(world: FactWorld) -> str:
    """sha256 of every generated text: documents with ids, fine-tuning pairs, queries."""
    blob = json.dumps(
        {
            "documents": [[d.id, d.text] for d in world.documents],
            "finetune": [[qa.prompt, qa.completion] for qa in world.finetune],
            "queries": [
                [q.id, q.qa.prompt, q.qa.completion, list(q.relevant_ids)] for q in world.queries
            ],
        }
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def names_both(text: str, entity: str, value: str) -> bool:
    """Whether text has the entity's full name and the value as whole words."""
    w, name = WORD.findall(text), entity.split()
    return value in w and any(w[i : i + len(name)] == name for i in range(len(w)))


def bm25_ranks(world: FactWorld) -> dict[str, list[str]]:
    """Every query's full BM25 ranking over the corpus, from the texts alone."""
    index = BM25Index.build([d.id for d in world.documents], [d.text for d in world.documents])
    n = len(world.documents)
    return {
        q.id: [d for d, _ in index.top_k(f"{q.qa.prompt} {q.qa.completion}", n)]
        for q in world.queries
    }


@pytest.fixture(scope="module")
def world() -> FactWorld:
    return generate_facts(DISTRACTOR)


@pytest.mark.parametrize("preset", sorted(PINNED))
def test_existing_presets_keep_their_fingerprint_and_text(preset):
    config = WorldConfig.preset(preset)
    fingerprint, sha = PINNED[preset]
    assert config.fingerprint() == fingerprint
    assert "distractors_per_fact" not in config.to_dict()
    assert world_sha(generate_facts(config)) == sha
    assert not any(d.distractor for d in generate_facts(config).documents)


def test_distractor_preset_is_the_default_world_plus_distractors(world):
    default = generate_facts(WorldConfig.preset("default"))
    assert world.entities == default.entities and world.finetune == default.finetune
    assert [q.qa for q in world.queries] == [q.qa for q in default.queries]
    kept = [(d.text, d.fact) for d in world.documents if d.distractor is None]
    assert kept == [(d.text, d.fact) for d in default.documents]
    counts = DISTRACTOR.num_entities * len(DISTRACTOR.attributes) * DISTRACTOR.distractors_per_fact
    assert len(world.documents) == len(default.documents) + counts
    assert DISTRACTOR.label() == "distractor" and DISTRACTOR.fingerprint() != PINNED["default"][0]


def test_distractors_name_the_entity_and_queried_value_and_are_not_relevant(world):
    by_id = {d.id: d for d in world.documents}
    statements = {
        t.format(name=e.name, value=e.value(a))
        for e in world.entities
        for a in DISTRACTOR.attributes
        for t in ATTRIBUTES[a].statements
    }
    for q in world.queries:
        fact = q.qa.fact
        decoys = [d for d in world.documents if d.distractor == fact]
        assert len(decoys) == DISTRACTOR.distractors_per_fact > DISTRACTOR.docs_per_fact
        assert len({d.text for d in decoys}) == len(decoys)
        for d in decoys:
            assert d.fact is None and d.id not in q.relevant_ids
            assert names_both(d.text, fact.entity, fact.value), d.text
            assert d.text not in statements, d.text
        # Relevant are exactly the true statements, each naming the entity and the answer.
        assert {d.id for d in world.documents if d.fact == fact} == set(q.relevant_ids)
        assert all(by_id[i].text in statements for i in q.relevant_ids)
        assert len(q.relevant_ids) == DISTRACTOR.docs_per_fact


def test_every_distractor_names_its_own_value_before_the_name(world):
    # Fine-tuning entities' distractors are built like the queried ones (the same relation to
    # the answer across the world), and in all of them the value comes first: a causal model
    # reading one learns to predict the name from the value, never the value from the name,
    # which is the direction every question asks (benchmarks/world_fairness.py measures it).
    decoys = [d for d in world.documents if d.distractor is not None]
    assert len(decoys) == len(world.documents) - len(generate_facts(PRESET_DEFAULT).documents)
    for d in decoys:
        fact = d.distractor
        assert names_both(d.text, fact.entity, fact.value), d.text
        words = WORD.findall(d.text)
        assert words.index(fact.value) < words.index(fact.entity.split()[0]), d.text
    for attr in ATTRIBUTES.values():
        for t in attr.distractors:
            assert t.index("{value}") < t.index("{name}"), t
        # Every statement is read the other way round, name first.
        for t in attr.statements:
            assert t.index("{name}") < t.index("{value}"), t


def test_distractors_are_as_long_as_the_statements(world):
    for attr in DISTRACTOR.attributes:
        true = [
            len(tokenize(d.text)) for d in world.documents if d.fact and d.fact.attribute == attr
        ]
        fake = [
            len(tokenize(d.text))
            for d in world.documents
            if d.distractor and d.distractor.attribute == attr
        ]
        # BM25's terms after stopwords; measured gaps are 0.1 to 0.6 terms per document.
        assert abs(statistics.mean(fake) - statistics.mean(true)) < 1.0, attr


def test_bm25_is_an_oracle_on_the_default_world_and_not_on_the_distractor_world(world):
    default = generate_facts(WorldConfig.preset("default"))
    relevant = {q.id: q.relevant_ids for q in default.queries}
    assert evaluate_rankings(bm25_ranks(default), relevant)["mrr"] == 1.0

    ranks = bm25_ranks(world)
    metrics = evaluate_rankings(ranks, {q.id: q.relevant_ids for q in world.queries})
    # Measured: MRR 0.696, a distractor on top for 28 of 48 queries (seed 0).
    assert metrics["mrr"] < 0.8
    by_id = {d.id: d for d in world.documents}
    decoy_first = sum(by_id[ranks[q.id][0]].distractor == q.qa.fact for q in world.queries)
    assert decoy_first >= 0.4 * len(world.queries)


def test_documents_fit_the_model_length(world):
    tok = train_tokenizer(world_texts(world), DISTRACTOR.max_length)
    longest = max(len(tok(d.text)["input_ids"]) for d in world.documents)
    assert longest <= DISTRACTOR.max_length
    assert tok.unk_token_id not in tok(" ".join(d.text for d in world.documents))["input_ids"]


def test_distractor_setting_round_trips_and_bad_values_are_refused():
    assert WorldConfig.from_dict(json.loads(json.dumps(DISTRACTOR.to_dict()))) == DISTRACTOR
    assert DISTRACTOR.to_dict()["distractors_per_fact"] == 6
    assert WorldConfig.from_dict(WorldConfig().to_dict()) == WorldConfig()
    for bad in (9, -1, 2.5, True):
        config = dataclasses.replace(DISTRACTOR, distractors_per_fact=bad)
        with pytest.raises(WorldConfigError, match=rf"distractors_per_fact is {bad!r}; each"):
            generate_facts(config)
    with pytest.raises(WorldConfigError, match="distractors_per_fact is '2'"):
        WorldConfig.from_dict({**DISTRACTOR.to_dict(), "distractors_per_fact": "2"}).validate()


def test_distractor_version_keys_only_worlds_with_distractors(monkeypatch):
    from msif.world import config as config_module

    before = {p: WorldConfig.preset(p).fingerprint() for p in ("default", "small", "distractor")}
    monkeypatch.setattr(config_module, "DISTRACTOR_VERSION", "test")
    after = {p: WorldConfig.preset(p).fingerprint() for p in before}
    assert after["default"] == before["default"] and after["small"] == before["small"]
    assert after["distractor"] != before["distractor"]
