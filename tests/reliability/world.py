"""What the hostile cases start from: a mini world, its whole pipeline run, and ways to spoil
copies of its files (bad tables, damaged models, forged artifacts)."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from msif.storage.publish import MARKER
from tests.support.cli_helpers import COMMON, TOP_K
from tests.support.mini_world import WORDS, tokenizer_for


@dataclass
class Ctx:
    """One case's view: the shared world and pipeline outputs, and its own scratch folder."""

    w: dict[str, str]  # the mini world's inputs (corpus, finetune, queries, pt_model, ft_model)
    p: dict[str, str]  # the pipeline's outputs (run_nodes), plus eigenbasis/partials dirs
    tmp: Path
    cleanups: list[Callable[[], object]] = field(default_factory=list)

    @property
    def out(self) -> Path:
        """The --out every case writes to; after a refused case it must not exist."""
        return self.tmp / "out"

    def table(self, name: str, data: dict | pa.Table) -> str:
        """A Parquet file under tmp from columns (or a table)."""
        path = self.tmp / f"{name}.parquet"
        pq.write_table(data if isinstance(data, pa.Table) else pa.table(data), path)
        return str(path)

    def copy(self, src: str, name: str) -> Path:
        """A private copy of a file or folder, to spoil."""
        dest = self.tmp / name
        if Path(src).is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy(src, dest)
        return dest


# ----------------------------------------------------------------------------- commands


def fit_covariance(c: Ctx, data: str | None = None, model: str | None = None, *extra) -> list:
    """argv of `msif fit-covariance` on the pre-training stage."""
    return [
        "fit-covariance",
        "--model",
        model or c.w["pt_model"],
        "--data",
        data or c.w["corpus"],
        "--stage",
        "pt",
        "--out",
        c.out,
        *COMMON,
        *extra,
    ]


def fit_covariance_ft(c: Ctx, data: str, *extra) -> list:
    """argv of `msif fit-covariance` on the fine-tuning stage."""
    return [
        "fit-covariance",
        "--model",
        c.w["ft_model"],
        "--data",
        data,
        "--stage",
        "ft",
        "--out",
        c.out,
        *COMMON,
        *extra,
    ]


def precondition(c: Ctx, queries: str | None = None, *extra, model: str | None = None) -> list:
    """argv of `msif precondition-queries` (multi-stage) with the pipeline's factors."""
    return [
        "precondition-queries",
        "--model",
        model or c.w["ft_model"],
        "--queries",
        queries or c.w["queries"],
        "--ft-factors",
        c.p["ft_factors"],
        "--pt-factors",
        c.p["pt_factors"],
        "--out",
        c.out,
        *COMMON,
        *extra,
    ]


def score(c: Ctx, corpus: str | None = None, *extra, model=None, pre=None) -> list:
    """argv of `msif score-corpus` (multi-stage queries unless pre says otherwise)."""
    return [
        "score-corpus",
        "--model",
        model or c.w["pt_model"],
        "--corpus",
        corpus or c.w["corpus"],
        "--preconditioned",
        pre or c.p["pre"],
        "--top-k",
        TOP_K,
        "--out",
        c.out,
        *COMMON,
        *extra,
    ]


def rank(c: Ctx, *extra, scores=None, corpus=None, queries=None) -> list:
    """argv of `msif rank` over the pipeline's multi-stage shards."""
    return [
        "rank",
        "--scores",
        *(scores or c.p["shards"]),
        "--corpus",
        corpus or c.w["corpus"],
        "--queries",
        queries or c.w["queries"],
        "--top-k",
        TOP_K,
        "--out",
        c.out,
        *extra,
    ]


def bm25(c: Ctx, *extra, corpus=None, queries=None) -> list:
    """argv of `msif bm25`."""
    corpus, queries = corpus or c.w["corpus"], queries or c.w["queries"]
    return ["bm25", "--corpus", corpus, "--queries", queries, "--out", c.out, *extra]


def eigendecompose(c: Ctx, *partials, extra=()) -> list:
    """argv of `msif eigendecompose` (default: the pipeline's pt covariance shards)."""
    parts = partials or c.p["cov_pt"]
    return ["eigendecompose", "--partials", *parts, "--out", c.out, *extra]


def build_factors(c: Ctx, eigenbasis=None, partials=None) -> list:
    """argv of `msif build-factors` (default: the pipeline's pt eigenbasis and Λ shards)."""
    eigenbasis = eigenbasis or c.p["eigen_pt"]
    partials = partials or c.p["lambda_pt"]
    return ["build-factors", "--eigenbasis", eigenbasis, "--partials", *partials, "--out", c.out]


def fit_lambda(c: Ctx, eigenbasis=None, model=None, stage="pt", data=None) -> list:
    """argv of `msif fit-lambda`."""
    return [
        "fit-lambda",
        "--model",
        model or c.w[f"{stage}_model"],
        "--data",
        data or c.w["corpus" if stage == "pt" else "finetune"],
        "--stage",
        stage,
        "--eigenbasis",
        eigenbasis or c.p[f"eigen_{stage}"],
        "--out",
        c.out,
        *COMMON,
    ]


# ----------------------------------------------------------------------------- spoilers


def corpus_with(c: Ctx, name: str, **columns) -> str:
    """A corpus of two documents with some columns replaced."""
    cols = {"id": ["d0", "d1"], "text": ["w1 w2 w3", "w4 w5 w6"], **columns}
    return c.table(name, {k: v for k, v in cols.items() if v is not None})


