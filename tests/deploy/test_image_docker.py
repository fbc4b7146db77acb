"""The CPU component image, for real: built with images/build.sh when the daemon lacks it, then
run as uid 1000 with host networking (there is no bridge where images/dockerd.sh runs it):
the components and pipeline import, `msif --help` answers, a node (`msif bm25`) runs with a
read-only root file system (tmpfs /tmp, the artifact dir mounted), and a missing input ends
in the one-line `msif: error:` with a non-zero exit. Then the main job on the small world with
every node in a container (`msif run --runner docker`, inputs over gs:// from the emulator)
against the in-process run, and bad inputs failing a containerized task.

Skipped without a reachable daemon, unless MSIF_REQUIRE_DOCKER=1 (scripts/test.sh sets it
when it started one itself): then a missing daemon is a failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.support.limits import time_limit

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("MSIF_TEST_IMAGE", "msif:cpu")


def _docker() -> str:
    client = shutil.which("docker")
    if client is None:
        if os.environ.get("MSIF_REQUIRE_DOCKER") == "1":
            pytest.fail("MSIF_REQUIRE_DOCKER=1 but there is no docker client on PATH")
        pytest.skip("no docker client on PATH")
    probe = subprocess.run(
        [client, "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        if os.environ.get("MSIF_REQUIRE_DOCKER") == "1":
            pytest.fail("MSIF_REQUIRE_DOCKER=1 but no docker daemon answers: " + probe.stderr)
        pytest.skip(
            "no docker daemon reachable (start one with images/dockerd.sh start DIR and "
            "export the DOCKER_HOST it prints): " + (probe.stderr.strip().splitlines() or [""])[-1]
        )
    return client


@pytest.fixture(scope="module")
def image() -> tuple[str, str]:
    client = _docker()
    have = subprocess.run([client, "image", "inspect", IMAGE], capture_output=True)
    if have.returncode != 0:
        subprocess.run([str(ROOT / "images" / "build.sh"), "cpu", IMAGE], check=True, timeout=3600)
    return client, IMAGE


def run(image, *args, mounts=(), read_only=False, **kw):
    client, tag = image
    cmd = [client, "run", "--rm", "--network", "host", "--user", "1000"]
    if read_only:
        cmd += ["--read-only", "--tmpfs", "/tmp:rw,size=256m", "--tmpfs", "/home/msif:rw,uid=1000"]
    for host, inside in mounts:
        cmd += ["--volume", f"{host}:{inside}"]
    return subprocess.run([*cmd, tag, *args], capture_output=True, text=True, timeout=600, **kw)


def test_imports_and_help(image):
    done = run(image, "python", "-c", "import msif.components, msif.pipelines, kfp; print('ok')")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    done = run(image, "msif", "--help")
    assert done.returncode == 0 and "fit-covariance" in done.stdout, done.stderr
    done = run(image, "id", "-u")
    assert done.stdout.strip() == "1000"


def test_no_compiler_no_pip_cache_no_ca_bundle_copy(image):
    script = (
        "import os, shutil; "
        "print(shutil.which('gcc'), shutil.which('cc'), os.path.exists('/run/secrets/pip_cert'), "
        "os.path.exists(os.path.expanduser('~/.cache/pip')), os.path.exists('/root/.cache/pip'))"
    )
    done = run(image, "python", "-c", script)
    assert done.stdout.split() == ["None", "None", "False", "False", "False"], done.stderr


def test_bm25_on_a_read_only_root(image, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    os.chmod(work, 0o777)  # uid 1000 writes the artifact dir
    docs = ["the cat sat on the mat", "dogs bark at night", "paris is the capital of france"]
    with open(work / "corpus.jsonl", "w") as fh:
        for i, text in enumerate(docs):
            fh.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    query = {"id": "q0", "prompt": "what is the capital of france?", "completion": "paris"}
    (work / "queries.jsonl").write_text(json.dumps(query) + "\n")
    done = run(
        image,
        "msif",
        "bm25",
        "--corpus",
        "/w/corpus.jsonl",
        "--queries",
        "/w/queries.jsonl",
        "--out",
        "/w/out",
        "--top-k",
        "2",
        mounts=[(work, "/w")],
        read_only=True,
    )
    assert done.returncode == 0, done.stderr
    assert (work / "out" / "_MSIF_COMPLETE.json").exists()
    assert (work / "out" / "scores.parquet").exists()


def test_missing_input_is_one_line_error(image, tmp_path):
    done = run(
        image,
        "msif",
        "bm25",
        "--corpus",
        "/tmp/nope.jsonl",
        "--queries",
        "/tmp/nope.jsonl",
        "--out",
        "/tmp/out",
        read_only=True,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("msif: error:"), done.stderr
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- the main job

MSIF = [sys.executable, "-c", "import sys; from msif.cli import main; sys.exit(main())"]


def main_job(runner: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [*MSIF, "run", "--preset", "small", "--runner", runner, "--out", str(out), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=1200)


def table_lines(stdout: str) -> list[str]:
    """The summary's metric table: from its header to the blank line after it."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("method "))
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    return lines[start:end]


