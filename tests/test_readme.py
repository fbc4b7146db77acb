"""The README's library example runs as written."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_library_example_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["scores"].values.shape == (1, 16)
    assert (tmp_path / "factors-pt" / "factors.safetensors").is_file()


def test_readme_own_models_and_data_commands_run(tmp_path, monkeypatch):
    """Every command of "Your own models and data", on a tiny Llama, a LoRA adapter of it and
    chat data in datasets folders, with the README's variables set to those files."""
    import json
    import shlex

    import pytest

    from msif.cli import main
    from tests.support.user_world import build_user_world

    pytest.importorskip("datasets")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Your own models and data", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    world = build_user_world(tmp_path / "mine")
    names = dict(BASE="base", ADAPTER="adapter", CORPUS="corpus", FINETUNE="finetune")
    names.update(QUERIES="queries")
    monkeypatch.chdir(tmp_path)
    commands = [line for line in block.splitlines() if line.startswith("msif ")]
    assert len(commands) == 11
    common = ["--max-length", "32", "--batch-size", "4", "--no-progress", "--device", "cpu"]
    for line in commands:
        for var, key in names.items():
            line = line.replace(f"${var}", world[key])
        argv = shlex.split(line)[1:]
        extra = [] if argv[0] in ("eigendecompose", "build-factors", "rank") else common
        assert main([*argv, *extra]) == 0, line
    metrics = json.loads((tmp_path / "out" / "ranking" / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"multi-stage"}
    queries = json.loads((tmp_path / "out" / "queries" / "queries.json").read_text())
    assert queries["query_ids"] == ["q0", "q1", "q2"]
