"""The README's "Python API" section runs as written (in a temporary folder): every analysis and compression
on an in-memory model built from a config, no files needed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def api_example() -> str:
    text = README.read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the README's Python API section has no python block"
    return "\n".join(blocks)


@pytest.mark.slow
def test_the_readme_python_api_example_runs(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(api_example(), "README.md#python-api", "exec"), scope)  # noqa: S102 - the README's own example
    import numpy as np
    import xarray as xr

    # the names the example promises exist and hold real results
    assert isinstance(scope["spec"], xr.Dataset) and np.isfinite(scope["spec"]["stable_rank"].values).all()
    assert scope["gaps"]["certified"].notnull().any()
    assert scope["rmap"]["components"] and (tmp_path / "small" / "config.json").is_file()
    assert set(scope["verdicts"]["verdict"].values) <= {"supported", "contradicted", "inconclusive",
                                                        "not testable here"}
