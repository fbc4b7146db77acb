"""Progress bars and throughput logging for long loops."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
log = logging.getLogger("msif")


def progress_bar(items: Iterable[T], enabled: bool, desc: str) -> Iterator[T]:
    """Iterate with a tqdm bar when enabled, and log items/s at the end either way."""
    start, count = time.perf_counter(), 0
    for item in tqdm(items, desc=desc, disable=not enabled, leave=False):
        count += 1
        yield item
    elapsed = time.perf_counter() - start
    log.info(
        "%s: %d batches in %.1fs (%.2f batches/s)",
        desc,
        count,
        elapsed,
        count / elapsed if elapsed else 0.0,
    )
