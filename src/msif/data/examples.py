"""Tokenisation of documents and prompt/completion rows into padded, masked batches."""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from msif.core.loss import IGNORE
from msif.errors import DataError, MismatchError

log = logging.getLogger("msif")


@dataclass
class Example:
    """One tokenised sequence: ids and the labels that score it (IGNORE = not scored)."""

    id: str
    input_ids: list[int]
    labels: list[int]


def pad_id_of(tokenizer) -> int:
    """The tokenizer's padding id (its eos id, else 0, when it has none)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return 0 if pad is None else int(pad)


EOS_MODES = ("auto", "on", "off")
_PROBE = "msif probe"


def appends_eos(tokenizer) -> bool:
    """Whether the tokenizer ends what it encodes with its EOS token itself.

    True when it says so (`add_eos_token`, as Llama and Gemma tokenizers have) or when its
    post-processor does it: a probe text encoded with special tokens ends with EOS and
    encoded without them does not.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return False
    if getattr(tokenizer, "add_eos_token", False) is True:
        return True
    with_special = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    without = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[-1] == eos and (not without or without[-1] != eos)


def eos_to_append(tokenizer, mode: str) -> int | None:
    """The token that ends every document and completion msif tokenises, or None.

    on: the tokenizer's EOS (DataError if it has none); off: none (and documents lose the
    EOS a tokenizer appends itself); auto: its EOS when the tokenizer appends EOS itself
    (`appends_eos`), else none: documents end as the tokenizer's own encoding ends them, and
    completions, encoded without special tokens, end alike. Pre-tokenised `input_ids` and
    chat rows (whose template writes the end of each turn) are left as they are.
    """
    if mode not in EOS_MODES:
        raise DataError(f"--append-eos {mode!r} is not one of {', '.join(EOS_MODES)}")
    if mode == "off":
        return None
    eos = getattr(tokenizer, "eos_token_id", None)
    if mode == "on":
        if eos is None:
            raise DataError("--append-eos on: the tokenizer has no EOS token")
        return int(eos)
    return int(eos) if appends_eos(tokenizer) else None


def _ended(ids: list[int], eos_id: int | None) -> list[int]:
    return ids + [eos_id] if eos_id is not None and (not ids or ids[-1] != eos_id) else ids


def _token_ids(row_id: str, values: Sequence[int]) -> list[int]:
    # operator.index, not int(): a float id would be truncated into another token.
    try:
        return [operator.index(x) for x in values]
    except TypeError:
        bad = next(x for x in values if not hasattr(x, "__index__"))
        raise DataError(f"row {row_id!r} has token id {bad!r}, which is not an integer") from None


def _text(row_id: str, column: str, value) -> str:
    # str() would tokenise the repr of a list or a float as if it were text.
    if not isinstance(value, str):
        what = "null" if value is None else f"a {type(value).__name__}, not a string"
        raise DataError(f"row {row_id!r}: {column} is {what}")
    return value


def document_example(doc_id: str, input_ids: Sequence[int], max_length: int) -> Example:
    """A pre-training document: every token scored; long documents keep their first tokens."""
    ids = _token_ids(doc_id, input_ids)
    if len(ids) < 2:
        raise DataError(f"document {doc_id!r} has {len(ids)} token(s); at least 2 are needed")
    if len(ids) > max_length:
        ids = ids[:max_length]
    return Example(doc_id, ids, list(ids))


def prompt_completion_example(
    row_id: str, prompt_ids: Sequence[int], completion_ids: Sequence[int], max_length: int
) -> Example:
    """Prompt tokens masked, completion tokens scored; over-long prompts lose their start."""
    p, c = _token_ids(row_id, prompt_ids), _token_ids(row_id, completion_ids)
    if not c:
        raise DataError(f"row {row_id!r} has an empty completion: nothing to score")
    if len(c) >= max_length:
        raise DataError(
            f"row {row_id!r}: completion has {len(c)} tokens, max length is {max_length}"
        )
    p = p[-(max_length - len(c)) :]
    if not p:
        raise DataError(
            f"row {row_id!r} has an empty prompt: the first completion token "
            "would have nothing to be predicted from"
        )
    return Example(row_id, p + c, [IGNORE] * len(p) + c)


