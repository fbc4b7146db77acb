"""The KFP pipeline: compiled IR (nodes, fan-out/fan-in, GPU placement, retries, artifact
types, caching), the committed YAML, the compile command and the rank node's UI outputs.
The kfp.local end-to-end run is in test_gcs_end_to_end.py, with gs:// inputs."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from msif.components.image import DEFAULT_IMAGE, IMAGE_ENV

from msif.cli import build_parser
from msif.errors import MsifError
from msif.workflow.cli import compile_pipeline, default_package, main

# Over every pipeline (the full one, index and attribute); msif.workflow.dag's and
# msif.pipelines.build's sets must say the same.
GPU_NODES = {"fit-covariance", "fit-lambda", "precondition-queries", "index", "score-corpus"}
CPU_NODES = {"shard-indices", "eigendecompose", "build-factors", "lookup", "bm25", "rank"}
SHARDED = {"fit-covariance", "fit-lambda", "index", "score-corpus"}
FULL_NODES = (GPU_NODES | CPU_NODES) - {"index", "lookup"}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_image_env(monkeypatch):
    # The default image is part of what the committed YAML pins.
    monkeypatch.delenv(IMAGE_ENV, raising=False)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
    saved = os.environ.pop(IMAGE_ENV, None)
    try:
        return compile_pipeline(out)
    finally:
        if saved is not None:
            os.environ[IMAGE_ENV] = saved


@pytest.fixture(scope="module")
def ir(compiled) -> dict:
    docs = list(yaml.safe_load_all(compiled.read_text()))
    assert len(docs) == 2, "pipeline spec + kfp-kubernetes platform spec"
    spec, platform = docs
    return {
        "spec": spec,
        "k8s": platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"],
    }


def node(name: str) -> str:
    """Task/executor name → component function name (`exec-score-shard-3` → `score-shard`)."""
    return re.sub(r"-\d+$", "", name.removeprefix("exec-"))


def dags(spec: dict) -> dict[str, dict]:
    """Every DAG in the spec (the root and each ParallelFor body), by component name."""
    out = {"root": spec["root"]}
    out.update({k: c for k, c in spec["components"].items() if "dag" in c})
    return out


def tasks(spec: dict) -> dict[str, tuple[str, dict]]:
    """Every task of every DAG: task name → (DAG name, task spec)."""
    return {t: (d, s) for d, c in dags(spec).items() for t, s in c["dag"]["tasks"].items()}


def executor(spec: dict, task: dict) -> str:
    return spec["components"][task["componentRef"]["name"]]["executorLabel"]


def leaf_tasks(spec: dict) -> dict[str, tuple[str, dict]]:
    """Tasks that run a container (not ParallelFor DAG tasks)."""
    return {
        t: (d, s)
        for t, (d, s) in tasks(spec).items()
        if "executorLabel" in spec["components"][s["componentRef"]["name"]]
    }


def loop_of(spec: dict, dag_name: str) -> dict:
    """The root task that runs the ParallelFor DAG dag_name."""
    (task,) = [
        s for s in spec["root"]["dag"]["tasks"].values() if s["componentRef"]["name"] == dag_name
    ]
    return task


def test_node_set(ir):
    counts = Counter(node(t) for t in leaf_tasks(ir["spec"]))
    assert counts == {
        "shard-indices": 1,
        "fit-covariance": 2,
        "eigendecompose": 2,
        "fit-lambda": 2,
        "build-factors": 2,
        "precondition-queries": 3,
        "score-corpus": 3,
        "bm25": 1,
        "rank": 1,
    }
    assert ir["spec"]["pipelineInfo"]["name"] == "multi-stage-influence"


def test_sharded_nodes_fan_out_over_shard_indices(ir):
    spec = ir["spec"]
    loops = 0
    for name, (dag, task) in leaf_tasks(spec).items():
        if node(name) not in SHARDED:
            assert dag == "root", f"{name} must not run per shard"
            continue
        loops += 1
        iterator = loop_of(spec, dag)["parameterIterator"]
        assert iterator["items"]["inputParameter"] == "pipelinechannel--shard-indices-Output"
        item = task["inputs"]["parameters"]["shard"]["componentInputParameter"]
        assert item == iterator["itemInput"] == "pipelinechannel--shard-indices-Output-loop-item"
        assert task["inputs"]["parameters"]["num_shards"] == {
            "componentInputParameter": "pipelinechannel--num_shards"
        }
    assert loops == 7  # covariance and Λ for two stages, scoring for three methods
    shards = spec["root"]["dag"]["tasks"]["shard-indices"]["inputs"]["parameters"]
    assert shards["num_shards"] == {"componentInputParameter": "num_shards"}


def collected_from(spec: dict, dag_task: dict, input_name: str) -> tuple[str, str]:
    """(producing node, its output) behind a dsl.Collected input of a root task."""
    source = dag_task["inputs"]["artifacts"][input_name]["taskOutputArtifact"]
    loop = spec["root"]["dag"]["tasks"][source["producerTask"]]
    body = spec["components"][loop["componentRef"]["name"]]
    assert body["outputDefinitions"]["artifacts"][source["outputArtifactKey"]]["isArtifactList"]
    (selector,) = body["dag"]["outputs"]["artifacts"][source["outputArtifactKey"]][
        "artifactSelectors"
    ]
    return node(selector["producerSubtask"]), selector["outputArtifactKey"]


def loop_body(spec: dict, loop_task: str) -> dict:
    """The one task inside the ParallelFor that root task loop_task runs."""
    comp = spec["root"]["dag"]["tasks"][loop_task]["componentRef"]["name"]
    (task,) = spec["components"][comp]["dag"]["tasks"].values()
    return task


def stage_of(spec: dict, task: dict) -> str:
    return task["inputs"]["parameters"]["stage"]["runtimeValue"]["constant"]


def test_each_stage_chain_reduces_its_own_shards(ir):
    spec = ir["spec"]
    root = spec["root"]["dag"]["tasks"]
    inputs = {"pt": ("pt_model_uri", "corpus_uri"), "ft": ("ft_model_uri", "finetune_data_uri")}
    seen = set()
    for name, task in root.items():
        if node(name) != "build-factors":
            continue
        eig = root[task["inputs"]["artifacts"]["eigenbasis"]["taskOutputArtifact"]["producerTask"]]
        assert collected_from(spec, task, "partials") == ("fit-lambda", "lambda_sums")
        assert collected_from(spec, eig, "partials") == ("fit-covariance", "covariance")
        lam_loop = task["inputs"]["artifacts"]["partials"]["taskOutputArtifact"]["producerTask"]
        cov_loop = eig["inputs"]["artifacts"]["partials"]["taskOutputArtifact"]["producerTask"]
        lam, cov = loop_body(spec, lam_loop), loop_body(spec, cov_loop)
        stage = stage_of(spec, cov)
        assert stage_of(spec, lam) == stage
        model, data = inputs[stage]
        for t in (cov, lam):
            assert t["inputs"]["parameters"]["model"]["componentInputParameter"].endswith(model)
            assert t["inputs"]["parameters"]["data"]["componentInputParameter"].endswith(data)
        # Λ is fitted in this stage's eigenbasis, passed into the loop from the same node.
        eig_name = task["inputs"]["artifacts"]["eigenbasis"]["taskOutputArtifact"]["producerTask"]
        assert root[lam_loop]["inputs"]["artifacts"][f"pipelinechannel--{eig_name}-eigenbasis"][
            "taskOutputArtifact"
        ] == {"outputArtifactKey": "eigenbasis", "producerTask": eig_name}
        seen.add(stage)
    assert seen == {"pt", "ft"}


def factors_stage(spec: dict, build_task_name: str) -> str:
    root = spec["root"]["dag"]["tasks"]
    eig = root[build_task_name]["inputs"]["artifacts"]["eigenbasis"]["taskOutputArtifact"]
    cov_loop = root[eig["producerTask"]]["inputs"]["artifacts"]["partials"]
    return stage_of(spec, loop_body(spec, cov_loop["taskOutputArtifact"]["producerTask"]))


def test_methods_get_the_right_factors_models_and_reach_rank(ir):
    spec = ir["spec"]
    root = spec["root"]["dag"]["tasks"]
    # gradient-dot applies no factors; the pre-train ones name the model its corpus needs
    expected = {"multi-stage": {"ft", "pt"}, "single-stage": {"ft"}, "gradient-dot": {"pt"}}
    score_model = {"multi-stage": "pt_model_uri", "single-stage": "ft_model_uri"}
    score_model["gradient-dot"] = "pt_model_uri"
    rank = root["rank"]
    for name, task in root.items():
        if node(name) != "precondition-queries":
            continue
        method = task["inputs"]["parameters"]["method"]["runtimeValue"]["constant"]
        arts = task["inputs"].get("artifacts", {})
        stages = {}
        for key, value in arts.items():
            stages[key] = factors_stage(spec, value["taskOutputArtifact"]["producerTask"])
        assert {k: v for k, v in stages.items()} == {f"{s}_factors": s for s in expected[method]}
        assert task["inputs"]["parameters"]["model"] == {"componentInputParameter": "ft_model_uri"}
        # What --refine-steps samples: each stage's data, and θ_pt.
        refine = {"pt_model": "pt_model_uri", "corpus": "corpus_uri"}
        refine.update(finetune_data="finetune_data_uri", refine_steps="refine_steps")
        refine.update(refine_samples="refine_samples", refine_lanczos="refine_lanczos")
        for arg, param in refine.items():
            assert task["inputs"]["parameters"][arg] == {"componentInputParameter": param}
        # The method's scores: a ParallelFor over shards fed by this node, collected by rank.
        key = method.replace("-", "_") + "_scores"
        source = rank["inputs"]["artifacts"][key]["taskOutputArtifact"]["producerTask"]
        loop = root[source]
        assert loop["inputs"]["artifacts"][f"pipelinechannel--{name}-preconditioned"][
            "taskOutputArtifact"
        ] == {"outputArtifactKey": "preconditioned", "producerTask": name}
        assert collected_from(spec, rank, key) == ("score-corpus", "scores")
        body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
        (score,) = body.values()
        model = score["inputs"]["parameters"]["model"]["componentInputParameter"]
        assert model == f"pipelinechannel--{score_model[method]}"
    assert rank["inputs"]["artifacts"]["bm25_scores"]["taskOutputArtifact"] == {
        "outputArtifactKey": "scores",
        "producerTask": "bm25",
    }
    factor_inputs = {k: rank["inputs"]["artifacts"][f"{k}_factors"] for k in ("pt", "ft")}
    for stage, ref in factor_inputs.items():
        assert factors_stage(spec, ref["taskOutputArtifact"]["producerTask"]) == stage


def test_node_sets_agree_with_the_dag_and_the_placement():
    from msif.pipelines.build import CPU_NODES as PLACED

    from msif.workflow.dag import GPU_NODES as DAG_GPU
    from msif.workflow.dag import PIPELINES, pipeline

    assert DAG_GPU == GPU_NODES and set(PLACED) == CPU_NODES
    used = {t.node for n in PIPELINES for t in pipeline(n).tasks} | {"shard-indices"}
    assert used == GPU_NODES | CPU_NODES
    assert {t.node for n in PIPELINES for t in pipeline(n).tasks if t.sharded} == SHARDED


def check_placement(ir: dict) -> None:
    """Accelerators, tolerations and node selectors on GPU nodes only; CPU nodes light."""
    spec, k8s = ir["spec"], ir["k8s"]
    executors = spec["deploymentSpec"]["executors"]
    for label, ex in executors.items():
        if "importer" in ex:  # no pod: KFP's driver records the URI
            continue
        resources = ex["container"]["resources"]
        platform = k8s.get(label, {})
        assert platform["podMetadata"]["labels"] == {"app.kubernetes.io/part-of": "msif"}
        if node(label) in GPU_NODES:
            assert resources["accelerator"]["resourceType"] == (
                "{{$.inputs.parameters['pipelinechannel--accelerator_type']}}"
            )
            assert resources["accelerator"]["resourceCount"] == (
                "{{$.inputs.parameters['pipelinechannel--accelerator_count']}}"
            )
            assert resources["resourceCpuRequest"].endswith(
                "['pipelinechannel--gpu_cpu_request']}}"
            )
            assert platform["tolerations"] == [
                {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}
            ]
            selector = platform["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"]
            assert selector.endswith("gpu_node_selector")
        else:
            assert "accelerator" not in resources, label
            assert float(resources["cpuRequest"]) <= 4 and resources["memoryRequest"] > 0
            assert "tolerations" not in platform and "nodeSelector" not in platform


def test_accelerators_tolerations_and_selectors_only_on_gpu_nodes(ir):
    executors = ir["spec"]["deploymentSpec"]["executors"]
    assert {node(e) for e in executors} == FULL_NODES
    check_placement(ir)


def check_retries_and_caching(spec: dict) -> None:
    """Retries on GPU nodes only, caching on every task that runs a container."""
    for name, (_, task) in leaf_tasks(spec).items():
        if node(name) == "importer":
            continue
        assert task["cachingOptions"] == {"enableCache": True}, name
        if node(name) in GPU_NODES:
            assert task["retryPolicy"] == {
                "backoffDuration": "60s",
                "backoffFactor": 2.0,
                "backoffMaxDuration": "3600s",
                "maxRetryCount": 3,
            }, name
        else:
            assert "retryPolicy" not in task, name


def test_retry_only_on_gpu_nodes_and_caching_everywhere(ir):
    check_retries_and_caching(ir["spec"])


def test_artifact_types_between_nodes(ir):
    comps = ir["spec"]["components"]

    def out_type(comp: str, key: str) -> str:
        return comps[comp]["outputDefinitions"]["artifacts"][key]["artifactType"]["schemaTitle"]

    assert out_type("comp-fit-covariance", "covariance") == "system.Artifact"
    assert out_type("comp-eigendecompose", "eigenbasis") == "system.Artifact"
    assert out_type("comp-fit-lambda", "lambda_sums") == "system.Artifact"
    assert out_type("comp-build-factors", "factors") == "system.Artifact"
    assert out_type("comp-precondition-queries", "preconditioned") == "system.Artifact"
    assert out_type("comp-score-corpus", "scores") == "system.Dataset"
    assert out_type("comp-bm25", "scores") == "system.Dataset"
    rank_outputs = {k: out_type("comp-rank", k) for k in ("ranking", "metrics", "report")}
    rank_outputs["report_html"] = out_type("comp-rank", "report_html")
    assert rank_outputs == {
        "ranking": "system.Dataset",
        "metrics": "system.Metrics",
        "report": "system.Markdown",
        "report_html": "system.HTML",
    }
    rank_in = comps["comp-rank"]["inputDefinitions"]["artifacts"]
    lists = {k for k, v in rank_in.items() if v.get("isArtifactList")}
    assert lists == {"multi_stage_scores", "single_stage_scores", "gradient_dot_scores"}
    # Optional: the attribute pipeline leaves single-stage out.
    assert all(rank_in[k].get("isOptional") for k in lists)
    score_in = comps["comp-score-corpus"]["inputDefinitions"]["artifacts"]
    assert score_in["candidates"]["isOptional"] is True  # unconnected: the whole shard
    optional = comps["comp-precondition-queries"]["inputDefinitions"]["artifacts"]
    assert {k: v.get("isOptional") for k, v in optional.items()} == {
        "ft_factors": True,
        "pt_factors": True,
    }
    # Models and data are URI parameters, never artifacts the pod would download whole.
    for comp in ("comp-fit-covariance", "comp-fit-lambda", "comp-score-corpus"):
        params = comps[comp]["inputDefinitions"]["parameters"]
        assert params["model"]["parameterType"] == "STRING"


def check_dag_inputs(ir: dict) -> None:
    """kfp 2.17.3 forgets resource-only parameters in ParallelFor DAGs unless registered."""
    spec, k8s = ir["spec"], ir["k8s"]
    for dag_name, comp in dags(spec).items():
        have = set(comp.get("inputDefinitions", {}).get("parameters", {}))
        have |= set(comp.get("inputDefinitions", {}).get("artifacts", {}))
        for name, task in comp["dag"]["tasks"].items():
            refs = [
                v["componentInputParameter"]
                for v in task.get("inputs", {}).get("parameters", {}).values()
                if "componentInputParameter" in v
            ]
            refs += [
                v["componentInputArtifact"]
                for v in task.get("inputs", {}).get("artifacts", {}).values()
                if "componentInputArtifact" in v
            ]
            label = spec["components"][task["componentRef"]["name"]].get("executorLabel")
            selector = k8s.get(label, {}).get("nodeSelector", {}).get("nodeSelectorJson", {})
            refs += [selector["componentInputParameter"]] if selector else []
            missing = sorted(set(refs) - have)
            assert not missing, f"{dag_name}/{name} references missing inputs {missing}"
        # Placeholders in resource settings must name inputs of the task itself.
        for name, task in comp["dag"]["tasks"].items():
            label = spec["components"][task["componentRef"]["name"]].get("executorLabel")
            if not label or "container" not in spec["deploymentSpec"]["executors"][label]:
                continue
            res = json.dumps(spec["deploymentSpec"]["executors"][label]["container"]["resources"])
            for param in re.findall(r"parameters\['([^']+)'\]", res):
                assert param in task["inputs"]["parameters"], (name, param)


def test_every_referenced_dag_input_exists(ir):
    check_dag_inputs(ir)


def test_runtime_parameters_and_defaults(ir):
    params = ir["spec"]["root"]["inputDefinitions"]["parameters"]
    required = {k for k, v in params.items() if "defaultValue" not in v and not v.get("isOptional")}
    assert required == {
        "pt_model_uri",
        "ft_model_uri",
        "corpus_uri",
        "finetune_data_uri",
        "queries_uri",
    }
    defaults = {k: v["defaultValue"] for k, v in params.items() if "defaultValue" in v}
    assert defaults == {
        "num_shards": 4,
        "max_length": 512,
        "batch_size": 8,
        "seed": 0,
        "device": "auto",
        "dtype": "float32",
        "include": [],
        "exclude": [],
        "split_heads": False,
        "split_heads_pattern": [],
        "embeddings": False,
        "lm_head": False,
        "module_groups": 1,
        "factor_dtype": "float32",
        "alpha": 0.001,
        "damping_factor": 0.01,
        "damping": 0.0,
        "query_rank": 0,
        "refine_steps": 0,
        "refine_lanczos": 0,
        "refine_samples": 128,
        "top_k": 100,
        "explain_k": 10,
        "full": False,
        "contraction": "auto",
        "report_k": 5,
        "text_column": "text",
        "id_column": "id",
        "prompt_column": "prompt",
        "completion_column": "completion",
        "messages_column": "messages",
        "split": "",
        "append_eos": "auto",
        "accelerator_type": "nvidia.com/gpu",
        "accelerator_count": 1,
        "gpu_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
        "gpu_cpu_request": "8",
        "gpu_memory_request": "48Gi",
    }
    # Every run option of msif.config is a pipeline parameter of the same name and default.
    from msif.workflow.dag import default_option_parameters

    for name, value in default_option_parameters().items():
        assert defaults[name] == value, name


def test_committed_yaml_is_current(compiled):
    committed = default_package()
    assert committed == ROOT / "pipelines" / "multi_stage_influence.yaml"
    assert committed.read_text() == compiled.read_text(), (
        "pipelines/multi_stage_influence.yaml is stale: run `msif pipeline compile`"
    )


@pytest.mark.parametrize("name, stem", [("index", "index"), ("attribute", "attribute")])
def test_committed_index_and_attribute_yaml_are_current(name, stem, tmp_path):
    committed = default_package(name)
    assert committed == ROOT / "pipelines" / f"{stem}.yaml"
    assert (
        committed.read_text() == compile_pipeline(tmp_path / "p.yaml", pipeline=name).read_text()
    ), f"pipelines/{stem}.yaml is stale: run `msif pipeline compile --pipeline {name}`"


def test_compile_is_deterministic(compiled, tmp_path):
    again = compile_pipeline(tmp_path / "again.yaml")
    assert again.read_bytes() == compiled.read_bytes()


def test_compile_options_change_image_and_defaults_only(compiled, tmp_path, capsys):
    out = tmp_path / "custom.yaml"
    image = "europe-docker.pkg.dev/proj/repo/msif:1.2.3"
    argv = ["pipeline", "compile", "--out", str(out), "--image", image]
    argv += ["--accelerator-type", "NVIDIA_L4", "--gke-accelerator", ""]
    argv += ["--accelerator-count", "2"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    spec = next(yaml.safe_load_all(out.read_text()))
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {image}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["accelerator_type"]["defaultValue"] == "NVIDIA_L4"
    assert params["accelerator_count"]["defaultValue"] == 2
    assert params["gpu_node_selector"]["defaultValue"] == {}
    base = next(yaml.safe_load_all(compiled.read_text()))
    base_images = {e["container"]["image"] for e in base["deploymentSpec"]["executors"].values()}
    assert base_images == {DEFAULT_IMAGE}
    # The environment and the imported components are as they were before the compile.
    assert IMAGE_ENV not in os.environ
    import msif.components

    assert msif.components.IMAGE == DEFAULT_IMAGE
    assert msif.components.rank.component_spec.implementation.container.image == DEFAULT_IMAGE


def test_compile_reads_image_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(IMAGE_ENV, "ghcr.io/acme/msif:env")
    out = compile_pipeline(tmp_path / "env.yaml")
    spec = next(yaml.safe_load_all(out.read_text()))
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"ghcr.io/acme/msif:env"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "Not An Image"], "--image 'Not An Image' is not a container image"),
        (["--accelerator-count", "-1"], "--accelerator-count must be >= 0, not -1"),
    ],
)
def test_compile_bad_options_write_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "bad.yaml"
    assert main(["pipeline", "compile", "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"msif: error: {message}") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


class FakeCli:
    """Stands in for msif.cli.main inside component bodies: records argv, writes rank outputs."""

    def __init__(self, rc: int = 0):
        self.rc, self.calls = rc, []

    def __call__(self, argv):
        self.calls.append(list(argv))
        if argv[0] == "rank" and self.rc == 0:
            self._publish_rank(argv[argv.index("--out") + 1])
        return self.rc

    @staticmethod
    def _publish_rank(uri: str) -> None:
        # Published as the rank node publishes: the component reads it back by its manifest.
        from msif.storage.publish import staged_output_dir

        with staged_output_dir(uri, {"node": "rank"}) as out:
            metrics = {
                "methods": {
                    "multi-stage": {"mrr": 0.75, "recall@10": 0.5, "num_queries": 4},
                    "bm25": {"mrr": 0.25, "recall@10": None, "num_queries": 4},
                },
                "top_k": 5,
            }
            (out / "metrics.json").write_text(json.dumps(metrics))
            (out / "report.md").write_text("# report\n")
            (out / "report.html").write_text("<h1>report</h1>\n")


@pytest.fixture
def fake_cli(monkeypatch) -> FakeCli:
    import msif.cli

    fake = FakeCli()
    monkeypatch.setattr(msif.cli, "main", fake)
    return fake


def art(tmp_path: Path, name: str, cls=None):
    from kfp.dsl import Artifact

    return (cls or Artifact)(name=name, uri=str(tmp_path / name), metadata={})


def test_components_map_artifacts_onto_the_cli(fake_cli, tmp_path):
    import msif.components as c

    p = dict(max_length=32, batch_size=4, seed=7, device="cpu", dtype="float64")
    p.update(include=["mlp"], exclude=[], split_heads=True, split_heads_pattern=["fc$"])
    p.update(embeddings=True, lm_head=False)
    columns = dict(text_column="body", id_column="id", prompt_column="prompt")
    columns.update(completion_column="completion", messages_column="messages", split="")
    p.update(columns, append_eos="on")
    cov = art(tmp_path, "cov")
    # Local runs hand ParallelFor items over as floats: 1.0 must become "1".
    c.fit_covariance.python_func("m", "d", "pt", 1.0, 2.0, covariance=cov, module_groups=2, **p)
    eig = art(tmp_path, "eig")
    c.eigendecompose.python_func([art(tmp_path, "c0"), art(tmp_path, "c1")], eig, "float64")
    lam = art(tmp_path, "lam")
    c.fit_lambda.python_func("m", "d", "ft", eig, 0.0, 2, lambda_sums=lam, module_groups=3, **p)
    fac = art(tmp_path, "fac")
    c.build_factors.python_func(eig, [art(tmp_path, "l0")], fac)
    pre = art(tmp_path, "pre")
    damp = dict(damping_factor=0.1, damping=0.0, query_rank=8)
    # KFP strings cannot be None: an empty stage URI is not passed on.
    refine = dict(refine_steps=3, refine_lanczos=5, refine_samples=64, pt_model="pt")
    refine.update(corpus="corpus")
    c.precondition_queries.python_func(
        "ft", "q", "multi-stage", pre, alpha=0.01, ft_factors=fac,
        pt_factors=art(tmp_path, "ptf"), **damp, **refine, finetune_data="", **p,
    )  # fmt: skip
    unrefined = dict(refine_steps=0, refine_lanczos=0, refine_samples=128, pt_model="")
    unrefined.update(corpus="", finetune_data="")
    c.precondition_queries.python_func(
        "ft", "q", "gradient-dot", pre, alpha=0.0, **damp, **unrefined, **p
    )
    sc = art(tmp_path, "sc")
    scoring = dict(top_k=5, explain_k=2, full=False, contraction="per-token")
    c.score_corpus.python_func("pt", "corpus", pre, 1.0, 2, sc, **scoring, **p)
    c.bm25.python_func("corpus", "q", sc, 5, **columns)
    t = str(tmp_path)
    opts = ["--max-length", "32", "--batch-size", "4", "--seed", "7", "--device", "cpu"]
    opts += ["--dtype", "float64", "--include", "mlp", "--split-heads"]
    opts += ["--split-heads-pattern", "fc$", "--embeddings"]
    cols = ["--text-column", "body", "--id-column", "id", "--prompt-column", "prompt"]
    cols += ["--completion-column", "completion", "--messages-column", "messages"]
    cols += ["--split", ""]
    # The fit nodes' --module-groups comes after the module options, before the columns.
    cov_opts = [*opts, "--module-groups", "2", *cols, "--append-eos", "on"]
    lam_opts = [*opts, "--module-groups", "3", *cols, "--append-eos", "on"]
    opts += [*cols, "--append-eos", "on"]
    pq_ = ["--damping-factor", "0.1", "--query-rank", "8"]
    assert fake_cli.calls == [
        ["fit-covariance", "--out", f"{t}/cov", "--model", "m", "--data", "d", "--stage", "pt",
         "--shard", "1", "--num-shards", "2", *cov_opts],
        ["eigendecompose", "--out", f"{t}/eig", "--partials", f"{t}/c0", f"{t}/c1",
         "--factor-dtype", "float64"],
        ["fit-lambda", "--out", f"{t}/lam", "--model", "m", "--data", "d", "--stage", "ft",
         "--eigenbasis", f"{t}/eig", "--shard", "0", "--num-shards", "2", *lam_opts],
        ["build-factors", "--out", f"{t}/fac", "--eigenbasis", f"{t}/eig", "--partials", f"{t}/l0"],
        ["precondition-queries", "--out", f"{t}/pre", "--model", "ft", "--queries", "q",
         "--method", "multi-stage", "--alpha", "0.01", *pq_, "--refine-steps", "3",
         "--refine-lanczos", "5", "--refine-samples", "64", "--pt-model", "pt",
         "--corpus", "corpus", *opts,
         "--ft-factors", f"{t}/fac", "--pt-factors", f"{t}/ptf"],
        ["precondition-queries", "--out", f"{t}/pre", "--model", "ft", "--queries", "q",
         "--method", "gradient-dot", *pq_, "--refine-steps", "0",
         "--refine-lanczos", "0", "--refine-samples", "128",
         *opts],
        ["score-corpus", "--out", f"{t}/sc", "--model", "pt", "--corpus", "corpus",
         "--preconditioned", f"{t}/pre", "--shard", "1", "--num-shards", "2", "--top-k", "5",
         "--explain-k", "2", "--contraction", "per-token", *opts],
        ["bm25", "--out", f"{t}/sc", "--corpus", "corpus", "--queries", "q", "--top-k", "5",
         *cols],
    ]  # fmt: skip
    for argv in fake_cli.calls:  # every argv the components build parses
        build_parser().parse_args(argv)
    assert c.shard_indices.python_func(num_shards=3.0) == [0, 1, 2]
    with pytest.raises(ValueError, match="num_shards must be at least 1, not 0"):
        c.shard_indices.python_func(num_shards=0)


def test_a_component_argument_the_cli_lacks_is_refused(fake_cli, tmp_path):
    from msif.cli import run_subcommand

    with pytest.raises(MsifError, match="msif bm25 has no option for 'seed'"):
        run_subcommand("bm25", corpus="c", queries="q", top_k=5, seed=0, out=str(tmp_path))
    assert fake_cli.calls == []


DEFAULT_COLUMNS = dict(text_column="text", id_column="id", prompt_column="prompt")
DEFAULT_COLUMNS.update(completion_column="completion", messages_column="messages", split="")


def test_rank_component_fills_the_ui_artifacts(fake_cli, tmp_path):
    import msif.components as c
    from kfp.dsl import HTML, Markdown, Metrics

    scores = [[art(tmp_path, f"{m}{i}") for i in range(2)] for m in ("ms", "ss", "gd")]
    ranking, metrics = art(tmp_path, "ranking"), art(tmp_path, "metrics", Metrics)
    report, html = art(tmp_path, "report", Markdown), art(tmp_path, "report_html", HTML)
    c.rank.python_func(
        "corpus", "q", art(tmp_path, "bm25"), art(tmp_path, "ptf"),
        art(tmp_path, "ftf"), ranking, metrics, report, html, top_k=5, report_k=3,
        **DEFAULT_COLUMNS, multi_stage_scores=scores[0], single_stage_scores=scores[1],
        gradient_dot_scores=scores[2],
    )  # fmt: skip
    t = str(tmp_path)
    shards = [f"{t}/{m}{i}" for m in ("ms", "ss", "gd") for i in range(2)] + [f"{t}/bm25"]
    assert fake_cli.calls == [
        ["rank", "--scores", *shards, "--corpus", "corpus", "--queries", "q",
         "--factors", f"{t}/ptf", f"{t}/ftf", "--top-k", "5", "--report-k", "3",
         "--text-column", "text", "--id-column", "id", "--prompt-column", "prompt",
         "--completion-column", "completion", "--messages-column", "messages", "--split", "",
         "--out", f"{t}/ranking"],
    ]  # fmt: skip
    assert metrics.metadata == {
        "multi-stage_mrr": 0.75,
        "multi-stage_recall-at-10": 0.5,
        "multi-stage_num_queries": 4.0,
        "bm25_mrr": 0.25,
        "bm25_num_queries": 4.0,
        "top_k": 5.0,
    }
    assert Path(report.path).read_text() == "# report\n"
    assert Path(html.path).read_text() == "<h1>report</h1>\n"


def test_index_lookup_and_rerank_components_map_onto_the_cli(fake_cli, tmp_path):
    import msif.components as c
    from kfp.dsl import HTML, Markdown, Metrics

    p = dict(max_length=32, batch_size=4, seed=0, device="cpu", dtype="float32")
    p.update(include=[], exclude=[], split_heads=False, split_heads_pattern=[])
    p.update(embeddings=False, lm_head=False, append_eos="auto", **DEFAULT_COLUMNS)
    indexing = dict(index_tier="factored", index_rank=32, index_whitening=0.5, index_values=4096)
    ptf, ix = art(tmp_path, "ptf"), art(tmp_path, "ix")
    c.index.python_func("pt", "corpus", ptf, 1.0, 2, ix, **indexing, index_dtype="float32", **p)
    pre, cand = art(tmp_path, "pre"), art(tmp_path, "cand")
    c.lookup.python_func(
        [art(tmp_path, "i0"), art(tmp_path, "i1")], pre, cand, 12, "both", bm25=art(tmp_path, "b")
    )
    sc = art(tmp_path, "sc")
    scoring = dict(top_k=5, explain_k=2, full=False, contraction="auto")
    c.score_corpus.python_func("pt", "corpus", pre, 0, 1, sc, **scoring, **p, candidates=cand)
    ranking, metrics = art(tmp_path, "ranking"), art(tmp_path, "metrics", Metrics)
    report, html = art(tmp_path, "report", Markdown), art(tmp_path, "report_html", HTML)
    c.rank.python_func(
        "corpus", "q", art(tmp_path, "bm25"), ptf, art(tmp_path, "ftf"), ranking, metrics,
        report, html, top_k=5, report_k=3, **DEFAULT_COLUMNS, multi_stage_scores=[sc],
        gradient_dot_scores=[art(tmp_path, "gd")],
    )  # fmt: skip
    t = str(tmp_path)
    assert fake_cli.calls[0][:9] == [
        "index", "--out", f"{t}/ix", "--model", "pt", "--corpus", "corpus", "--pt-factors",
        f"{t}/ptf",
    ]  # fmt: skip
    assert fake_cli.calls[0][9:15] == [
        "--shard",
        "1",
        "--num-shards",
        "2",
        "--index-tier",
        "factored",
    ]
    assert ["--index-rank", "32"] == fake_cli.calls[0][15:17]
    assert fake_cli.calls[1] == [
        "lookup", "--out", f"{t}/cand", "--index", f"{t}/i0", f"{t}/i1", "--preconditioned",
        f"{t}/pre", "--top-c", "12", "--candidates-from", "both", "--bm25", f"{t}/b",
    ]  # fmt: skip
    assert fake_cli.calls[2][-2:] == ["--candidates", f"{t}/cand"]
    # Single-stage unconnected: rank merges the methods it was given, and bm25.
    assert fake_cli.calls[3][:5] == ["rank", "--scores", f"{t}/sc", f"{t}/gd", f"{t}/bm25"]
    for argv in fake_cli.calls:
        build_parser().parse_args(argv)


def test_component_failure_raises(fake_cli, tmp_path):
    import msif.components as c

    fake_cli.rc = 1
    # SystemExit: the task process ends with the node's code, no traceback after its line.
    with pytest.raises(SystemExit, match="msif bm25 failed with exit code 1") as failed:
        c.bm25.python_func("corpus", "q", art(tmp_path, "sc"), 5, **DEFAULT_COLUMNS)
    assert failed.value.code == 1


def test_local_parameters_are_checked(tmp_path):
    from msif.workflow.local_run import LocalRunError, check_parameters, pipeline_parameters

    required = {k for k, v in pipeline_parameters().items() if v}
    assert required == {
        "pt_model_uri",
        "ft_model_uri",
        "corpus_uri",
        "finetune_data_uri",
        "queries_uri",
    }
    with pytest.raises(LocalRunError, match=r"unknown pipeline parameter\(s\) shards;"):
        check_parameters({"shards": 2})
    with pytest.raises(
        LocalRunError, match="missing required pipeline parameter\\(s\\) corpus_uri"
    ):
        check_parameters({k: "x" for k in required - {"corpus_uri"}})
