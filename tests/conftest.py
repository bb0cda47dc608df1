"""Keep the suite's disk footprint to one module's worth.

A tiny model's run folder is 35-190 MB (best.pt, last.pt with optimiser state,
rerank.pt), and the retrieval modules write dozens of them; kept to the end of the
session they came to 2.5 GB and filled a CI machine's disk. Per-test folders go when
their test passes (`tmp_path_retention_policy` in pyproject.toml); this removes what a
module's own fixtures made once the module is done, unless one of its tests failed.
"""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="module", autouse=True)
def _free_module_scratch(request, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        return
    for path in set(base.iterdir()) - before:
        shutil.rmtree(path, ignore_errors=True)
