"""The `index` and `attribute` pipelines: compiled IR (nodes, fan-outs, importers of the index
run's outputs, lookup → exact rerank per method), placement as the full pipeline's, the
parameters each pipeline has, and `msif pipeline compile --pipeline`. The kfp.local run of
both against the full pipeline is test_index_attribute_local.py."""

from __future__ import annotations

from collections import Counter

import pytest
import yaml

from msif.workflow.cli import compile_pipeline, default_package, main
from msif.workflow.dag import ATTRIBUTE, FULL, INDEX, PIPELINES, pipeline
from tests.workflow.test_pipeline_compile import (
    GPU_NODES,
    check_dag_inputs,
    check_placement,
    check_retries_and_caching,
    collected_from,
    leaf_tasks,
    loop_body,
    node,
)

PLACEMENT = {
    "accelerator_type",
    "accelerator_count",
    "gpu_node_selector",
    "gpu_cpu_request",
    "gpu_memory_request",
}


def load(path) -> dict:
    spec, platform = yaml.safe_load_all(path.read_text())
    return {"spec": spec, "k8s": platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]}


@pytest.fixture(scope="module")
def irs(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("ir")
    return {n: load(compile_pipeline(out / f"{n}.yaml", pipeline=n)) for n in (INDEX, ATTRIBUTE)}


def test_index_pipeline_nodes(irs):
    spec = irs[INDEX]["spec"]
    assert spec["pipelineInfo"]["name"] == "index"
    assert Counter(node(t) for t in leaf_tasks(spec)) == {
        "shard-indices": 1,
        "fit-covariance": 1,
        "eigendecompose": 1,
        "fit-lambda": 1,
        "build-factors": 1,
        "index": 1,
    }
    root = spec["root"]["dag"]["tasks"]
    (loop,) = [t for t, s in root.items() if "parameterIterator" in s and _body(spec, t) == "index"]
    task = loop_body(spec, loop)
    assert task["inputs"]["parameters"]["model"]["componentInputParameter"].endswith("pt_model_uri")
    assert task["inputs"]["parameters"]["corpus"]["componentInputParameter"].endswith("corpus_uri")
    factors = root[loop]["inputs"]["artifacts"]["pipelinechannel--build-factors-factors"]
    assert factors["taskOutputArtifact"] == {
        "outputArtifactKey": "factors",
        "producerTask": "build-factors",
    }
    stage = root["build-factors"]
    assert collected_from(spec, stage, "partials") == ("fit-lambda", "lambda_sums")


def _body(spec: dict, loop: str) -> str:
    return node(next(iter(loop_body_tasks(spec, loop))))


def loop_body_tasks(spec: dict, loop: str) -> dict:
    comp = spec["root"]["dag"]["tasks"][loop]["componentRef"]["name"]
    return spec["components"][comp]["dag"]["tasks"]


def test_attribute_pipeline_nodes(irs):
    spec = irs[ATTRIBUTE]["spec"]
    assert spec["pipelineInfo"]["name"] == "attribute"
    assert Counter(node(t) for t in leaf_tasks(spec)) == {
        "shard-indices": 1,
        "importer": 2,
        "fit-covariance": 1,
        "eigendecompose": 1,
        "fit-lambda": 1,
        "build-factors": 1,
        "precondition-queries": 2,
        "lookup": 2,
        "score-corpus": 2,
        "bm25": 1,
        "rank": 1,
    }


def test_attribute_wires_imports_lookup_and_rerank_per_method(irs):
    spec = irs[ATTRIBUTE]["spec"]
    root = spec["root"]["dag"]["tasks"]
    # pt factors: one importer of pt_factors_uri; index shards: one per URI of index_uris.
    assert root["importer"]["inputs"]["parameters"]["uri"] == {
        "componentInputParameter": "pt_factors_uri"
    }
    (index_loop,) = [
        t for t, s in root.items() if "parameterIterator" in s and _body(spec, t) == "importer"
    ]
    assert root[index_loop]["parameterIterator"]["items"] == {
        "inputParameter": "pipelinechannel--index_uris"
    }
    rank = root["rank"]
    methods = set()
    for name, task in root.items():
        if node(name) != "precondition-queries":
            continue
        method = task["inputs"]["parameters"]["method"]["runtimeValue"]["constant"]
        methods.add(method)
        pt = task["inputs"]["artifacts"]["pt_factors"]["taskOutputArtifact"]
        assert pt == {"outputArtifactKey": "artifact", "producerTask": "importer"}
        (lookup,) = [
            t
            for t, s in root.items()
            if node(t) == "lookup"
            and s["inputs"]["artifacts"]["preconditioned"]["taskOutputArtifact"]["producerTask"]
            == name
        ]
        assert collected_from(spec, root[lookup], "index") == ("importer", "artifact")
        key = method.replace("-", "_") + "_scores"
        loop = rank["inputs"]["artifacts"][key]["taskOutputArtifact"]["producerTask"]
        arts = root[loop]["inputs"]["artifacts"]
        assert arts[f"pipelinechannel--{lookup}-candidates"]["taskOutputArtifact"] == {
            "outputArtifactKey": "candidates",
            "producerTask": lookup,
        }
        assert arts[f"pipelinechannel--{name}-preconditioned"]["taskOutputArtifact"] == {
            "outputArtifactKey": "preconditioned",
            "producerTask": name,
        }
        (score,) = loop_body_tasks(spec, loop).values()
        assert score["inputs"]["parameters"]["model"]["componentInputParameter"].endswith(
            "pt_model_uri"
        )
    assert methods == {"multi-stage", "gradient-dot"}
    assert "single_stage_scores" not in rank["inputs"]["artifacts"]
    assert rank["inputs"]["artifacts"]["pt_factors"]["taskOutputArtifact"] == {
        "outputArtifactKey": "artifact",
        "producerTask": "importer",
    }


@pytest.mark.parametrize("name", [INDEX, ATTRIBUTE])
def test_placement_retries_and_dag_inputs_as_the_full_pipeline(irs, name):
    ir = irs[name]
    check_placement(ir)
    check_retries_and_caching(ir["spec"])
    check_dag_inputs(ir)
    gpu = {node(t) for t in leaf_tasks(ir["spec"])} & GPU_NODES
    assert gpu == (
        {"fit-covariance", "fit-lambda", "index"} if name == INDEX else GPU_NODES - {"index"}
    )


def _needed(name: str) -> set[str]:
    """The pipeline parameters pipeline name's tasks read: each component input no task
    wiring supplies, the URIs they name, num_shards and the placement parameters."""
    from msif.components import COMPONENTS

    spec = pipeline(name)
    needed = {"num_shards", *PLACEMENT, *(i.parameter for i in spec.imported)}
    for task in spec.tasks:
        wired = {*task.parameters, *task.constants, *task.inputs, "shard"}
        needed |= set(task.parameters.values())
        for arg, spec_ in (COMPONENTS[task.node].component_spec.inputs or {}).items():
            if arg not in wired and not spec_.optional:
                needed.add(arg)
    return needed


@pytest.mark.parametrize("name", PIPELINES)
def test_each_pipeline_has_exactly_the_parameters_its_tasks_read(name):
    from msif.workflow.local_run import pipeline_parameters

    assert set(pipeline_parameters(name)) == _needed(name)


@pytest.mark.parametrize("name", PIPELINES)
def test_option_defaults_are_msif_config_s(irs, name):
    from msif.workflow.dag import default_option_parameters

    spec = irs[name]["spec"] if name in irs else load(default_package(FULL))["spec"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    defaults = {k: v["defaultValue"] for k, v in params.items() if "defaultValue" in v}
    options = default_option_parameters()
    from msif.config import IndexOptions, LookupOptions
    from msif.workflow.dag import option_parameters

    options.update(option_parameters(IndexOptions(), LookupOptions()))
    for key, value in defaults.items():
        if key not in PLACEMENT | {"num_shards"}:
            assert options[key] == value, key


def test_compile_command_writes_the_pipeline_asked_for(tmp_path, capsys):
    out = tmp_path / "a.yaml"
    assert main(["pipeline", "compile", "--pipeline", "attribute", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert load(out)["spec"]["pipelineInfo"]["name"] == "attribute"
    with pytest.raises(SystemExit) as bad:
        main(["pipeline", "compile", "--pipeline", "nope", "--out", str(out)])
    assert bad.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
