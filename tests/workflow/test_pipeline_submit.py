"""`msif pipeline submit|schedule` through the real kfp.Client against a local HTTP server that
speaks the KFP v2beta1 REST API (experiments, runs, recurring runs, healthz) and records every
request: the pipeline spec, parameters, experiment, cron and credentials that reach the API."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from msif.workflow.cli import SA_TOKEN_PATH_ENV, TOKEN_ENV, default_package, main

API = "/apis/v2beta1"
PARAMS = {
    "pt_model_uri": "gs://bucket/models/pt",
    "ft_model_uri": "gs://bucket/models/ft",
    "corpus_uri": "gs://bucket/corpus/",
    "finetune_data_uri": "gs://bucket/finetune/",
    "queries_uri": "gs://bucket/queries.parquet",
    "num_shards": 8,
    "alpha": 0.01,
    "gpu_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"},
}


@dataclass
class Request:
    """One recorded API call."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: dict | None


@dataclass
class FakeKfp:
    """State and request log of the fake KFP API server."""

    url: str = ""
    requests: list[Request] = field(default_factory=list)
    experiments: dict[str, dict] = field(default_factory=dict)
    fail: dict[str, int] = field(default_factory=dict)  # path → HTTP status to answer with
    junk: bool = False  # answer every request 200 with JSON that is no KFP object

    def calls(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == API + path]


def _handler(state: FakeKfp):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def _record(self, method: str) -> Request:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            req = Request(
                method,
                url.path,
                parse_qs(url.query),
                {k.lower(): v for k, v in self.headers.items()},
                json.loads(raw) if raw else None,
            )
            state.requests.append(req)
            return req

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _fake_answer(self, req: Request) -> bool:
            """Answer as a failing or non-KFP endpoint; whether it did."""
            if req.path in state.fail:
                # Like a careless proxy, the error body echoes the credentials it was sent.
                echo = {"error": "backend says no", "you sent": req.headers.get("authorization")}
                self._reply(state.fail[req.path], echo)
            elif state.junk:
                self._reply(200, {"hello": "world"})
            return req.path in state.fail or state.junk

        def do_GET(self):  # noqa: N802 - http.server's naming
            req = self._record("GET")
            if self._fake_answer(req):
                return None
            if req.path == f"{API}/healthz":
                return self._reply(200, {"multi_user": False})
            if req.path == f"{API}/experiments":
                (raw_filter,) = req.query["filter"]
                (predicate,) = json.loads(raw_filter)["predicates"]
                assert predicate["key"] == "display_name"
                exp = state.experiments.get(predicate["stringValue"])
                return self._reply(200, {"experiments": [exp], "total_size": 1} if exp else {})
            return self._reply(404, {"error": f"no route {req.path}"})

        def do_POST(self):  # noqa: N802
            req = self._record("POST")
            if self._fake_answer(req):
                return None
            if req.path == f"{API}/experiments":
                exp = {**req.body, "experiment_id": f"exp-{len(state.experiments) + 1}"}
                state.experiments[exp["display_name"]] = exp
                return self._reply(200, exp)
            if req.path == f"{API}/runs":
                return self._reply(200, {**req.body, "run_id": "run-1", "state": "PENDING"})
            if req.path == f"{API}/recurringruns":
                return self._reply(200, {**req.body, "recurring_run_id": "rr-1"})
            return self._reply(404, {"error": f"no route {req.path}"})

    return Handler


