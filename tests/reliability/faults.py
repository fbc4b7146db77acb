"""Faults tested outside the in-process harness (a GCS emulator with a fault proxy, real
signals, a second process, a fake KFP endpoint): what each is, what msif does, which test."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    """One fault and the test that shows what msif does."""

    what: str
    does: str
    test: str  # "tests/x/test_y.py::test_z"
    error: bool = True  # ends in a one-line error (else: handled, the run succeeds)


FAULTS: list[Fault] = []

_S = "tests/storage/test_publish_safety.py::"
_F = "tests/storage/test_faults.py::"
_C = "tests/nodes/test_cli_errors.py::"
_K = "tests/workflow/test_pipeline_submit.py::"


def _add(what: str, does: str, test: str, error: bool = True) -> None:
    FAULTS.append(Fault(what, does, test, error))


_add(
    "gs://: replacing a complete output, the upload fails half-way (fault proxy)",
    "one line; the old output stays complete and readable",
    _S + "test_gs_failure_mid_upload_keeps_the_old_output",
)
_add(
    "gs://: the final marker (pointer) write fails",
    "one line; the old output stays readable; the next publish removes the leftovers",
    _S + "test_gs_failed_pointer_write_keeps_the_old_output_and_the_next_publish_cleans",
)
_add(
    "gs://: two publishers race for one output",
    "the first marker write wins (ifGenerationMatch); the loser deletes its version, one line",
    _S + "test_gs_a_concurrent_winner_is_kept",
)
_add(
    "gs://: --out holds the user's own objects (no marker)",
    "refused before any work, objects untouched",
    _S + "test_gs_prefix_with_user_objects_is_refused_before_work_and_untouched",
)
_add(
    "gs://: user objects appear under --out while the node works",
    "refused at publish time, objects untouched",
    _S + "test_gs_user_objects_added_during_the_work_are_not_replaced",
)
_add(
    "gs://: --out holds only leftovers of failed msif publishes",
    "replaced and cleaned",
    _S + "test_gs_msif_leftovers_alone_are_replaced",
    error=False,
)
_add(
    "gs://: an output published by the previous release (flat layout)",
    "read as before, and replaced whole",
    _S + "test_gs_old_layout_manifest_reads_and_is_replaced",
    error=False,
)
_add(
    "gs://: a reader downloads while a publisher replaces the output",
    "the reader gets the old or the new output whole, never a mix",
    _S + "test_gs_output_replaced_while_being_read_is_read_again_whole",
    error=False,
)
_add(
    "gs://: a scoring process killed mid-shard (SIGKILL)",
    "nothing published; a rerun gives the uninterrupted ranking",
    _F + "test_killed_scoring_publishes_nothing_and_a_rerun_completes",
    error=False,
)
_add(
    "gs://: transient 503s on every request of every node",
    "retried; the ranking equals the fault-free one",
    _F + "test_transient_503s_are_retried_through_every_node",
    error=False,
)
_add(
    "gs://: endless 503s",
    "one line after a bounded number of retries",
    _F + "test_endless_503s_give_up_in_bounded_time",
)
_add(
    "gs://: a missing bucket",
    "one line, nothing published",
    _F + "test_a_missing_bucket_is_one_line_and_publishes_nothing",
)
_add(
    "gs://: a shard output lost before rank",
    "one line naming the shard",
    _F + "test_rank_refuses_a_lost_shard_output",
)
_add(
    "local: killed between the two renames of a replace",
    "the next run restores the orphaned output, then replaces it",
    _S + "test_local_output_orphaned_between_renames_is_restored",
    error=False,
)
_add(
    "local: SIGKILL/SIGTERM left staging folders `.NAME.msif-*`",
    "removed on the next run when their process is dead; a live one is kept",
    _S + "test_stale_staging_dirs_are_removed_but_live_ones_kept",
    error=False,
)
_add(
    "disk full (real 1 MiB tmpfs) while staging an output",
    "one line naming the path and 'No space left on device'; the old output kept",
    _S + "test_a_full_disk_while_staging_is_one_line_and_keeps_the_old_output",
)
_add(
    "disk full while downloading an input into the cache",
    "one line",
    _S + "test_a_full_cache_disk_while_downloading_is_one_line",
)
_add(
    "disk full (/dev/full) inside a node's torch/safetensors writes",
    "one line: writing a file failed; is the disk full?",
    _C + "test_a_real_full_disk_is_one_line",
)
_add(
    "SIGTERM (Kubernetes pre-emption) while a node runs",
    "`msif: terminated`, exit 143, staging removed, nothing published",
    _C + "test_a_real_process_terminated_by_sigterm",
)
_add(
    "an unexpected exception inside a node",
    "one line `unexpected <Type>: …`; `-v` prints the traceback first",
    _C + "test_verbose_prints_the_traceback_first",
)
_add(
    "secrets in exception texts and logs (tokens, Authorization headers, user:pw@ URLs)",
    "redacted in every line and traceback, also with -v",
    _C + "test_tracebacks_and_lines_never_show_a_secret",
)
_add(
    "`pipeline submit` to an endpoint answering 200 with non-KFP JSON",
    "one line: answered without a run id",
    _K + "test_endpoint_answering_junk_is_refused",
)
_add(
    "`pipeline submit` answered 401 with a body echoing the bearer token",
    "one line 'refused the request: 401 Unauthorized'; the token is never printed",
    _K + "test_refused_credentials_are_one_line_without_the_token",
)
_add(
    "`pipeline submit` answered 500",
    "one line with the body redacted",
    _K + "test_server_error_body_is_shown_redacted",
)
_add(
    "`pipeline submit` to a closed port, with -v",
    "one error line, no retry noise",
    _K + "test_closed_port_with_verbose_is_still_one_error_line",
)
