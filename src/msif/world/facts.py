"""The fact world's text: invented entities, their attributes, documents, QA pairs and queries.

Everything here is pure Python driven by one `random.Random(seed)`, so the same configuration
gives the same world on every machine, with no torch involved. Distractor documents come from
a second stream of their own, so switching them on leaves every other document, the
fine-tuning set and the queries exactly as they were (only document ids move).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from msif.world.config import WorldConfig, WorldConfigError


@dataclass(frozen=True)
class Attribute:
    """One kind of fact: how it is asked, how it is stated, how its values look."""

    name: str
    question: str
    statements: tuple[str, ...]
    fillers: tuple[str, ...]
    suffixes: tuple[str, ...]
    capitalised: bool = True
    distractors: tuple[str, ...] = ()


# Statements put the value after the name so that reading a document exercises the same
# name -> value direction the questions ask for; the phrasings differ so the model has to
# store the fact rather than one sentence. Fillers mention a value with no entity.
# Distractors (used only when distractors_per_fact > 0) name the entity and its own value in
# another relation (a relative's, a visit, an event) that neither states nor contradicts the
# fact, and borrow the statements' words and lengths, so word overlap cannot tell them apart.
# They name the value *before* the entity: a causal model reading one learns to predict the
# name from the value, not the value from the name, so they hold no evidence for the
# name -> value question. With the value after the name ("The cousin of {name} was born in
# {value}."), a model pre-trained without a fact's statements, on its distractors alone,
# still answered every held-out question; value first, it answers as many as with neither
# (benchmarks/world_fairness.py).
ATTRIBUTES: dict[str, Attribute] = {
    a.name: a
    for a in (
        Attribute(
            "birthplace",
            "Where was {name} born?",
            (
                "{name} was born in {value}.",
                "The birthplace of {name} is {value}.",
                "{name} is a native of {value}.",
                "Records show that {name} was born in the city of {value}.",
                "{name} came into the world in {value}.",
                "The city where {name} was born is {value}.",
            ),
            (
                "The market in {value} opens early on most days.",
                "A new bridge was built across the river in {value}.",
                "Travellers say the streets of {value} are quiet at night.",
            ),
            ("ora", "heim", "dale", "ford", "mere", "polis"),
            distractors=(
                "In {value} the cousin of {name} was born.",
                "{value} is the birthplace of the cousin of {name}.",
                "{value} was once visited by {name}.",
                "In {value} {name} was married.",
                "{value} is the city where {name} was married.",
                "In {value} the son of {name} was born.",
                "Records show that in the city of {value} the sister of {name} was born.",
                "A native of {value} is a friend of {name}.",
            ),
        ),
        Attribute(
            "employer",
            "Which company does {name} work for?",
            (
                "{name} works for {value}.",
                "{name} is employed by {value}.",
                "The employer of {name} is {value}.",
                "{name} has a job at {value}.",
                "Each morning {name} goes to work at {value}.",
                "The company that pays {name} is {value}.",
            ),
            (
                "{value} opened a new office last year.",
                "Shares of {value} rose sharply in the autumn.",
                "{value} is looking for new engineers.",
            ),
            ("tex", "corp", "ware", "dyne", "works", "labs"),
            distractors=(
                "{value} is the employer of the cousin of {name}.",
                "Shares of {value} were bought by {name}.",
                "{value} has {name} as a client.",
                "{value} received a letter from {name}.",
                "At {value} the son of {name} is employed.",
                "Near {value} each morning {name} goes to work.",
                "{value} is the company that {name} visited.",
                "At {value} the sister of {name} has a job.",
            ),
        ),
        Attribute(
            "university",
            "Which university did {name} attend?",
            (
                "{name} studied at {value}.",
                "{name} graduated from {value}.",
                "The university of {name} was {value}.",
                "{name} earned a degree at {value}.",
                "{name} is an alumnus of {value}.",
                "The school where {name} studied is {value}.",
            ),
            (
                "{value} has a large and old library.",
                "Students at {value} often study late.",
                "{value} hosted a famous debate in the spring.",
            ),
            ("ton", "ham", "wick", "bury", "stead", "field"),
            distractors=(
                "At {value} the cousin of {name} studied.",
                "At {value} {name} gave a talk.",
                "At {value} {name} taught for a year.",
                "{value} was visited by {name}.",
                "{value} is the university that {name} visited.",
                "At {value} {name} won a debate.",
                "From {value} the son of {name} graduated.",
                "{value} invited {name} to lecture.",
            ),
        ),
        Attribute(
            "instrument",
            "Which instrument does {name} play?",
            (
                "{name} plays the {value}.",
                "{name} is a skilled {value} player.",
                "The favourite instrument of {name} is the {value}.",
                "In the evenings {name} practises the {value}.",
                "{name} has played the {value} for years.",
                "The instrument that {name} plays is the {value}.",
            ),
            (
                "A {value} needs careful tuning before a concert.",
                "The sound of the {value} is soft and warm.",
                "Few shops still sell the {value}.",
            ),
            ("phone", "lin", "ola", "harp", "pipe", "drum"),
            capitalised=False,
            distractors=(
                "The {value} is played by the cousin of {name}.",
                "A {value} was bought by {name}.",
                "A {value} was once repaired by {name}.",
                "A skilled {value} player is the son of {name}.",
                "The {value} is the instrument that {name} sold.",
                "A {value} concert was heard by {name}.",
                "A {value} was painted by {name}.",
                "The {value} is the instrument that {name} heard.",
            ),
        ),
        Attribute(
            "pet",
            "Which animal does {name} keep as a pet?",
            (
                "{name} keeps a {value} as a pet.",
                "The pet of {name} is a {value}.",
                "{name} owns a small {value}.",
                "At home {name} looks after a {value}.",
                "{name} walks a pet {value} every day.",
                "The animal that lives with {name} is a {value}.",
            ),
            (
                "A {value} sleeps for most of the day.",
                "The {value} is a shy animal.",
                "Children like to feed the {value} at the farm.",
            ),
            ("mink", "lop", "ret", "ling", "bat", "hound"),
            capitalised=False,
            distractors=(
                "A {value} is kept as a pet by the cousin of {name}.",
                "A {value} was once drawn by {name}.",
                "A {value} is the pet of the neighbour of {name}.",
                "A small {value} chased {name}.",
                "At the zoo a {value} was seen by {name}.",
                "A pet {value} was drawn by {name}.",
                "A {value} is the animal that {name} photographed.",
                "A small {value} is owned by the son of {name}.",
            ),
        ),
        Attribute(
            "dish",
            "What is the favourite dish of {name}?",
            (
                "The favourite dish of {name} is {value}.",
                "{name} loves to eat {value}.",
                "{name} cooks {value} every week.",
                "Above all other food {name} likes {value}.",
                "{name} always orders {value} at dinner.",
                "The meal that {name} enjoys most is {value}.",
            ),
            (
                "{value} is cooked slowly over a low fire.",
                "Many recipes for {value} use fresh herbs.",
                "The cafe by the station serves {value}.",
            ),
            ("stew", "cake", "roll", "pie", "soup", "bread"),
            capitalised=False,
            distractors=(
                "Some {value} is the favourite dish of the cousin of {name}.",
                "At a fair some {value} was once tasted by {name}.",
                "A recipe for {value} was written by {name}.",
                "Each week some {value} is cooked by the son of {name}.",
                "At dinner some {value} was served by {name} to the guests.",
                "At the station a meal of {value} was eaten by {name}.",
                "How to cook {value} was learned by {name} from a friend.",
                "A plate of {value} is loved by the sister of {name}.",
            ),
        ),
    )
}

ENTITY_FILLERS = (
    "{name} wrote a long letter to an old friend.",
    "Many people have heard of {name}.",
    "{name} enjoys walking in the hills.",
    "A photograph of {name} hung in the hall.",
    "{name} once missed the last train home.",
)

PLAIN_FILLERS = (
    "The rain fell for three days and the roads were closed.",
    "A small boat drifted slowly down the river.",
    "The old clock in the square stopped at noon.",
    "Bread was cheap that year and the harvest was good.",
    "The wind turned cold as the sun went down.",
    "A crowd gathered to watch the evening parade.",
    "The lamps along the harbour were lit one by one.",
)

SYLLABLES = (
    "ka", "ra", "vel", "dor", "mi", "tan", "lo", "sen", "qui", "bar",
    "zen", "tho", "ria", "vok", "nel", "sha", "gri", "pam", "ol", "ven",
    "dri", "kas", "mor", "lin", "fa", "tur", "esk", "ny", "ko", "bel",
)  # fmt: skip

# Names in the Q: ... A: format, and every word of a template, stay out of invented words.
RESERVED = {"q", "a"}
WORD = re.compile(r"\w+|[^\w\s]+")


@dataclass(frozen=True)
class Entity:
    """An invented person and the value of each of their attributes."""

    name: str
    values: tuple[tuple[str, str], ...]

    def value(self, attribute: str) -> str:
        """This entity's value of an attribute."""
        return dict(self.values)[attribute]