@pytest.fixture(scope="module")
def main_jobs(image, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """`msif run --preset small` with every node in a container, and in-process."""
    out = tmp_path_factory.mktemp("main-job")
    runs = {}
    for runner, extra in (("docker", ("--image", image[1])), ("inprocess", ())):
        done = main_job(runner, out / runner, *extra)
        assert done.returncode == 0, f"msif run --runner {runner}: {done.stderr[-3000:]}"
        runs[runner] = (out / runner, done.stdout)
    return runs


def test_main_job_in_containers_gives_the_inprocess_results(main_jobs):
    (docker_out, docker_stdout), (ref_out, ref_stdout) = main_jobs["docker"], main_jobs["inprocess"]
    assert "world served at gs://msif-world/" in docker_stdout
    assert table_lines(docker_stdout) == table_lines(ref_stdout)
    got = json.loads((docker_out / "summary.json").read_text())
    want = json.loads((ref_out / "summary.json").read_text())
    assert set(got["metrics"]["methods"]) == {"multi-stage", "single-stage", "gradient-dot", "bm25"}
    want_methods = {m: pytest.approx(v) for m, v in want["metrics"]["methods"].items()}
    assert got["metrics"]["methods"] == want_methods
    # Every node read the world over gs://, never the host's files.
    assert sorted(got["inputs"]) == ["corpus", "finetune", "ft_model", "pt_model", "queries"]
    assert all(uri.startswith("gs://msif-world/") for uri in got["inputs"].values())
    task_log = (docker_out / "kfp.log").read_text()
    assert got["world"]["pt_model"] not in task_log and got["inputs"]["pt_model"] in task_log
    rows = [pq.read_table(Path(r["ranking"]) / "ranking.parquet").to_pylist() for r in (got, want)]
    key = ("method", "query_id", "rank", "doc_id", "relevant")
    assert [[r[k] for k in key] for r in rows[0]] == [[r[k] for k in key] for r in rows[1]]
    assert [r["score"] for r in rows[0]] == pytest.approx([r["score"] for r in rows[1]], rel=1e-5)


def test_every_node_ran_the_compiled_command_in_the_image_as_uid_1000(main_jobs, image):
    out = main_jobs["docker"][0]
    record = [json.loads(line) for line in (out / "containers.jsonl").read_text().splitlines()]
    assert record and all(r["status"] == 0 and r["image"] == image[1] for r in record)
    docs = yaml.safe_load_all((ROOT / "pipelines" / "multi_stage_influence.yaml").read_text())
    executors = next(docs)["deploymentSpec"]["executors"]
    # What the committed YAML tells a cluster to run is what ran: its command, then its args
    # with the placeholders filled in.
    used = set()
    for r in record:
        matches = [
            name
            for name, spec in executors.items()
            if r["command"][: len(spec["container"]["command"])] == spec["container"]["command"]
            and r["command"][-1] == spec["container"]["args"][-1]
        ]
        assert matches, f"a container ran a command no executor has: {r['command'][-4:]}"
        used.update(matches)
    assert used == set(executors)
    run_dir = next((out / "kfp").iterdir())
    owners = {p.stat().st_uid for p in run_dir.rglob("*")}
    assert owners == {1000}
    # ... on a read-only root: every node wrote only to the mounts.
    assert all(r["read_only"] for r in record)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def one_task(image, gcs_emulator, tmp_path):
    """Run one component as a kfp.local task in the image; yields the component module getter."""
    from kfp import local

    from msif.workflow import containers
    from msif.workflow.cli import components_in

    root = tmp_path / "kfp"
    containers.prepare_root(root)
    env = {"STORAGE_EMULATOR_HOST": gcs_emulator.endpoint}
    with components_in(image[1]), containers.docker_runner(image[1], env) as runner:
        local.init(runner=runner, pipeline_root=str(root))
        yield lambda name: getattr(__import__(f"msif.components.{name}", fromlist=[name]), name)


def one_line_failure(call, capfd) -> str:
    """Run a failing task; the one `msif: error:` line its log holds."""
    with time_limit(300, "a failing task"), pytest.raises(RuntimeError, match="FAILURE"):
        call()
    log = capfd.readouterr()
    text = log.out + log.err
    errors = [line.strip() for line in text.splitlines() if "msif: error:" in line]
    assert len(errors) == 1, text[-3000:]
    assert "Traceback" not in text
    return errors[0]


def test_missing_model_fails_its_task_with_one_line(one_task, gcs_bucket, capfd):
    from msif.workflow.dag import default_option_parameters

    component = one_task("fit_covariance")
    options = default_option_parameters()
    names = component.component_spec.inputs
    args = {k: v for k, v in options.items() if k in names}
    args.update(model=f"{gcs_bucket}/no-such-model", data=f"{gcs_bucket}/no-such-corpus.parquet")
    args.update(stage="pt", shard=0, num_shards=1, device="cpu")
    line = one_line_failure(lambda: component(**args), capfd)
    assert "no-such-model" in line


def test_corrupt_corpus_fails_its_task_with_one_line(one_task, gcs_bucket, capfd, tmp_path):
    from msif.storage import gcs
    from msif.workflow.dag import default_option_parameters

    bad = tmp_path / "corpus.parquet"
    bad.write_bytes(b"PAR1" + os.urandom(4096))
    gcs.upload_file(bad, f"{gcs_bucket}/corrupt/corpus.parquet")
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"id": "q0", "prompt": "a", "completion": "b"}) + "\n")
    gcs.upload_file(queries, f"{gcs_bucket}/corrupt/queries.jsonl")
    component = one_task("bm25")
    options = default_option_parameters()
    args = {k: v for k, v in options.items() if k in component.component_spec.inputs}
    args.update(corpus=f"{gcs_bucket}/corrupt/corpus.parquet")
    args.update(queries=f"{gcs_bucket}/corrupt/queries.jsonl")
    line = one_line_failure(lambda: component(**args), capfd)
    assert "corpus.parquet" in line


