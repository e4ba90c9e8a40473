"""Shared fixtures for the extractor tests: single-threaded torch (much faster for the tiny
network on a small shared CPU), a tiny random detector, and generated images."""
from __future__ import annotations

import warnings

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Per module, so the setting never leaks into other test directories."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_detector():
    from extractor.config import tiny_config
    from extractor.detector import build_detector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_detector(tiny_config(use_attributes=True))
