"""Chat rows: `messages` lists rendered with the tokenizer's chat template, assistant turns scored.

A conversation is a list of `{"role", "content"}` messages (role system, user, assistant or
tool; other keys are handed to the template as they are). It is rendered with
`tokenizer.apply_chat_template` and encoded without further special tokens, as transformers
does for training. Which tokens an assistant turn owns is found by rendering prefixes:

- `before` = the messages up to that turn, with the generation prompt (the assistant header);
- `through` = the messages up to and including that turn;
- `full` = the whole conversation.

The tokens of `before` must be a prefix of those of `through`, and those of `through` a
prefix of `full`'s (a template that renders a turn differently once more follows, or whose
tokens merge across a turn boundary, is refused: the span would be a guess). The turn's
scored tokens are then `full[len(before):len(through)]` less trailing tokens that decode to
whitespace only: the assistant's content and the end-of-turn token the template puts after it
(`<|im_end|>`, `<|eot_id|>`, `</s>`, `<end_of_turn>`: the model learns to stop), but not the
newline some templates put between turns, which the model never generates.

Fine-tuning rows score every assistant turn (what supervised fine-tuning trains on). A query
scores only its last assistant turn: that is the answer asked about, and earlier turns (which
may not even be the model's) are context, like a prompt. The sequence ends with the last
scored token; messages after it change nothing a causal model computes before it.

Too long a conversation loses its beginning, as prompts do: the last assistant turn must fit
with at least one token before it, earlier scored tokens inside the window stay scored.
"""

from __future__ import annotations

from collections.abc import Sequence

from msif.core.loss import IGNORE
from msif.data.examples import Example, _token_ids
from msif.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


def require_chat_template(tokenizer, what: str) -> None:
    """DataError unless the tokenizer has a chat template to render conversations with."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{what} holds chat conversations, but the tokenizer has no chat template to render "
            "them with (give prompt/completion columns, or a tokenizer with a chat_template)"
        )


def conversation(row_id: str, value, column: str = "messages") -> list[dict]:
    """The checked messages of one row: a list of {role, content} with an assistant turn."""
    if not isinstance(value, list | tuple):
        what = "null" if value is None else f"a {type(value).__name__}"
        raise DataError(f"row {row_id!r}: `{column}` is {what}, not a list of messages")
    if not value:
        raise DataError(f"row {row_id!r}: `{column}` is an empty list: nothing to score")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            what = "null" if message is None else f"a {type(message).__name__}"
            raise DataError(f"row {row_id!r}: message {i} is {what}, not a {{role, content}}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            shown = "no role" if role is None else f"role {role!r}"
            raise DataError(
                f"row {row_id!r}: message {i} has {shown}; expected one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            what = "no content" if content is None else f"a {type(content).__name__} as content"
            raise DataError(f"row {row_id!r}: message {i} ({role}) has {what}, not a string")
        out.append({k: v for k, v in message.items() if v is not None})
    turns = [i for i, m in enumerate(out) if m["role"] == "assistant"]
    if not turns:
        raise DataError(f"row {row_id!r}: `{column}` has no assistant turn: nothing to score")
    for i in turns:
        if not out[i]["content"].strip():
            raise DataError(f"row {row_id!r}: message {i} (assistant) is empty: nothing to score")
    return out


def _render(tokenizer, messages: list[dict], row_id: str, generation: bool) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )
    except Exception as exc:  # jinja2's TemplateError, the template's raise_exception, ...
        lines = str(exc).strip().splitlines()
        detail = lines[0] if lines else type(exc).__name__
        raise DataError(
            f"row {row_id!r}: the chat template refused this conversation ({detail})"
        ) from None
    if not isinstance(text, str):
        raise DataError(f"row {row_id!r}: the chat template did not render text")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _is_prefix(short: Sequence[int], long: Sequence[int]) -> bool:
    return len(short) <= len(long) and list(long[: len(short)]) == list(short)


def _blank(tokenizer, token_id: int, special: set[int]) -> bool:
    return token_id not in special and not tokenizer.decode([token_id]).strip()


def assistant_spans(
    tokenizer, row_id: str, messages: list[dict], *, last_only: bool
) -> tuple[list[int], list[tuple[int, int]]]:
    """(token ids of the whole conversation, [start, stop) of each scored assistant turn)."""
    full = _render(tokenizer, messages, row_id, False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if last_only:
        turns = turns[-1:]
    special = {int(t) for t in getattr(tokenizer, "all_special_ids", [])}
    spans = []
    for i in turns:
        if i:
            before = _render(tokenizer, messages[:i], row_id, True)
        else:  # an opening assistant turn: the template may render nothing before it
            try:
                before = _render(tokenizer, [], row_id, True)
            except DataError:
                before = []
        through = _render(tokenizer, messages[: i + 1], row_id, False)
        if not (_is_prefix(before, through) and _is_prefix(through, full)):
            raise DataError(
                f"row {row_id!r}: the chat template does not render this conversation turn by "
                f"turn (the tokens up to message {i} are not a prefix of the whole rendering), "
                "so msif cannot tell which tokens the assistant wrote"
            )
        stop = len(through)
        while stop > len(before) and _blank(tokenizer, full[stop - 1], special):
            stop -= 1
        if stop <= len(before):
            raise DataError(f"row {row_id!r}: assistant message {i} renders to no tokens")
        spans.append((len(before), stop))
    return full, spans


def chat_example(
    tokenizer,
    row_id: str,
    messages: list[dict],
    max_length: int,
    *,
    last_only: bool = False,
) -> Example:
    """One conversation as a sequence whose labels are the scored assistant tokens only."""
    full, spans = assistant_spans(tokenizer, row_id, messages, last_only=last_only)
    end = spans[-1][1]
    ids = _token_ids(row_id, full[:end])
    labels = [IGNORE] * end
    for a, b in spans:
        labels[a:b] = ids[a:b]
    if end > max_length:
        cut = end - max_length
        last = spans[-1][0]
        if last <= cut:
            raise DataError(
                f"row {row_id!r}: its last assistant turn has {end - last} tokens, max length is "
                f"{max_length}"
            )
        ids, labels = ids[cut:], labels[cut:]
    labels[0] = IGNORE  # the first token is predicted from nothing
    if all(x == IGNORE for x in labels):
        raise DataError(
            f"row {row_id!r}: the first assistant token would have nothing to be predicted from"
        )
    return Example(row_id, ids, labels)


def chat_examples(
    tokenizer,
    ids: Sequence[str],
    values: Sequence,
    max_length: int,
    *,
    last_only: bool = False,
    column: str = "messages",
) -> list[Example]:
    """Chat rows as examples: every assistant turn scored, or only the last (queries)."""
    out = []
    for row_id, value in zip(ids, values, strict=True):
        messages = conversation(row_id, value, column)
        out.append(chat_example(tokenizer, row_id, messages, max_length, last_only=last_only))
    return out


def query_text(messages: list[dict]) -> tuple[str, str]:
    """(prompt, completion) as text for reports and BM25: the messages before the last
    assistant turn as `role: content` lines, and that turn's content."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages[:last])
    return prompt, messages[last]["content"]
