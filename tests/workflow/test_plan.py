"""`msif plan`: a 1-layer Llama whose shapes, FLOPs and bytes are counted by hand, the JSON
round trip, the one-line refusals, gs:// configs and `msif pipeline compile --plan`."""

from __future__ import annotations

import json

import pytest
import yaml

from msif.cli import main
from msif.workflow import costs
from msif.workflow.dag import ATTRIBUTE, FULL, INDEX, pipeline
from msif.workflow.plan import Plan, PlanInputs, estimate, format_plan, make_plan

# One layer: q 8→8, k 8→4, v 8→4 (one key/value head of size 4), o 8→8, gate and up 8→16,
# down 16→8, no biases; vocabulary 32, embeddings untied.
TINY = {
    "model_type": "llama",
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 32,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
SHAPES = {  # name → (out, in)
    "model.layers.0.self_attn.q_proj": (8, 8),
    "model.layers.0.self_attn.k_proj": (4, 8),
    "model.layers.0.self_attn.v_proj": (4, 8),
    "model.layers.0.self_attn.o_proj": (8, 8),
    "model.layers.0.mlp.gate_proj": (16, 8),
    "model.layers.0.mlp.up_proj": (16, 8),
    "model.layers.0.mlp.down_proj": (8, 16),
}
# Σ out·in = 64 + 32 + 32 + 64 + 128 + 128 + 128; the LM head adds 32·8 to the matmuls; the
# embedding (256) and three RMSNorms (24) complete the parameters.
TRACKED, MATMUL, PARAMETERS = 576, 832, 1112
# Σ in² + out²: A is 64 ×6 + 256, G is 64 + 16 + 16 + 64 + 256 + 256 + 64.
COVARIANCE_ENTRIES = 640 + 736
EIGENVALUES = 128  # Σ in + out
# Per position at L = 4: attention 4·layers·L·width = 4·1·4·8 = 128.
FROZEN = 4 * MATMUL + 3 * 128  # forward + backward to the activations: 3712
TRAINING = 6 * MATMUL + 3 * 128  # with weight gradients: 5376
COVARIANCE = 2 * COVARIANCE_ENTRIES  # every width below the Gram leaf: 2752
LAMBDA = 2 * COVARIANCE_ENTRIES + 2 * TRACKED + 2 * TRACKED // 4  # 4192


def tiny_inputs(tmp_path, **kw) -> PlanInputs:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    base = dict(
        model=str(tmp_path),
        corpus_tokens=4096,
        finetune_tokens=1024,
        queries=2,
        num_shards=2,
        max_length=4,
        query_length=4,
        batch_size=2,
        dtype="float32",
    )
    return PlanInputs(**{**base, **kw})


@pytest.fixture
def tiny(tmp_path):
    return make_plan(tiny_inputs(tmp_path))


def nodes(plan: Plan) -> dict:
    return {n.task: n for n in plan.nodes}


def test_tiny_shape_matches_hand_counts(tmp_path):
    shape = make_plan(tiny_inputs(tmp_path)).shape
    assert {s.name: s.shape for s in shape.specs} == SHAPES
    assert (shape.parameters, shape.matmul_parameters, shape.tracked_parameters) == (
        PARAMETERS,
        MATMUL,
        TRACKED,
    )
    assert shape.covariance_entries == COVARIANCE_ENTRIES
    assert shape.eigenvalue_entries == EIGENVALUES == shape.block_linear_io
    assert (shape.layers, shape.attention_width, shape.vocab, shape.hidden) == (1, 8, 32, 8)


def test_split_heads_blocks_g(tmp_path):
    shape = make_plan(tiny_inputs(tmp_path, split_heads=True)).shape
    blocks = {s.name.rsplit(".", 1)[1]: (s.num_blocks, s.block_size) for s in shape.specs}
    assert blocks["q_proj"] == (2, 4) and blocks["k_proj"] == (1, 4)
    assert blocks["gate_proj"] == (1, 16)
    # q's G: two 4 × 4 blocks instead of one 8 × 8.
    assert shape.covariance_entries == COVARIANCE_ENTRIES - 64 + 32


def test_per_position_flops_by_hand(tiny):
    s = tiny.shape
    assert costs.frozen_pass_flops(s, 4) == FROZEN == 3712
    assert costs.training_step_flops(s, 4) == TRAINING == 5376
    assert costs.covariance_flops(s, "gpu") == COVARIANCE == 2752
    assert costs.lambda_flops(s, 4) == LAMBDA == 4192
    assert costs.eigh_flops(s) == 4 * (7168 + 9856)  # Σ in³ + Σ blocks·bs³


def test_gram_counts_each_off_diagonal_block_once():
    assert costs.gram_macs(256, 256) == 256**2
    assert costs.gram_macs(512, 256) == 2 * 256**2 + 256**2  # 3/4 of the full product
    assert (
        costs.gram_macs(1025, 256)
        == costs.gram_macs(512, 256) + costs.gram_macs(513, 256) + 512 * 513
    )


def test_fitting_nodes_by_hand(tiny):
    n = nodes(tiny)
    assert n["fit-covariance (pt)"].flops == (FROZEN + COVARIANCE) * 4096
    assert n["fit-covariance (ft)"].flops == (FROZEN + COVARIANCE) * 1024
    assert n["fit-lambda (pt)"].flops == (FROZEN + LAMBDA) * 4096
    assert n["eigendecompose (pt)"].flops == 4 * 17024
    # Storage: float64 partials per shard, float32 eigenbasis and factors once.
    assert n["fit-covariance (pt)"].storage == 2 * 8 * COVARIANCE_ENTRIES
    assert n["eigendecompose (pt)"].storage == 4 * (COVARIANCE_ENTRIES + EIGENVALUES)
    assert n["fit-lambda (pt)"].storage == 2 * 8 * TRACKED
    assert n["build-factors (pt)"].storage == 4 * (COVARIANCE_ENTRIES + TRACKED) == 7808
    # The device of a covariance pod: weights, the float64 sums, one batch of 2 × 4 positions
    # (saved linear inputs/outputs 128·4, hooked output gradients 64·4, one module's float32
    # a and g 4·24, logits 3·4·32 bytes per position).
    assert n["fit-covariance (pt)"].gpu_memory == 4 * PARAMETERS + 8 * COVARIANCE_ENTRIES + 8 * (
        512 + 256 + 96 + 384
    )
    # Eigendecompose holds the running sum and the partial being added (float64), then the
    # float64 vectors and the cast copies.
    assert n["eigendecompose (pt)"].host_memory == costs.BASE_PROCESS_BYTES + 2 * (
        8 * COVARIANCE_ENTRIES
    ) + 2 * 4 * (COVARIANCE_ENTRIES + EIGENVALUES)


def test_module_groups_by_hand(tmp_path):
    one = nodes(make_plan(tiny_inputs(tmp_path)))
    two = nodes(make_plan(tiny_inputs(tmp_path, module_groups=2)))
    # Covariance bytes per module (in² + out²): q 128, k 80, v 80, o 128, gate 320, up 320,
    # down 320; the best contiguous cut in two is q..gate (736) | up, down (640).
    # Per position the first group's batch holds the saved linear inputs/outputs 128·4, its
    # hooked output gradients (8 + 4 + 4 + 8 + 16)·4, one module's float32 a and g 4·24 and
    # the logits 3·4·32; the second's hooks are (16 + 8)·4. Batch 2 × 4 positions.
    first, second = 8 * 736 + 8 * (512 + 160 + 96 + 384), 8 * 640 + 8 * (512 + 96 + 96 + 384)
    assert (first, second) == (15104, 13824)
    cov = two["fit-covariance (pt)"]
    assert cov.gpu_memory == 4 * PARAMETERS + first
    assert one["fit-covariance (pt)"].gpu_memory == 4 * PARAMETERS + 8 * COVARIANCE_ENTRIES + 8 * (
        512 + 256 + 96 + 384
    )
    # The frozen forward and backward run twice, the statistics once.
    assert cov.flops == (2 * FROZEN + COVARIANCE) * 4096
    assert two["fit-covariance (ft)"].flops == (2 * FROZEN + COVARIANCE) * 1024
    assert cov.positions == 2 * 4096
    # Two pods (shards), float32 at 40 % of the H100's 67 TFLOP/s; the weights, the partial
    # and the shard's text twice (4 bytes per token) through GCS at 0.5 GB/s.
    transfers = 4 * PARAMETERS + 8 * COVARIANCE_ENTRIES + 2 * 4 * 4096 / 2
    seconds = (2 * FROZEN + COVARIANCE) * 4096 / 2 / (0.4 * 67e12) + transfers / 0.5e9
    assert cov.transfers == transfers
    assert cov.hours_per_pod == pytest.approx(seconds / 3600, rel=1e-12)
    # What is written and held on the host does not change.
    for name in ("fit-covariance (pt)", "fit-lambda (pt)"):
        assert (two[name].storage, two[name].host_memory) == (
            one[name].storage,
            one[name].host_memory,
        )
    # Λ bytes per module: 8·out·in + 4·(in² + out²) (float64 sums, float32 eigenvectors):
    # q 1024, k 576, v 576, o 1024, gate 2304, up 2304, down 2304; the same cut,
    # q..gate (5504) | up, down (4608), beside the first group's batch and the rotation chunk.
    lam = two["fit-lambda (pt)"]
    assert lam.gpu_memory == 4 * PARAMETERS + 5504 + 8 * (512 + 160 + 96 + 384) + 4 * 2**26
    assert (
        one["fit-lambda (pt)"].gpu_memory
        == (4 * PARAMETERS + 8 * TRACKED + 4 * COVARIANCE_ENTRIES + 8 * (512 + 256 + 96 + 384))
        + 4 * 2**26
    )
    assert lam.flops == (2 * FROZEN + LAMBDA) * 4096
    assert "2 module groups: the shard is read and run 2 times" in lam.notes[0]
    # The other nodes are as without groups.
    for name, n in one.items():
        if not name.startswith("fit-"):
            assert two[name] == n, name


def test_more_module_groups_than_modules_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    rc, err = _fails([*_argv(tmp_path), "--module-groups", "8"], capsys)
    assert rc == 1 and "cannot fit 8 module groups: only 7 modules are tracked" in err
    rc, err = _fails([*_argv(tmp_path), "--module-groups", "0"], capsys)
    assert rc == 2 and "--module-groups must be at least 1, not 0" in err


def test_queries_and_scoring_by_hand(tiny):
    n = nodes(tiny)
    # Two queries of 4 positions; 2·out·in per position for Σ g aᵀ; per module three
    # two-sided rotations per query and the composed bases once.
    rotations = 2 * 3 * 2 * (64 * 16 * 2 + 32 * 12 * 2 + 128 * 24 * 3)
    compose = 2 * ((512 + 512) * 2 + (64 + 512) * 2 + (4096 + 512) * 3)
    assert n["precondition-queries (multi-stage)"].flops == (
        FROZEN * 8 + 2 * TRACKED * 8 + rotations + compose
    )
    assert n["precondition-queries (gradient-dot)"].flops == FROZEN * 8 + 2 * TRACKED * 8
    assert n["precondition-queries (multi-stage)"].storage == 4 * 2 * TRACKED
    # Scoring: B·T·o·i + Q·B·o·i = 12·o·i beats Q·B·T·(o·i + min) = 16·(o·i + min) for every
    # module, so 2·12·Σ o·i / (B·T) per position; 2·2·10 explained documents of 4 positions
    # go through the per-token path once more (2·Q·T·(o·i + min) / T per position).
    explained = 40 * 4
    expected = FROZEN * (4096 + explained) + 3 * TRACKED * 4096
    expected += explained * 2 * 2 * (TRACKED + 48)
    assert n["score-corpus (multi-stage)"].flops == expected


def test_scoring_paths_agree_with_the_scorer():
    import torch

    from msif.attribution.precondition import PreconditionedQueries
    from msif.attribution.scoring import path_costs
    from msif.core.modules import ModuleSpec

    spec = ModuleSpec("m", "linear", 48, 96, True, 96)
    for q, rank in ((1, 0), (16, 0), (4, 3)):
        pre = PreconditionedQueries([f"q{i}" for i in range(q)], "gradient-dot", {"m": spec})
        if rank:
            pre.lowrank["m"] = (
                torch.zeros(q, 96, rank),
                torch.zeros(q, rank),
                torch.zeros(q, 49, rank),
            )
        else:
            pre.dense["m"] = torch.zeros(q, 96, 49)
        for b, t in ((4, 8), (2, 128)):
            assert costs.scoring_macs(spec, q, rank, b, t) == path_costs(spec, pre, b, t)


def test_benchmark_shapes_match_real_models():
    import msif
    from benchmarks.common import neox

    for hidden, layers, vocab in ((128, 4, 2048), (256, 2, 512)):
        model = neox(hidden, layers=layers, heads=4, vocab=vocab)
        real = costs.shape_of(model, msif.find_modules(model).values())
        assert real == costs.neox_shape(hidden, layers, 4, vocab)


def test_cpu_rates_carry_their_source():
    rates = costs.cpu_rates()
    assert "RESULTS.md 'Speed against the training step'" in rates["covariance"].source
    assert "RESULTS.md 'Scaling'" in rates["eigh"].source
    # Measured side by side, the passes run at the training step's FLOP rate within 15 %:
    # the FLOP counts, not a fitted constant, carry the passes' relative costs.
    for name in ("covariance", "lambda", "scoring-1", "scoring-16"):
        assert 0.85 < rates[name].value / rates["training"].value < 1.15, name


def test_plan_walks_the_dag(tiny, tmp_path):
    assert [n.task for n in tiny.nodes] == [t.display_name for t in pipeline(FULL).tasks]
    indexed = make_plan(tiny_inputs(tmp_path, via_index=True, methods=("multi-stage",)))
    want = [
        t.display_name
        for name in (INDEX, ATTRIBUTE)
        for t in pipeline(name).tasks
        if t.label in ("", "pt", "ft", "multi-stage")
    ]
    assert [n.task for n in indexed.nodes] == want
    assert {n.pipeline for n in indexed.nodes} == {INDEX, ATTRIBUTE}
    split = indexed.by_pipeline()
    assert sum(t["gpu_hours"] for t in split.values()) == pytest.approx(indexed.gpu_hours)
    index_gpu = sum(
        n.device_hours for n in indexed.nodes if n.pipeline == INDEX and n.runs_on == "gpu"
    )
    assert split[INDEX]["gpu_hours"] == pytest.approx(index_gpu)


def test_index_storage_by_hand(tmp_path):
    factored = make_plan(tiny_inputs(tmp_path, via_index=True, index_dtype="bfloat16"))
    n = nodes(factored)
    # 1024 documents × rank 8 × Σ(out + in + 1) = 135 values in bfloat16.
    assert n["index"].storage == 1024 * 8 * (128 + 7) * 2
    projected = make_plan(
        tiny_inputs(
            tmp_path,
            via_index=True,
            index_tier="projected",
            index_values=64,
            index_dtype="bfloat16",
        )
    )
    assert nodes(projected)["index"].storage == 1024 * 32 * (2 + 4)


def test_json_round_trip(tiny, capsys, tmp_path):
    d = json.loads(json.dumps(tiny.to_dict()))
    assert Plan.from_dict(d) == tiny
    assert Plan.from_dict(d).to_dict() == d
    argv = ["plan", "--model", str(tmp_path), "--corpus-tokens", "4096", "--finetune-tokens"]
    argv += ["1024", "--queries", "2", "--num-shards", "2", "--max-length", "4"]
    argv += ["--query-length", "4", "--batch-size", "2", "--dtype", "float32", "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert Plan.from_dict(printed) == tiny
    assert printed["total"]["gpu_hours"] == pytest.approx(tiny.gpu_hours)


def test_table_names_every_node_and_the_largest(tiny):
    text = format_plan(tiny)
    for n in tiny.nodes:
        assert f"| {n.task} |" in text
    assert f"largest GPU memory: {tiny.largest('gpu_memory').task}" in text
    assert "does not fit" not in text


def test_token_counts_accept_scientific_notation(tmp_path, capsys):
    argv = ["plan", "--model", str(tmp_path), "--corpus-tokens", "1e4", "--finetune-tokens"]
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert main([*argv, "2.5e3", "--json"]) == 0
    inputs = json.loads(capsys.readouterr().out)["inputs"]
    assert (inputs["corpus_tokens"], inputs["finetune_tokens"]) == (10_000, 2_500)


def _fails(argv, capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("msif: error: "), err
    return rc, err


def _argv(model) -> list[str]:
    return ["plan", "--model", str(model), "--corpus-tokens", "1000", "--finetune-tokens", "100"]


@pytest.mark.parametrize(
    "config, message",
    [
        (None, "no config.json there"),
        ("{not json", "is not readable JSON"),
        ("[1, 2]", "holds a JSON list, not a config object"),
        ('{"hidden_size": 8}', "config.json names no model_type"),
        ('{"model_type": "nonesuch"}', "cannot build a causal LM from config.json"),
    ],
)
def test_bad_configs_are_one_line(tmp_path, capsys, config, message):
    if config is not None:
        (tmp_path / "config.json").write_text(config)
    rc, err = _fails(_argv(tmp_path), capsys)
    assert rc == 1 and message in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--corpus-tokens", "0"], "--corpus-tokens must be at least 1, not 0"),
        (["--finetune-tokens", "-5"], "--finetune-tokens must be at least 1, not -5"),
        (["--corpus-tokens", "1.5"], "is not a whole number of tokens"),
        (["--gpu", "V100"], "invalid choice: 'V100'"),
        (["--queries", "0"], "--queries must be at least 1, not 0"),
        (["--via-index", "--methods", "single-stage"], "--via-index serves multi-stage"),
        (["--mfu", "0"], "--mfu must be in (0, 1]"),
    ],
)
def test_bad_inputs_are_usage_errors(tmp_path, capsys, flags, message):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    rc, err = _fails([*_argv(tmp_path), *flags], capsys)
    assert rc == 2 and message in err


def test_config_from_gcs(gcs_prefix, tmp_path):
    from msif.storage import gcs

    gcs.write_bytes_atomic(f"{gcs_prefix}/model/config.json", json.dumps(TINY).encode())
    remote = make_plan(tiny_inputs(tmp_path, model=f"{gcs_prefix}/model"))
    assert remote.shape == make_plan(tiny_inputs(tmp_path)).shape
    with pytest.raises(costs.PlanError, match="no config.json there"):
        make_plan(tiny_inputs(tmp_path, model=f"{gcs_prefix}/empty"))


def test_reducers_hold_two_partials_whatever_the_shard_count(tmp_path):
    two, eight = (make_plan(tiny_inputs(tmp_path, num_shards=k)) for k in (2, 8))
    part = 8 * COVARIANCE_ENTRIES
    for name in ("eigendecompose (pt)", "build-factors (pt)"):
        assert nodes(eight)[name].host_memory == nodes(two)[name].host_memory
        assert nodes(eight)[name].disk == nodes(two)[name].disk  # each download dropped
    e2, e8 = nodes(two)["eigendecompose (pt)"], nodes(eight)["eigendecompose (pt)"]
    assert e8.transfers - e2.transfers == 6 * part  # but every partial is still read
    assert e2.disk == part + 4 * (COVARIANCE_ENTRIES + EIGENVALUES)
    # A fit pod's memory does not depend on the shard count; its hours fall with it.
    a, b = nodes(two)["fit-covariance (pt)"], nodes(eight)["fit-covariance (pt)"]
    assert a.gpu_memory == b.gpu_memory and a.flops == b.flops


def test_problems_name_what_does_not_fit():
    shape = costs.neox_shape(2048, 24, 16, 50_000)
    inputs = PlanInputs("x", 10**9, 10**7, gpu="L4", dtype="bfloat16")
    plan = estimate(inputs, shape)
    usable = 24 * costs.GIB * costs.GPU_MEMORY_USABLE.value
    over = [n.task for n in plan.nodes if n.gpu_memory > usable]
    assert "fit-covariance (pt)" in over  # 24 layers of float64 A and G: 13 GiB of G alone
    assert [p.split(" needs ")[0] for p in plan.problems()] == over
    assert plan.to_dict()["problems"] == plan.problems()


def test_requests_follow_the_plan(tiny):
    r = tiny.requests()
    head = costs.ceil_gib(1.25 * max(n.host_memory for n in tiny.nodes if n.runs_on == "gpu"))
    assert r["gpu_memory_request"] == f"{head}Gi"
    assert r["gke_accelerator"] == "nvidia-h100-80gb" and r["accelerator_count"] == 1
    assert set(r["cpu_nodes"]) == {"eigendecompose", "build-factors", "bm25", "rank"}


def _compiled_requests(path) -> tuple[dict, dict]:
    spec = next(yaml.safe_load_all(path.read_text()))
    params = spec["root"]["inputDefinitions"]["parameters"]
    executors = spec["deploymentSpec"]["executors"]
    memory = {
        k.removeprefix("exec-"): e["container"]["resources"].get("memoryRequest")
        for k, e in executors.items()
    }
    return params, memory


def test_compile_takes_the_plan(tmp_path, capsys):
    inputs = tiny_inputs(tmp_path, gpu="H200", corpus_tokens=10**8)
    plan = make_plan(inputs)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan.to_dict()))
    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "--out", str(out), "--plan", str(path)]) == 0
    params, memory = _compiled_requests(out)
    requests = plan.requests()
    assert params["gpu_memory_request"]["defaultValue"] == requests["gpu_memory_request"]
    assert params["gpu_node_selector"]["defaultValue"] == {
        "cloud.google.com/gke-accelerator": "nvidia-h200-141gb"
    }
    gib = int(requests["cpu_nodes"]["bm25"]["memory"][:-2])
    assert memory["bm25"] == gib * costs.GIB / 1e9  # KFP writes requests in GB
    # An option given beside the plan wins.
    assert (
        main(
            ["pipeline", "compile", "--out", str(out), "--plan", str(path)]
            + ["--gke-accelerator", "nvidia-l4"]
        )
        == 0
    )
    params, _ = _compiled_requests(out)
    assert params["gpu_node_selector"]["defaultValue"] == {
        "cloud.google.com/gke-accelerator": "nvidia-l4"
    }


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "No such file"),
        ("{", "is not JSON"),
        ("{}", "has no requests"),
        (
            '{"requests": {}, "problems": ["fit-lambda (pt) needs 2 TiB"]}',
            "does not fit its GPU: fit-lambda",
        ),
        (
            '{"requests": {"gpu_memory_request": "48G", "gpu_cpu_request": "8", "cpu_nodes": {}}}',
            "is not a Kubernetes request",
        ),
    ],
)
def test_compile_refuses_bad_plans(tmp_path, capsys, content, message):
    path = tmp_path / "plan.json"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "p.yaml"
    rc, err = _fails(["pipeline", "compile", "--out", str(out), "--plan", str(path)], capsys)
    assert rc == 1 and message in err and not out.exists()


