"""Shared pytest fixtures."""

from __future__ import annotations

import re
import uuid

import pytest

from msif.testing import DEFAULT_BUCKET, Emulator, EmulatorError
from msif.testing import gcs_emulator as start_emulator

# ----------------------------------------------------------------------------- GCS emulator


@pytest.fixture(scope="session")
def gcs_emulator() -> Emulator:
    """A real gcp-storage-emulator process for the session, with bucket `msif-test`.

    Sets STORAGE_EMULATOR_HOST (so msif.storage.gcs talks to it) and a short retry base delay for
    as long as the session runs. Downloads share $MSIF_CACHE: they are keyed by content hash.
    """
    with pytest.MonkeyPatch.context() as mp:
        try:
            with start_emulator() as emulator:
                emulator.create_bucket(DEFAULT_BUCKET)
                mp.setenv("STORAGE_EMULATOR_HOST", emulator.endpoint)
                mp.setenv("MSIF_STORAGE_RETRY_BASE", "0.01")
                yield emulator
        except EmulatorError as exc:
            pytest.skip(str(exc))


@pytest.fixture
def gcs_bucket(gcs_emulator) -> str:
    """The URI of the emulator's test bucket, `gs://msif-test`."""
    return f"gs://{DEFAULT_BUCKET}"


@pytest.fixture
def gcs_prefix(gcs_bucket, request) -> str:
    """A fresh, empty gs:// prefix in the test bucket, unique to this test."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:60]
    return f"{gcs_bucket}/{name}-{uuid.uuid4().hex[:8]}"
