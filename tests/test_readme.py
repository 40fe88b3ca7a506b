"""The README's agent examples run as written: each ```python block is spawned as an agent on the real kernel
and must exit 0 (docs are part of the contract: an example that no longer runs is a bug)."""
from __future__ import annotations

import re

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.timeout(300)

BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


@pytest.mark.parametrize("source", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_a_readme_example_runs_as_an_agent(kernel, source):
    rec, out = kernel.run(source, name="readme-example", timeout=240)
    assert rec["exit_status"] == 0, out
