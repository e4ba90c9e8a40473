"""Shared fixtures for the extractor tests: a tiny random detector and generated images
(tests/conftest.py makes torch single-threaded for the whole suite)."""
from __future__ import annotations

import warnings

import pytest


@pytest.fixture(scope="session")
def tiny_detector():
    from extractor.config import tiny_config
    from extractor.detector import build_detector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_detector(tiny_config(use_attributes=True))