@pytest.fixture
def kfp_api(monkeypatch) -> Iterator[FakeKfp]:
    for var in (TOKEN_ENV, SA_TOKEN_PATH_ENV, "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    state = FakeKfp()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def params_file(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(PARAMS))
    return path


def package_spec(package: Path | None = None) -> dict:
    """What kfp sends as pipeline_spec for a compiled YAML with a platform spec."""
    spec, platform = yaml.safe_load_all((package or default_package()).read_text())
    return {"pipeline_spec": spec, "platform_spec": platform}


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def submit_argv(api: FakeKfp, params: Path, *extra: str) -> list[str]:
    argv = ["pipeline", "submit", "--host", api.url, "--experiment", "influence-ci"]
    return [*argv, "--params", str(params), *extra]


def test_submit_creates_experiment_and_run_with_package_and_params(kfp_api, params_file, capsys):
    assert main(submit_argv(kfp_api, params_file, "--run-name", "nightly-1")) == 0
    assert last_json(capsys.readouterr().out) == {
        "experiment_id": "exp-1",
        "run_id": "run-1",
        "run_name": "nightly-1",
    }
    (lookup,) = kfp_api.calls("GET", "/experiments")
    assert json.loads(lookup.query["filter"][0])["predicates"][0]["stringValue"] == "influence-ci"
    (created,) = kfp_api.calls("POST", "/experiments")
    assert created.body["display_name"] == "influence-ci"
    (run,) = kfp_api.calls("POST", "/runs")
    assert run.body["experiment_id"] == "exp-1"
    assert run.body["display_name"] == "nightly-1"
    assert run.body["pipeline_spec"] == package_spec()
    assert run.body["runtime_config"]["parameters"] == PARAMS
    assert "pipeline_root" not in run.body["runtime_config"]
    assert "service_account" not in run.body
    assert "authorization" not in run.headers


def test_second_submit_reuses_the_experiment(kfp_api, params_file, capsys):
    assert main(submit_argv(kfp_api, params_file)) == 0
    assert main(submit_argv(kfp_api, params_file)) == 0
    assert len(kfp_api.calls("POST", "/experiments")) == 1
    runs = kfp_api.calls("POST", "/runs")
    assert [r.body["experiment_id"] for r in runs] == ["exp-1", "exp-1"]
    assert runs[0].body["display_name"].startswith("multi-stage-influence ")


def test_submit_options_reach_the_run(kfp_api, params_file, tmp_path, capsys):
    package = tmp_path / "custom.yaml"
    assert main(["pipeline", "compile", "--out", str(package), "--image", "ghcr.io/a/msif:9"]) == 0
    extra = ["--package", str(package), "--no-cache", "--pipeline-root", "gs://bucket/root"]
    extra += ["--service-account", "msif-pipeline-runner", "--namespace", "team-a"]
    assert main(submit_argv(kfp_api, params_file, *extra)) == 0
    (lookup,) = kfp_api.calls("GET", "/experiments")
    assert lookup.query["namespace"] == ["team-a"]
    assert kfp_api.calls("POST", "/experiments")[0].body["namespace"] == "team-a"
    (run,) = kfp_api.calls("POST", "/runs")
    spec = run.body["pipeline_spec"]["pipeline_spec"]
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"ghcr.io/a/msif:9"}
    caching = [
        t["cachingOptions"]
        for c in [spec["root"], *spec["components"].values()]
        for t in c.get("dag", {}).get("tasks", {}).values()
        if "cachingOptions" in t
    ]
    # Protobuf JSON drops false booleans: a disabled cache is an empty cachingOptions.
    assert caching and all(not c.get("enableCache", False) for c in caching)
    assert run.body["runtime_config"]["pipeline_root"] == "gs://bucket/root"
    assert run.body["service_account"] == "msif-pipeline-runner"


def test_credentials_come_from_the_environment_only(
    kfp_api, params_file, tmp_path, monkeypatch, capsys
):
    token = tmp_path / "token"
    token.write_text("sa-token-123")
    monkeypatch.setenv(SA_TOKEN_PATH_ENV, str(token))
    assert main(submit_argv(kfp_api, params_file)) == 0
    assert {r.headers.get("authorization") for r in kfp_api.requests} == {"Bearer sa-token-123"}
    monkeypatch.delenv(SA_TOKEN_PATH_ENV)
    monkeypatch.setenv(TOKEN_ENV, "iap-token-456")
    kfp_api.requests.clear()
    assert main(submit_argv(kfp_api, params_file)) == 0
    assert {r.headers.get("authorization") for r in kfp_api.requests} == {"Bearer iap-token-456"}
    printed = capsys.readouterr()
    assert "token-" not in printed.out + printed.err


def test_schedule_creates_a_recurring_run(kfp_api, params_file, capsys):
    argv = ["pipeline", "schedule", "--host", kfp_api.url, "--experiment", "influence-nightly"]
    argv += ["--params", str(params_file), "--cron", "0 0 3 * * *", "--name", "nightly"]
    assert main(argv) == 0
    assert last_json(capsys.readouterr().out) == {
        "cron": "0 0 3 * * *",
        "experiment_id": "exp-1",
        "recurring_run_id": "rr-1",
    }
    (created,) = kfp_api.calls("POST", "/experiments")
    assert created.body["display_name"] == "influence-nightly"
    (job,) = kfp_api.calls("POST", "/recurringruns")
    assert job.body["display_name"] == "nightly"
    assert job.body["experiment_id"] == "exp-1"
    assert job.body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert job.body["mode"] == "ENABLE"
    assert job.body["no_catchup"] is True
    assert int(job.body["max_concurrency"]) == 1
    assert job.body["pipeline_spec"] == package_spec()
    assert job.body["runtime_config"]["parameters"] == PARAMS


