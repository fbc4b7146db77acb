"""Building the fact world once per configuration into a cache directory, atomically."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from msif.errors import MsifError
from msif.version import __version__
from msif.world.config import WORLD_VERSION, WorldConfig
from msif.world.facts import FactWorld, generate_facts
from msif.world.train import (
    FT_OBJECTIVE,
    PT_OBJECTIVE,
    completion_matches,
    evaluate_accuracy,
    finetune,
    pretrain,
)

log = logging.getLogger("msif")
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
WORLD_JSON = "world.json"
STALE_AFTER_S = 24 * 3600


class WorldBuildError(MsifError):
    """The fact world's cache cannot be used or written."""


@dataclass(frozen=True)
class WorldPaths:
    """Where a built fact world lies, and how well its fine-tuned model knows the facts."""

    root: Path
    config: WorldConfig
    accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def corpus(self) -> Path:
        """Pre-training corpus: `id`, `text`."""
        return self.root / "corpus.parquet"

    @property
    def finetune(self) -> Path:
        """Fine-tuning pairs: `prompt`, `completion`."""
        return self.root / "finetune.parquet"

    @property
    def queries(self) -> Path:
        """Held-out questions: `id`, `prompt`, `completion`, `relevant_ids`."""
        return self.root / "queries.parquet"

    @property
    def pt_model(self) -> Path:
        """The pre-trained model and its tokenizer (save_pretrained dir)."""
        return self.root / "pt_model"

    @property
    def ft_model(self) -> Path:
        """The fine-tuned model and its tokenizer (save_pretrained dir)."""
        return self.root / "ft_model"

    @property
    def world_json(self) -> Path:
        """The build record: config, accuracy, timings, versions."""
        return self.root / WORLD_JSON

    @property
    def alpha(self) -> float:
        """The proximity coefficient the fine-tuning used."""
        return self.config.alpha


def default_cache_dir() -> Path:
    """Where worlds are cached: msif.storage.cache.cache_home() ($MSIF_CACHE or ~/.cache/msif)."""
    from msif.storage.cache import cache_home

    return cache_home()


def world_dir(config: WorldConfig, cache_dir: str | Path | None = None) -> Path:
    """The directory a configuration's world lives in: <preset or custom>-<fingerprint>."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"{config.label()}-{config.fingerprint()}"


def write_tables(world: FactWorld, out_dir: str | Path) -> dict[str, Path]:
    """corpus.parquet, finetune.parquet and queries.parquet of a world; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {
        "corpus": pa.table(
            {
                "id": pa.array([d.id for d in world.documents], pa.string()),
                "text": pa.array([d.text for d in world.documents], pa.string()),
            }
        ),
        "finetune": pa.table(
            {
                "prompt": pa.array([qa.prompt for qa in world.finetune], pa.string()),
                "completion": pa.array([qa.completion for qa in world.finetune], pa.string()),
            }
        ),
        "queries": pa.table(
            {
                "id": pa.array([q.id for q in world.queries], pa.string()),
                "prompt": pa.array([q.qa.prompt for q in world.queries], pa.string()),
                "completion": pa.array([q.qa.completion for q in world.queries], pa.string()),
                "relevant_ids": pa.array(
                    [list(q.relevant_ids) for q in world.queries], pa.list_(pa.string())
                ),
            }
        ),
    }
    paths = {}
    for name, table in tables.items():
        paths[name] = out / f"{name}.parquet"
        pq.write_table(table, paths[name])
    return paths


