"""Check that streaming a corpus keeps memory flat as the corpus grows.

`python -m msif.testing.memcheck [--gs] [--rows N] [--factors 1 4 16]` writes corpora of
N×factor rows, streams each one in a fresh process with ParquetSource.iter_batches and
prints the peak resident-memory growth during streaming (Linux: VmHWM after resetting it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROW_GROUP = 1000
TEXT_BYTES = 1000


def status_kib(field: str) -> int | None:
    """A /proc/self/status field in KiB (VmRSS, VmHWM), None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Reset VmHWM (the peak RSS) to the current RSS (Linux); False where unsupported."""
    # Writing 5 to clear_refs is the Linux interface for it.
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def stream_peak_growth(uri: str, batch_rows: int = 256) -> dict:
    """Stream every row of uri (id + text); report rows, seconds and peak RSS growth."""
    from msif.data.parquet import ParquetSource

    source = ParquetSource.open(uri)
    columns = [c for c in ("id", "text") if c in source.schema.names]
    exact = reset_peak()
    before = status_kib("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    rows = chars = 0
    for batch in source.iter_batches(columns, batch_rows=batch_rows):
        rows += batch.num_rows
        chars += sum(len(t) for t in batch.column(columns[-1]).to_pylist())
    seconds = time.perf_counter() - started
    peak = status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "uri": uri,
        "rows": rows,
        "chars": chars,
        "seconds": round(seconds, 2),
        "peak_growth_mib": round((peak - before) / 1024, 1),
        "exact_peak": exact,
    }


def write_corpus(root: Path, rows: int, files: int = 4) -> int:
    """Write a corpus of `rows` documents of ~1 KB in `files` Parquet files; its byte size."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_file = -(-rows // files)
    for f in range(files):
        ids = range(f * per_file, min(rows, (f + 1) * per_file))
        with pq.ParquetWriter(
            root / f"part-{f:03d}.parquet", pa.schema([("id", pa.string()), ("text", pa.string())])
        ) as w:
            for start in range(ids.start, ids.stop, ROW_GROUP):
                n = min(ROW_GROUP, ids.stop - start)
                # Random hex text does not compress: the file size tracks the corpus size.
                text = [rng.bytes(TEXT_BYTES // 2).hex() for _ in range(n)]
                w.write_table(
                    pa.table({"id": [f"doc-{i}" for i in range(start, start + n)], "text": text}),
                    row_group_size=ROW_GROUP,
                )
    return sum(p.stat().st_size for p in root.glob("*.parquet"))


def _measure_in_child(uri: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "msif.testing.memcheck", "--stream", uri],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"streaming {uri} failed (exit {out.returncode}): {out.stderr.strip()[-3000:]}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Measure peak RSS growth while streaming corpora of growing size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--gs", action="store_true", help="stream from a GCS emulator")
    parser.add_argument("--stream", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stream:
        print(json.dumps(stream_peak_growth(args.stream)))
        return 0
    with tempfile.TemporaryDirectory(prefix="msif-memcheck-") as tmp:
        if args.gs:
            from msif.testing.gcs_emulator import gcs_emulator

            with gcs_emulator() as emulator:
                emulator.create_bucket()
                os.environ["STORAGE_EMULATOR_HOST"] = emulator.endpoint
                _run(Path(tmp), args, remote=True)
        else:
            _run(Path(tmp), args, remote=False)
    return 0


def _run(tmp: Path, args, remote: bool) -> None:
    from msif.storage import gcs as storage

    print(f"{'rows':>10} {'MiB on disk':>12} {'peak RSS growth MiB':>20} {'seconds':>8}")
    for factor in args.factors:
        local = tmp / f"corpus-{factor}"
        size = write_corpus(local, args.rows * factor)
        uri = str(local)
        if remote:
            uri = f"gs://msif-test/corpus-{factor}"
            storage.upload_tree(local, uri)
        r = _measure_in_child(uri)
        print(
            f"{r['rows']:>10} {size / 2**20:>12.1f} {r['peak_growth_mib']:>20.1f} "
            f"{r['seconds']:>8.1f}",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
