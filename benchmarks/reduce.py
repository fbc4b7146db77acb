"""Reducer memory against the shard count: the streaming sum against loading every partial.

python -m benchmarks.reduce [--hidden 512] [--shards 2 4 8] [--quick]

Saves N published covariance partials of one GPT-NeoX (built from a config, 2 layers), then in
a fresh subprocess per (N, way) sums them and reports the growth of the process's peak RSS over
its RSS after the imports (Linux: VmHWM reset through /proc/self/clear_refs): `streaming` is
what eigendecompose and build-factors run (msif.nodes.runtime.sum_partials: the running sum
and one partial held), `all-at-once` the reduce they ran before 2026-12-03 (every partial
loaded, then added pairwise). The two sums are checked equal. The partial's size is printed
beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import machine, neox, token_examples

_CHILD = """
import json, sys, torch
from msif.ekfac.covariance import CovarianceSums
from msif.nodes import runtime
from msif.testing.memcheck import reset_peak, status_kib
dirs, way = json.loads(sys.argv[1]), sys.argv[2]
start = status_kib("VmRSS")
if not reset_peak():
    raise SystemExit("needs Linux's /proc/self/clear_refs to reset the peak RSS")
if way == "streaming":
    total = runtime.sum_partials(dirs, CovarianceSums.load, "covariance partial sums")
else:
    import functools, operator
    parts = [CovarianceSums.load(d) for d in dirs]
    total = functools.reduce(operator.add, parts)
check = sum(float(t.sum()) for t in total.gradient.values())
print(json.dumps({"peak_mib": (status_kib("VmHWM") - start) / 1024,
                  "check": check, "tokens": total.num_tokens}))
"""


def make_partials(root: Path, hidden: int, shards: int) -> tuple[list[str], int]:
    """`shards` published covariance partials (one shard each of 4 random sequences)."""
    import msif
    from msif.data.examples import collate
    from msif.nodes import runtime

    model = neox(hidden, vocab=512).double()
    dirs = []
    for i in range(shards):
        data = token_examples(4, 16, 512, seed=i)
        cov = msif.fit_covariance(model, [collate(data, 0)], stage="pt")
        cov.info.update({"shard": i, "num_shards": shards, "data_fingerprint": "bench"})
        out = root / f"{shards}-{i}"
        meta = runtime.shard_meta("fit-covariance", "pt", i, shards)
        with runtime.published(str(out), meta) as staging:
            cov.save(staging)
        dirs.append(str(out))
    size = sum(t.numel() * 8 for d in (cov.activation, cov.gradient) for t in d.values())
    return dirs, size


def measure(dirs: list[str], way: str) -> dict:
    """Peak RSS of a fresh process summing the partials one way."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(dirs), way],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    """Print peak RSS per shard count and way; return the rows."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--shards", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--quick", action="store_true", help="hidden 256, 2 and 4 shards")
    args = p.parse_args(argv)
    hidden, counts = (256, [2, 4]) if args.quick else (args.hidden, args.shards)
    torch.set_num_threads(1)
    print(f"reducer peak RSS, GPT-NeoX hidden {hidden}, 2 layers; {machine()}")
    print("| shards | partial MiB | all-at-once: peak growth MiB | streaming | ratio |")
    print("|---:|---:|---:|---:|---:|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            dirs, size = make_partials(Path(tmp), hidden, n)
            old, new = measure(dirs, "all-at-once"), measure(dirs, "streaming")
            if old["check"] != new["check"] or old["tokens"] != new["tokens"]:
                raise SystemExit("the two sums differ")
            row = {"shards": n, "partial_mib": size / 2**20, "all_at_once_mib": old["peak_mib"],
                   "streaming_mib": new["peak_mib"]}  # fmt: skip
            rows.append(row)
            ratio = row["all_at_once_mib"] / row["streaming_mib"]
            print(
                f"| {n} | {row['partial_mib']:.0f} | {row['all_at_once_mib']:.0f} | "
                f"{row['streaming_mib']:.0f} | {ratio:.2f} |",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