@pytest.mark.parametrize(
    "cron, message",
    [
        ("0 3 * * *", "has 5 fields; KFP cron has 6 with seconds first, e.g. '0 0 3 * * *'"),
        ("0 0 3 * * * *", "is not a KFP cron expression"),
        ("0 0 3 * * ;rm", "is not a KFP cron expression"),
    ],
)
def test_schedule_refuses_bad_cron_before_any_request(kfp_api, params_file, capsys, cron, message):
    argv = ["pipeline", "schedule", "--host", kfp_api.url, "--experiment", "e"]
    argv += ["--params", str(params_file), "--cron", cron, "--name", "n"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == f"msif: error: --cron {cron!r} {message}" + (
        "\n"
        if message.endswith("'")
        else " (6 fields: second minute hour day-of-month month day-of-week)\n"
    )
    assert kfp_api.requests == []


def test_schedule_accepts_descriptors(kfp_api, params_file, capsys):
    argv = ["pipeline", "schedule", "--host", kfp_api.url, "--experiment", "e"]
    argv += ["--params", str(params_file), "--cron", "@every 6h", "--name", "n", "--catchup"]
    assert main(argv) == 0
    (job,) = kfp_api.calls("POST", "/recurringruns")
    assert job.body["trigger"]["cron_schedule"]["cron"] == "@every 6h"
    assert job.body.get("no_catchup") in (False, None)


@pytest.mark.parametrize(
    "params, message",
    [
        ({**PARAMS, "shards": 2}, "unknown pipeline parameter(s) shards (known: "),
        ({k: v for k, v in PARAMS.items() if k != "corpus_uri"}, "missing pipeline parameter"),
        ({**PARAMS, "num_shards": "four"}, "parameter num_shards must be number_integer, not"),
        ({**PARAMS, "num_shards": True}, "parameter num_shards must be number_integer, not"),
        ({**PARAMS, "gpu_node_selector": "nvidia-l4"}, "gpu_node_selector must be struct"),
        (["not", "a", "mapping"], "must hold a mapping of pipeline parameters"),
    ],
)
def test_bad_params_fail_before_any_request(kfp_api, tmp_path, capsys, params, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(params))
    assert main(submit_argv(kfp_api, path)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"msif: error: {path}") and message in err and err.count("\n") == 1
    assert kfp_api.requests == []


def test_api_errors_are_one_line(kfp_api, params_file, capsys):
    kfp_api.fail[f"{API}/runs"] = 500
    assert main(submit_argv(kfp_api, params_file)) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"msif: error: KFP API at {kfp_api.url} failed to create the run: HTTP 500"
    )
    assert err.count("\n") == 1


def test_unreachable_host_is_one_line(params_file, capsys):
    with socket.socket() as s:  # a port nobody listens on: bind, read the number, close
        s.bind(("127.0.0.1", 0))
        host = f"http://127.0.0.1:{s.getsockname()[1]}"
    argv = ["pipeline", "submit", "--host", host, "--experiment", "e"]
    assert main([*argv, "--params", str(params_file)]) == 1
    assert capsys.readouterr().err == (
        f"msif: error: cannot reach the KFP API at {host}: "
        "Failed to establish a new connection: [Errno 111] Connection refused\n"
    )