def test_refinement_by_hand(tmp_path):
    plain = nodes(make_plan(tiny_inputs(tmp_path)))
    refined = nodes(
        make_plan(tiny_inputs(tmp_path, refine_steps=3, refine_lanczos=5, refine_samples=6))
    )
    # A product per position and direction: the forward twice (with its tangent: 2·(2·832 +
    # 128)), the backward to the activations (3712 − 1792), 4·576 for a′vᵀ and Σ g a′ᵀ.
    product = 2 * 1792 + (FROZEN - 1792) + 4 * TRACKED
    assert costs.product_pass_flops(make_plan(tiny_inputs(tmp_path)).shape, 4) == product
    # Per stage: 6 sequences × (2 queries × (3 steps + the residual) + 5 Lanczos) of 4 tokens.
    positions = 6 * (2 * 4 + 5) * 4
    # EK-FAC applied 2·4 times (2 rotations each, 2·o·i·(bs + i) per rotation), M^{-1/2}
    # 3·5 times; the Ritz directions 4·5·576 per application; Lanczos 6·5²·576.
    rotate = 2 * (64 * 16 * 2 + 32 * 12 * 2 + 128 * 24 * 3)
    vectors = 2 * rotate * (8 + 15) + 4 * 5 * TRACKED * 8 + 6 * 25 * TRACKED
    for method, stages in (("multi-stage", 2), ("single-stage", 1)):
        a, b = (
            plain[f"precondition-queries ({method})"],
            refined[f"precondition-queries ({method})"],
        )
        assert b.flops - a.flops == stages * (positions * product + vectors)
        assert b.positions - a.positions == stages * positions
        assert "refinement: 3 CG steps (+1 residual) × 2 queries" in b.notes[0]
    # The CG vectors (6 per query) and the Lanczos basis with its Ritz vectors, float64, and a
    # pass's tangents (twice a batch's activations, which the plain node holds once); the
    # pre-trained model beside the fine-tuned one for multi-stage only.
    acts = costs.activation_bytes(make_plan(tiny_inputs(tmp_path)).shape, 2, 4, "float32")
    held = 8 * TRACKED * (6 * 2 + 2 * 5) + 2 * acts
    multi = ("precondition-queries (multi-stage)", 4 * PARAMETERS)
    for name, weights in (multi, ("precondition-queries (single-stage)", 0)):
        assert refined[name].gpu_memory - plain[name].gpu_memory == weights + held - acts
        assert refined[name].host_memory - plain[name].host_memory == weights
    assert (
        refined["precondition-queries (gradient-dot)"]
        == plain["precondition-queries (gradient-dot)"]
    )
    for name, n in plain.items():
        if not name.startswith("precondition-queries"):
            assert refined[name] == n, name


def test_refinement_samples_at_most_the_stage_data(tmp_path):
    def flops(samples: int) -> float:
        plan = make_plan(tiny_inputs(tmp_path, refine_steps=1, refine_samples=samples))
        return nodes(plan)["precondition-queries (single-stage)"].flops

    # 1024 fine-tune tokens of 4 per row: 256 rows, so asking for more samples changes nothing.
    assert flops(256) == flops(10_000) > flops(255)


def test_plan_command_prints_the_refinement(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert main([*_argv(tmp_path), "--refine-steps", "20", "--refine-lanczos", "100"]) == 0
    out = capsys.readouterr().out
    assert "refined queries (20 CG steps, 100 Lanczos steps, 128 sampled sequences" in out
    rc, err = _fails([*_argv(tmp_path), "--refine-samples", "0"], capsys)
    assert rc == 2 and "--refine-samples must be at least 1, not 0" in err
