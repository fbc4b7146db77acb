"""Kubernetes manifests, offline: yamllint, schema validation (kubernetes-validate) of every
resource as written and as rendered by kustomize, and what the rendering must contain."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate  # dev extra: offline JSON-schema validation of Kubernetes objects
import pytest
import yaml
from yamllint import config as yamllint_config
from yamllint import linter

from msif.workflow.cli import check_params, default_package, package_parameters

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
KUSTOMIZATIONS = [MANIFESTS / "base", MANIFESTS / "overlays" / "example"]
# The oldest Kubernetes minor still supported on GKE when this was written, and the newest
# schema kubernetes-validate ships.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
NON_RESOURCES = {"kustomization.yaml", "pipeline-params.yaml"}


def yaml_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*.yaml"))


def resource_files() -> list[Path]:
    return [p for p in yaml_files() if p.name not in NON_RESOURCES]


def listed_files(kustomization_dir: Path) -> list[Path]:
    """Every file a kustomization names, following bases recursively."""
    k = yaml.safe_load((kustomization_dir / "kustomization.yaml").read_text())
    files = []
    for entry in k.get("resources", []):
        target = (kustomization_dir / entry).resolve()
        files += listed_files(target) if target.is_dir() else [target]
    for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
        files += [(kustomization_dir / f.split("=")[-1]).resolve() for f in gen.get("files", [])]
    files += [
        (kustomization_dir / p["path"]).resolve() for p in k.get("patches", []) if "path" in p
    ]
    return files


def render(kustomization_dir: Path) -> list[dict]:
    """`kubectl kustomize DIR` as a list of resources (skips without kubectl)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: rendering checked by listed-files test only")
    result = subprocess.run(
        [kubectl, "kustomize", str(kustomization_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def by_kind(resources: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in resources:
        out.setdefault(r["kind"], []).append(r)
    return out


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_yamllint_strict(path):
    conf = yamllint_config.YamlLintConfig(file=str(MANIFESTS / ".yamllint"))
    problems = [f"{p.line}:{p.column} {p.message}" for p in linter.run(path.read_text(), conf)]
    assert problems == []


@pytest.mark.parametrize("path", resource_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_resource_files_validate(path, version):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_validator_rejects_a_misspelt_field():
    quota = yaml.safe_load((MANIFESTS / "base" / "resourcequota.yaml").read_text())
    quota["spec"]["hardd"] = quota["spec"].pop("hard")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(quota, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_every_listed_file_exists_and_parses(kdir):
    files = listed_files(kdir)
    assert files
    for f in files:
        assert f.is_file(), f"{kdir.name}/kustomization.yaml lists missing {f}"
        assert list(yaml.safe_load_all(f.read_text()))


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_rendered_resources_validate(kdir):
    resources = render(kdir)
    for r in resources:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(r, version, strict=True)


def expect_namespace(kdir: Path) -> str:
    return yaml.safe_load((kdir / "kustomization.yaml").read_text())["namespace"]


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_rendering_wires_identity_quota_and_params(kdir):
    ns = expect_namespace(kdir)
    kinds = by_kind(render(kdir))
    assert sorted(kinds) == [
        "ConfigMap",
        "LimitRange",
        "Namespace",
        "ResourceQuota",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    ]
    assert [n["metadata"]["name"] for n in kinds["Namespace"]] == [ns]
    for kind, items in kinds.items():
        for r in items:
            assert r["metadata"]["labels"]["app.kubernetes.io/part-of"] == "msif"
            if kind != "Namespace":
                assert r["metadata"]["namespace"] == ns, (kind, r["metadata"]["name"])
    (sa,) = kinds["ServiceAccount"]
    gsa = sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert gsa.endswith(".iam.gserviceaccount.com")
    (binding,) = kinds["RoleBinding"]
    assert binding["roleRef"]["name"] == kinds["Role"][0]["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": ns}
    ]
    (quota,) = kinds["ResourceQuota"]
    assert int(quota["spec"]["hard"]["requests.nvidia.com/gpu"]) >= 1
    assert not [k for k in quota["spec"]["hard"] if k.startswith("limits.")]
    (limits,) = kinds["LimitRange"]
    assert {"cpu", "memory"} <= set(limits["spec"]["limits"][0]["defaultRequest"])
    (cm,) = kinds["ConfigMap"]
    assert cm["metadata"]["name"] == "msif-pipeline-params"
    params = yaml.safe_load(cm["data"]["params.yaml"])
    package = default_package()
    check_params(params, package_parameters(package), f"{kdir.name} ConfigMap")


def test_overlay_changes_environment_values():
    base = by_kind(render(KUSTOMIZATIONS[0]))
    overlay = by_kind(render(KUSTOMIZATIONS[1]))

    def gsa(kinds):
        return kinds["ServiceAccount"][0]["metadata"]["annotations"][
            "iam.gke.io/gcp-service-account"
        ]

    def gpus(kinds):
        return kinds["ResourceQuota"][0]["spec"]["hard"]["requests.nvidia.com/gpu"]

    assert gsa(base) != gsa(overlay)
    assert (gpus(base), gpus(overlay)) == ("8", "16")
    params = yaml.safe_load(overlay["ConfigMap"][0]["data"]["params.yaml"])
    expected = yaml.safe_load(
        (KUSTOMIZATIONS[1] / "pipeline-params.yaml").read_text(encoding="utf-8")
    )
    assert params == expected


def test_param_files_match_the_pipeline():
    package = default_package()
    for kdir in KUSTOMIZATIONS:
        path = kdir / "pipeline-params.yaml"
        check_params(yaml.safe_load(path.read_text()), package_parameters(package), str(path))
