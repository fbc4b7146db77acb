"""Node `eigendecompose`: reduce a stage's covariance shards and eigendecompose them (float64,
on the node's GPU when it has one, else on the CPU)."""

from __future__ import annotations

from collections.abc import Sequence

from msif.config import EigenOptions, add_options, check_device, from_namespace
from msif.nodes import runtime

NAME = "eigendecompose"


def add_parser(sub) -> None:
    """`msif eigendecompose`."""
    p = runtime.subparser(
        sub,
        NAME,
        "reduce covariance shards and eigendecompose them",
        "Add the covariance partial sums of every shard of one stage (all shards must be\n"
        "there) and compute the EK-FAC eigenbasis Q_A, Q_G in float64. Needs no model.\n"
        "On a CUDA device one matrix at a time is on the GPU; a matrix whose CUDA eigh fails\n"
        "(cuSOLVER error, out of memory) is done on the CPU, with a warning.",
    )
    p.add_argument("--partials", nargs="+", required=True, help="every shard's covariance output")
    runtime.add_out_argument(p, "where the eigenbasis goes")
    add_options(p, EigenOptions)
    p.add_argument(
        "--device",
        default="auto",
        help="where eigh runs: auto (cuda when available), cpu, cuda or cuda:N (default: auto)",
    )
    p.set_defaults(
        run=lambda a: run(a.partials, a.out, from_namespace(EigenOptions, a), device=a.device)
    )


@runtime.timed
def run(
    partial_uris: Sequence[str],
    out_uri: str,
    options: EigenOptions | None = None,
    *,
    device: str = "auto",
) -> None:
    """Reduce covariance partial sums (one at a time) and eigendecompose them (on device,
    see eigh_device)."""
    from msif.data.models import DTYPES
    from msif.ekfac.covariance import CovarianceSums
    from msif.ekfac.eigenbasis import eigendecompose, eigh_device

    options = options or EigenOptions()
    check_device(device)
    eigh_device(device)  # a CUDA device asked for on a machine without one: refused now
    runtime.check_output(out_uri, partial_uris)
    cov = runtime.sum_partials(partial_uris, CovarianceSums.load, "covariance partial sums")
    basis = eigendecompose(cov, dtype=DTYPES[options.factor_dtype], device=device)
    basis.info.update(
        {k: cov.info.get(k) for k in ("data", "data_fingerprint", "model", "tokenizer")}
    )
    with runtime.published(out_uri, {"node": NAME, "stage": basis.stage}) as tmp:
        basis.save(tmp)
