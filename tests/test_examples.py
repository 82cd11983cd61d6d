"""Every shipped example YAML is valid: ``modulora plan`` accepts it (on a tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tiny import model_dir

from modulora.cli import main
from modulora.config import METHODS

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def test_one_example_per_method():
    methods = [yaml.safe_load(p.read_text())["method"] for p in EXAMPLES]
    assert sorted(methods) == sorted(METHODS)
    for path in EXAMPLES:  # each opens with the command that runs it
        assert f"examples/{path.name}" in path.read_text().split("model:")[0]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_plan_accepts_example(path, model_path, capsys):
    assert main(["plan", str(path), "--set", f"model={model_path}"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(path.read_text())["method"] in out
