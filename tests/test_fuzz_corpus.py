"""Replay the committed fuzz corpus (fuzz/corpus/*) through the fuzz target,
so every input the coverage-guided fuzzer found interesting stays covered
(also in the sanitizer job)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
INPUTS = sorted(p for p in (FUZZ / "corpus").rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def harness():
    sys.path.insert(0, str(FUZZ))
    try:
        import harness as h
    finally:
        sys.path.remove(str(FUZZ))
    return h


@pytest.mark.parametrize("path", INPUTS, ids=[p.name for p in INPUTS])
def test_corpus_input(harness, path, caplog):
    before = len(os.listdir("/proc/self/fd"))
    with caplog.at_level(logging.CRITICAL):
        harness.one_input(path.read_bytes())
    assert len(os.listdir("/proc/self/fd")) == before