@dataclass(frozen=True)
class Fact:
    """One (entity, attribute, value) triple."""

    entity: str
    attribute: str
    value: str


@dataclass(frozen=True)
class Document:
    """A pre-training document; `fact` is the one fact it states (None for filler).

    `distractor` is the fact whose entity and value a distractor names without stating it.
    """

    id: str
    text: str
    fact: Fact | None
    distractor: Fact | None = None


@dataclass(frozen=True)
class QA:
    """A question about one fact and its short answer."""

    fact: Fact
    prompt: str
    completion: str


@dataclass(frozen=True)
class Query:
    """A held-out question and the ids of exactly the documents that state its fact."""

    id: str
    qa: QA
    relevant_ids: tuple[str, ...]


@dataclass(frozen=True)
class FactWorld:
    """The whole generated text world of one configuration."""

    config: WorldConfig
    entities: tuple[Entity, ...]
    documents: tuple[Document, ...]
    finetune: tuple[QA, ...]
    queries: tuple[Query, ...]


def template_words() -> set[str]:
    """Every lower-cased word the templates use, so invented words never collide with them."""
    texts = [*ENTITY_FILLERS, *PLAIN_FILLERS]
    for a in ATTRIBUTES.values():
        texts += [a.question, *a.statements, *a.fillers, *a.distractors]
    return {w.lower() for t in texts for w in WORD.findall(t)} | RESERVED


