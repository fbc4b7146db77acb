"""Run the pipeline with every node in its container image: kfp.local's DockerRunner.

What a pod meets first is checked here: the image's entry point, user (uid 1000, as a pod's
`runAsUser`), installed packages and paths. Each task runs in a fresh container with host
networking (where images/dockerd.sh runs the daemon there is no bridge) and sees only the
pipeline root, mounted at the same path, as kfp.local arranges. Everything else a node reads
must come by URI, so the world's inputs are uploaded to a GCS emulator on 127.0.0.1 and
passed as gs:// URIs, which is how a cluster run receives them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from msif.errors import MsifError

DEFAULT_IMAGE = "msif:cpu"
IMAGE_USER = "1000:1000"  # the image's own user: containers never run as root
# A read-only root file system, as a pod's securityContext may demand: a node writes only to
# the mounted pipeline root, kfp's scratch dir (/tmp) and its download cache under HOME.
WRITABLE = {"/tmp": "rw,size=2g", "/home/msif": "rw,uid=1000,gid=1000,size=8g"}
WORLD_BUCKET = "msif-world"
WORLD_INPUTS = {
    "pt_model": "pt_model_uri",
    "ft_model": "ft_model_uri",
    "corpus": "corpus_uri",
    "finetune": "finetune_data_uri",
    "queries": "queries_uri",
}


class ContainerRunError(MsifError):
    """No daemon, no image, or an emulator that could not start for the containerized run."""


def docker_client(image: str):
    """A docker-py client whose daemon answers and holds image; else ContainerRunError."""
    try:
        import docker
    except ImportError:
        raise ContainerRunError(
            "--runner docker needs the docker Python package (pip install docker, or msif[dev])"
        ) from None
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except docker.errors.DockerException as exc:
        host = os.environ.get("DOCKER_HOST", "the default socket")
        raise ContainerRunError(
            f'no docker daemon answers at {host} (start one: eval "export '
            f'$(images/dockerd.sh start DIR)"): {str(exc).splitlines()[0]}'
        ) from None
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        client.close()
        raise ContainerRunError(
            f"the daemon has no image {image} (build it: images/build.sh cpu {image})"
        ) from None
    return client


def run_container(
    client, image: str, command: list[str], volumes: dict, record: Path | None = None, **run_args
) -> int:
    """Run one task's container to its end; its exit status.

    Replaces kfp.local's own runner function, which starts containers with auto-remove and
    reports a container already removed when it asks for the status as a success: a failed
    node must fail its task. Here the container is removed only after its status is read.
    record: a JSON Lines file that gets one line per container (image, command, status,
    read_only, seconds).
    """
    start = time.perf_counter()
    container = client.containers.run(
        image=image, command=command, detach=True, volumes=volumes, **run_args
    )
    status = -1
    try:
        for line in container.logs(stream=True, follow=True):
            print(line.decode(errors="replace"), end="")
        status = int(container.wait()["StatusCode"])
        return status
    finally:
        with contextlib.suppress(Exception):
            container.remove(force=True)
        if record is not None:
            line = {"image": image, "command": list(command), "status": status}
            line["read_only"] = bool(run_args.get("read_only"))
            line["seconds"] = round(time.perf_counter() - start, 3)
            with open(record, "a") as fh:
                fh.write(json.dumps(line) + "\n")


@contextlib.contextmanager
def docker_runner(
    image: str, environment: dict[str, str], record: Path | None = None
) -> Iterator[Any]:
    """A kfp.local DockerRunner for image (host network, uid 1000, read-only root, the
    environment), with kfp's container runner replaced by run_container while the context
    lasts; record: as for run_container."""
    from kfp import local
    from kfp.local import docker_task_handler

    docker_client(image).close()
    runner = local.DockerRunner(
        network_mode="host",
        user=IMAGE_USER,
        environment=environment,
        read_only=True,
        tmpfs=dict(WRITABLE),
    )
    saved = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = functools.partial(run_container, record=record)
    try:
        yield runner
    finally:
        docker_task_handler.run_docker_container = saved


def prepare_root(root: Path) -> None:
    """Make the pipeline root writable by the containers' user (uid 1000)."""
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(root, 1000, 1000)
    else:
        root.chmod(0o777)


def world_key(world: dict) -> str:
    """A short name for this world's inputs in the bucket: a hash of their local paths."""
    text = "\n".join(str(world[name]) for name in WORLD_INPUTS)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def upload_world(world: dict, bucket: str = WORLD_BUCKET) -> dict[str, str]:
    """Upload the world's models and tables to gs://bucket/KEY/; their gs:// URIs by name."""
    from msif.storage import gcs

    prefix = f"gs://{bucket}/{world_key(world)}"
    uris = {}
    for name in WORLD_INPUTS:
        path = Path(world[name])
        uri = f"{prefix}/{name}" + ("" if path.is_dir() else path.suffix)
        if path.is_dir():
            gcs.upload_tree(path, uri)
        else:
            gcs.upload_file(path, uri)
        uris[name] = uri
    return uris


@contextlib.contextmanager
def world_on_emulator(world: dict) -> Iterator[tuple[dict, dict[str, str]]]:
    """Serve the world's inputs from a fresh GCS emulator on 127.0.0.1.

    Yields the world with gs:// URIs in place of its paths, and the environment a container
    needs to reach the emulator (through host networking).
    """
    from msif.testing.gcs_emulator import EmulatorError, create_bucket, gcs_emulator

    try:
        with gcs_emulator() as emulator:
            create_bucket(emulator.endpoint, WORLD_BUCKET)
            env = {"STORAGE_EMULATOR_HOST": emulator.endpoint, **thread_settings()}
            with _environment(env):
                uris = upload_world(world)
            yield {**world, **uris}, env
    except EmulatorError as exc:
        raise ContainerRunError(f"cannot serve the world over gs://: {exc}") from None


def thread_settings() -> dict[str, str]:
    """This process's thread-count settings, for the containers: the same float sums in the
    same order as a run here, and no more threads than the host was given."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    return {name: os.environ[name] for name in names if name in os.environ}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
