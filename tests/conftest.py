"""Shared pytest configuration and fixtures (one section per concern)."""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any, Callable

import pytest

# --- markers: the test's kind (its folder) and what it needs ----------------------------------------
# tests/unit: one process, seconds; tests/distributed: torchrun worlds, equivalence of parallel layouts and
# backends; tests/faults: crashes, SIGKILL, damaged and malicious inputs; tests/gpu: CUDA only.
# `pytest -m "not slow"` leaves out the modules whose tests (with the fixtures they need) take over 20 s
# (SLOW_MODULES); `-m unit` is the quick loop. CI runs everything.

FOLDER_MARKERS = {"unit": "unit", "distributed": "distributed", "faults": "faults", "gpu": "gpu"}

# Modules marked `slow`: seconds of the module in `bash scripts/test.sh --durations=120` on 2 idle CPU cores
# (2026-11-30). A module, not a test, because their time is mostly a shared fixture (one torchrun job
# whose result several tests check), which any one selected test would start anyway.
SLOW_MODULES = {
    "tests/distributed/test_parallel_equivalence.py": 280,  # fixtures 278 s in all (fresh clone, see below)
    "tests/distributed/test_deepspeed_zero.py": 125,  # fixture 121 s (fresh clone, see below)
    "tests/distributed/test_validation_samples.py": 40,  # fixture 25 s (fresh clone, see below)
    "tests/faults/test_resume.py": 93,
    "tests/faults/test_exit_signal.py": 75,  # fixture 59 s (fresh clone, see below)
    "tests/distributed/test_resume_layouts.py": 85,  # fixture 79 s (fresh clone, see below)
    "tests/distributed/test_precision_checkpoints.py": 42,
    "tests/faults/test_publish_crash.py": 36,
    "tests/faults/test_numerical_faults.py": 31,
    "tests/faults/test_safe_loading.py": 29,
    "tests/faults/test_tokenizer_faults.py": 28,
    "tests/distributed/test_multinode.py": 23,
    "tests/distributed/test_parallel_training.py": 22,
    # "fresh clone": fixture setup times of `bash scripts/test.sh --durations=30` on a fresh clone, 2026-11-30
    # (709 passed in 1150 s; its first minutes shared the 2 cores with another job, so these are upper bounds)
    "tests/distributed/test_untied_head.py": 40,  # fixture 39 s (fresh clone, see below)
}


def pytest_configure(config):
    """Register the markers (``-m "not network"`` deselects tests that reach a package registry, ...)."""
    for line in (
        "unit: one process, no torchrun (tests/unit)",
        "distributed: starts torchrun / multi-process worlds (tests/distributed)",
        "faults: crashes, kills, damaged or malicious inputs (tests/faults)",
        "slow: a module whose tests take over 20 s on 2 CPU cores (SLOW_MODULES)",
        "network: needs a package registry (PyPI / Debian apt) or its cache; skipped when the files are not "
        "cached and the registry is unreachable",
        "gpu: needs a CUDA GPU (skipped on CPU machines and in CI; tests/gpu)",
    ):
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(config, items):
    """Mark every test with its folder's kind (FOLDER_MARKERS) and the slow modules (SLOW_MODULES)."""
    for item in items:
        parts = item.nodeid.split("/")
        if len(parts) > 2 and parts[0] == "tests" and parts[1] in FOLDER_MARKERS:
            item.add_marker(FOLDER_MARKERS[parts[1]])
        if item.nodeid.split("::")[0] in SLOW_MODULES:
            item.add_marker("slow")


# --- data_prep: `network` marker (tests that reach PyPI / Debian apt) ---------------------------------


DEFAULT_INDEX_URL = "https://pypi.org/simple"
PROBE_TIMEOUT_S = 10


def pip_index_url() -> str:
    """The index ``pip download`` uses: ``PIP_INDEX_URL``, else ``index-url`` from pip's configuration files
    (the ``download`` section over ``global``, later files over earlier ones), else PyPI."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    try:
        listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        listing = ""
    found = {}
    for line in listing.splitlines():
        m = re.match(r"^(global|download)\.index-url='(.*)'$", line.strip())
        if m:
            found[m.group(1)] = m.group(2)
    return found.get("download") or found.get("global") or DEFAULT_INDEX_URL


class PackageRegistry:
    """Whether pip's package index answers, probed once (lazily) with a short timeout, and the rule the
    ``network`` tests follow: a download that fails while the index is unreachable skips the test; any
    other failure (a reachable index, a wrong checksum, a broken archive, a bug) fails it.

    Args:
        index_url: the index to probe (default :func:`pip_index_url`).
        known: (reachable, detail) to use instead of probing (for testing this class).
    """

    def __init__(self, index_url: str | None = None, known: tuple[bool, str] | None = None,
                 timeout: float = PROBE_TIMEOUT_S) -> None:
        self.index_url, self.timeout, self._result = index_url, timeout, known

    def probe(self) -> tuple[bool, str]:
        """(reachable, detail): GET ``<index>/pip/`` through the environment's proxies (as pip does), with
        ``PIP_CERT`` as CA bundle if set. Any HTTP answer below 500 (404 included: the server is there)
        counts as reachable; a refused or timed-out connection, a proxy error (407, 5xx) or a TLS failure
        does not."""
        if self._result is None:
            url = (self.index_url or pip_index_url()).rstrip("/") + "/pip/"
            context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
            try:
                with urllib.request.urlopen(url, timeout=self.timeout, context=context) as response:
                    self._result = (True, f"{url}: HTTP {response.status}")
            except urllib.error.HTTPError as exc:
                self._result = (exc.code < 500 and exc.code != 407, f"{url}: HTTP {exc.code}")
            except (urllib.error.URLError, OSError) as exc:  # refused, DNS, timeout, proxy, TLS
                self._result = (False, f"{url}: {getattr(exc, 'reason', exc)}")
        return self._result

    @property
    def reachable(self) -> bool:
        """Whether the index answered (see :meth:`probe`)."""
        return self.probe()[0]

    def fetch(self, fetch: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fetch(*args, **kwargs)`` (a cached file needs no network and is returned either way).

        With the index unreachable, pip runs with no retries and a short timeout (so a miss fails in
        seconds, not after pip's retries), and a ``DownloadError`` (the registry client failed) skips
        the calling test, naming the index, the probe's answer and the download error.

        Raises:
            DownloadError: the download failed although the index is reachable (a real failure).
            Anything else ``fetch`` raises (ChecksumError, FetchError for a broken archive, ...).
        """
        from data_prep.sample_media import DownloadError

        reachable, detail = self.probe()
        with pytest.MonkeyPatch.context() as mp:
            if not reachable:
                for name, value in (("PIP_RETRIES", "0"), ("PIP_TIMEOUT", str(PROBE_TIMEOUT_S)),
                                    ("PIP_DEFAULT_TIMEOUT", str(PROBE_TIMEOUT_S))):
                    mp.setenv(name, value)
            try:
                return fetch(*args, **kwargs)
            except DownloadError as exc:
                if reachable:
                    raise
                pytest.skip(f"package registry unreachable ({detail}) and the files are not cached: {exc}")


@pytest.fixture(scope="session")
def package_registry() -> PackageRegistry:
    """The session's :class:`PackageRegistry` (the index is probed at most once per session)."""
    return PackageRegistry()