def queries_with(c: Ctx, name: str, **columns) -> str:
    """The world's queries with some columns replaced (None drops a column)."""
    table = pq.read_table(c.w["queries"]).to_pydict()
    table.update(columns)
    return c.table(name, {k: v for k, v in table.items() if v is not None})


def pairs_with(c: Ctx, name: str, **columns) -> str:
    """Fine-tune pairs of two rows with some columns replaced."""
    cols = {"prompt": ["w1 w2", "w3 w4"], "completion": [" w5", " w6"], **columns}
    return c.table(name, cols)


def model_with(c: Ctx, name: str, *, drop=(), write=None, base: str = "pt_model") -> str:
    """A copy of a model folder with files removed or overwritten ({file: bytes})."""
    dest = c.copy(c.w[base], name)
    for f in drop:
        (dest / f).unlink()
    for f, data in (write or {}).items():
        (dest / f).write_bytes(data)
    return str(dest)


def truncated(path: str, keep: float = 0.5) -> bytes:
    """The first part of a file's bytes."""
    data = Path(path).read_bytes()
    return data[: int(len(data) * keep)]


def pickle_checkpoint(c: Ctx, name: str, payload_file: Path | None = None) -> str:
    """A model folder holding only a pickle checkpoint, optionally one that runs code."""
    from transformers import AutoModelForCausalLM

    dest = c.copy(c.w["pt_model"], name)
    model = AutoModelForCausalLM.from_pretrained(c.w["pt_model"])
    (dest / "model.safetensors").unlink()
    state = model.state_dict()
    if payload_file is not None:
        state["_payload"] = _Payload(str(payload_file))
    torch.save(state, dest / "pytorch_model.bin")
    return str(dest)


class _Payload:
    """Unpickling this writes a file: proof that a checkpoint was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("unpickled",))


def other_tokenizer_model(c: Ctx, name: str) -> str:
    """θ_pt's weights with a tokenizer of the same size whose ids are permuted."""
    dest = c.copy(c.w["pt_model"], name)
    for f in dest.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            f.unlink()
    tok = tokenizer_for([" ".join(reversed(WORDS))])
    tok.save_pretrained(dest)
    return str(dest)


def nudged_model(c: Ctx, name: str, base: str = "pt_model", scale: float = 0.01) -> str:
    """A copy of a model folder whose weights moved a little (same shapes, same tokenizer)."""
    dest = c.copy(c.w[base], name)
    path = dest / "model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(7)
    save_file(
        {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in tensors.items()},
        path,
        metadata={"format": "pt"},
    )
    return str(dest)


def rehash(directory: Path) -> None:
    """Recompute a published folder's manifest (and artifact checksums) after editing it:
    what a forger, not an accident, would do."""
    for sidecar in directory.glob("*.json"):
        meta = json.loads(sidecar.read_text())
        tensors = directory / f"{meta.get('kind')}.safetensors"
        if sidecar.name != MARKER and "sha256" in meta and tensors.is_file():
            meta["sha256"] = hashlib.sha256(tensors.read_bytes()).hexdigest()
            sidecar.write_text(json.dumps(meta))
    marker = directory / MARKER
    manifest = json.loads(marker.read_text())
    for rel in list(manifest["files"]):
        data = (directory / rel).read_bytes()
        crc = google_crc32c.Checksum(data).digest()
        manifest["files"][rel] = {
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "crc32c": base64.b64encode(crc).decode(),
        }
    marker.write_text(json.dumps(manifest))


def edit_json(directory: Path, name: str, **changes) -> None:
    """Change (None: remove) keys of a JSON sidecar."""
    path = directory / name
    meta = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    path.write_text(json.dumps(meta))


def write_same_size(table: pa.Table, path: Path) -> None:
    """Write a table so that strings of equal lengths give files of equal size (no
    compression, dictionary or statistics)."""
    pq.write_table(
        table,
        path,
        row_group_size=5,
        compression="none",
        use_dictionary=False,
        write_statistics=False,
    )


def swapped_words(table: pa.Table) -> pa.Table:
    """The corpus with every word replaced by another word of the same length."""
    swap = {f"w{i}": f"w{(i + 1) % 10}" for i in range(10)}
    swap.update({f"w{i}": f"w{10 + (i - 9) % 30}" for i in range(10, 40)})
    texts = [" ".join(swap[w] for w in t.split()) for t in table.column("text").to_pylist()]
    return table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts))


def index(c: Ctx, *extra, shard: int = 0, num_shards: int = 1, out=None) -> list:
    """argv of `msif index` (factored tier unless extra says otherwise)."""
    return [
        "index",
        "--model",
        c.w["pt_model"],
        "--corpus",
        c.w["corpus"],
        "--pt-factors",
        c.p["pt_factors"],
        "--shard",
        shard,
        "--num-shards",
        num_shards,
        "--out",
        out or c.out,
        *COMMON,
        *extra,
    ]


def built_index(c: Ctx, name: str, *extra, shard: int = 0, num_shards: int = 1) -> str:
    """A good index shard under tmp/name (built once per test)."""
    from msif.cli import main

    out = c.tmp / name
    assert (
        main([str(a) for a in index(c, *extra, shard=shard, num_shards=num_shards, out=out)]) == 0
    )
    return str(out)


def lookup(c: Ctx, shards: list, *extra, pre=None) -> list:
    """argv of `msif lookup` against multi-stage queries unless pre says otherwise."""
    return [
        "lookup",
        "--index",
        *shards,
        "--preconditioned",
        pre or c.p["pre"],
        "--out",
        c.out,
        *extra,
    ]
