"""The embedded synthetic fact world: generated documents, QA data and tiny trained models.

`build_world(WorldConfig.preset("default"))` generates invented entities and their facts,
trains a word-level tokenizer and a tiny GPT-NeoX on the documents, fine-tunes it on questions
about half of the entities, and caches everything; the queries ask about the other half, whose
facts the model saw only in pre-training.
"""

from msif.world.build import (
    WorldBuildError,
    WorldPaths,
    build_world,
    default_cache_dir,
    world_dir,
    write_tables,
)
from msif.world.config import PRESETS, WORLD_VERSION, WorldConfig, WorldConfigError
from msif.world.facts import ATTRIBUTES, Document, Entity, Fact, FactWorld, Query, generate_facts
from msif.world.tokenizer import train_tokenizer
from msif.world.train import completion_matches, evaluate_accuracy, finetune, pretrain

__all__ = [
    "ATTRIBUTES",
    "PRESETS",
    "WORLD_VERSION",
    "Document",
    "Entity",
    "Fact",
    "FactWorld",
    "Query",
    "WorldBuildError",
    "WorldConfig",
    "WorldConfigError",
    "WorldPaths",
    "build_world",
    "completion_matches",
    "default_cache_dir",
    "evaluate_accuracy",
    "finetune",
    "generate_facts",
    "pretrain",
    "train_tokenizer",
    "world_dir",
    "write_tables",
]
