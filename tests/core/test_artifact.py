"""Generic artifact save/load from dataclass fields, and the refusals every artifact shares."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file

from msif.core.artifact import Artifact, module_specs, per_module, reduce_partials
from msif.core.modules import ModuleSpec
from msif.errors import MismatchError, MsifError

SPECS = {n: ModuleSpec(n, "linear", 2, 3, True, 3) for n in ("a.0.x", "a.1.x")}


@dataclass
class Toy(Artifact):
    stem: ClassVar[str] = "toy"

    label: str
    specs: dict[str, ModuleSpec] = module_specs()
    weight: dict[str, torch.Tensor] = per_module("W")
    dense: dict[str, torch.Tensor] = per_module("D", optional=True)
    lowrank: dict[str, tuple] = per_module("U", "V", optional=True)
    info: dict = field(default_factory=dict)


class Renamed(Toy):
    stem: ClassVar[str] = "renamed"


def _toy():
    return Toy(
        "x",
        SPECS,
        {n: torch.full((3, 3), float(i)) for i, n in enumerate(SPECS)},
        dense={"a.0.x": torch.ones(2, 3, 3)},
        lowrank={"a.1.x": (torch.ones(2, 3, 1), torch.zeros(2, 3, 1))},
        info={"note": [1, 2]},
    )


def test_fields_decide_tensor_keys_and_metadata_and_round_trip(tmp_path):
    toy = _toy()
    toy.save(tmp_path)
    keys = set(load_file(str(tmp_path / "toy.safetensors")))
    assert keys == {"a.0.x.W", "a.1.x.W", "a.0.x.D", "a.1.x.U", "a.1.x.V"}
    meta = json.loads((tmp_path / "toy.json").read_text())
    assert set(meta) == {"kind", "msif_version", "sha256", "label", "modules", "info"}
    assert meta["kind"] == "toy" and meta["modules"] == [s.to_dict() for s in SPECS.values()]
    back = Toy.load(tmp_path)
    assert (back.label, back.specs, back.info) == ("x", SPECS, {"note": [1, 2]})
    assert set(back.dense) == {"a.0.x"} and set(back.lowrank) == {"a.1.x"}
    assert all(torch.equal(back.weight[k], toy.weight[k]) for k in SPECS)
    assert isinstance(back.lowrank["a.1.x"], tuple) and len(back.lowrank["a.1.x"]) == 2


def _rewrite(directory, stem, drop):
    """Drop tensors and re-sign the file, so only the missing tensors are wrong."""
    from msif.core.artifact import _sha256

    path = directory / f"{stem}.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if k not in drop}
    save_file(tensors, str(path))
    meta = json.loads((directory / f"{stem}.json").read_text())
    meta["sha256"] = _sha256(path)
    (directory / f"{stem}.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "drop,message",
    [
        ({"a.1.x.W"}, "incomplete toy artifact: a.1.x.W is missing"),
        ({"a.1.x.V"}, "incomplete toy artifact: a.1.x.V is missing"),
        ({"a.0.x.D"}, "incomplete toy artifact: module 'a.0.x' has no tensors"),
    ],
)
def test_missing_tensors_are_refused(tmp_path, drop, message):
    _toy().save(tmp_path)
    _rewrite(tmp_path, "toy", drop)
    with pytest.raises(MsifError, match=message):
        Toy.load(tmp_path)


def test_other_kind_corrupt_and_absent_artifacts_are_refused(tmp_path):
    _toy().save(tmp_path / "t")
    for ext in ("safetensors", "json"):
        (tmp_path / "t" / f"toy.{ext}").rename(tmp_path / "t" / f"renamed.{ext}")
    with pytest.raises(MismatchError, match="holds a 'toy' artifact, not 'renamed'"):
        Renamed.load(tmp_path / "t")
    _toy().save(tmp_path / "c")
    blob = tmp_path / "c" / "toy.safetensors"
    blob.write_bytes(blob.read_bytes()[:-4] + b"0000")
    with pytest.raises(MsifError, match="checksum differs"):
        Toy.load(tmp_path / "c")
    with pytest.raises(MsifError, match="not a toy artifact: toy.safetensors is missing"):
        Toy.load(tmp_path / "nothing")


def test_no_partials_is_an_error():
    # Adding partial sums is tested on the real ones in tests/ekfac.
    with pytest.raises(MsifError, match="no toy sums given"):
        reduce_partials([], "toy sums")
