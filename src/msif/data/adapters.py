"""PEFT adapter folders (LoRA and the other mergeable tuners) as fine-tuned models.

Most fine-tunes are saved as an adapter: `adapter_config.json` and
`adapter_model.safetensors`, with the base model named in the config. msif loads the base,
puts the adapter into it with peft, merges it (`merge_and_unload`: θ_ft = θ_pt + ΔW on the
adapted modules) and hands on the plain transformers model that results, with the base's
module names and shapes, so that factors, fingerprints and scores line up with the
pre-train side (docs/design.md §1, "LoRA fine-tunes"). `msif.data.models.load_model` is the
entry point; this module reads, checks and merges. Nothing here unpickles.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from msif.errors import MismatchError, MsifError
from msif.storage.uri import NotFoundError, StorageError, is_remote, join

log = logging.getLogger("msif")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Files any tokenizer save_pretrained writes; one of them means the folder has its own.
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
# peft's key prefix of the wrapped model; dropped in messages, which name the base's modules.
_PREFIX = "base_model.model."
_ADVICE = "give the base model it was trained on with --base-model URI"


@dataclass
class Adapter:
    """A PEFT adapter folder, read and checked: its config and its weights."""

    uri: str
    path: Path
    config: object  # a peft PeftConfig subclass (LoraConfig, ...)
    weights: dict[str, torch.Tensor]

    @property
    def recorded_base(self) -> str | None:
        """base_model_name_or_path of adapter_config.json (often a hub id)."""
        return getattr(self.config, "base_model_name_or_path", None) or None


def is_adapter_dir(path: Path) -> bool:
    """Whether a local folder is a PEFT adapter (it has adapter_config.json)."""
    return (path / ADAPTER_CONFIG).is_file()


def has_tokenizer(path: Path) -> bool:
    """Whether an adapter folder carries its own tokenizer (else the base's is used)."""
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


def read_adapter(path: Path, uri: str) -> Adapter:
    """The adapter of a folder: config parsed, type mergeable, weights from safetensors only,
    undamaged and finite. Every failure is one line."""
    where = f"cannot load the PEFT adapter {uri}"
    _check_peft_type(_read_json(path / ADAPTER_CONFIG, where), where)
    weights_file = path / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        pickles = sorted(
            p.name for p in path.iterdir() if p.is_file() and p.name.endswith(_PICKLE_SUFFIXES)
        )
        if pickles:
            raise MsifError(
                f"{where}: it holds only a pickle adapter ({pickles[0]}), which msif does not "
                "load because unpickling can run code; convert it once where you trust it: "
                "PeftModel.from_pretrained(BASE, DIR).save_pretrained(NEW_DIR, "
                f"safe_serialization=True) writes {ADAPTER_WEIGHTS}"
            )
        raise MsifError(f"{where}: it has no {ADAPTER_WEIGHTS}")
    config = _peft_config(path, where)
    weights = _read_weights(weights_file, where)
    return Adapter(uri, path, config, weights)


def resolve_base(adapter: Adapter, base_model: str | None) -> tuple[str, Path]:
    """(URI, local folder) of the adapter's base: base_model when given, else the
    base_model_name_or_path of its config when that is a local folder or a gs:// URI."""
    from msif.storage.cache import fetch_model_dir

    recorded = adapter.recorded_base
    if base_model:
        uri, named = base_model, "given by --base-model"
        if recorded and recorded != base_model:
            log.info("%s: base %s (its config names %s)", adapter.uri, base_model, recorded)
    elif not recorded:
        raise MsifError(
            f"the PEFT adapter {adapter.uri} does not name its base (no base_model_name_or_path "
            f"in {ADAPTER_CONFIG}): {_ADVICE}"
        )
    elif is_remote(recorded) or Path(recorded).is_dir():
        uri, named = recorded, f"named in {ADAPTER_CONFIG}"
    elif recorded.startswith(("/", "./", "../", "~")):
        raise MsifError(
            f"the PEFT adapter {adapter.uri} names its base {recorded!r}, which is no folder "
            f"here (the adapter was saved elsewhere): {_ADVICE}"
        )
    else:
        raise MsifError(
            f"the PEFT adapter {adapter.uri} names its base {recorded!r}, which is no local folder "
            f"or gs:// URI (msif downloads nothing from the hub): {_ADVICE}"
        )
    try:
        path = fetch_model_dir(uri)
    except StorageError as e:
        hint = "" if base_model else f"; {_ADVICE}"
        raise MsifError(
            f"cannot read the base of PEFT adapter {adapter.uri} ({named}): {e}{hint}"
        ) from None
    if is_adapter_dir(path):
        raise MsifError(
            f"the base {uri} of PEFT adapter {adapter.uri} is itself an adapter: give the full "
            "model it was trained on (merge a stacked adapter into it first)"
        )
    return uri, path


def base_of(uri: str, base_model: str | None = None) -> str | None:
    """Without loading anything: when a model URI is a PEFT adapter, the URI of its base
    (base_model, else its config's base_model_name_or_path); None for a full model or an
    adapter that names no base. For rerun keys: load_model checks what this does not."""
    from msif.storage.gcs import read_bytes

    try:
        if is_remote(uri):
            raw = read_bytes(join(uri, ADAPTER_CONFIG))
        else:
            raw = (Path(uri) / ADAPTER_CONFIG).read_bytes()
    except (NotFoundError, OSError):
        return None
    if base_model:
        return base_model
    try:
        recorded = json.loads(raw).get("base_model_name_or_path")
    except (ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) and recorded else None


def merge(base: torch.nn.Module, adapter: Adapter, base_uri: str) -> torch.nn.Module:
    """base with the adapter merged in (peft merge_and_unload): the base's own module tree,
    weights θ_pt + ΔW where the adapter applies. The adapter must fit the base exactly: the
    modules it targets exist, and its weights have the shapes this base gives them."""
    from peft import PeftModel
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    where = f"the PEFT adapter {adapter.uri} does not fit the base {base_uri}"
    _resize_vocabulary(base, adapter, where)
    try:
        with _quiet():
            wrapped = PeftModel(base, adapter.config)
    except Exception as e:  # noqa: BLE001 - peft's refusals (no target module...) are an open set
        raise MismatchError(f"{where}: {_first_line(e)}") from None
    with _quiet():
        wanted = get_peft_model_state_dict(wrapped, save_embedding_layers=False)
    _check_shapes(wanted, adapter.weights, where)
    try:
        with _quiet():
            result = set_peft_model_state_dict(wrapped, dict(adapter.weights))
    except RuntimeError as e:  # a size mismatch outside peft's own save format
        lines = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise MismatchError(f"{where}: {lines[0] if lines else _first_line(e)}") from None
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(adapter.config.peft_type, "")
    missing = sorted(
        k.replace(".default", "") for k in result.missing_keys if prefix in k and ".default" in k
    )
    if missing:
        raise MismatchError(
            f"{where}: the adapter lacks {len(missing)} weight(s) its config gives this base "
            f"(first: {_short(missing[0])})"
        )
    extra = sorted(k for k in result.unexpected_keys if not _copy_of_loaded(k, adapter.weights))
    if extra:
        raise MismatchError(
            f"{where}: the adapter holds {len(extra)} weight(s) with no place in this base "
            f"(first: {_short(extra[0])})"
        )
    try:
        with _quiet(), torch.no_grad():
            merged = wrapped.merge_and_unload()
    except Exception as e:  # noqa: BLE001
        raise MsifError(f"cannot merge the PEFT adapter {adapter.uri}: {_first_line(e)}") from None
    return merged


def _copy_of_loaded(key: str, weights: dict) -> bool:
    """Whether an adapter weight peft did not load is another format's copy of one it did:
    peft saves a module kept whole (modules_to_save) as X.weight, and some versions also as
    X.modules_to_save.weight and X.original_module.weight."""
    for part in (".modules_to_save.", ".original_module."):
        if part in key and key.replace(part, ".", 1) in weights:
            return True
    return False


def _embedding_keys(base: torch.nn.Module) -> list[str]:
    """Adapter-file keys of the base's input and output embedding matrices."""
    pair = (base.get_input_embeddings(), base.get_output_embeddings())
    embeddings = [m for m in pair if m is not None]
    return [
        f"{_PREFIX}{name}.weight"
        for name, module in base.named_modules()
        if any(module is m for m in embeddings)
    ]


def _resize_vocabulary(base: torch.nn.Module, adapter: Adapter, where: str) -> None:
    """Give the base the vocabulary of a fine-tune that appended tokens: the number of rows
    of the embedding matrices the adapter carries (saved whole or as modules_to_save)."""
    rows, carried = set(), {}
    modules = dict(base.named_modules())
    for key in _embedding_keys(base):
        stem = key[len(_PREFIX) : -len(".weight")]
        weight = modules[stem].weight  # tied input and output embeddings share it
        for suffix in (".weight", ".modules_to_save.weight", ".original_module.weight"):
            tensor = adapter.weights.get(_PREFIX + stem + suffix)
            if tensor is not None and tensor.dim() == 2:
                rows.add(int(tensor.shape[0]))
                carried[id(weight)] = True
        carried.setdefault(id(weight), False)
    if not rows:
        return
    if len(rows) > 1:
        raise MismatchError(f"{where}: its embedding matrices have {sorted(rows)} rows")
    (size,) = rows
    if size == base.get_input_embeddings().num_embeddings:
        return
    if not all(carried.values()):
        # Resizing would leave rows of the other matrix at random values.
        raise MismatchError(
            f"{where}: it resizes the vocabulary to {size} tokens but carries only one of the "
            "input and output embedding matrices"
        )
    log.info("%s: vocabulary resized to %d rows, as the adapter's", adapter.uri, size)
    with _quiet():
        base.resize_token_embeddings(size, mean_resizing=False)


def _check_shapes(wanted: dict, weights: dict, where: str) -> None:
    """The adapter's weights have the shapes this base gives them (in peft's save format)."""
    other = [k for k in sorted(wanted) if k in weights and wanted[k].shape != weights[k].shape]
    if other:
        k = other[0]
        raise MismatchError(
            f"{where}: weight {_short(k)} has shape {list(weights[k].shape)} in the adapter but "
            f"{list(wanted[k].shape)} on this base ({len(other)} weight(s) differ)"
        )


def _check_peft_type(doc: dict, where: str) -> None:
    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    kind = doc.get("peft_type")
    if not isinstance(kind, str) or kind not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise MsifError(
            f"{where}: {ADAPTER_CONFIG} names peft_type {kind!r}, which peft {peft.__version__} "
            "does not know"
        )


def _peft_config(path: Path, where: str):
    from peft import PeftConfig

    try:
        with _quiet():
            config = PeftConfig.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - unknown peft_type, fields of a newer peft, ...
        raise MsifError(f"{where}: {ADAPTER_CONFIG}: {_first_line(e)}") from None
    if getattr(config, "is_prompt_learning", False) or getattr(config, "is_adaption_prompt", False):
        kind = getattr(config.peft_type, "value", config.peft_type)
        raise MsifError(
            f"{where}: a {kind} adapter adds virtual tokens rather than weight deltas, so there "
            "is no merged model to attribute; msif takes adapters that merge (LoRA and the like)"
        )
    config.inference_mode = True
    return config


def _read_json(path: Path, where: str) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise MsifError(f"{where}: {path.name} cannot be read ({_first_line(e)})") from None
    except json.JSONDecodeError as e:
        raise MsifError(
            f"{where}: {path.name} is not valid JSON ({e.msg} at line {e.lineno})"
        ) from None
    if not isinstance(doc, dict):
        raise MsifError(f"{where}: {path.name} holds a {type(doc).__name__}, not a JSON object")
    return doc


def _read_weights(path: Path, where: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        weights = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, an empty file, ...
        raise MsifError(
            f"{where}: its {path.name} is damaged or truncated ({_first_line(e)})"
        ) from None
    if not weights:
        raise MsifError(f"{where}: its {path.name} holds no tensors")
    for name, tensor in sorted(weights.items()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise MsifError(f"{where}: weight {_short(name)} holds NaN or infinite values")
    return weights


def merge_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a merge runs in: float64 when asked for, else float32 (a bfloat16 or
    float16 model is merged in float32 and rounded once afterwards)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _short(key: str) -> str:
    return key[len(_PREFIX) :] if key.startswith(_PREFIX) else key


@contextmanager
def _quiet():
    # peft and transformers warn about adapter details (dtype casts, deprecated fields); the
    # failures that matter are raised as one line instead.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "Adapter",
    "base_of",
    "has_tokenizer",
    "is_adapter_dir",
    "merge",
    "merge_dtype",
    "read_adapter",
    "resolve_base",
]
