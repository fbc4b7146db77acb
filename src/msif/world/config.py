"""The fact world's configuration: what is generated, how the models look and train."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from msif.errors import MsifError

# Bump when the generated text, the tokenizer or the training recipe changes, so cached
# worlds built by older code are not reused.
WORLD_VERSION = "1"
# The same for the distractor phrasings; only worlds that have distractors carry it.
# 2: the value before the name, so that distractors do not teach the answer.
DISTRACTOR_VERSION = "2"
KNOWN_ATTRIBUTES = ("birthplace", "employer", "university", "instrument", "pet", "dish")
MAX_PHRASINGS = 6
MAX_DISTRACTORS = 8
# Settings added after worlds were cached and benchmarked: at this value they are left out of
# to_dict() and so out of the fingerprint, which keeps every earlier world's cache key.
OFF_DEFAULTS = {"distractors_per_fact": 0}


class WorldConfigError(MsifError):
    """A fact-world configuration that cannot be built."""


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a fact world; equal configs build identical worlds."""

    seed: int = 0
    # the facts
    num_entities: int = 24
    attributes: tuple[str, ...] = ("birthplace", "employer", "university", "instrument")
    values_per_attribute: int = 8
    docs_per_fact: int = 3
    filler_docs: int = 48
    # documents naming an entity and its value without stating the fact (see facts.py)
    distractors_per_fact: int = 0
    finetune_fraction: float = 0.5
    # the model (GPT-NeoX)
    hidden_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 384
    max_length: int = 64
    # pre-training: AdamW on the mean token loss, linear warm-up then cosine decay
    pt_epochs: int = 40
    pt_lr: float = 3e-3
    pt_batch_size: int = 16
    pt_weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    # fine-tuning: mean over examples of the summed completion loss + alpha/2 |theta - pt|^2
    ft_epochs: int = 10
    ft_lr: float = 1e-3
    ft_batch_size: int = 8
    alpha: float = 0.01

    @staticmethod
    def preset(name: str) -> WorldConfig:
        """A named configuration: 'default' (the main job's world), 'small' (for CI) or
        'distractor' (the default world plus lexical distractors that defeat BM25)."""
        if name not in PRESETS:
            raise WorldConfigError(
                f"unknown fact-world preset {name!r}; choose one of {', '.join(PRESETS)}"
            )
        return PRESETS[name]

    def with_seed(self, seed: int) -> WorldConfig:
        """The same configuration with another seed."""
        return dataclasses.replace(self, seed=int(seed))

    @property
    def num_finetune_entities(self) -> int:
        """How many entities (the first ones) have their facts in the fine-tuning set."""
        return round(self.num_entities * self.finetune_fraction)

    def validate(self) -> None:
        """Raise WorldConfigError with the first problem found."""
        unknown = [a for a in self.attributes if a not in KNOWN_ATTRIBUTES]
        if unknown:
            raise WorldConfigError(
                f"unknown attribute {unknown[0]!r}; choose from {', '.join(KNOWN_ATTRIBUTES)}"
            )
        if not self.attributes or len(set(self.attributes)) != len(self.attributes):
            raise WorldConfigError("attributes must be a non-empty list without repeats")
        if not 1 <= self.docs_per_fact <= MAX_PHRASINGS:
            raise WorldConfigError(
                f"docs_per_fact is {self.docs_per_fact}; each fact has 1 to {MAX_PHRASINGS} "
                "phrasings"
            )
        n = self.distractors_per_fact
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_DISTRACTORS:
            raise WorldConfigError(
                f"distractors_per_fact is {n!r}; each fact has 0 to {MAX_DISTRACTORS} "
                "distractor phrasings"
            )
        split = self.num_finetune_entities
        if not 0 < split < self.num_entities:
            raise WorldConfigError(
                f"{self.num_entities} entities with finetune_fraction {self.finetune_fraction} "
                "leave no entity for fine-tuning or none for queries"
            )
        if self.values_per_attribute < 2:
            raise WorldConfigError("values_per_attribute must be at least 2")
        if self.hidden_size % self.num_heads:
            raise WorldConfigError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        positive = ("pt_epochs", "ft_epochs", "pt_batch_size", "ft_batch_size", "num_layers")
        for name in positive:
            if getattr(self, name) < 1:
                raise WorldConfigError(f"{name} must be at least 1")
        if self.alpha < 0 or self.filler_docs < 0:
            raise WorldConfigError("alpha and filler_docs must not be negative")

    def to_dict(self) -> dict:
        """Plain JSON-able fields, less those at their OFF_DEFAULTS value."""
        d = dataclasses.asdict(self)
        d["attributes"] = list(self.attributes)
        for name, off in OFF_DEFAULTS.items():
            if d[name] == off:
                del d[name]
        return d

    @staticmethod
    def from_dict(d: dict) -> WorldConfig:
        """Inverse of to_dict; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(WorldConfig)}
        extra = sorted(set(d) - names)
        if extra:
            raise WorldConfigError(f"unknown fact-world setting(s): {', '.join(extra)}")
        d = dict(d)
        if "attributes" in d:
            d["attributes"] = tuple(d["attributes"])
        return WorldConfig(**d)

    def fingerprint(self) -> str:
        """A short hash of the configuration and the world version (names the cache dir)."""
        versions = {"v": WORLD_VERSION}
        if self.distractors_per_fact:
            versions["distractor_v"] = DISTRACTOR_VERSION
        blob = json.dumps({**versions, "config": self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def label(self) -> str:
        """The preset this config is (any seed), else 'custom'."""
        for name, preset in PRESETS.items():
            if dataclasses.replace(self, seed=preset.seed) == preset:
                return name
        return "custom"


PRESETS: dict[str, WorldConfig] = {
    "default": WorldConfig(),
    "small": WorldConfig(
        num_entities=8,
        attributes=("birthplace", "employer", "instrument"),
        values_per_attribute=4,
        docs_per_fact=3,
        filler_docs=8,
        hidden_size=48,
        num_layers=1,
        num_heads=2,
        intermediate_size=96,
    ),
    # Twice as many distractors as statements per fact: a lexical matcher then puts one above
    # every true statement about half the time, while the facts, fine-tuning set and queries
    # are exactly the default world's (and the model answers from the statements alone).
    "distractor": WorldConfig(distractors_per_fact=6),
}
