"""docs/reliability.md, made from the cases:
`python -m tests.reliability.table > docs/reliability.md`.

tests/reliability/test_table.py checks that the committed file is what this prints, so the
table cannot drift from what the tests run.
"""

from __future__ import annotations

import sys
from collections import Counter

from tests.reliability.cases import CASES
from tests.reliability.faults import FAULTS

HEADER = """\
# Reliability: what msif does with bad input and faults

Every row is a test. The rows of the first part are run by
`tests/reliability/test_hostile.py` against the real CLI, in-process, on a mini world and its
whole pipeline run; each must end with one `msif: error:` line (exit 1 at run time, 2 for a
usage error), print no traceback and leave its `--out` as it was, or (rows marked *handled*)
succeed with a right answer that the test checks. The second part lists faults that need a
real GCS emulator, real signals or a second process; each names its test. With `-v` msif
prints the traceback before the line.

This file is generated: `python -m tests.reliability.table > docs/reliability.md`.

## What the checks prove, and what they do not

- The manifest of every output (`_MSIF_COMPLETE.json`: size, sha256 and crc32c of every file)
  and the checksum in every artifact's sidecar prove *integrity against accidents*: a
  truncated upload, a file edited or replaced after publishing, a half-written folder. They
  are not signatures. Someone who edits a tensor and recomputes the hashes (a forger) is not
  detected: a flipped Λ with a rehashed manifest is read as valid factors. Protect the bucket
  with IAM, not with msif.
- What *is* caught among forgeries is what contradicts the models: factors relabelled to
  another stage carry the other model's fingerprint (θ_pt = θ_ft), queries carry the
  fingerprint of the model their corpus must be scored with, and every artifact that
  tokenises records the vocabulary hash of its tokenizer.
- Rerun skips and shard checks compare contents, not names: a local Parquet file by the
  sha256 of its bytes, a gs:// object by its generation and crc32c, a model folder by the
  digests of its files.
"""


def rows() -> list[str]:
    """The Markdown table rows of the in-process cases, grouped."""
    out, group = [], None
    for c in CASES:
        if c.group != group:
            group = c.group
            out += ["", f"### {group}", "", "| # | input | msif does | exit |", "|---|---|---|---|"]
        does = f"*handled*: {c.handled}" if c.handled else f"error: …{c.expect}…"
        code = 0 if c.handled else c.code
        out.append(f"| `{c.id}` | {c.what} | {does.replace('|', '∣')} | {code} |")
    return out


def fault_rows() -> list[str]:
    """The Markdown table rows of the faults tested elsewhere."""
    out = ["", "| fault | msif does | test |", "|---|---|---|"]
    for f in FAULTS:
        out.append(f"| {f.what} | {f.does} | `{f.test}` |")
    return out


def totals() -> list[str]:
    """The totals line: what was tried and how it ended."""
    kinds = Counter("handled" if c.handled else "error" for c in CASES)
    n = len(CASES) + len(FAULTS)
    return [
        "",
        "## Totals",
        "",
        "| tried | clear one-line errors | handled right | tracebacks | silent wrong answers "
        "| lost or half-written outputs |",
        "|---|---|---|---|---|---|",
        f"| {n} | {kinds['error'] + sum(f.error for f in FAULTS)} | "
        f"{kinds['handled'] + sum(not f.error for f in FAULTS)} | 0 | 0 | 0 |",
        "",
        "The last three columns are 0 because every row above is a passing test.",
    ]


def render() -> str:
    """The whole document."""
    parts = [HEADER, "## Bad input, in-process", *rows()]
    parts += ["", "## Faults: storage, signals, endpoints", *fault_rows(), *totals()]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