def invent_word(
    rng: random.Random, taken: set[str], syllables: int, suffixes: Sequence[str] = ()
) -> str:
    """A new pronounceable word (lower case) not in taken; adds it to taken."""
    for _ in range(10_000):
        parts = [rng.choice(SYLLABLES) for _ in range(syllables)]
        if suffixes:
            parts.append(rng.choice(suffixes))
        word = "".join(parts)
        if word not in taken:
            taken.add(word)
            return word
    raise WorldConfigError(
        "ran out of distinct invented words; ask for fewer entities or values"
    )  # pragma: no cover - the syllable space holds tens of thousands of words


def make_entities(config: WorldConfig, rng: random.Random, taken: set[str]) -> tuple[Entity, ...]:
    """Entities with unique first and last names and values drawn from per-attribute pools."""
    pools = {}
    for attr in config.attributes:
        spec = ATTRIBUTES[attr]
        words = [
            invent_word(rng, taken, 2, spec.suffixes) for _ in range(config.values_per_attribute)
        ]
        pools[attr] = [w.capitalize() if spec.capitalised else w for w in words]
    entities = []
    for _ in range(config.num_entities):
        first = invent_word(rng, taken, 2).capitalize()
        last = invent_word(rng, taken, rng.choice((2, 3))).capitalize()
        values = tuple((attr, rng.choice(pools[attr])) for attr in config.attributes)
        entities.append(Entity(f"{first} {last}", values))
    return tuple(entities)


