"""The CPU component image, for real: built with images/build.sh when the daemon lacks it, then
run as uid 1000 with host networking (there is no bridge where images/dockerd.sh runs it):
the components and pipeline import, `msif --help` answers, a node (`msif bm25`) runs with a
read-only root file system (tmpfs /tmp, the artifact dir mounted), and a missing input ends
in the one-line `msif: error:` with a non-zero exit. Skipped without a reachable daemon."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("MSIF_TEST_IMAGE", "msif:cpu")


def _docker() -> str:
    client = shutil.which("docker")
    if client is None:
        pytest.skip("no docker client on PATH")
    probe = subprocess.run(
        [client, "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
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
