"""The embedded fact world: generated text, its guarantees, training, caching and atomicity."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from msif.world import (
    ATTRIBUTES,
    WorldConfig,
    WorldConfigError,
    build_world,
    completion_matches,
    default_cache_dir,
    evaluate_accuracy,
    finetune,
    generate_facts,
    pretrain,
    train_tokenizer,
    world_dir,
    write_tables,
)
from msif.world import build as build_module
from msif.world.facts import Fact, question
from msif.world.train import proximal_loss

pytestmark = pytest.mark.e2e

SMALL = WorldConfig.preset("small")
WORD = re.compile(r"\w+|[^\w\s]+")


def words(text: str) -> list[str]:
    return WORD.findall(text)


def states(text: str, fact: Fact) -> bool:
    """Whether a document contains the entity's full name and its value as whole words."""
    w = words(text)
    name = fact.entity.split()
    has_name = any(w[i : i + len(name)] == name for i in range(len(w)))
    return has_name and fact.value in w


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def default_world():
    return generate_facts(WorldConfig.preset("default"))


@pytest.fixture(scope="module")
def small_paths(tmp_path_factory):
    return build_world(SMALL, tmp_path_factory.mktemp("cache"), progress=False)


def test_generation_is_deterministic_and_seeded(tmp_path):
    a, b = generate_facts(SMALL), generate_facts(SMALL)
    assert a == b
    pa, pb = write_tables(a, tmp_path / "a"), write_tables(b, tmp_path / "b")
    for name in ("corpus", "finetune", "queries"):
        assert pa[name].read_bytes() == pb[name].read_bytes()
    other = generate_facts(SMALL.with_seed(1))
    assert [d.text for d in other.documents] != [d.text for d in a.documents]
    assert {e.name for e in other.entities} != {e.name for e in a.entities}


def test_default_world_has_the_documented_size(default_world):
    counts = {
        "documents": len(default_world.documents),
        "filler": sum(d.fact is None for d in default_world.documents),
        "finetune": len(default_world.finetune),
        "queries": len(default_world.queries),
    }
    assert counts == {"documents": 336, "filler": 48, "finetune": 48, "queries": 48}
    assert [d.id for d in default_world.documents] == [f"doc-{i:06d}" for i in range(336)]


def test_question_format_is_exact():
    qa = question(Fact("Dravik Oltan", "birthplace", "Velora"))
    assert (qa.prompt, qa.completion) == ("Q: Where was Dravik Oltan born? A:", " Velora.")


def test_relevant_documents_are_exactly_those_stating_the_fact(default_world):
    for q in default_world.queries:
        fact = q.qa.fact
        stating = {d.id for d in default_world.documents if states(d.text, fact)}
        assert set(q.relevant_ids) == stating, q.id
        assert len(q.relevant_ids) == default_world.config.docs_per_fact
        phrasings = {
            t.format(name=fact.entity, value=fact.value)
            for t in ATTRIBUTES[fact.attribute].statements
        }
        texts = {d.id: d.text for d in default_world.documents}
        assert {texts[i] for i in q.relevant_ids} <= phrasings
        assert len({texts[i] for i in q.relevant_ids}) == len(q.relevant_ids)


def test_finetune_facts_are_disjoint_from_query_facts(default_world):
    ft = {qa.fact for qa in default_world.finetune}
    queried = {q.qa.fact for q in default_world.queries}
    assert not ft & queried
    assert not {f.entity for f in ft} & {f.entity for f in queried}
    prompts = {qa.prompt for qa in default_world.finetune}
    assert not prompts & {q.qa.prompt for q in default_world.queries}
    # Every fact of the world is either taught as QA or asked about, never both.
    assert len(ft) + len(queried) == len(default_world.entities) * len(
        default_world.config.attributes
    )


def test_entity_names_and_values_also_appear_in_non_relevant_documents(default_world):
    for q in default_world.queries:
        fact, relevant = q.qa.fact, set(q.relevant_ids)
        others = [d.text for d in default_world.documents if d.id not in relevant]
        assert any(fact.entity in t for t in others), q.id
    values = {q.qa.fact.value for q in default_world.queries}
    filler = [d.text for d in default_world.documents if d.fact is None]
    assert any(v in words(t) for v in values for t in filler)


