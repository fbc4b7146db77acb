"""The component image. Offline: what the Dockerfile copies exists and passes the build-context
filter, both variants (gpu: the CUDA PyTorch base; cpu: Debian bookworm + the CPU torch wheel)
carry the pinned torch, pip's CA bundle is a build secret and never a layer, the user is not
root, and images/requirements.txt agrees with constraints.txt and pyproject.toml. With a docker
daemon (DOCKER_HOST, e.g. from images/dockerd.sh): the CPU image is built and run."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "images" / "Dockerfile"
DOCKERIGNORE = ROOT / "images" / "Dockerfile.dockerignore"
REQUIREMENTS = ROOT / "images" / "requirements.txt"
tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def pins(path: Path) -> dict[str, Version]:
    """name → pinned version of a requirements/constraints file (every line must pin ==)."""
    found: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{path.name}: {line} is not pinned with =="
        name = canonicalize_name(req.name)
        assert name not in found, f"{path.name} pins {name} twice"
        found[name] = Version(spec.version)
    return found


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_copy_sources_exist_and_enter_the_build_context():
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "the context filter must start from nothing"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    copies = [args for word, args in instructions(DOCKERFILE) if word == "COPY"]
    assert copies
    for args in copies:
        parts = [a for a in args.split() if not a.startswith("--")]
        assert "--from" not in args, "every COPY reads the context, never another stage"
        *sources, _dest = parts
        for source in sources:
            rel = source.rstrip("/")
            assert (ROOT / rel).exists(), f"COPY source {source} does not exist"
            assert any(rel == a or rel.startswith(a + "/") for a in allowed), (
                f"COPY source {source} is excluded by {DOCKERIGNORE.name}"
            )
    copied = {s.rstrip("/") for args in copies for s in args.split()[:-1]}
    # What the installed distribution needs: sources, both mapped packages, metadata.
    assert {"src", "components", "pipelines", "pyproject.toml", "README.md"} <= copied
    assert "images/requirements.txt" in copied
    assert "images/torch-cpu-requirements.txt" in copied
    # The CPU torch wheel is bind-mounted from images/wheels/, which must enter the context.
    assert "images/wheels" in allowed
    assert "/images/wheels/" in (ROOT / ".gitignore").read_text().split()


def test_base_image_torch_matches_constraints():
    (arg,) = [a for w, a in instructions(DOCKERFILE) if w == "ARG" and a.startswith("BASE_IMAGE=")]
    image = arg.split("=", 1)[1]
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", image)
    assert match, f"base image {image} is not a pinned CUDA PyTorch runtime tag"
    torch = pins(ROOT / "constraints.txt")["torch"]
    assert Version(match.group(1)) == torch
    assert pins(REQUIREMENTS)["torch"] == torch
    froms = [a for w, a in instructions(DOCKERFILE) if w == "FROM"]
    assert froms == [
        "${BASE_IMAGE} AS base-gpu",
        "${CPU_BASE_IMAGE} AS base-cpu",
        "base-${VARIANT} AS image",
    ]
    args = dict(a.split("=", 1) for w, a in instructions(DOCKERFILE) if w == "ARG" and "=" in a)
    assert args["VARIANT"] == "gpu", "the default image is the CUDA one"


def test_cpu_variant_installs_the_pinned_cpu_torch_wheel():
    torch = pins(ROOT / "constraints.txt")["torch"]
    wheels = re.findall(r"torch-([\w.+]+)-cp311-cp311-\S+\.whl", DOCKERFILE.read_text())
    assert wheels and {Version(w).public for w in wheels} == {str(torch)}
    assert Version(wheels[0]).local == "cpu"
    build = (ROOT / "images" / "build.sh").read_text()
    assert f"torch-{wheels[0]}-cp311-cp311-" in build, "build.sh stages the same wheel"
    cpu_pins = pins(ROOT / "images" / "torch-cpu-requirements.txt")
    assert "torch" not in cpu_pins
    assert not set(cpu_pins) & set(pins(REQUIREMENTS)), "each package pinned in one file"


def test_pip_ca_bundle_is_a_build_secret_not_a_layer():
    text = DOCKERFILE.read_text()
    assert not text.startswith("# syntax="), "no frontend image can be pulled offline"
    runs = [a for w, a in instructions(DOCKERFILE) if w == "RUN"]
    online = [r for r in runs if "pip install" in r and "--no-deps" not in r]
    assert len(online) == 2
    for run in online:
        assert "--mount=type=secret,id=pip_cert" in run
        assert "PIP_CERT=/run/secrets/pip_cert" in run
    envs = " ".join(a for w, a in instructions(DOCKERFILE) if w == "ENV")
    assert "PIP_CERT" not in envs and "PIP_NO_CACHE_DIR=1" in envs
    copies = " ".join(a for w, a in instructions(DOCKERFILE) if w in {"COPY", "ADD"})
    assert ".crt" not in copies and "certs" not in copies
    assert not [w for w, _ in instructions(DOCKERFILE) if w == "ADD"]


def test_runs_as_a_numeric_non_root_user():
    users = [a for w, a in instructions(DOCKERFILE) if w == "USER"]
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "runAsNonRoot needs a numeric, non-zero uid"
    runs = " ".join(a for w, a in instructions(DOCKERFILE) if w == "RUN")
    assert f"--uid {uid}" in runs
    # KFP's launcher creates /gcs, /minio or /s3 under / for artifacts: they must be writable.
    assert re.search(r"chown \S+ /gcs /minio /s3", runs)


def test_installs_pinned_requirements_then_msif_without_dependencies():
    runs = [a for w, a in instructions(DOCKERFILE) if w == "RUN"]
    assert any("pip install --requirement images/requirements.txt" in r for r in runs)
    local = "pip install --no-deps --no-build-isolation ."
    assert any(local in r and "pip check" in r for r in runs)


TEST_TOOLS = {"gcp-storage-emulator", "datasets", "docker"}  # host-side tools, not the image's


def test_requirements_agree_with_constraints():
    required = pins(REQUIREMENTS)
    for name, version in pins(ROOT / "constraints.txt").items():
        if name in TEST_TOOLS:  # test tools, not part of the image
            assert name not in required
            continue
        assert required.get(name) == version, f"{name}: image {required.get(name)}, CI {version}"


def test_requirements_satisfy_every_project_dependency():
    required = pins(REQUIREMENTS)
    for line in project()["dependencies"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in required, f"the image lacks dependency {name}"
        assert required[name] in req.specifier, f"{name}=={required[name]} violates {req}"
    assert {"kfp", "kfp-kubernetes"} <= set(required)
    dev = {
        canonicalize_name(Requirement(r).name) for r in project()["optional-dependencies"]["dev"]
    }
    assert not dev & set(required), "dev tools do not belong in the image"


def test_requirement_parser_refuses_loose_pins(tmp_path):
    loose = tmp_path / "req.txt"
    loose.write_text("numpy>=2\n")
    with pytest.raises(AssertionError, match="numpy>=2 is not pinned with =="):
        pins(loose)