def test_missing_package_is_one_line(kfp_api, params_file, tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(submit_argv(kfp_api, params_file, "--package", str(missing))) == 1
    assert capsys.readouterr().err == f"msif: error: pipeline package {missing} does not exist\n"


# ----------------------------------------------------------------------------- bad endpoints

TOKEN = "tok-3f9c1e77aa"  # what MSIF_KFP_TOKEN holds in the tests below


@pytest.fixture
def token(monkeypatch) -> str:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return TOKEN


def run_cli(argv: list[str], verbose: bool, capsys, caplog) -> tuple[int, str, str, str]:
    """msif.cli.main (with -v when verbose), recording DEBUG records of kfp's REST client,
    which logs every response body; rc, stdout, stderr and the logged text."""
    from msif.cli import main as msif_main

    caplog.set_level(logging.DEBUG)
    # kfp resets the "kfp_server_api" logger to WARNING; its child keeps a level set here.
    caplog.set_level(logging.DEBUG, logger="kfp_server_api.rest")
    rc = msif_main(["-v", *argv] if verbose else argv)
    printed = capsys.readouterr()
    return rc, printed.out, printed.err, caplog.text


def error_line(err: str, verbose: bool) -> str:
    """The one error line: all of stderr, or its last line after -v's traceback."""
    lines = err.splitlines()
    if verbose:
        assert lines[0] == "Traceback (most recent call last):"
    else:
        assert len(lines) == 1, err
    return lines[-1]


@pytest.mark.parametrize("verbose", [False, True])
def test_endpoint_answering_junk_is_refused(kfp_api, params_file, token, capsys, caplog, verbose):
    kfp_api.junk = True
    rc, out, err, logged = run_cli(submit_argv(kfp_api, params_file), verbose, capsys, caplog)
    assert rc == 1 and out == ""  # neither a JSON line nor kfp's link to run None
    assert error_line(err, verbose) == (
        f"msif: error: {kfp_api.url} answered without a run id: is --host the KFP v2 API "
        "endpoint, e.g. https://HOST/pipeline?"
    )
    assert TOKEN not in err + logged


def test_schedule_on_junk_endpoint_is_refused(kfp_api, params_file, capsys):
    kfp_api.junk = True
    argv = ["pipeline", "schedule", "--host", kfp_api.url, "--experiment", "e"]
    assert main([*argv, "--params", str(params_file), "--cron", "@daily", "--name", "n"]) == 1
    assert capsys.readouterr().err == (
        f"msif: error: {kfp_api.url} answered without an experiment id: is --host the KFP v2 "
        "API endpoint, e.g. https://HOST/pipeline?\n"
    )
    assert kfp_api.calls("POST", "/recurringruns") == []


@pytest.mark.parametrize(
    "path, status, reason",
    [("/healthz", 401, "Unauthorized"), ("/runs", 403, "Forbidden")],
)
@pytest.mark.parametrize("verbose", [False, True])
def test_refused_credentials_are_one_line_without_the_token(
    kfp_api, params_file, token, capsys, caplog, path, status, reason, verbose
):
    kfp_api.fail[API + path] = status
    rc, out, err, logged = run_cli(submit_argv(kfp_api, params_file), verbose, capsys, caplog)
    assert rc == 1 and out == ""
    assert error_line(err, verbose) == (
        f"msif: error: {kfp_api.url} refused the request: {status} {reason}; check the credentials"
    )
    assert {r.headers.get("authorization") for r in kfp_api.requests} == {f"Bearer {TOKEN}"}
    assert len(kfp_api.calls("GET", "/healthz")) == 1  # no retries (kfp's took 25 s)
    assert "you sent" in logged  # the echoing body was logged, and redacted
    assert TOKEN not in err + logged


@pytest.mark.parametrize("verbose", [False, True])
def test_server_error_body_is_shown_redacted(kfp_api, params_file, token, capsys, caplog, verbose):
    kfp_api.fail[f"{API}/runs"] = 500
    rc, out, err, logged = run_cli(submit_argv(kfp_api, params_file), verbose, capsys, caplog)
    assert rc == 1 and out == ""
    assert error_line(err, verbose) == (
        f"msif: error: KFP API at {kfp_api.url} failed to create the run: HTTP 500 Internal "
        'Server Error: {"error": "backend says no", "you sent": "Bearer ***"}'
    )
    assert "Bearer ***" in logged and TOKEN not in err + logged


def test_closed_port_with_verbose_is_still_one_error_line(params_file, token, capsys, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        host = f"http://127.0.0.1:{s.getsockname()[1]}"
    argv = ["pipeline", "submit", "--host", host, "--experiment", "e", "--params", str(params_file)]
    rc, out, err, logged = run_cli(argv, True, capsys, caplog)
    assert rc == 1 and out == "" and TOKEN not in err + logged
    assert error_line(err, True) == (
        f"msif: error: cannot reach the KFP API at {host}: "
        "Failed to establish a new connection: [Errno 111] Connection refused"
    )


def test_a_real_process_never_prints_the_token(kfp_api, params_file, tmp_path):
    """`msif -v pipeline submit` in a subprocess: DEBUG logging to stderr as a user sees it."""
    kfp_api.fail[f"{API}/healthz"] = 401
    env = {**os.environ, TOKEN_ENV: TOKEN, "PYTHONPATH": os.pathsep.join(sys.path)}
    for verbose in ([], ["-v"]):
        code = "import sys; from msif.cli import main; sys.exit(main())"
        argv = [sys.executable, "-c", code, *verbose, *submit_argv(kfp_api, params_file)]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert TOKEN not in proc.stdout + proc.stderr
        last = proc.stderr.splitlines()[-1]
        assert last == (
            f"msif: error: {kfp_api.url} refused the request: 401 Unauthorized; "
            "check the credentials"
        )
        if not verbose:
            assert proc.stderr == last + "\n"
