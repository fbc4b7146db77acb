"""Counting, on a CPU-only machine, what would make the host wait for a CUDA device.

On CUDA the host waits for every queued kernel when Python reads a device value (`.item()`,
`bool(t)`, `int(t)`, `.tolist()`, `.numpy()`, `.cpu()`), when an op's output shape depends on
device data (`t[mask]`, `.nonzero()`, `torch.unique`), when a linear-algebra op checks its
cuSOLVER status (eigh, svd), and when a copy between host and device is blocking (any
`.to(device)` of pageable memory without non_blocking=True). `torch.cuda.set_sync_debug_mode`
sees these only on a GPU, so SyncCounter finds them on the CPU: it tags tensors as *device*
tensors (the model's parameters and buffers, the batches msif.core.device.to_device moves,
and everything computed from a device tensor, in-place results included) and records each of
the operations above applied to one.

What it cannot see: on a CPU-only machine `.to(model_device)` and `.to("cpu")` are the same
call, so a copy to the host counts only when asked for as `.cpu()`, `.numpy()`, `.tolist()`,
a scalar read, the string "cpu", or a blocking `copy_` into a host tensor; and a host tensor
moved with `.to(<torch.device>)` (or `torch.tensor(..., device=...)`) counts as a blocking copy
to the device, since only msif.core.device.to moves batches from pinned memory without
blocking. Non-blocking copies into host tensors (msif.core.device.to_host) are allowed: their
reader waits on an event of a batch the GPU already finished.
"""

from __future__ import annotations

import sys
import traceback
import weakref
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import msif.core.device as msif_device

# aten ops that read a device value on the host or size their output by device data.
SYNCING_OPS = {
    "_local_scalar_dense": "scalar read (.item(), bool(), int(), float())",
    "nonzero": "data-dependent shape (nonzero)",
    "masked_select": "data-dependent shape (masked_select)",
    "unique": "data-dependent shape (unique)",
    "_unique": "data-dependent shape (unique)",
    "_unique2": "data-dependent shape (unique)",
    "unique_dim": "data-dependent shape (unique)",
    "unique_consecutive": "data-dependent shape (unique)",
    "_linalg_eigh": "cuSOLVER status check (eigh)",
    "_linalg_svd": "cuSOLVER status check (svd)",
    "_linalg_check_errors": "cuSOLVER status check",
}
INDEXING_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


@dataclass
class Sync:
    """One operation that would synchronise, and where msif called it."""

    kind: str
    where: str


@dataclass
class SyncCounter(TorchDispatchMode):
    """A dispatch mode that records would-be CUDA synchronisations of device tensors."""

    model: torch.nn.Module
    syncs: list[Sync] = field(default_factory=list)
    quiet: int = 0  # inside msif.core.device.to, whose copies are allowed
    _device: dict[int, weakref.ref] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__()
        for t in [*self.model.parameters(), *self.model.buffers()]:
            self.mark(t)

    # ----------------------------------------------------------------------------- tagging

    def mark(self, t: torch.Tensor) -> torch.Tensor:
        """Tag t as a device tensor."""
        key = id(t)
        if key not in self._device:
            self._device[key] = weakref.ref(t, lambda _, key=key: self._device.pop(key, None))
        return t

    def on_device(self, t) -> bool:
        """Whether t is a tagged device tensor."""
        if not isinstance(t, torch.Tensor):
            return False
        ref = self._device.get(id(t))
        return ref is not None and ref() is t

    def record(self, kind: str) -> None:
        """A would-be synchronisation, with the innermost msif frame that caused it."""
        if self.quiet:
            return
        frames = [f for f in traceback.extract_stack() if "/src/msif/" in f.filename]
        where = f"{frames[-1].filename.split('/src/')[-1]}:{frames[-1].lineno}" if frames else "?"
        self.syncs.append(Sync(kind, where))

    # ------------------------------------------------------------------------ aten level

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = pytree.tree_leaves((args, kwargs))
        from_device = any(self.on_device(x) for x in leaves)
        name = func.overloadpacket.__name__
        if from_device:
            self._check(name, args, kwargs)
        out = func(*args, **kwargs)
        inplace = name.endswith("_") and args and isinstance(args[0], torch.Tensor)
        if from_device and name == "copy_":
            pass  # a copy's result is where its destination is: tagged already or a host buffer
        elif from_device or (inplace and self.on_device(args[0])):
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.mark(t)
        return out

    def _check(self, name: str, args, kwargs) -> None:
        if name in SYNCING_OPS:
            self.record(SYNCING_OPS[name])
        elif name in INDEXING_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                self.record("data-dependent shape (boolean-mask indexing)")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None:
            self.record("data-dependent shape (repeat_interleave)")
        elif name == "copy_":
            dst, src = args[0], args[1]
            non_blocking = len(args) > 2 and args[2] or kwargs.get("non_blocking", False)
            if self.on_device(src) and not self.on_device(dst) and not non_blocking:
                self.record("blocking copy to the host (copy_)")