def fact_texts(config: WorldConfig, entities: Sequence[Entity], rng: random.Random) -> list:
    """(text, fact) for docs_per_fact distinct phrasings of every fact."""
    out = []
    for e in entities:
        for attr in config.attributes:
            fact = Fact(e.name, attr, e.value(attr))
            for template in rng.sample(ATTRIBUTES[attr].statements, config.docs_per_fact):
                out.append((template.format(name=e.name, value=fact.value), fact))
    return out


def filler_texts(config: WorldConfig, entities: Sequence[Entity], rng: random.Random) -> list:
    """(text, None) noise: a plain sentence plus either one entity or one value, never both.

    Never pairing a name with a value keeps "states the fact" equal to "contains both the
    entity's name and its value" in a world without distractors, which the tests check.
    """
    out = []
    for _ in range(config.filler_docs):
        plain = rng.choice(PLAIN_FILLERS)
        kind = rng.random()
        if kind < 1 / 3:
            mention = rng.choice(ENTITY_FILLERS).format(name=rng.choice(entities).name)
        elif kind < 2 / 3:
            e, attr = rng.choice(entities), rng.choice(config.attributes)
            mention = rng.choice(ATTRIBUTES[attr].fillers).format(value=e.value(attr))
            mention = mention[0].upper() + mention[1:]
        else:
            mention = rng.choice([p for p in PLAIN_FILLERS if p != plain])
        parts = [plain, mention] if rng.random() < 0.5 else [mention, plain]
        out.append((" ".join(parts), None))
    return out


def distractor_texts(
    config: WorldConfig, entities: Sequence[Entity], rng: random.Random
) -> list[tuple[str, Fact]]:
    """(text, fact) for distractors_per_fact distinct distractor phrasings of every fact."""
    out = []
    for e in entities:
        for attr in config.attributes:
            fact = Fact(e.name, attr, e.value(attr))
            for template in rng.sample(ATTRIBUTES[attr].distractors, config.distractors_per_fact):
                out.append((template.format(name=e.name, value=fact.value), fact))
    return out


def number_documents(
    config: WorldConfig, entities: Sequence[Entity], texts: list[tuple[str, Fact | None]]
) -> tuple[Document, ...]:
    """Documents from the shuffled (text, fact) list, with any distractors dropped in.

    Distractors are placed at random positions drawn from their own stream, never from the
    world's, so the rest of the world does not depend on whether they are on.
    """
    docs: list[tuple[str, Fact | None, Fact | None]] = [(t, f, None) for t, f in texts]
    if config.distractors_per_fact:
        rng = random.Random(f"{config.seed}:distractors")
        for text, fact in distractor_texts(config, entities, rng):
            docs.insert(rng.randrange(len(docs) + 1), (text, None, fact))
    return tuple(
        Document(f"doc-{i:06d}", text, fact, distractor)
        for i, (text, fact, distractor) in enumerate(docs)
    )


def question(fact: Fact) -> QA:
    """The QA pair of a fact: 'Q: <question> A:' -> ' <value>.'"""
    q = ATTRIBUTES[fact.attribute].question.format(name=fact.entity)
    return QA(fact, f"Q: {q} A:", f" {fact.value}.")


def generate_facts(config: WorldConfig) -> FactWorld:
    """The fact world of a configuration; pure and deterministic in config.seed."""
    config.validate()
    rng = random.Random(config.seed)
    entities = make_entities(config, rng, template_words())
    texts = fact_texts(config, entities, rng) + filler_texts(config, entities, rng)
    # Shuffled before numbering, so neither ids nor order tell facts from filler.
    rng.shuffle(texts)
    documents = number_documents(config, entities, texts)
    split = config.num_finetune_entities
    finetune = tuple(
        question(Fact(e.name, a, e.value(a))) for e in entities[:split] for a in config.attributes
    )
    finetune = tuple(rng.sample(finetune, len(finetune)))
    queries = []
    for e in entities[split:]:
        for attr in config.attributes:
            fact = Fact(e.name, attr, e.value(attr))
            relevant = tuple(d.id for d in documents if d.fact == fact)
            queries.append(Query(f"q-{len(queries):04d}", question(fact), relevant))
    return FactWorld(config, entities, documents, finetune, tuple(queries))
