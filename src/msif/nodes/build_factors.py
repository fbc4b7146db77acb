"""Node `build-factors` (CPU): reduce a stage's Λ shards into its EK-FAC factors."""

from __future__ import annotations

from collections.abc import Sequence

from msif.nodes import runtime

NAME = "build-factors"


def add_parser(sub) -> None:
    """`msif build-factors`."""
    p = runtime.subparser(
        sub,
        NAME,
        "reduce Λ shards into a stage's factors",
        "Add the Λ partial sums of every shard of one stage and combine them with the\n"
        "stage's eigenbasis into its factors (Q_A, Q_G, Λ per module). Needs no model.",
    )
    p.add_argument("--eigenbasis", required=True, help="the stage's eigendecompose output")
    p.add_argument("--partials", nargs="+", required=True, help="every shard's fit-lambda output")
    runtime.add_out_argument(p, "where the factors go")
    p.set_defaults(run=lambda a: run(a.eigenbasis, a.partials, a.out))


@runtime.timed
def run(eigenbasis_uri: str, partial_uris: Sequence[str], out_uri: str) -> None:
    """Reduce Λ partial sums (one at a time) into the stage's factors."""
    from msif.ekfac.eigenbasis import Eigenbasis
    from msif.ekfac.factors import Factors
    from msif.ekfac.lambdas import LambdaSums

    runtime.check_output(out_uri, eigenbasis_uri, partial_uris)
    basis = Eigenbasis.load(runtime.input_dir(eigenbasis_uri))
    lam = runtime.sum_partials(partial_uris, LambdaSums.load, "Λ partial sums")
    factors = Factors.build(basis, lam)
    factors.info.update({k: basis.info.get(k) for k in ("data", "model", "tokenizer")})
    with runtime.published(out_uri, {"node": NAME, "stage": factors.stage}) as tmp:
        factors.save(tmp)
