"""DataOptions: one field = one flag = one component argument = one pipeline parameter, on every
node that reads a table; bad values are usage errors naming the flag."""

from __future__ import annotations

import argparse
import inspect
from dataclasses import fields

import pytest

from msif.cli import build_parser, main
from msif.config import OPTION_CLASSES, DataOptions
from msif.errors import OptionError
from msif.workflow.dag import default_option_parameters

READERS = ("fit-covariance", "fit-lambda", "precondition-queries", "score-corpus", "bm25", "rank")
TEXT_ONLY = ("bm25", "rank")  # they tokenise nothing: no --append-eos


def _flags(node: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {s for a in sub.choices[node]._actions for s in a.option_strings}


def test_defaults_are_todays_names():
    d = DataOptions()
    assert (d.text_column, d.id_column, d.prompt_column) == ("text", "id", "prompt")
    assert (d.completion_column, d.messages_column) == ("completion", "messages")
    assert (d.split, d.append_eos) == ("", "auto")
    assert DataOptions in OPTION_CLASSES
    table = DataOptions(text_column="body").table(64)
    assert table.max_length == 64 and table.text_column == "body" and table.append_eos == "auto"


@pytest.mark.parametrize("node", READERS)
def test_every_reading_node_has_the_flags_and_its_component_the_arguments(node):
    import msif.components

    names = [f.name for f in fields(DataOptions)]
    wanted = {n for n in names if not (node in TEXT_ONLY and n == "append_eos")}
    assert {"--" + n.replace("_", "-") for n in wanted} <= _flags(node)
    if node in TEXT_ONLY:
        assert "--append-eos" not in _flags(node)
    params = inspect.signature(msif.components.COMPONENTS[node].python_func).parameters
    if "text_column" not in params:
        pytest.skip("msif.components is another checkout's (an editable install elsewhere)")
    assert wanted <= set(params)
    assert all(params[n].default is inspect.Parameter.empty for n in wanted)  # no defaults
    defaults = default_option_parameters()
    assert {n: defaults[n] for n in names} == {n: getattr(DataOptions(), n) for n in names}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"text_column": ""}, "--text-column must be a column name, not ''"),
        ({"id_column": " "}, "--id-column must be a column name, not ' '"),
        ({"messages_column": 3}, "--messages-column must be a column name, not 3"),
        ({"completion_column": "prompt"}, "--prompt-column and --completion-column both name"),
        ({"text_column": "id"}, "--id-column and --text-column both name 'id'"),
        ({"split": "../test"}, "--split '../test' is not a split name"),
        ({"split": "a/b"}, "--split 'a/b' is not a split name"),
        ({"append_eos": "yes"}, "--append-eos 'yes' is not one of auto, on, off"),
    ],
)
def test_bad_values_name_their_flag(values, message):
    with pytest.raises(OptionError) as err:
        DataOptions(**values)
    assert str(err.value).startswith(message)


def test_bad_values_are_usage_errors_on_the_command_line(tmp_path, capsys):
    argv = ["bm25", "--corpus", "c", "--queries", "q", "--out", str(tmp_path / "o")]
    assert main([*argv, "--text-column", ""]) == 2
    assert capsys.readouterr().err.startswith("msif: error: --text-column must be a column name")
    with pytest.raises(SystemExit) as e:
        main(["fit-covariance", "--append-eos", "maybe"])
    assert e.value.code == 2
    assert not (tmp_path / "o").exists()