def test_bad_configs_are_refused_with_a_clear_message():
    with pytest.raises(WorldConfigError, match="unknown fact-world preset 'huge'"):
        WorldConfig.preset("huge")
    with pytest.raises(WorldConfigError, match="unknown attribute 'shoe'"):
        generate_facts(dataclasses.replace(SMALL, attributes=("shoe",)))
    with pytest.raises(WorldConfigError, match="docs_per_fact is 7"):
        generate_facts(dataclasses.replace(SMALL, docs_per_fact=7))
    with pytest.raises(WorldConfigError, match="leave no entity"):
        generate_facts(dataclasses.replace(SMALL, num_entities=1))


def test_documents_longer_than_max_length_are_refused(tmp_path):
    config = dataclasses.replace(SMALL, max_length=8)
    world = generate_facts(config)
    corpus = pq.read_table(write_tables(world, tmp_path)["corpus"])
    tok = train_tokenizer(build_module.world_texts(world), config.max_length)
    with pytest.raises(WorldConfigError, match=r"document doc-\d{6} has \d+ tokens, more than"):
        pretrain(config, tok, corpus, progress=False)


def test_cache_dir_names_follow_preset_and_fingerprint(tmp_path, monkeypatch):
    assert world_dir(SMALL, tmp_path).name == f"small-{SMALL.fingerprint()}"
    assert world_dir(SMALL.with_seed(3), tmp_path).name.startswith("small-")
    assert SMALL.with_seed(3).fingerprint() != SMALL.fingerprint()
    custom = dataclasses.replace(SMALL, pt_epochs=1)
    assert world_dir(custom, tmp_path).name.startswith("custom-")
    assert WorldConfig.from_dict(json.loads(json.dumps(SMALL.to_dict()))) == SMALL
    monkeypatch.setenv("MSIF_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"


def test_tokenizer_keeps_prompt_completion_boundary():
    world = generate_facts(SMALL)
    tok = train_tokenizer([d.text for d in world.documents] + ["Q: Where born? A: ."], 32)
    qa = world.queries[0].qa
    prompt = tok(qa.prompt)["input_ids"]
    completion = tok(qa.completion, add_special_tokens=False)["input_ids"]
    assert prompt[0] == tok.bos_token_id and len(completion) == 2
    assert tok(qa.prompt + qa.completion)["input_ids"] == prompt + completion
    assert tok.unk_token_id not in tok(" ".join(d.text for d in world.documents))["input_ids"]


def test_training_is_deterministic_and_finetuning_leaves_pretrained_model_alone(tmp_path):
    config = dataclasses.replace(SMALL, pt_epochs=2, ft_epochs=2)
    world = generate_facts(config)
    tables = {k: pq.read_table(p) for k, p in write_tables(world, tmp_path).items()}
    tok = train_tokenizer(build_module.world_texts(world), config.max_length)
    m1, _ = pretrain(config, tok, tables["corpus"], progress=False)
    m2, _ = pretrain(config, tok, tables["corpus"], progress=False)
    before = {k: v.clone() for k, v in m1.state_dict().items()}
    f1, _ = finetune(m1, tok, tables["finetune"], config, progress=False)
    f2, _ = finetune(m2, tok, tables["finetune"], config, progress=False)
    for name, value in m2.state_dict().items():
        assert torch.equal(before[name], value), name
        assert torch.equal(m1.state_dict()[name], value), name
        assert torch.equal(f1.state_dict()[name], f2.state_dict()[name]), name
    moved = [n for n, v in f1.state_dict().items() if not torch.equal(v, before[n])]
    assert moved


def test_proximal_term_is_exactly_half_alpha_squared_distance(small_paths):
    model = AutoModelForCausalLM.from_pretrained(str(small_paths.ft_model))
    tok = AutoTokenizer.from_pretrained(str(small_paths.ft_model))
    from msif.data.examples import collate, tokenize_prompt_completion

    batch = collate(
        tokenize_prompt_completion(tok, ["a"], ["Q: x A:"], [" ."], 32), tok.pad_token_id
    )
    reference = [p.detach() - 0.5 for p in model.parameters()]
    count = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        plain = proximal_loss(0.0, reference)(model, batch)
        anchored = proximal_loss(0.2, reference)(model, batch)
    assert anchored.item() - plain.item() == pytest.approx(0.1 * 0.25 * count, rel=1e-5)


def test_small_world_builds_and_loads_like_a_user_model(small_paths):
    root = small_paths.root
    assert root.name == f"small-{SMALL.fingerprint()}"
    assert [p.name for p in root.parent.iterdir()] == [root.name]
    record = json.loads(small_paths.world_json.read_text())
    assert record["config"] == SMALL.to_dict() and record["alpha"] == SMALL.alpha
    assert set(record["accuracy"]) == {"queries", "finetune", "pt_statements"}
    assert record["accuracy"] == small_paths.accuracy
    tables = {
        name: pq.read_table(getattr(small_paths, name))
        for name in ("corpus", "finetune", "queries")
    }
    assert tables["corpus"].column_names == ["id", "text"]
    assert tables["finetune"].column_names == ["prompt", "completion"]
    assert tables["queries"].column_names == ["id", "prompt", "completion", "relevant_ids"]
    world = generate_facts(SMALL)
    assert tables["corpus"].column("text").to_pylist() == [d.text for d in world.documents]

    tok = AutoTokenizer.from_pretrained(str(small_paths.ft_model))
    ft = AutoModelForCausalLM.from_pretrained(str(small_paths.ft_model))
    pt = AutoModelForCausalLM.from_pretrained(str(small_paths.pt_model))
    assert ft.config.model_type == "gpt_neox" and ft.config.hidden_size == SMALL.hidden_size
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>"
    # The recorded accuracy is what the saved files give, and the model learned something.
    assert evaluate_accuracy(ft, tok, tables["queries"]) == record["accuracy"]["queries"]
    assert record["accuracy"]["finetune"] >= 0.75 and record["accuracy"]["queries"] > 0.25
    assert evaluate_accuracy(pt, tok, tables["queries"]) < record["accuracy"]["queries"]


def test_exact_match_agrees_with_greedy_generation(small_paths):
    tok = AutoTokenizer.from_pretrained(str(small_paths.ft_model))
    model = AutoModelForCausalLM.from_pretrained(str(small_paths.ft_model))
    table = pq.read_table(small_paths.queries)
    prompts, completions = (table.column(c).to_pylist() for c in ("prompt", "completion"))
    matches = completion_matches(model, tok, prompts, completions)
    for prompt, completion, match in zip(prompts, completions, matches, strict=True):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        want = tok(completion, add_special_tokens=False)["input_ids"]
        out = model.generate(
            ids, max_new_tokens=len(want), do_sample=False, pad_token_id=tok.pad_token_id
        )
        assert (out[0, ids.shape[1] :].tolist() == want) == match
    assert any(matches)


def test_cache_hit_is_fast_and_returns_the_same_world(small_paths):
    start = time.perf_counter()
    again = build_world(SMALL, small_paths.root.parent, progress=False)
    assert time.perf_counter() - start < 1.0
    assert again == small_paths


def test_world_json_must_name_the_config(small_paths):
    assert build_module.read_complete(small_paths.root, SMALL) is not None
    assert build_module.read_complete(small_paths.root, SMALL.with_seed(9)) is None


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    config = dataclasses.replace(SMALL, pt_epochs=1, ft_epochs=1)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # A staging dir of a build killed two days ago, and one of a build that may still run.
    stale = tmp_path / f".{world_dir(config, tmp_path).name}.tmp-old"
    fresh = tmp_path / f".{world_dir(config, tmp_path).name}.tmp-new"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    monkeypatch.setattr(build_module, "finetune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_world(config, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == [fresh]
    fresh.rmdir()
    monkeypatch.undo()
    paths = build_world(config, tmp_path, progress=False)
    (paths.ft_model / "model.safetensors").unlink()
    assert build_module.read_complete(paths.root, config) is None
    rebuilt = build_world(config, tmp_path, progress=False)
    assert (rebuilt.ft_model / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [paths.root.name]
