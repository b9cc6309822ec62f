"""Shared pytest configuration and fixtures (one section per concern)."""

from __future__ import annotations

# --- data_prep: `network` marker (tests that reach PyPI / Debian apt) ---------------------------------


def pytest_configure(config):
    """Register markers (``-m "not network"`` deselects tests that reach a package registry)."""
    config.addinivalue_line("markers", "network: needs a package registry (PyPI / Debian apt) or its cache")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU machines and in CI)")
