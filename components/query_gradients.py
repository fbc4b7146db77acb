"""Pipeline node `query gradients` (GPU): precondition the queries' gradients at θ_ft."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def query_gradients(
    ft_model_uri: str,
    queries_uri: str,
    method: str,
    alpha: float,
    damping_factor: float,
    query_rank: int,
    max_length: int,
    batch_size: int,
    preconditioned: Output[Artifact],
    ft_factors: Input[Artifact] = None,
    pt_factors: Input[Artifact] = None,
):
    """`msif query-gradients` for one method.

    alpha <= 0 keeps the CLI's relative default (damping_factor × mean Λ_ft); query_rank 0
    stores full-rank queries. Factors a method does not use may be left unconnected.
    """
    from msif.cli import main

    argv = ["query-gradients", "--model", ft_model_uri, "--queries", queries_uri]
    argv += ["--method", method, "--damping-factor", str(damping_factor)]
    argv += ["--rank", str(int(query_rank))]
    if alpha > 0:
        argv += ["--alpha", str(alpha)]
    if ft_factors is not None:
        argv += ["--ft-factors", ft_factors.path]
    if pt_factors is not None:
        argv += ["--pt-factors", pt_factors.path]
    argv += ["--max-length", str(max_length), "--batch-size", str(batch_size)]
    rc = main([*argv, "--out", preconditioned.path])
    if rc != 0:
        raise RuntimeError(f"msif query-gradients failed with exit code {rc}")
