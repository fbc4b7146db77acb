"""Model positions, tokenizer identity and one-line refusals of models msif cannot load safely."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from msif.data.examples import document_example
from msif.data.models import (
    effective_max_length,
    load_model,
    position_limit,
    tokenizer_fingerprint,
    tokenizer_identity,
)
from msif.errors import MismatchError, MsifError
from tests.support.mini_world import tokenizer_for
from tests.support.tiny import tiny_model

TEXTS = ["w1 w2 w3 w4", "w2 w3 w5 w6 w7"]


@pytest.mark.parametrize(("arch", "limit"), [("gpt2", 64), ("gpt_neox", 64), ("llama", 64)])
def test_position_limit_and_clamp(arch, limit, caplog):
    model = tiny_model(arch, dtype=torch.float32)
    assert position_limit(model) == limit and position_limit(model.config) == limit
    with caplog.at_level(logging.INFO, logger="msif"):
        assert effective_max_length(model, 32) == 32
        assert not caplog.records
        assert effective_max_length(model, 512) == limit
    assert [r.getMessage() for r in caplog.records] == [
        f"--max-length 512 exceeds the model's {limit} positions: using {limit}"
    ]
    # A 512-token document cut to the clamped length runs; uncut, learned positions break.
    ids = document_example("d", [1 + i % 20 for i in range(512)], effective_max_length(model, 512))
    with torch.no_grad():
        model(torch.tensor([ids.input_ids]))
    if arch == "gpt2":
        with pytest.raises(IndexError), torch.no_grad():
            model(torch.tensor([[1] * 512]))


def test_a_model_without_a_position_field_is_not_clamped():
    model = tiny_model("bloom", dtype=torch.float32)  # ALiBi: no position table
    assert position_limit(model) is None and effective_max_length(model, 4096) == 4096


def _word_tokenizer(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def test_tokenizer_fingerprint_tells_vocabularies_apart(tmp_path):
    words = ["[UNK]", "[EOS]", "a", "b", "c"]
    tok = _word_tokenizer({w: i for i, w in enumerate(words)})
    fp = tokenizer_fingerprint(tok)
    tok.save_pretrained(tmp_path / "tok")
    assert tokenizer_fingerprint(PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")) == fp
    swapped = _word_tokenizer({w: i for i, w in enumerate(["[UNK]", "[EOS]", "b", "a", "c"])})
    assert len(swapped) == len(tok) and tokenizer_fingerprint(swapped) != fp
    renamed = _word_tokenizer({w: i for i, w in enumerate(["[UNK]", "[EOS]", "a", "b", "d"])})
    assert tokenizer_fingerprint(renamed) != fp
    extra = _word_tokenizer({w: i for i, w in enumerate(words)})
    extra.add_special_tokens({"additional_special_tokens": ["[SEP]"]})
    assert tokenizer_fingerprint(extra) != fp
    padded = _word_tokenizer({w: i for i, w in enumerate(words)})
    padded.pad_token = padded.eos_token  # padded positions are masked: same identity
    assert tokenizer_fingerprint(padded) == fp
    # A fine-tune that appended tokens keeps its base's identity over the base's ids.
    assert tokenizer_fingerprint(extra, len(tok)) == fp
    assert tokenizer_fingerprint(swapped, len(tok)) != fp


def test_the_fine_tune_tokenizer_may_append_tokens_but_not_change_any(tmp_path):
    from msif.nodes.runtime import check_tokenizer

    words = ["[UNK]", "[EOS]", "a", "b", "c"]
    base = _word_tokenizer({w: i for i, w in enumerate(words)})
    recorded = tokenizer_identity(base)
    chat = _word_tokenizer({w: i for i, w in enumerate(words)})
    chat.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    check_tokenizer(recorded, base, "the factors")
    check_tokenizer(recorded, chat, "the factors", extends=True)
    with pytest.raises(MismatchError, match="the factors used a tokenizer with another vocab"):
        check_tokenizer(recorded, chat, "the factors")  # the same model must be the same
    swapped = _word_tokenizer({w: i for i, w in enumerate(["[UNK]", "[EOS]", "b", "a", "c"])})
    swapped.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    with pytest.raises(MismatchError, match="may only append tokens"):
        check_tokenizer(recorded, swapped, "the factors", extends=True)
    with pytest.raises(MismatchError):
        check_tokenizer(tokenizer_identity(chat), base, "the queries", extends=True)


# ----------------------------------------------------------------------------- load_model


def _save(path: Path, arch: str = "gpt_neox", vocab: int = 29, **changes) -> Path:
    model = tiny_model(arch, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer_for(TEXTS).save_pretrained(path)
    if changes:
        config = json.loads((path / "config.json").read_text()) | changes
        (path / "config.json").write_text(json.dumps(config))
    return path


class _Trap:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("models") / "good")


def test_a_good_model_loads(good):
    model, tokenizer = load_model(str(good), device="cpu")
    assert not model.training and len(tokenizer) == len(tokenizer_for(TEXTS))


def _pickle_only(tmp_path: Path, good: Path) -> Path:
    path = tmp_path / "pickled"
    shutil.copytree(good, path)
    state = load_model(str(good), device="cpu")[0].state_dict()
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    (path / "training_args.bin").write_bytes(pickle.dumps(_Trap(tmp_path / "unpickled")))
    return path


def test_a_pickle_only_checkpoint_is_refused_with_how_to_convert(tmp_path, good):
    path = _pickle_only(tmp_path, good)
    with pytest.raises(MsifError) as err:
        load_model(str(path), device="cpu")
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"cannot load a causal LM from {path}: ")
    assert "only a pickle checkpoint (pytorch_model.bin)" in text
    assert "save_pretrained(NEW_DIR, safe_serialization=True)" in text


def test_a_pickle_beside_safetensors_is_never_unpickled(tmp_path, good):
    path = tmp_path / "both"
    shutil.copytree(good, path)
    marker = tmp_path / "unpickled"
    for name in ("pytorch_model.bin", "training_args.bin"):
        (path / name).write_bytes(pickle.dumps(_Trap(marker)))
    load_model(str(path), device="cpu")
    assert not marker.exists()
    pickle.loads((path / "pytorch_model.bin").read_bytes())  # the trap works
    assert marker.exists()


def _truncated(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _garbage_weights(path: Path) -> None:
    (path / "model.safetensors").write_bytes(b"\xff" * 4096)


def _tiny_header(path: Path) -> None:
    (path / "model.safetensors").write_bytes(b"\x05\0\0\0")


def _bad_json_header(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:8] + b"#" + data[9:])


def _config(text: str):
    return lambda path: (path / "config.json").write_text(text)


def _no_tokenizer(path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()


def _broken_tokenizer(path: Path) -> None:
    (path / "tokenizer.json").write_text("{not json")


def _other_architecture(path: Path) -> None:
    other = path.parent / f"{path.name}-gpt2"
    _save(other, "gpt2")
    shutil.copy(other / "model.safetensors", path / "model.safetensors")


def _wider_config(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"hidden_size": 32}))


def _fewer_layers(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1}))


LOAD = "cannot load a causal LM from {path}: "
TOK = "cannot load a tokenizer from {path}: "
BROKEN = {
    "truncated safetensors": (_truncated, LOAD + "its safetensors file is damaged or truncated"),
    "garbage safetensors": (_garbage_weights, LOAD + "its safetensors file is damaged"),
    "4-byte safetensors": (_tiny_header, LOAD + "its safetensors file is damaged"),
    "bad safetensors header": (_bad_json_header, LOAD + "its safetensors file is damaged"),
    "config not JSON": (
        _config("{not json"),
        LOAD + "config.json is not valid JSON (Expecting property name enclosed in double quotes",
    ),
    "config a list": (_config("[1, 2]"), LOAD + "config.json holds a list, not a JSON object"),
    "config not UTF-8": (
        lambda path: (path / "config.json").write_bytes(b'{"a": "\xff"}'),
        LOAD + "config.json cannot be read",
    ),
    "config without model_type": (_config("{}"), LOAD + "Unrecognized model in … `model_type`"),
    "config unknown type": (
        _config('{"model_type": "nonsense"}'),
        LOAD + " … model type `nonsense`",
    ),
    "config wrong type": (
        _config('{"model_type": "gpt_neox", "hidden_size": "wide"}'),
        LOAD + "Validation error for field 'hidden_size': TypeError",
    ),
    "no tokenizer files": (_no_tokenizer, TOK + "none of its files"),
    "tokenizer not JSON": (_broken_tokenizer, TOK + "Expecting property name"),
    "weights of another architecture": (
        _other_architecture,
        LOAD + "the checkpoint lacks 28 weight(s) the architecture in config.json needs",
    ),
    "config wider than the weights": (
        _wider_config,
        LOAD + "weight gpt_neox.embed_in.weight has shape [29, 16] in the checkpoint but "
        "[29, 32] in config.json",
    ),
    "config with fewer layers": (
        _fewer_layers,
        LOAD + "the checkpoint holds 12 weight(s) the architecture in config.json has no place",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_model_directories_give_one_line(case, tmp_path, good, capsys):
    damage, message = BROKEN[case]
    path = tmp_path / "model"
    shutil.copytree(good, path)
    damage(path)
    with pytest.raises(MsifError) as err:
        load_model(str(path), device="cpu")
    text = str(err.value)
    assert type(err.value) is MsifError and "\n" not in text
    parts = message.format(path=path).split(" … ")
    assert text.startswith(parts[0]) and all(part in text for part in parts[1:])
    assert "LOAD REPORT" not in capsys.readouterr().err
