"""Test helpers shipped with msif: a real GCS emulator process and a fault-injecting proxy."""

from msif.testing.gcs_emulator import (
    DEFAULT_BUCKET,
    Emulator,
    EmulatorError,
    FaultProxy,
    Faults,
    create_bucket,
    fault_proxy,
    gcs_emulator,
)

__all__ = [
    "DEFAULT_BUCKET",
    "Emulator",
    "EmulatorError",
    "FaultProxy",
    "Faults",
    "create_bucket",
    "fault_proxy",
    "gcs_emulator",
]