def test_two_pipeline_path_in_containers_gives_the_inprocess_results(image, tmp_path):
    """`msif run --via-index`: the index pipeline, then the attribute pipeline on its outputs,
    every node of both in the image, against the same two pipelines in-process."""
    runs = {}
    for runner, extra in (("docker", ("--image", image[1])), ("inprocess", ())):
        done = main_job(runner, tmp_path / runner, "--via-index", *extra)
        assert done.returncode == 0, (
            f"msif run --via-index --runner {runner}: {done.stderr[-3000:]}"
        )
        runs[runner] = (tmp_path / runner, done.stdout)
    assert table_lines(runs["docker"][1]) == table_lines(runs["inprocess"][1])
    got, want = (json.loads((out / "summary.json").read_text()) for out, _ in runs.values())
    assert all(uri.startswith("gs://msif-world/") for uri in got["inputs"].values())
    lines = (runs["docker"][0] / "containers.jsonl").read_text().splitlines()
    record = [json.loads(line) for line in lines]
    assert all(r["status"] == 0 and r["image"] == image[1] for r in record)
    words = [set(" ".join(r["command"]).split()) for r in record]
    assert any("index" in w for w in words) and any("lookup" in w for w in words)
    rows = [pq.read_table(Path(r["ranking"]) / "ranking.parquet").to_pylist() for r in (got, want)]
    key = ("method", "query_id", "rank", "doc_id", "relevant")
    assert [[r[k] for k in key] for r in rows[0]] == [[r[k] for k in key] for r in rows[1]]


def test_index_and_lookup_run_in_the_image(main_jobs, image, tmp_path):
    """The corpus index nodes in the image, as uid 1000 on a read-only root: `msif index` over
    the small world's corpus with the containerized run's pre-train factors, then `msif
    lookup` of its multi-stage queries; the candidates are those a host run finds."""
    from msif.cli import main
    from msif.workflow.local_run import published_outputs

    out_dir = main_jobs["docker"][0]
    summary = json.loads((out_dir / "summary.json").read_text())
    world = summary["world"]
    outputs = published_outputs(next((out_dir / "kfp").iterdir()))
    (factors,) = outputs["build-factors-pt"]
    (pre,) = outputs["precondition-queries-multi-stage"]
    work = tmp_path / "work"
    work.mkdir()
    os.chmod(work, 0o777)
    world_dir = str(Path(world["pt_model"]).parent)
    mounts = [(world_dir, world_dir), (str(out_dir), str(out_dir)), (str(work), str(work))]
    common = ["--max-length", "64", "--batch-size", "16", "--device", "cpu", "--no-progress"]
    index = ["index", "--model", world["pt_model"], "--corpus", world["corpus"]]
    index += ["--pt-factors", factors, "--out", str(work / "index"), *common]
    done = run(image, "msif", *index, mounts=mounts, read_only=True)
    assert done.returncode == 0, done.stderr[-2000:]
    lookup = ["lookup", "--index", str(work / "index"), "--preconditioned", pre, "--top-c", "5"]
    done = run(image, "msif", *lookup, "--out", str(work / "cand"), mounts=mounts, read_only=True)
    assert done.returncode == 0, done.stderr[-2000:]
    # The same two nodes on the host give the same candidates.
    host = tmp_path / "host"
    assert main([*index[: -len(common) - 2], "--out", str(host / "index"), *common]) == 0
    assert main([*lookup[:2], str(host / "index"), *lookup[3:], "--out", str(host / "cand")]) == 0
    got, want = (
        pq.read_table(d / "candidates.parquet").to_pylist() for d in (work / "cand", host / "cand")
    )
    assert [(r["query_id"], r["doc_id"]) for r in got] == [
        (r["query_id"], r["doc_id"]) for r in want
    ]
    assert [r["index_score"] for r in got] == pytest.approx(
        [r["index_score"] for r in want], rel=1e-4
    )