def read_complete(root: Path, config: WorldConfig) -> WorldPaths | None:
    """The world at root when every file is there and world.json names this config."""
    try:
        record = json.loads((root / WORLD_JSON).read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != config.fingerprint():
        return None
    paths = WorldPaths(root, config, dict(record.get("accuracy", {})))
    files = [paths.corpus, paths.finetune, paths.queries]
    files += [d / f for d in (paths.pt_model, paths.ft_model) for f in MODEL_FILES]
    return paths if all(f.is_file() for f in files) else None


@contextlib.contextmanager
def quiet_threads(n: int) -> Iterator[None]:
    """Run the block with n torch threads and no transformers save/load bars; then restore."""
    import torch
    from transformers.utils import logging as hf_logging

    before, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(max(1, n))
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if bars:
            hf_logging.enable_progress_bar()


def build_world(
    config: WorldConfig,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    threads: int = 1,
) -> WorldPaths:
    """The built world of config: reused from the cache, or generated, trained and cached.

    One thread by default: the model's matrices are too small to gain from more, and spinning
    threads slow everything else on a shared machine.
    """
    config.validate()
    root = world_dir(config, cache_dir)
    found = read_complete(root, config)
    if found is not None:
        log.info("fact world %s reused from the cache", root)
        return found
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(root)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    except OSError as e:
        raise WorldBuildError(f"cannot write the fact-world cache {root.parent}: {e}") from None
    try:
        with quiet_threads(threads):
            accuracy = build_into(config, staging, progress)
        return publish(staging, root, config, accuracy)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(root: Path, max_age_s: float = STALE_AFTER_S) -> None:
    """Delete staging dirs of this world left by builds killed long ago (no build runs a day)."""
    now = time.time()
    for stale in root.parent.glob(f".{root.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)


def publish(staging: Path, root: Path, config: WorldConfig, accuracy: dict) -> WorldPaths:
    """Rename the finished staging dir to root; a concurrent builder's complete world wins."""
    if root.exists() and read_complete(root, config) is None:
        # A damaged world (files deleted by hand) is moved aside whole, never patched.
        log.warning("replacing the incomplete fact world at %s", root)
        trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        os.rename(root, trash / "world")
        shutil.rmtree(trash, ignore_errors=True)
    # mkdtemp makes the directory private; a cached world is shared like any other file.
    staging.chmod(0o755)
    try:
        os.rename(staging, root)
    except OSError:
        found = read_complete(root, config)
        if found is None:
            raise
        return found
    return WorldPaths(root, config, accuracy)


def build_into(config: WorldConfig, out: Path, progress: bool) -> dict[str, float]:
    """Generate, train, save and evaluate the world into out; world.json is written last."""
    from msif.world.tokenizer import train_tokenizer

    start = time.perf_counter()
    world = generate_facts(config)
    tables = {k: pq.read_table(p) for k, p in write_tables(world, out).items()}
    tokenizer = train_tokenizer(world_texts(world), config.max_length)
    times = {"generate": time.perf_counter() - start}

    pt_model, pt_stats = pretrain(config, tokenizer, tables["corpus"], progress)
    save_model(pt_model, tokenizer, out / "pt_model")
    ft_model, ft_stats = finetune(pt_model, tokenizer, tables["finetune"], config, progress)
    save_model(ft_model, tokenizer, out / "ft_model")
    times["pretrain"], times["finetune"] = pt_stats.seconds, ft_stats.seconds

    tick = time.perf_counter()
    accuracy, counts = measure(out, world, tables)
    times["evaluate"] = time.perf_counter() - tick
    times["total"] = time.perf_counter() - start
    log.info(
        "fact world: fine-tuned model answers %.0f%% of held-out queries, %.0f%% of "
        "fine-tuning questions; pre-trained model completes %.0f%% of held-out statements",
        *(100 * accuracy[k] for k in ("queries", "finetune", "pt_statements")),
    )
    record = world_record(config, accuracy, counts, times, pt_stats, ft_stats)
    (out / WORLD_JSON).write_text(json.dumps(record, indent=1) + "\n")
    return accuracy


def world_texts(world: FactWorld) -> list[str]:
    """Every text the tokenizer must know: documents, prompts and completions."""
    pairs = [*world.finetune, *(q.qa for q in world.queries)]
    return [d.text for d in world.documents] + [
        t for qa in pairs for t in (qa.prompt, qa.completion)
    ]


def measure(out: Path, world: FactWorld, tables: dict[str, pa.Table]) -> tuple[dict, dict]:
    """Accuracy figures and sizes, measured on the saved files loaded like a user's model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out / "ft_model"))
    ft = AutoModelForCausalLM.from_pretrained(str(out / "ft_model"))
    pt = AutoModelForCausalLM.from_pretrained(str(out / "pt_model"))
    accuracy = {
        "queries": evaluate_accuracy(ft, tokenizer, tables["queries"]),
        "finetune": evaluate_accuracy(ft, tokenizer, tables["finetune"]),
        "pt_statements": statement_recall(pt, tokenizer, world),
    }
    counts = {
        "entities": len(world.entities),
        "documents": len(world.documents),
        "fact_documents": sum(d.fact is not None for d in world.documents),
        "filler_documents": sum(d.fact is None and d.distractor is None for d in world.documents),
        "distractor_documents": sum(d.distractor is not None for d in world.documents),
        "finetune_pairs": len(world.finetune),
        "queries": len(world.queries),
        "vocabulary": len(tokenizer),
        "parameters": sum(p.numel() for p in pt.parameters()),
    }
    return accuracy, counts


def statement_recall(model, tokenizer, world: FactWorld) -> float:
    """Share of held-out fact documents whose value the pre-trained model predicts in place.

    A diagnostic of memorisation: a query can only be answered if the pre-trained model has
    stored the fact in the first place.
    """
    prompts, completions = [], []
    held_out = {q.qa.fact for q in world.queries}
    for d in world.documents:
        if d.fact in held_out:
            # A word match: a value may also occur inside an invented name.
            at = re.search(rf"\b{re.escape(d.fact.value)}\b", d.text).start()
            head = d.text[:at].rstrip()
            prompts.append(head)
            completions.append(" " + d.fact.value)
    hits = completion_matches(model, tokenizer, prompts, completions)
    return sum(hits) / len(hits) if hits else 0.0


def save_model(model, tokenizer, out: Path) -> None:
    """Model weights (safetensors) and tokenizer side by side, as from_pretrained expects."""
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    # transformers writes the weights through a private temporary file (mode 0600): the
    # world is a cache other users and containers (uid 1000) read, so give it the umask's.
    umask = os.umask(0)
    os.umask(umask)
    for f in Path(out).iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def world_record(config: WorldConfig, accuracy, counts, times, pt_stats, ft_stats) -> dict:
    """The content of world.json."""
    import tokenizers
    import torch
    import transformers

    return {
        "world_version": WORLD_VERSION,
        "msif_version": __version__,
        "preset": config.label(),
        "fingerprint": config.fingerprint(),
        "config": config.to_dict(),
        "alpha": config.alpha,
        "objectives": {"pretrain": PT_OBJECTIVE, "finetune": FT_OBJECTIVE},
        "accuracy": accuracy,
        "counts": counts,
        "timings_s": {k: round(v, 2) for k, v in times.items()},
        "training": {"pretrain": pt_stats.to_dict(), "finetune": ft_stats.to_dict()},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "pyarrow": pa.__version__,
        },
        "torch_threads": torch.get_num_threads(),
    }