@contextmanager
def counting_syncs(model: torch.nn.Module):
    """SyncCounter over the block, with the Python-level reads and copies patched in."""
    counter = SyncCounter(model)
    with ExitStack() as stack:
        for patch in _patches(counter):
            stack.enter_context(patch)
        with counter:
            yield counter


@contextmanager
def _patched(owner, name: str, make):
    original = getattr(owner, name)
    setattr(owner, name, make(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def _patches(counter: SyncCounter):
    def reading(kind):
        def make(original):
            def read(self, *args, **kwargs):
                if counter.on_device(self):
                    counter.record(kind)
                return original(self, *args, **kwargs)

            return read

        return make

    def moving(original):
        def to(self, *args, **kwargs):
            target = kwargs.get("device")
            non_blocking = bool(kwargs.get("non_blocking", False))
            for a in args:
                if isinstance(a, str | torch.device):
                    target = a
                elif isinstance(a, torch.Tensor):
                    target = a.device if target is None else target
                elif isinstance(a, bool):
                    non_blocking = a
            out = original(self, *args, **kwargs)
            if target is None:
                return out
            to_host = isinstance(target, str) and target.startswith("cpu")
            if to_host and counter.on_device(self) and not non_blocking:
                counter.record("blocking copy to the host (.to('cpu'))")
            if not to_host and not counter.on_device(self):
                if not non_blocking:
                    counter.record("blocking copy to the device (.to(device))")
                out = out.clone() if out is self else out  # never tag the host original
                counter.mark(out)
            return out

        return to

    def moving_batch(original):
        def move(tensor, device):
            # msif's own move: pinned and non-blocking on CUDA, so allowed; its result is a
            # device tensor, distinct from the host batch it came from.
            counter.quiet += 1
            try:
                moved = original(tensor, device)
            finally:
                counter.quiet -= 1
            return counter.mark(moved.clone())

        return move

    def creating(original):
        def tensor(data, *args, **kwargs):
            out = original(data, *args, **kwargs)
            device = kwargs.get("device")
            if device is not None and not (isinstance(device, str) and device.startswith("cpu")):
                counter.record("blocking copy to the device (torch.tensor(..., device=...))")
                counter.mark(out)
            return out

        return tensor

    yield _patched(torch.Tensor, "item", reading("scalar read (.item())"))
    yield _patched(torch.Tensor, "tolist", reading("copy to the host (.tolist())"))
    yield _patched(torch.Tensor, "numpy", reading("copy to the host (.numpy())"))
    yield _patched(torch.Tensor, "cpu", reading("copy to the host (.cpu())"))
    yield _patched(torch.Tensor, "to", moving)
    yield _patched(torch, "tensor", creating)
    original_to = msif_device.to
    for module in [m for n, m in sys.modules.items() if n.startswith("msif") and m is not None]:
        if getattr(module, "to", None) is original_to:
            yield _patched(module, "to", moving_batch)


def per_batch(counts: Counter) -> str:
    """A readable list of counted syncs."""
    return ", ".join(f"{n}× {k}" for k, n in counts.most_common())


def syncs_of(run, model: torch.nn.Module) -> Counter:
    """Counter of (kind, where) of the syncs run() makes."""
    with counting_syncs(model) as counter:
        run()
    return Counter((s.kind, s.where) for s in counter.syncs)


def extra_syncs(run_small, run_large, model: torch.nn.Module, allowed=()) -> Counter:
    """Syncs run_large makes beyond run_small's: those that grow with the number of batches.

    allowed: kinds that are inherent (a cuSOLVER status check of a per-batch SVD)."""
    small, large = syncs_of(run_small, model), syncs_of(run_large, model)
    grown = large - small
    return Counter({k: n for k, n in grown.items() if k[0] not in allowed})
