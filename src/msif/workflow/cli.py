"""`msif pipeline compile|submit|schedule`: build the KFP pipeline YAML and run it on a cluster.

Credentials never travel as arguments. `submit` and `schedule` authenticate the way kfp does
from the environment: `KF_PIPELINES_SA_TOKEN_PATH` (a projected service-account token file,
re-read on every request), `MSIF_KFP_TOKEN` (a bearer token, e.g. an IAP identity token in
CI), or kfp's own `KF_PIPELINES_IAP_OAUTH2_CLIENT_ID` / `KF_PIPELINES_APP_OAUTH2_CLIENT_*`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http
import importlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from msif.errors import MsifError, add_secret, redact

PIPELINE_FILE = "multi_stage_influence.yaml"  # the full pipeline's, the default package
TOKEN_ENV = "MSIF_KFP_TOKEN"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
# A container image reference: [registry[:port]/]path[:tag][@sha256:digest], lower-case path.
_IMAGE_RE = re.compile(
    r"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-]+[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
)
_CRON_FIELD_RE = re.compile(r"^[0-9A-Za-z*?/,#LW-]+$")
_CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight"}
_CRON_DESCRIPTORS |= {"@hourly"}
_PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "STRING": (str,),
    "NUMBER_INTEGER": (int,),
    "NUMBER_DOUBLE": (int, float),
    "BOOLEAN": (bool,),
    "STRUCT": (dict,),
    "LIST": (list,),
}


class PipelineCliError(MsifError):
    """Bad pipeline options, parameters or package, or a KFP API that refused a request."""


# ----------------------------------------------------------------------------- compile


def default_package(name: str | None = None) -> Path:
    """The compiled YAML of pipeline name (default: the full one) shipped in msif.pipelines."""
    import msif.pipelines
    from msif.workflow.dag import FULL, pipeline

    return Path(msif.pipelines.__file__).with_name(f"{pipeline(name or FULL).module}.yaml")


def check_image(image: str) -> str:
    """Return image if it is a container image reference, else raise PipelineCliError."""
    if not _IMAGE_RE.match(image):
        raise PipelineCliError(f"--image {image!r} is not a container image reference")
    return image


@contextmanager
def components_in(image: str, name: str | None = None) -> Iterator[Any]:
    """Re-import components and pipelines with MSIF_IMAGE=image, yielding the module of
    pipeline name (default: the full one); restore them afterwards."""
    from msif.components import COMPONENT_MODULES, IMAGE_ENV
    from msif.components import image as current
    from msif.workflow.dag import FULL, PIPELINES, pipeline

    wanted = f"msif.pipelines.{pipeline(name or FULL).module}"
    if current.IMAGE == image:
        yield importlib.import_module(wanted)
        return
    # Every pipeline module is reloaded after the components, so none keeps the old image.
    modules = [f"msif.pipelines.{pipeline(n).module}" for n in PIPELINES]
    pipelines = ("msif.pipelines.build", *modules)

    def reload_all():
        for module_name in (*COMPONENT_MODULES, "msif.components", *pipelines):
            module = sys.modules.get(module_name)
            if module:
                importlib.reload(module)
            else:
                importlib.import_module(module_name)
        return sys.modules[wanted]

    old = os.environ.get(IMAGE_ENV)
    os.environ[IMAGE_ENV] = image
    try:
        yield reload_all()
    finally:
        if old is None:
            os.environ.pop(IMAGE_ENV, None)
        else:
            os.environ[IMAGE_ENV] = old
        reload_all()


def compile_pipeline(
    out: Path,
    image: str | None = None,
    accelerator_type: str | None = None,
    accelerator_count: int | None = None,
    gke_accelerator: str | None = None,
    pipeline: str | None = None,
    plan: Path | None = None,
) -> Path:
    """Compile a pipeline (default: the full one) to out (atomically); None keeps the
    default of each setting.

    The image defaults to $MSIF_IMAGE, else `msif.components.image.DEFAULT_IMAGE`; the
    accelerator settings become the defaults of the pipeline's run-time parameters. plan, a
    `msif plan --json` file, sets the GPU model, the GPU pods' memory request and the CPU
    nodes' requests; the accelerator options given beside it win.
    """
    from kfp import compiler

    from msif.components.image import DEFAULT_IMAGE, IMAGE_ENV

    image = check_image(image or os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE)
    if accelerator_count is not None and accelerator_count < 0:
        raise PipelineCliError(f"--accelerator-count must be >= 0, not {accelerator_count}")
    requests = plan_requests(Path(plan)) if plan is not None else {}
    out = Path(out)
    with components_in(image, pipeline) as module:
        given = {
            "accelerator_type": accelerator_type,
            "accelerator_count": accelerator_count,
            "gke_accelerator": gke_accelerator,
        }
        given = {**_plan_defaults(requests), **{k: v for k, v in given.items() if v is not None}}
        defaults = module.PipelineDefaults(**given)
        pipeline = module.build_pipeline(defaults)
        out.parent.mkdir(parents=True, exist_ok=True)
        # The compiler creates the file itself, so it gets the usual umask permissions.
        tmp = str(out.with_name(f".{out.name}.{os.getpid()}.tmp.yaml"))
        try:
            compiler.Compiler().compile(pipeline, tmp)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


_REQUEST_RE = re.compile(r"^[1-9][0-9]*Gi$")
_CPU_RE = re.compile(r"^(?:[1-9][0-9]*|[1-9][0-9]*m)$")


def plan_requests(path: Path) -> dict[str, Any]:
    """The pod requests of a `msif plan --json` file, checked; a plan that does not fit its
    GPU is refused, since its pods could not run."""
    try:
        plan = json.loads(path.read_text())
    except OSError as exc:
        raise PipelineCliError(f"--plan {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise PipelineCliError(f"--plan {path} is not JSON: {exc}") from None
    requests = plan.get("requests") if isinstance(plan, dict) else None
    if not isinstance(requests, dict):
        raise PipelineCliError(f"--plan {path} has no requests: write it with `msif plan --json`")
    if plan.get("problems"):
        raise PipelineCliError(f"--plan {path} does not fit its GPU: {plan['problems'][0]}")
    _check_request(path, "gpu_memory_request", requests.get("gpu_memory_request"), _REQUEST_RE)
    _check_request(path, "gpu_cpu_request", requests.get("gpu_cpu_request"), _CPU_RE)
    nodes = requests.get("cpu_nodes")
    if not isinstance(nodes, dict):
        raise PipelineCliError(f"--plan {path}: requests.cpu_nodes is not a mapping")
    for name, res in nodes.items():
        if not isinstance(res, dict):
            raise PipelineCliError(f"--plan {path}: requests of {name!r} are not a mapping")
        _check_request(path, f"{name} memory", res.get("memory"), _REQUEST_RE)
        _check_request(path, f"{name} cpu", res.get("cpu"), _CPU_RE)
    return requests


def _check_request(path: Path, what: str, value: Any, pattern: re.Pattern) -> None:
    if not isinstance(value, str) or not pattern.match(value):
        raise PipelineCliError(f"--plan {path}: {what} {value!r} is not a Kubernetes request")


def _plan_defaults(requests: dict[str, Any]) -> dict[str, Any]:
    """PipelineDefaults fields from a plan's requests (none without a plan); called while
    the pipeline modules are imported for the image, so the classes are theirs."""
    if not requests:
        return {}
    from msif.pipelines.build import CPU_NODES, CpuResources

    cpu_nodes = dict(CPU_NODES)
    for name, res in requests["cpu_nodes"].items():
        if name not in cpu_nodes:
            raise PipelineCliError(f"--plan: {name!r} is not a CPU node of the pipeline")
        cpu_nodes[name] = CpuResources(res["cpu"], res["memory"])
    return {
        "gke_accelerator": requests.get("gke_accelerator"),
        "accelerator_count": requests.get("accelerator_count"),
        "gpu_cpu_request": requests["gpu_cpu_request"],
        "gpu_memory_request": requests["gpu_memory_request"],
        "cpu_nodes": cpu_nodes,
    }


def _compile_command(args: argparse.Namespace) -> int:
    out = compile_pipeline(
        Path(args.out) if args.out else default_package(args.pipeline),
        image=args.image,
        accelerator_type=args.accelerator_type,
        accelerator_count=args.accelerator_count,
        gke_accelerator=args.gke_accelerator,
        pipeline=args.pipeline,
        plan=Path(args.plan) if args.plan else None,
    )
    print(out)
    return 0


# ----------------------------------------------------------------------------- parameters


def package_parameters(package: Path) -> dict[str, dict]:
    """The root input parameters of a compiled pipeline YAML (name → IR definition)."""
    try:
        docs = list(yaml.safe_load_all(Path(package).read_text()))
    except FileNotFoundError:
        raise PipelineCliError(f"pipeline package {package} does not exist") from None
    except (OSError, yaml.YAMLError) as exc:
        raise PipelineCliError(f"cannot read pipeline package {package}: {exc}") from None
    spec = docs[0] if docs and isinstance(docs[0], dict) else {}
    root = spec.get("root", {})
    if "pipelineInfo" not in spec or "dag" not in root:
        raise PipelineCliError(f"{package} is not a compiled KFP pipeline")
    return root.get("inputDefinitions", {}).get("parameters", {})


def load_params(path: Path, package: Path) -> dict[str, Any]:
    """Read a YAML mapping of pipeline parameters and check it against the package."""
    try:
        params = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise PipelineCliError(f"parameter file {path} does not exist") from None
    except (OSError, yaml.YAMLError) as exc:
        raise PipelineCliError(f"cannot read parameter file {path}: {exc}") from None
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise PipelineCliError(f"{path} must hold a mapping of pipeline parameters")
    check_params(params, package_parameters(package), str(path))
    return params


def check_params(params: dict[str, Any], definitions: dict[str, dict], where: str) -> None:
    """Unknown, missing and mistyped parameters become one clear error line."""
    unknown = sorted(set(params) - set(definitions))
    if unknown:
        raise PipelineCliError(
            f"{where}: unknown pipeline parameter(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(definitions))})"
        )
    missing = sorted(
        name
        for name, d in definitions.items()
        if name not in params and "defaultValue" not in d and not d.get("isOptional")
    )
    if missing:
        raise PipelineCliError(f"{where}: missing pipeline parameter(s) {', '.join(missing)}")
    for name, value in params.items():
        kind = definitions[name].get("parameterType", "STRING")
        allowed = _PARAM_TYPES.get(kind, (object,))
        wrong_bool = isinstance(value, bool) and bool not in allowed
        if wrong_bool or not isinstance(value, allowed):
            raise PipelineCliError(
                f"{where}: parameter {name} must be {kind.lower()}, not {value!r}"
            )


# ----------------------------------------------------------------------------- KFP API


def kfp_client(host: str, namespace: str | None):
    """A kfp.Client for host with credentials from the environment only.

    Every credential it may send is registered with `msif.errors.add_secret`, so no error
    line, traceback or log record prints it.
    """
    import kfp

    kwargs: dict[str, Any] = {"host": host}
    if namespace:
        kwargs["namespace"] = namespace
    _register_secrets()
    _quiet_connection_retries()
    if os.environ.get(TOKEN_ENV):
        kwargs["existing_token"] = os.environ[TOKEN_ENV]
    elif os.environ.get(SA_TOKEN_PATH_ENV):
        # kfp reads the file named by KF_PIPELINES_SA_TOKEN_PATH and re-reads it per request.
        kwargs["credentials"] = kfp.client.ServiceAccountTokenVolumeCredentials()
    try:
        with warnings.catch_warnings(), _kfp_prints():
            # kfp warns on every client that it needs a KFP >= 2.0.0-beta.2 backend.
            warnings.filterwarnings("ignore", category=FutureWarning, module="kfp")
            return _client_class()(**kwargs)
    except Exception as exc:  # kfp raises bare exceptions of many kinds while connecting
        raise _api_error(host, exc, f"cannot reach the KFP API at {host}") from None


def _register_secrets() -> None:
    add_secret(os.environ.get(TOKEN_ENV))
    add_secret(os.environ.get("KF_PIPELINES_APP_OAUTH2_CLIENT_SECRET"))
    if os.environ.get(SA_TOKEN_PATH_ENV):
        with contextlib.suppress(OSError):
            add_secret(Path(os.environ[SA_TOKEN_PATH_ENV]).read_text())


@functools.cache
def _quiet_connection_retries() -> None:
    """Drop urllib3's warning on each of its three connection retries unless -v (DEBUG) is on:
    the one error line says what failed. (A filter, as kfp resets urllib3's log level.)"""

    def keep(record: logging.LogRecord) -> bool:
        retry = str(record.msg).startswith("Retrying")
        return not retry or logging.getLogger().isEnabledFor(logging.DEBUG)

    logging.getLogger("urllib3.connectionpool").addFilter(keep)


@functools.cache
def _client_class() -> type:
    """kfp.Client with a health check that neither retries 4xx nor logs response bodies."""
    import kfp
    import kfp_server_api

    class Client(kfp.Client):
        def get_kfp_healthz(self, sleep_duration: int = 5):
            # kfp tries 5 times, 5 s apart, logging each response body (which may echo the
            # token): a refused token took 25 s and printed five tracebacks. A server error
            # (5xx) still gets a second and third try.
            for attempt in range(3):
                try:
                    return self._healthz_api.healthz_service_get_healthz()
                except kfp_server_api.ApiException as exc:
                    if attempt == 2 or (exc.status or 0) < 500:
                        raise
                    time.sleep(1)

    return Client


@contextmanager
def _kfp_prints() -> Iterator[None]:
    """Hold back what kfp prints (its "Run details: URL" links) until the call succeeded: an
    endpoint that is no KFP API would get a link to run None."""
    held = io.StringIO()
    with contextlib.redirect_stdout(held):
        yield
    sys.stdout.write(held.getvalue())


def _api_error(host: str, exc: BaseException, prefix: str) -> PipelineCliError:
    """One line for an API or connection error: `prefix: reason`, or, when the endpoint
    refused the credentials, a line that says so (never the headers, body or token)."""
    status = getattr(exc, "status", None)
    if status in (401, 403):
        reason = getattr(exc, "reason", None) or http.HTTPStatus(status).phrase
        return PipelineCliError(
            f"{host} refused the request: {status} {reason}; check the credentials"
        )
    return PipelineCliError(redact(f"{prefix}: {_reason(exc)}"))


def _reason(exc: BaseException) -> str:
    """One short line for an API or connection error (redacted by the caller)."""
    status, reason = getattr(exc, "status", None), getattr(exc, "reason", None)
    if status is not None:
        body = (getattr(exc, "body", "") or "").strip().replace("\n", " ")
        return f"HTTP {status} {reason or ''}".strip() + (f": {body[:200]}" if body else "")
    if isinstance(reason, BaseException):  # urllib3's MaxRetryError wraps the real cause
        return _reason(reason)
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    # urllib3 prefixes the connection's repr: "HTTPConnection(host='h', port=1): reason".
    return re.sub(r"^\w*HTTPS?Connection\([^)]*\):\s*", "", text)


@contextmanager
def _api_errors(host: str, action: str) -> Iterator[None]:
    try:
        with _kfp_prints():
            yield
    except MsifError:
        raise
    except Exception as exc:  # ApiException, urllib3 and socket errors: one line each
        raise _api_error(host, exc, f"KFP API at {host} failed to {action}") from None


def _require(host: str, value: Any, what: str) -> Any:
    """value, unless the API answered without it (200 from something that is no KFP API)."""
    if not value:
        raise PipelineCliError(
            f"{host} answered without {what}: is --host the KFP v2 API endpoint, "
            "e.g. https://HOST/pipeline?"
        )
    return value


def disable_caching(docs: list[dict]) -> list[dict]:
    """The pipeline spec with caching off for every task, ParallelFor bodies included.

    kfp.Client's own enable_caching=False only reaches the root DAG's tasks, so sharded
    steps inside a ParallelFor would still be served from the cache.
    """
    spec = docs[0]
    for comp in [spec["root"], *spec.get("components", {}).values()]:
        for task in comp.get("dag", {}).get("tasks", {}).values():
            task["cachingOptions"] = {"enableCache": False}
    return docs


@contextmanager
def _package_to_send(package: Path, no_cache: bool) -> Iterator[Path]:
    if not no_cache:
        yield package
        return
    docs = list(yaml.safe_load_all(package.read_text()))
    with tempfile.TemporaryDirectory(prefix="msif-package-") as tmp:
        path = Path(tmp) / package.name
        path.write_text(yaml.safe_dump_all(disable_caching(docs), sort_keys=False))
        yield path


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    package = Path(args.package) if args.package else default_package(args.pipeline)
    return {
        "package": package,
        "params": load_params(Path(args.params), package),
        "pipeline_root": args.pipeline_root,
        "service_account": args.service_account,
    }


def submit(args: argparse.Namespace) -> dict[str, str]:
    """Create (or reuse) the experiment and start one run of the package; return their ids."""
    opts = _run_options(args)
    run_name = args.run_name or f"multi-stage-influence {time.strftime('%Y-%m-%d %H:%M:%S')}"
    client = kfp_client(args.host, args.namespace)
    with _package_to_send(opts["package"], args.no_cache) as package:
        with _api_errors(args.host, "create the run"):
            result = client.create_run_from_pipeline_package(
                pipeline_file=str(package),
                arguments=opts["params"],
                run_name=run_name,
                experiment_name=args.experiment,
                namespace=args.namespace,
                pipeline_root=opts["pipeline_root"],
                service_account=opts["service_account"],
            )
            run = result.run_info
            return {
                "run_id": _require(args.host, run.run_id, "a run id"),
                "experiment_id": _require(args.host, run.experiment_id, "an experiment id"),
                "run_name": run_name,
            }


def check_cron(cron: str) -> str:
    """Return cron if KFP accepts it: 6 fields, seconds first, or a @descriptor."""
    text = cron.strip()
    if text in _CRON_DESCRIPTORS or re.match(r"^@every \d+(\.\d+)?(ns|us|ms|s|m|h)+$", text):
        return text
    fields = text.split()
    if len(fields) == 5:
        raise PipelineCliError(
            f"--cron {cron!r} has 5 fields; KFP cron has 6 with seconds first, e.g. '0 {text}'"
        )
    if len(fields) != 6 or not all(_CRON_FIELD_RE.match(f) for f in fields):
        raise PipelineCliError(
            f"--cron {cron!r} is not a KFP cron expression "
            "(6 fields: second minute hour day-of-month month day-of-week)"
        )
    return " ".join(fields)


def schedule(args: argparse.Namespace) -> dict[str, str]:
    """Create (or reuse) the experiment and a recurring run on a cron schedule."""
    cron = check_cron(args.cron)
    if args.max_concurrency < 1:
        raise PipelineCliError(f"--max-concurrency must be >= 1, not {args.max_concurrency}")
    opts = _run_options(args)
    client = kfp_client(args.host, args.namespace)
    with _api_errors(args.host, "create the experiment"):
        experiment = client.create_experiment(name=args.experiment, namespace=args.namespace)
        _require(args.host, experiment.experiment_id, "an experiment id")
    with _package_to_send(opts["package"], args.no_cache) as package:
        with _api_errors(args.host, "create the recurring run"):
            job = client.create_recurring_run(
                experiment_id=experiment.experiment_id,
                job_name=args.name,
                cron_expression=cron,
                max_concurrency=args.max_concurrency,
                no_catchup=not args.catchup,
                params=opts["params"],
                pipeline_package_path=str(package),
                pipeline_root=opts["pipeline_root"],
                service_account=opts["service_account"],
            )
            _require(args.host, job.recurring_run_id, "a recurring run id")
    return {
        "recurring_run_id": job.recurring_run_id,
        "experiment_id": experiment.experiment_id,
        "cron": cron,
    }


def _print_result(fn):
    def run(args: argparse.Namespace) -> int:
        print(json.dumps(fn(args), sort_keys=True))
        return 0

    return run


# ----------------------------------------------------------------------------- parser


def _run_arguments(p: argparse.ArgumentParser) -> None:
    from msif.workflow.dag import FULL, PIPELINES

    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://HOST/pipeline")
    p.add_argument("--experiment", required=True, help="experiment name (created if missing)")
    p.add_argument("--params", required=True, help="YAML mapping of pipeline parameters")
    p.add_argument("--package", help="compiled pipeline YAML (default: --pipeline's packaged one)")
    p.add_argument(
        "--pipeline",
        choices=PIPELINES,
        default=FULL,
        help="which packaged pipeline to run when --package is not given",
    )
    p.add_argument("--namespace", help="Kubeflow profile namespace (multi-user clusters)")
    p.add_argument("--pipeline-root", help="artifact root for this run, e.g. gs://BUCKET/msif")
    p.add_argument("--service-account", help="Kubernetes service account the run's pods use")
    p.add_argument("--no-cache", action="store_true", help="disable KFP caching for this run")


def add_pipeline_parser(subparsers) -> argparse.ArgumentParser:
    """Add `pipeline compile|submit|schedule` to an argparse subparsers object."""
    from msif.workflow.dag import ATTRIBUTE, FULL, INDEX, PIPELINES

    parser = subparsers.add_parser(
        "pipeline",
        help="compile, submit or schedule the Kubeflow pipeline",
        description="Compile the KFP v2 pipeline YAML, submit a run, or schedule recurring "
        "runs. Credentials come from the environment only (KF_PIPELINES_SA_TOKEN_PATH, "
        f"{TOKEN_ENV}, kfp's IAP variables).",
    )
    actions = parser.add_subparsers(dest="pipeline_action", metavar="ACTION")
    parser.set_defaults(run=lambda a: _usage(parser))

    p = actions.add_parser("compile", help="write the compiled pipeline YAML")
    p.add_argument(
        "--pipeline",
        choices=PIPELINES,
        default=FULL,
        help=f"which pipeline ({FULL}: everything; {INDEX}: pre-train factors and the corpus "
        f"index, once per pre-trained model and corpus; {ATTRIBUTE}: a fine-tune's queries "
        "through an index run's outputs)",
    )
    p.add_argument(
        "--out", help="output file (default: the packaged YAML, pipelines/<pipeline>.yaml)"
    )
    p.add_argument("--image", help="component image (sets MSIF_IMAGE while compiling)")
    p.add_argument("--accelerator-type", help="default accelerator resource (nvidia.com/gpu)")
    p.add_argument("--accelerator-count", type=int, help="default accelerators per GPU node (1)")
    p.add_argument(
        "--gke-accelerator",
        help="default GKE GPU model for the node selector (nvidia-l4; '' for none)",
    )
    p.add_argument(
        "--plan",
        help="a `msif plan --json` file: its GPU model, GPU pod memory and CPU node requests",
    )
    p.set_defaults(run=_compile_command)

    p = actions.add_parser("submit", help="start one run on a KFP cluster")
    _run_arguments(p)
    p.add_argument("--run-name", help="run name (default: pipeline name and local time)")
    p.set_defaults(run=_print_result(submit))

    p = actions.add_parser("schedule", help="create a recurring run (KFP cron, 6 fields)")
    _run_arguments(p)
    p.add_argument("--cron", required=True, help='e.g. "0 0 3 * * *" = 03:00:00 every day')
    p.add_argument("--name", required=True, help="recurring run name")
    p.add_argument("--max-concurrency", type=int, default=1, help="parallel runs allowed (1)")
    p.add_argument("--catchup", action="store_true", help="backfill runs missed while paused")
    p.set_defaults(run=_print_result(schedule))
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    print(
        f"msif: error: choose an action: compile, submit or schedule (see {parser.prog} --help)",
        file=sys.stderr,
    )
    return 2


def build_parser() -> argparse.ArgumentParser:
    """A standalone `msif` parser holding only the pipeline commands."""
    from msif.cli import ArgumentParser

    parser = ArgumentParser(prog="msif")
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks of errors")
    add_pipeline_parser(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `msif pipeline ...` standalone, with the exit codes and one-line errors of
    `msif.cli.main` (1 runtime, 2 usage)."""
    from msif.cli import execute

    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not hasattr(args, "run"):
        return _usage(parser)
    return execute(lambda: args.run(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
