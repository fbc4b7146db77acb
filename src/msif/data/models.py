"""Loading a user's model and tokenizer (local dir or gs:// prefix) through from_pretrained.

A model is a save_pretrained folder or a PEFT adapter folder (LoRA and the like), which is
merged into its base (msif.data.adapters). Nothing here unpickles: weights are read from
safetensors only (a folder with nothing but a pickle checkpoint is refused with how to
convert it), and every failure to load is one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from msif.core.device import resolve_device
from msif.data.examples import check_tokenizer
from msif.errors import MsifError

log = logging.getLogger("msif")
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "float16": torch.float16,
}
# Config fields that bound a sequence's length (learned positions, or the trained context).
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# What a Trainer saves beside a checkpoint: pickles too, but not the model's weights.
TRAINER_FILES = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"}
# A fixed text whose encoding shows how a tokenizer splits, normalises and adds special tokens.
_PROBE = "The quick brown fox, 12345 — naïve CAFÉ!\n\ttabs  and  spaces"


def position_limit(model) -> int | None:
    """The most positions a model (or its config) takes; None when its config names none."""
    config = getattr(model, "config", model)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def effective_max_length(model, max_length: int) -> int:
    """max_length, clamped to the model's positions (logged once per call when it clamps)."""
    limit = position_limit(model)
    if limit is None or max_length <= limit:
        return max_length
    log.info("--max-length %d exceeds the model's %d positions: using %d", max_length, limit, limit)
    return limit


def tokenizer_fingerprint(tokenizer, size: int | None = None) -> str:
    """A hash of a tokenizer's identity: its vocabulary and how it encodes text.

    It covers every token → id (added and special tokens included), which ids are special,
    and the ids of a fixed probe text (splitting, normalisation, BOS/EOS insertion). The pad
    token is not part of it: padded positions are masked. With size, only ids below it
    count, so a fine-tune's tokenizer that appended tokens can be compared with its base's.
    """
    size = len(tokenizer) if size is None else size
    vocab = sorted((i, t) for t, i in tokenizer.get_vocab().items() if i < size)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = sorted(
        int(i) for i, tok in added.items() if getattr(tok, "special", False) and int(i) < size
    )
    probe = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
    doc = json.dumps({"vocab": vocab, "special": special, "probe": probe})
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def tokenizer_identity(tokenizer) -> dict:
    """What artifacts record of the tokenizer they were made with: its size and fingerprint."""
    return {"size": len(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer)}


def load_model(
    uri: str,
    *,
    device: str = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    base_model: str | None = None,
):
    """(model in eval mode, tokenizer) from a save_pretrained directory or gs:// prefix.

    Weights come from safetensors only; a checkpoint whose tensors do not match its config
    (missing, unexpected or differently shaped weights) is refused rather than filled in
    with random values.

    A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) is loaded onto
    its base and merged: the model returned is the base's architecture, with the base's
    module names, and θ_pt + ΔW on the adapted modules. The base is base_model when given
    (a folder or gs:// prefix), else the adapter config's base_model_name_or_path when that
    is a local folder or a gs:// URI; the tokenizer is the adapter folder's if it has one,
    else the base's. base_model is not used for a full model.
    """
    from transformers.utils import logging as hf_logging

    from msif.data.adapters import is_adapter_dir
    from msif.storage.cache import fetch_model_dir

    hf_logging.disable_progress_bar()  # one bar per node is ours; theirs per load is noise

    if dtype not in DTYPES:
        raise MsifError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    path = fetch_model_dir(uri)
    if is_adapter_dir(path):
        model, tokenizer = _load_adapter_model(
            path, uri, base_model, DTYPES[dtype], trust_remote_code
        )
    else:
        if base_model:
            log.debug("%s is a full model: base model %s not used", uri, base_model)
        _check_config(path, uri)
        _refuse_pickle_only(path, uri)
        model = _load_causal_lm(path, uri, DTYPES[dtype], trust_remote_code)
        tokenizer = _load_tokenizer(path, uri, trust_remote_code)
    model.to(resolve_device(device)).eval()
    check_tokenizer(tokenizer, model)
    log.info(
        "loaded %s (%s, %d parameters)", uri, dtype, sum(p.numel() for p in model.parameters())
    )
    return model, tokenizer


