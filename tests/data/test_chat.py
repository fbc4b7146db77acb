"""Chat rows: the tokenizer's chat template renders them and only assistant tokens are scored,
checked against masks built by hand; templates msif cannot split are refused in one line."""

from __future__ import annotations

import pyarrow as pa
import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from msif.core.loss import IGNORE
from msif.data.chat import chat_example, conversation, query_text
from msif.data.sources import open_source
from msif.data.tables import TableOptions, iter_examples, read_queries, table_kind
from msif.errors import DataError
from tests.data.formats import every_format, write_jsonl

SPECIAL = ["[PAD]", "[UNK]", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = [f"w{i}" for i in range(20)]
# A template in the style of ChatML: each turn `<|role|> content <|end|>` and a newline.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
S, U, A, E, NL = 3, 4, 5, 6, 7  # <|system|> <|user|> <|assistant|> <|end|> \n


def w(i: int) -> int:
    """The id of word w<i>."""
    return 8 + i


def chat_tokenizer(template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    """Word-level tokenizer with role tokens and a newline token, and a chat template."""
    vocab = {t: i for i, t in enumerate([*SPECIAL, "\n", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>"
    )
    out.add_special_tokens({"additional_special_tokens": SPECIAL[3:]})
    out.add_tokens([AddedToken("\n", normalized=False, special=False)])
    out.chat_template = template
    return out


TOK = chat_tokenizer()
CONVERSATION = [
    {"role": "system", "content": "w0"},
    {"role": "user", "content": "w1 w2"},
    {"role": "assistant", "content": "w3 w4"},
    {"role": "user", "content": "w5"},
    {"role": "assistant", "content": "w6"},
]
# Built by hand from TEMPLATE: the sequence ends with the last assistant turn's <|end|>.
IDS = [S, w(0), E, NL, U, w(1), w(2), E, NL, A, w(3), w(4), E, NL, U, w(5), E, NL, A, w(6), E]
FIRST_TURN = {10: w(3), 11: w(4), 12: E}  # content and end-of-turn, not the newline after
LAST_TURN = {19: w(6), 20: E}


def _labels(scored: dict[int, int]) -> list[int]:
    return [scored.get(i, IGNORE) for i in range(len(IDS))]


def test_fine_tune_rows_score_every_assistant_turn():
    example = chat_example(TOK, "c", conversation("c", CONVERSATION), 64)
    assert example.input_ids == IDS
    assert example.labels == _labels({**FIRST_TURN, **LAST_TURN})


def test_queries_score_only_their_last_assistant_turn():
    example = chat_example(TOK, "q", conversation("q", CONVERSATION), 64, last_only=True)
    assert example.input_ids == IDS
    assert example.labels == _labels(LAST_TURN)
    assert query_text(conversation("q", CONVERSATION)) == (
        "system: w0\nuser: w1 w2\nassistant: w3 w4\nuser: w5",
        "w6",
    )


def test_messages_after_the_last_assistant_turn_are_left_out():
    trailing = [*CONVERSATION, {"role": "user", "content": "w7 w8"}]
    example = chat_example(TOK, "c", conversation("c", trailing), 64)
    assert example.input_ids == IDS


def test_too_long_conversations_lose_their_beginning():
    example = chat_example(TOK, "c", conversation("c", CONVERSATION), 8)
    assert example.input_ids == IDS[-8:]
    want = _labels({**FIRST_TURN, **LAST_TURN})[-8:]
    want[0] = IGNORE
    assert example.labels == want
    with pytest.raises(DataError) as err:
        chat_example(TOK, "c", conversation("c", CONVERSATION), 2)
    assert str(err.value) == "row 'c': its last assistant turn has 2 tokens, max length is 2"


BAD = {
    "a string": ("[{'role': 'user'}]", "row 'r': `messages` is a str, not a list of messages"),
    "empty": ([], "row 'r': `messages` is an empty list: nothing to score"),
    "a message not a dict": (["hi"], "row 'r': message 0 is a str, not a {role, content}"),
    "unknown role": (
        [{"role": "human", "content": "w1"}, {"role": "assistant", "content": "w2"}],
        "row 'r': message 0 has role 'human'; expected one of system, user, assistant, tool",
    ),
    "no role": ([{"content": "w1"}], "row 'r': message 0 has no role; expected one of"),
    "null content": (
        [{"role": "user", "content": None}],
        "row 'r': message 0 (user) has no content, not a string",
    ),
    "list content": (
        [{"role": "user", "content": [{"type": "text", "text": "w1"}]}],
        "row 'r': message 0 (user) has a list as content, not a string",
    ),
    "no assistant turn": (
        [{"role": "user", "content": "w1"}],
        "row 'r': `messages` has no assistant turn: nothing to score",
    ),
    "empty assistant turn": (
        [{"role": "user", "content": "w1"}, {"role": "assistant", "content": " "}],
        "row 'r': message 1 (assistant) is empty: nothing to score",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_conversations_are_one_line(case):
    value, message = BAD[case]
    with pytest.raises(DataError) as err:
        conversation("r", value)
    assert "\n" not in str(err.value) and str(err.value).startswith(message)


def test_templates_msif_cannot_split_are_refused():
    # The last message is rendered differently from the same message followed by more.
    marked = TEMPLATE.replace(
        "{% for m in messages %}", "{% for m in messages %}{% if loop.last %}w19 {% endif %}"
    )
    with pytest.raises(DataError) as err:
        chat_example(chat_tokenizer(marked), "c", conversation("c", CONVERSATION), 64)
    assert str(err.value) == (
        "row 'c': the chat template does not render this conversation turn by turn (the tokens "
        "up to message 2 are not a prefix of the whole rendering), so msif cannot tell which "
        "tokens the assistant wrote"
    )
    strict = (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ raise_exception('a system turn first') }}{% endif %}" + TEMPLATE
    )
    with pytest.raises(DataError) as err:
        chat_example(chat_tokenizer(strict), "c", conversation("c", CONVERSATION[1:]), 64)
    assert str(err.value) == (
        "row 'c': the chat template refused this conversation (a system turn first)"
    )


def test_a_tokenizer_without_a_chat_template_is_refused(tmp_path):
    uri = write_jsonl([{"messages": CONVERSATION}], tmp_path / "chat.jsonl")
    source = open_source(uri)
    opts = TableOptions(max_length=64)
    assert table_kind(source.schema, uri, opts) == "chat"
    with pytest.raises(DataError) as err:
        next(iter_examples(source, chat_tokenizer(None), "chat", opts, 99))
    assert str(err.value) == (
        f"{uri} holds chat conversations, but the tokenizer has no chat template to render them "
        "with (give prompt/completion columns, or a tokenizer with a chat_template)"
    )


def test_chat_tables_in_every_format(tmp_path):
    table = pa.table(
        {
            "conv": [CONVERSATION, CONVERSATION[:3]],
            "qid": ["a", "b"],
            "relevant_ids": [["doc-1"], []],
        }
    )
    opts = TableOptions(max_length=64, messages_column="conv", id_column="qid", batch_rows=1)
    for fmt, uri in every_format(table, tmp_path).items():
        source = open_source(uri)
        assert table_kind(source.schema, uri, opts) == "chat", fmt
        got = list(iter_examples(source, TOK, "chat", opts, len(TOK)))
        assert [e.id for e in got] == ["a", "b"]
        assert got[0].labels == _labels({**FIRST_TURN, **LAST_TURN})
        assert got[1].input_ids == IDS[:13] and got[1].labels == _labels(FIRST_TURN)[:13]
        queries = read_queries(uri, opts)
        assert queries.kind == "chat" and queries.ids == ["a", "b"]
        (first, second) = queries.examples(TOK, 64)
        assert first.labels == _labels(LAST_TURN) and second.labels == _labels(FIRST_TURN)[:13]
        assert queries.view().column("completion").to_pylist() == ["w6", "w3 w4"]


def test_bad_chat_cells_name_the_row(tmp_path):
    rows = [{"messages": CONVERSATION}, {"messages": [{"role": "bot", "content": "w1"}]}]
    uri = write_jsonl(rows, tmp_path / "chat.jsonl")
    source = open_source(uri)
    with pytest.raises(DataError) as err:
        list(iter_examples(source, TOK, "chat", TableOptions(max_length=64), 99))
    assert str(err.value).startswith("row 'row-1': message 0 has role 'bot'")
    typed = write_jsonl([{"messages": "user: hi"}], tmp_path / "typed.jsonl")
    with pytest.raises(DataError) as err:
        table_kind(open_source(typed).schema, typed)
    assert str(err.value) == (
        f"{typed}: column `messages` is string; expected list of {{role, content}} strings"
    )
    null = write_jsonl([{"messages": CONVERSATION}, {"messages": None}], tmp_path / "null.jsonl")
    with pytest.raises(DataError) as err:
        list(iter_examples(open_source(null), TOK, "chat", TableOptions(max_length=64), 99))
    assert str(err.value) == f"{null} row 1: `messages` is null"
    with pytest.raises(DataError) as err:
        read_queries(uri)
    assert str(err.value).startswith("row 'row-1': message 0 has role 'bot'")
