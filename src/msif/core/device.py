"""Where tensors live, in which precision per-batch statistics are computed, and how results
cross between host and device without making the host wait on the batch in flight.

On CUDA every read of a device value from Python (`.item()`, `bool(t)`, `.cpu()`, `.tolist()`),
every shape that depends on device data (`t[mask]`, `.nonzero()`) and every blocking copy in
either direction waits until the GPU has finished all queued work. Inside a batch loop that
drains the queue once per batch. The loops therefore read host facts from the host batch, move
batches from pinned memory without blocking (`to_device`), and hand device results to the host
through `Deferred`, which waits only on a batch the GPU finished long ago.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from msif.errors import MsifError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """cuda when asked for or available under auto, else cpu."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MsifError(f"device {device!r} asked for, but no CUDA device is available")
    return torch.device(device)


def to(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """tensor on device; a host tensor goes to CUDA through pinned memory without blocking
    (a pageable or blocking copy synchronises the stream)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
        return pinned.to(device, non_blocking=True)
    return tensor.to(device)


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device | str) -> dict:
    """Move the tensor fields of a batch to device (non-blocking from pinned memory to CUDA)."""
    return {k: (to(v, device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter."""
    return next(model.parameters()).device


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision per-batch statistics are computed in: float64 for float64 models, else
    float32 (half-precision activations are upcast, and every running sum is float32 or
    wider)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sums_device(model: nn.Module) -> torch.device:
    """Where float64 running sums live: beside the model, so a GPU pass never syncs per batch.

    MPS has no float64, so its sums stay on the CPU.
    """
    device = model_device(model)
    return torch.device("cpu") if device.type == "mps" else device


@dataclass
class HostCopy:
    """A tensor's host copy, started without waiting; `get` waits for this copy alone."""

    tensor: torch.Tensor
    event: torch.cuda.Event | None = None

    def get(self) -> torch.Tensor:
        """The host tensor, once its copy has finished."""
        if self.event is not None:
            self.event.synchronize()
        return self.tensor


def to_host(tensor: torch.Tensor) -> HostCopy:
    """Start copying tensor to the host: into pinned memory, non-blocking, from CUDA; a plain
    copy elsewhere (so the host copy never aliases a buffer the pass goes on writing)."""
    tensor = tensor.detach()
    cuda = tensor.device.type == "cuda"
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=cuda)
    out.copy_(tensor, non_blocking=True)
    if not cuda:
        return HostCopy(out)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(tensor.device))
    return HostCopy(out, event)


class Deferred:
    """Work on device results that needs them on the host, done `lag` batches later.

    `add(fn, *tensors)` starts the tensors' host copies at once; `fn(*host_tensors)` runs
    when the loop has moved `lag` batches past the one that added it, in the order added, so
    the host waits only for a batch the GPU finished while it queued the next ones. Checks
    that raise (non-finite values) therefore raise up to `lag` batches late, always before
    the loop ends; lag 0 runs each at the next `run`.
    """

    def __init__(self, lag: int = 1) -> None:
        self.lag = lag
        self.step = 0
        self._items: deque[tuple[int, Callable, list[HostCopy]]] = deque()

    def add(self, fn: Callable[..., None], *tensors: torch.Tensor) -> None:
        """Queue fn for the host copies of tensors, under the current batch."""
        self._items.append((self.step, fn, [to_host(t) for t in tensors]))

    def advance(self) -> None:
        """The loop moved on to its next batch."""
        self.step += 1

    def run(self, lag: int | None = None) -> None:
        """Run the queued work of every batch at least lag (default self.lag) batches old."""
        lag = self.lag if lag is None else lag
        while self._items and self._items[0][0] <= self.step - lag:
            _, fn, copies = self._items.popleft()
            fn(*(c.get() for c in copies))

    def flush(self) -> None:
        """Run all queued work (the end of the loop)."""
        while self._items:
            _, fn, copies = self._items.popleft()
            fn(*(c.get() for c in copies))

    def discard(self) -> None:
        """Drop queued work unrun (the loop was abandoned)."""
        self._items.clear()
