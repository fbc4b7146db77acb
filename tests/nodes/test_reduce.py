"""The reducers' streaming sum: exact, one partial at a time, every shard-set refusal kept."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import msif
from msif.ekfac.covariance import CovarianceSums
from msif.errors import MismatchError, MsifError
from msif.nodes import runtime
from tests.support.tiny import make_batches, random_examples, tiny_model


def _publish(part: CovarianceSums, directory) -> None:
    with runtime.published(str(directory), {"node": "fit-covariance", "stage": part.stage}) as tmp:
        part.save(tmp)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three saved covariance shards of one tiny model's data, and their all-at-once sum."""
    model = tiny_model("gpt_neox")
    examples = random_examples(9, seed=3)
    root = tmp_path_factory.mktemp("partials")
    dirs, parts = [], []
    for i in range(3):
        part = msif.fit_covariance(model, make_batches(examples[3 * i : 3 * i + 3], 2))
        part.info.update({"shard": i, "num_shards": 3, "data_fingerprint": "d"})
        _publish(part, root / str(i))
        dirs.append(str(root / str(i)))
        parts.append(part)
    return dirs, parts[0] + parts[1] + parts[2]


def test_streaming_sum_equals_the_all_at_once_sum_bit_for_bit(shards):
    dirs, expected = shards
    got = runtime.sum_partials(dirs, CovarianceSums.load, "covariance partial sums")
    assert (got.num_tokens, got.num_sequences) == (expected.num_tokens, expected.num_sequences)
    for name in expected.specs:
        assert torch.equal(got.activation[name], expected.activation[name])
        assert torch.equal(got.gradient[name], expected.gradient[name])
    assert got.info["shard"] == 0  # the sum carries the first shard's provenance, as `+` did


def test_at_most_the_sum_and_one_partial_are_alive(shards):
    dirs, _ = shards
    alive: list[weakref.ref] = []
    peak = 0

    def loader(directory):
        nonlocal peak
        gc.collect()
        part = CovarianceSums.load(directory)
        alive.append(weakref.ref(part))
        peak = max(peak, sum(r() is not None for r in alive))
        return part

    runtime.sum_partials(dirs, loader, "covariance partial sums")
    assert peak == 2  # the running sum (the first, added into) and the one just read


@pytest.mark.parametrize(
    ("order", "edit", "error", "message"),
    [
        ((0, 2), None, MsifError, "covariance partial sums: shard 1 of 3 is missing"),
        ((0, 0, 1, 2), None, MsifError, "covariance partial sums: shard 0 was given twice"),
        ((0, 1, 2), {"num_shards": 4}, MismatchError, "come from different shardings or data"),
        ((0, 1, 2), {"data_fingerprint": "e"}, MismatchError, "different shardings or data"),
    ],
)
def test_incomplete_or_mixed_sets_are_refused(shards, tmp_path, order, edit, error, message):
    dirs, _ = shards
    chosen = [dirs[i] for i in order]
    if edit:  # the last shard from another sharding or data
        part = CovarianceSums.load(chosen[-1])
        part.info.update(edit)
        _publish(part, tmp_path / "other")
        chosen[-1] = str(tmp_path / "other")
    with pytest.raises(error, match=message):
        runtime.sum_partials(chosen, CovarianceSums.load, "covariance partial sums")


def test_no_partials_is_refused():
    with pytest.raises(MsifError, match="no partial sums given"):
        runtime.sum_partials([], CovarianceSums.load, "covariance partial sums")


def test_gs_partials_leave_no_downloaded_copy(shards, gcs_bucket, tmp_path, monkeypatch):
    from msif.storage import gcs as storage
    from msif.storage.uri import join

    dirs, expected = shards
    monkeypatch.setenv("MSIF_CACHE", str(tmp_path / "cache"))
    prefix = join(gcs_bucket, f"reduce-{tmp_path.name}")
    uris = []
    for i, d in enumerate(dirs):
        uris.append(join(prefix, str(i)))
        storage.upload_tree(d, uris[-1])
    got = runtime.sum_partials(uris, CovarianceSums.load, "covariance partial sums")
    for name in expected.specs:
        assert torch.equal(got.gradient[name], expected.gradient[name])
    artifacts = tmp_path / "cache" / "artifacts"
    assert artifacts.is_dir()  # the copies were made there ...
    assert [p.name for p in artifacts.iterdir()] == []  # ... and dropped once added
