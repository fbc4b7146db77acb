"""What every node shares: timing, atomic publishing, skip-if-complete, shard checks, inputs.

A node is a module of this package with `NAME` (its one name in every layer), `add_parser`
(its `msif NAME` subcommand) and `run` (the work). This module holds the rest they share.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import pyarrow as pa

from msif.config import STAGES, DataOptions, ModelOptions
from msif.data.examples import batches, pad_id_of
from msif.data.tables import iter_examples, table_kind
from msif.errors import DataError, MismatchError, MsifError

P = TypeVar("P")  # a PartialSums artifact (CovarianceSums, LambdaSums)

log = logging.getLogger("msif")
_STARTED: contextvars.ContextVar[float | None] = contextvars.ContextVar("started", default=None)


def subparser(sub, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """The `msif NAME` subcommand of a node."""
    return sub.add_parser(
        name,
        help=help,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_shard_arguments(p: argparse.ArgumentParser) -> None:
    """--shard and --num-shards."""
    p.add_argument("--shard", type=int, default=0, help="index of this shard (default: 0)")
    p.add_argument("--num-shards", type=int, default=1, help="number of shards (default: 1)")


def add_stage_argument(p: argparse.ArgumentParser) -> None:
    """--stage pt|ft."""
    stages = "; ".join(f"{k}: {v}" for k, v in STAGES.items())
    p.add_argument("--stage", required=True, choices=list(STAGES), help=stages)


def add_out_argument(p: argparse.ArgumentParser, what: str) -> None:
    """--out: the directory (local or gs://) the node publishes."""
    p.add_argument("--out", required=True, help=f"{what}: a directory or gs:// prefix")


def timed(fn: Callable) -> Callable:
    """Record when a node started, so its output manifest can carry its wall time."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        token = _STARTED.set(time.perf_counter())
        try:
            return fn(*args, **kwargs)
        finally:
            _STARTED.reset(token)

    return wrapper


@contextlib.contextmanager
def published(out_uri: str, meta: dict) -> Iterator[Path]:
    """staged_output_dir whose manifest also records the node's wall time."""
    from msif.storage.publish import staged_output_dir

    with staged_output_dir(out_uri, meta) as tmp:
        yield tmp
        started = _STARTED.get()
        if started is not None:
            meta["wall_s"] = round(time.perf_counter() - started, 3)


def inputs_key(**inputs) -> str:
    """A hash of everything an output depends on, to recognise a complete rerun."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def already_complete(out_uri: str, key: str) -> bool:
    """True when out_uri holds a complete output made from the same inputs."""
    from msif.storage.publish import is_complete, read_manifest
    from msif.storage.uri import BucketNotFoundError, StorageError, split_gs

    try:
        if not is_complete(out_uri):
            return False
    except BucketNotFoundError:
        # Name the output, not the marker object this check happened to read.
        bucket, _ = split_gs(out_uri)
        raise StorageError(
            f"{out_uri}: checking the destination failed: no such bucket {bucket!r}"
        ) from None
    if read_manifest(out_uri).get("metadata", {}).get("inputs") != key:
        return False
    log.info("%s is complete for these inputs: skipped", out_uri)
    return True


def artifact_digest(uri: str) -> str:
    """Content digest of a published artifact (from its manifest's file hashes)."""
    from msif.storage.publish import read_manifest

    files = read_manifest(uri).get("files", {})
    return inputs_key(files={k: v.get("sha256") for k, v in files.items()})


def check_output(out_uri: str, *inputs: str | Sequence[str] | None) -> None:
    """Refuse, before any work, an --out that is, holds or lies inside one of the node's
    inputs, or that holds something other than an earlier msif output."""
    from msif.storage.publish import check_output_replaceable
    from msif.storage.uri import check_output_distinct

    flat: list[str] = []
    for item in inputs:
        if isinstance(item, str):
            flat.append(item)
        elif item is not None:
            flat += [str(x) for x in item]
    check_output_distinct(out_uri, flat)
    check_output_replaceable(out_uri)


def add_base_model_argument(p: argparse.ArgumentParser) -> None:
    """--base-model: the base a PEFT adapter given as --model is merged into."""
    p.add_argument(
        "--base-model",
        help="when --model is a PEFT (LoRA) adapter folder: the base model it was trained on, "
        "a directory or gs:// prefix (default: the adapter's base_model_name_or_path when that "
        "is a folder or gs:// URI; the pipeline passes θ_pt); unused for a full model",
    )


def load_stage_model(model_uri: str, opts: ModelOptions, base_model_uri: str | None = None):
    """(model, tokenizer, options) with --max-length clamped to the model's positions; a PEFT
    adapter is merged into its base (base_model_uri, else the one its config names)."""
    import dataclasses

    from msif.data.models import effective_max_length, load_model

    model, tokenizer = load_model(
        model_uri, device=opts.device, dtype=opts.dtype, base_model=base_model_uri
    )
    limit = effective_max_length(model, opts.max_length)
    return model, tokenizer, dataclasses.replace(opts, max_length=limit)


def model_key(model_uri: str, base_model_uri: str | None = None) -> str:
    """A model's content digest for rerun keys: its folder's, and for a PEFT adapter its
    base's with it, so that a changed base is not answered from a stale output."""
    from msif.data.adapters import base_of
    from msif.storage.digest import model_digest
    from msif.storage.uri import StorageError

    digest = model_digest(model_uri)
    base = base_of(model_uri, base_model_uri)
    if base is None:
        return digest
    try:
        return inputs_key(model=digest, base=model_digest(base))
    except StorageError:  # an unreadable base: loading refuses it, with the reason
        return digest


def check_tokenizer(recorded: dict | None, tokenizer, what: str, *, extends: bool = False) -> None:
    """Refuse a tokenizer whose vocabulary differs from the one an artifact was made with.

    Two tokenizers of equal size but other ids pass every shape check and give quietly wrong
    scores, so vocabularies are compared by hash. extends: this tokenizer may append tokens
    to the recorded one (a fine-tune that added chat or padding tokens to its base's).
    """
    from msif.data.models import tokenizer_fingerprint

    if recorded is None:
        return
    size = int(recorded["size"])
    fits = len(tokenizer) == size or (extends and len(tokenizer) > size)
    if fits and tokenizer_fingerprint(tokenizer, size) == recorded["fingerprint"]:
        return
    raise MismatchError(
        f"{what} used a tokenizer with another vocabulary than this model's: the pre-trained "
        "and fine-tuned models must share one tokenizer (the fine-tune may only append tokens)"
    )


def input_dir(uri: str) -> Path:
    """A verified local copy of a published input artifact."""
    from msif.storage.cache import local_input_dir

    return local_input_dir(uri)


def check_shard(shard: int, num_shards: int) -> None:
    """0 <= shard < num_shards."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise MsifError(f"shard {shard} of {num_shards} is not a valid shard index")


def check_stage(stage: str) -> None:
    """stage is pt or ft."""
    if stage not in STAGES:
        raise MsifError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")


def check_shard_set(infos: Sequence[dict], what: str) -> None:
    """Refuse an incomplete or mixed set of shards: reducing it would give wrong results."""
    check_consistent_shards(infos, what)
    total = infos[0].get("num_shards")
    missing = sorted(set(range(total)) - {i.get("shard") for i in infos})
    if missing:
        raise MsifError(f"{what}: shard {missing[0]} of {total} is missing")


def check_consistent_shards(infos: Sequence[dict], what: str) -> None:
    """Refuse shards of different shardings or data, or one shard given twice (a set not yet
    complete passes: the reducers check each partial as it arrives)."""
    n = {i.get("num_shards") for i in infos}
    fps = {i.get("data_fingerprint") for i in infos}
    # Other columns of the same files are other data (absent: an output that reads none).
    read = {json.dumps(i.get("data_options"), sort_keys=True) for i in infos}
    if len(n) != 1 or len(fps) != 1 or len(read) != 1:
        raise MismatchError(f"{what} come from different shardings or data")
    seen = sorted(i.get("shard") for i in infos)
    if len(seen) != len(set(seen)):
        twice = next(s for s in seen if seen.count(s) > 1)
        raise MsifError(f"{what}: shard {twice} was given twice")


def sum_partials(uris: Sequence[str], loader: Callable[[Path], P], what: str) -> P:
    """The sum of every shard's partial sums (CovarianceSums or LambdaSums), read one at a
    time: the reducer holds the running sum and one partial, whatever the shard count, and
    keeps no downloaded copy of a gs:// partial once it is added.

    Each partial is checked against the ones before it as it arrives (sharding, data,
    model, stage, seed); the set is checked complete at the end, before anything is written.
    """
    from msif.storage.cache import release_input_dir

    if not uris:
        raise MsifError("no partial sums given")
    total, infos = None, []
    for uri in uris:
        directory = input_dir(uri)
        part = loader(directory)
        release_input_dir(uri, directory)
        infos.append(part.info)
        check_consistent_shards(infos, what)
        if total is None:
            total = part
        else:
            total.add_(part)
        del part  # freed before the next is read
    check_shard_set(infos, what)
    return total


def open_table(uri: str, data: DataOptions):
    """The input table a node reads (Parquet, a datasets folder, JSON Lines; msif.data.sources)."""
    from msif.data.sources import open_source

    return open_source(uri, data.split)


def read_queries(uri: str, data: DataOptions, max_length: int = 512):
    """The checked queries table (msif.data.tables.Queries) of a node."""
    from msif.data.tables import read_queries as read

    return read(uri, data.table(max_length), data.split)


def shard_examples(
    model,
    tokenizer,
    uri: str,
    shard: int,
    num_shards: int,
    opts: ModelOptions,
    data: DataOptions,
    *,
    corpus: bool = False,
    source=None,
):
    """Examples of one shard of a table, with its source and row range (source: the table
    already opened, so that its listing and fingerprint are not done twice)."""
    check_shard(shard, num_shards)
    source = source if source is not None else open_table(uri, data)
    table = data.table(opts.max_length)
    kind = table_kind(source.schema, uri, table)
    if corpus and kind != "corpus":
        raise DataError(
            f"{uri} is not a corpus: it needs a text column `{data.text_column}` "
            "(--text-column) or `input_ids`"
        )
    start, stop = source.shard_range(shard, num_shards)
    vocab = model.get_input_embeddings().num_embeddings
    examples = iter_examples(source, tokenizer, kind, table, vocab, start, stop)
    return examples, source, (start, stop)


def sample_examples(
    model,
    tokenizer,
    uri: str,
    samples: int,
    seed: int,
    opts: ModelOptions,
    data: DataOptions,
    *,
    corpus: bool = False,
) -> tuple[list, dict]:
    """A seeded uniform sample of a table's rows as examples (every row when it has no more
    than samples), with what identifies it: data, fingerprint, rows drawn, seed."""
    from msif.attribution.refine import sample_rows

    source = open_table(uri, data)
    table = data.table(opts.max_length)
    kind = table_kind(source.schema, uri, table)
    if corpus and kind != "corpus":
        raise DataError(
            f"{uri} is not a corpus: it needs a text column `{data.text_column}` "
            "(--text-column) or `input_ids`"
        )
    rows = sample_rows(source.num_rows, samples, seed)
    vocab = model.get_input_embeddings().num_embeddings
    examples = [
        e for r in rows for e in iter_examples(source, tokenizer, kind, table, vocab, r, r + 1)
    ]
    if not examples:
        raise DataError(f"{uri} has no rows to sample")
    record = {
        "data": uri,
        "data_fingerprint": source.fingerprint(),
        "num_rows": source.num_rows,
        "rows": rows,
        "seed": seed,
        "data_options": data.recorded(),
        "max_length": opts.max_length,
    }
    return examples, record


def stage_batches(
    model,
    tokenizer,
    data_uri: str,
    shard: int,
    num_shards: int,
    opts: ModelOptions,
    data: DataOptions,
) -> tuple[Callable[[], Iterator[dict]], dict]:
    """Batches of one shard of a stage's data, with the facts its partial sums record.

    The batches come from a zero-argument callable: each call reads the shard afresh from the
    table opened here (a fit with module groups passes over it once per group).
    """
    examples, source, (start, stop) = shard_examples(
        model, tokenizer, data_uri, shard, num_shards, opts, data
    )
    from msif.data.models import tokenizer_identity

    info = {
        "data": data_uri,
        "data_fingerprint": source.fingerprint(),
        "tokenizer": tokenizer_identity(tokenizer),
        "shard": shard,
        "num_shards": num_shards,
        "rows": [start, stop],
        "options": opts.recorded(),
        "data_options": data.recorded(),
    }
    pad = pad_id_of(tokenizer)
    first = [examples]  # the first pass reads the examples already opened (checked) here

    def fresh() -> Iterator[dict]:
        rows = first.pop() if first else None
        if rows is None:
            rows, _, _ = shard_examples(
                model, tokenizer, data_uri, shard, num_shards, opts, data, source=source
            )
        return batches(rows, opts.batch_size, pad)

    return fresh, info


def stage_inputs(
    model_uri: str,
    data_uri: str,
    stage: str,
    shard: int,
    num_shards: int,
    opts: ModelOptions,
    data: DataOptions,
    base_model_uri: str | None = None,
):
    """What fit-covariance and fit-lambda start from: the stage's model, a callable giving one
    shard's batches afresh on each call, and the facts their partial sums record."""
    check_stage(stage)
    model, tokenizer, opts = load_stage_model(model_uri, opts, base_model_uri)
    batches_, info = stage_batches(model, tokenizer, data_uri, shard, num_shards, opts, data)
    return model, batches_, info


def shard_meta(node: str, stage: str, shard: int, num_shards: int) -> dict:
    """The manifest metadata of a fit node's shard output."""
    return {"node": node, "stage": stage, "shard": shard, "num_shards": num_shards}


def table_fingerprint(table: pa.Table) -> str:
    """Content hash of a small table (queries)."""
    h = hashlib.sha256()
    for name in sorted(table.column_names):
        h.update(name.encode())
        h.update(json.dumps(table.column(name).to_pylist(), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def write_json(path: Path, info: dict) -> None:
    """A node's JSON sidecar, stable for diffs."""
    path.write_text(json.dumps(info, indent=1, sort_keys=True))