def tokenize_documents(
    tokenizer,
    ids: Sequence[str],
    texts: Sequence[str],
    max_length: int,
    *,
    eos_id: int | None = None,
    strip_eos: bool = False,
    column: str = "text",
) -> list[Example]:
    """Tokenise pre-training documents (`id`, `text`) with the tokenizer's special tokens.

    eos_id: end each document with it (unless the tokenizer already did); strip_eos: remove
    the EOS a tokenizer that appends one put there (`--append-eos off`). An EOS is scored
    like every other token of a document.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    strip = strip_eos and appends_eos(tokenizer)
    out = []
    for doc_id, text in zip(ids, texts, strict=True):
        if not _text(doc_id, column, text).strip():
            raise DataError(f"document {doc_id!r} is empty")
        enc = list(tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])
        if strip and enc and enc[-1] == eos:
            enc = enc[:-1]
        enc = _ended(enc, eos_id)
        if len(enc) > max_length:
            log.debug("document %s truncated from %d to %d tokens", doc_id, len(enc), max_length)
        out.append(document_example(doc_id, enc, max_length))
    return out


def tokenize_prompt_completion(
    tokenizer,
    ids: Sequence[str],
    prompts: Sequence[str],
    completions: Sequence[str],
    max_length: int,
    *,
    eos_id: int | None = None,
    columns: tuple[str, str] = ("prompt", "completion"),
) -> list[Example]:
    """Tokenise (`prompt`, `completion`) rows; the boundary is exact as each is encoded alone.

    The prompt is encoded with special tokens (a BOS), less the EOS a tokenizer that appends
    one would end it with: the completion follows it. A non-empty completion is ended with
    eos_id when given; that EOS is scored, as the completion's last token.
    """
    strip = appends_eos(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    for row_id, prompt, completion in zip(ids, prompts, completions, strict=True):
        prompt_text = _text(row_id, columns[0], prompt)
        completion_text = _text(row_id, columns[1], completion)
        p = list(tokenizer(prompt_text, add_special_tokens=True)["input_ids"])
        if strip and p and p[-1] == eos:
            p = p[:-1]
        c = list(tokenizer(completion_text, add_special_tokens=False)["input_ids"])
        out.append(prompt_completion_example(row_id, p, _ended(c, eos_id) if c else c, max_length))
    return out


def collate(examples: Sequence[Example], pad_id: int) -> dict:
    """Right-pad examples into a batch with input_ids, attention_mask, labels and ids."""
    length = max(len(e.input_ids) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        input_ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        mask[i, :k] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "ids": [e.id for e in examples],
    }


def batches(examples: Iterable[Example], batch_size: int, pad_id: int = 0) -> Iterator[dict]:
    """Group examples into collated batches of at most batch_size."""
    chunk: list[Example] = []
    for e in examples:
        chunk.append(e)
        if len(chunk) == batch_size:
            yield collate(chunk, pad_id)
            chunk = []
    if chunk:
        yield collate(chunk, pad_id)


def check_tokenizer(tokenizer, model) -> None:
    """Refuse a tokenizer whose ids the model's embedding cannot hold."""
    vocab = model.get_input_embeddings().num_embeddings
    size = len(tokenizer)
    if size > vocab:
        raise MismatchError(
            f"tokenizer has {size} tokens but the model's embedding holds {vocab}: "
            "they do not belong together"
        )


def check_ids(examples: Iterable[Example], vocab: int) -> None:
    """Refuse pre-tokenised input_ids outside the model's vocabulary."""
    for e in examples:
        bad = [t for t in e.input_ids if t < 0 or t >= vocab]
        if bad:
            raise MismatchError(
                f"row {e.id!r} has token id {bad[0]} outside the model's vocabulary of {vocab}"
            )