def _load_adapter_model(
    path: Path, uri: str, base_model: str | None, dtype: torch.dtype, trust_remote_code: bool
):
    """(merged model, tokenizer) of a PEFT adapter folder and its base."""
    from msif.data import adapters

    adapter = adapters.read_adapter(path, uri)
    base_uri, base_path = adapters.resolve_base(adapter, base_model)
    where = f"{base_uri} (the base of PEFT adapter {uri})"
    _check_config(base_path, where)
    _refuse_pickle_only(base_path, where)
    # Merged in float32 (float64 when asked for), rounded to dtype once, after the merge.
    base = _load_causal_lm(base_path, where, adapters.merge_dtype(dtype), trust_remote_code)
    model = _cast_parameters(adapters.merge(base, adapter, base_uri), dtype)
    if adapters.has_tokenizer(path):
        tokenizer = _load_tokenizer(path, uri, trust_remote_code)
    else:
        tokenizer = _load_tokenizer(base_path, where, trust_remote_code)
    log.info("merged PEFT adapter %s into its base %s", uri, base_uri)
    return model, tokenizer


def _cast_parameters(model, dtype: torch.dtype):
    """The weights in dtype as from_pretrained(dtype=...) leaves them: buffers (rotary
    frequencies) and modules the model keeps in float32 stay as they are."""
    if dtype == next(model.parameters()).dtype:
        return model
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    for name, p in model.named_parameters():
        if p.is_floating_point() and not keep & set(name.split(".")):
            p.data = p.data.to(dtype)
    model.config.dtype = dtype
    return model


def _check_config(path: Path, uri: str) -> None:
    # Both loaders read config.json; checked once here, its errors name it, not the tokenizer.
    where = f"cannot load a causal LM from {uri}: config.json"
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise MsifError(f"{where} cannot be read ({_first_line(e)})") from None
    except json.JSONDecodeError as e:
        raise MsifError(f"{where} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config, dict):
        raise MsifError(f"{where} holds a {type(config).__name__}, not a JSON object")


def _refuse_pickle_only(path: Path, uri: str) -> None:
    names = [p.name for p in sorted(path.iterdir()) if p.is_file()]
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        return
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES) and n not in TRAINER_FILES]
    if pickles:
        raise MsifError(
            f"cannot load a causal LM from {uri}: it holds only a pickle checkpoint "
            f"({pickles[0]}), which msif does not load because unpickling can run code; "
            "convert it once where you trust it: AutoModelForCausalLM.from_pretrained(DIR)"
            ".save_pretrained(NEW_DIR, safe_serialization=True) writes model.safetensors"
        )


def _load_tokenizer(path: Path, uri: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(
                str(path), trust_remote_code=trust_remote_code, local_files_only=True
            )
    except Exception as e:  # noqa: BLE001 - see _load_causal_lm
        raise MsifError(f"cannot load a tokenizer from {uri}: {_first_line(e)}") from None
    # Without its files AutoTokenizer quietly builds an empty tokenizer of the config's class.
    files = sorted(set(getattr(tokenizer, "vocab_files_names", {}).values()))
    if files and not any((path / f).is_file() for f in files):
        raise MsifError(
            f"cannot load a tokenizer from {uri}: none of its files ({', '.join(files)}) is there"
        )
    return tokenizer


def _load_causal_lm(path: Path, uri: str, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(path),
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                use_safetensors=True,
                local_files_only=True,
                ignore_mismatched_sizes=True,  # reported in info, and refused below
                output_loading_info=True,
            )
    # Only the user's files are read here, and what from_pretrained raises for bad ones is an
    # open set (SafetensorError, hub config validation, OSError, ValueError, RuntimeError...):
    # every one of them means "this directory is not a loadable model".
    except Exception as e:  # noqa: BLE001
        raise MsifError(f"cannot load a causal LM from {uri}: {_describe_load_error(e)}") from None
    _check_loading_info(info, uri)
    return model


def _check_loading_info(info: dict, uri: str) -> None:
    """Refuse weights that transformers would fill in or drop silently."""
    where = f"cannot load a causal LM from {uri}"
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: m[0])
    if mismatched:
        name, ckpt, want = mismatched[0]
        raise MsifError(
            f"{where}: weight {name} has shape {list(ckpt)} in the checkpoint but "
            f"{list(want)} in config.json ({len(mismatched)} weight(s) differ)"
        )
    for key, what in (
        ("missing_keys", "lacks {n} weight(s) the architecture in config.json needs"),
        ("unexpected_keys", "holds {n} weight(s) the architecture in config.json has no place for"),
    ):
        names = sorted(info.get(key) or [])
        if names:
            detail = what.format(n=len(names))
            raise MsifError(f"{where}: the checkpoint {detail} (first: {names[0]})")


@contextmanager
def _quiet_transformers():
    # Loading reports (tables of keys) are logged as warnings; msif raises one line instead.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _describe_load_error(e: Exception) -> str:
    if type(e).__name__ == "SafetensorError":
        return f"its safetensors file is damaged or truncated ({_first_line(e)})"
    return _first_line(e)


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    # "Validation error for field 'x':" says what only on its next line.
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
