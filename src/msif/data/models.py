"""Loading a user's model and tokenizer (local dir or gs:// prefix) through from_pretrained."""

from __future__ import annotations

import logging

import torch

from msif.data.examples import check_tokenizer
from msif.errors import MsifError

log = logging.getLogger("msif")
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "float16": torch.float16,
}


def resolve_device(device: str = "auto") -> torch.device:
    """cuda when asked for or available under auto, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MsifError(f"device {device!r} asked for, but no CUDA device is available")
    return torch.device(device)


def load_model(
    uri: str, *, device: str = "auto", dtype: str = "float32", trust_remote_code: bool = False
):
    """(model in eval mode, tokenizer) from a save_pretrained directory or gs:// prefix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from msif.storage.cache import fetch_model_dir

    hf_logging.disable_progress_bar()  # one bar per node is ours; theirs per load is noise

    if dtype not in DTYPES:
        raise MsifError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    path = fetch_model_dir(uri)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise MsifError(f"cannot load a tokenizer from {uri}: {_first_line(e)}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, TypeError) as e:
        raise MsifError(f"cannot load a causal LM from {uri}: {_first_line(e)}") from None
    model.to(resolve_device(device)).eval()
    check_tokenizer(tokenizer, model)
    log.info(
        "loaded %s (%s, %d parameters)", uri, dtype, sum(p.numel() for p in model.parameters())
    )
    return model, tokenizer


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
