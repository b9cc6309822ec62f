"""Tests of data_prep.video_io: decoding, resize/crop, clips, tensors, mp4 and PNG writing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.video_io import (
    VideoDecodeError,
    clip_starts,
    decode_video,
    frames_to_tensor,
    list_videos,
    load_clip,
    resize_center_crop,
    tensor_to_frames,
    write_contact_sheet,
    write_mp4,
)
from data_prep.synthetic import pattern_frames, write_pattern_video


def _mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_list_videos_recursive_sorted_filtered(tmp_path):
    for rel in ["b/z.MP4", "a/y.avi", "a/x.mp4", "top.webm", "notes.txt", "a/img.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    got = [p.relative_to(tmp_path).as_posix() for p in list_videos(tmp_path)]
    assert got == ["a/x.mp4", "a/y.avi", "b/z.MP4", "top.webm"]
    with pytest.raises(NotADirectoryError):
        list_videos(tmp_path / "missing")


def test_decode_shapes_fps_and_content(tmp_path):
    written = write_pattern_video(tmp_path / "v.mp4", num_frames=12, height=40, width=48, fps=8)
    frames, fps = decode_video(tmp_path / "v.mp4")
    assert frames.dtype == np.uint8 and frames.shape == (12, 40, 48, 3)
    assert fps == pytest.approx(8.0)
    assert _mean_abs(frames, written) < 4.0  # crf 10: near-lossless
    assert decode_video(tmp_path / "v.mp4", max_frames=5)[0].shape == (5, 40, 48, 3)
    small, _ = decode_video(tmp_path / "v.mp4", size=(16, 24))
    assert small.shape == (12, 16, 24, 3)


@pytest.mark.parametrize("content", [b"", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
                                     b"this is a text file, not a video\n" * 50])
def test_decode_rejects_non_videos(tmp_path, content):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(content)
    with pytest.raises(VideoDecodeError) as info:
        decode_video(bad)
    assert info.value.path == bad and info.value.reason


def test_decode_missing_file(tmp_path):
    with pytest.raises(VideoDecodeError, match="no such file"):
        decode_video(tmp_path / "nope.mp4")


def test_resize_center_crop_keeps_the_center():
    # 20 x 40 frame: white 20 x 20 square in the middle, black bars left and right.
    frame = np.zeros((1, 20, 40, 3), np.uint8)
    frame[:, :, 10:30] = 255
    out = resize_center_crop(frame, 10)
    assert out.shape == (1, 10, 10, 3) and out.dtype == np.uint8
    assert out[:, :, 1:-1].min() >= 250  # only the white center survives the crop
    assert out.min() >= 200  # (edge columns: Lanczos ringing from the black just outside the box)
    tall = resize_center_crop(np.zeros((3, 50, 20, 3), np.uint8), (8, 16))
    assert tall.shape == (3, 8, 16, 3)


def test_resize_center_crop_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        resize_center_crop(np.zeros((1, 8, 8, 3), np.float32), 4)
    with pytest.raises(ValueError, match="size"):
        resize_center_crop(np.zeros((1, 8, 8, 3), np.uint8), 0)


def test_clip_starts_examples():
    assert clip_starts(17) == [0]
    assert clip_starts(16) == []
    assert clip_starts(40, clip_len=17) == [0, 17]
    assert clip_starts(40, clip_len=5, frame_stride=2) == [0, 10, 20, 30]  # span 9, hop 10
    assert clip_starts(20, clip_len=5, frame_stride=2, hop=3) == [0, 3, 6, 9]
    assert clip_starts(100, clip_len=5, max_clips=3) == [0, 5, 10]
    with pytest.raises(ValueError):
        clip_starts(10, clip_len=0)
    with pytest.raises(ValueError):
        clip_starts(10, hop=0)


def test_load_clip_stride_and_errors(tmp_path):
    write_pattern_video(tmp_path / "v.mp4", num_frames=20)
    full, _ = decode_video(tmp_path / "v.mp4")
    clip = load_clip(tmp_path / "v.mp4", num_frames=5, size=16, start=3, frame_stride=2)
    assert clip.shape == (5, 16, 16, 3)
    expected = resize_center_crop(full[3:12:2], 16)  # area reduction in RGB instead of YUV: close, not equal
    assert _mean_abs(clip, expected) < 2.0
    with pytest.raises(VideoDecodeError, match="too short"):
        load_clip(tmp_path / "v.mp4", num_frames=17, size=16, start=4)


def test_tensor_conversions():
    frames = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3) * 2
    x = frames_to_tensor(frames)
    assert x.dtype == torch.float32 and x.shape == (3, 2, 3, 4)
    assert x[1, 1, 2, 3].item() == pytest.approx(frames[1, 2, 3, 1] / 127.5 - 1.0)
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(tensor_to_frames(x), frames)
    clamped = tensor_to_frames(torch.tensor([-3.0, 3.0]).repeat(3, 1, 1, 1).reshape(3, 1, 1, 2))
    assert clamped[0, 0, :, 0].tolist() == [0, 255]
    with pytest.raises(ValueError):
        tensor_to_frames(torch.zeros(4, 1, 2, 2))
    with pytest.raises(ValueError):
        frames_to_tensor(frames.astype(np.float32))


def test_write_mp4_round_trip_atomic(tmp_path):
    frames = pattern_frames(9, 32, 48)
    out = write_mp4(frames, tmp_path / "sub" / "clip.mp4", fps=8)
    decoded, fps = decode_video(out)
    assert decoded.shape == frames.shape and fps == pytest.approx(8.0)
    assert _mean_abs(decoded, frames) < 4.0
    assert sorted(p.name for p in out.parent.iterdir()) == ["clip.mp4"]  # no temp files left
    with pytest.raises(ValueError, match="even"):
        write_mp4(pattern_frames(2, 31, 48), tmp_path / "odd.mp4")
    assert not (tmp_path / "odd.mp4").exists()


def test_contact_sheet(tmp_path):
    a, b = pattern_frames(4, 16, 24, seed=1), pattern_frames(2, 16, 24, seed=2)
    path = write_contact_sheet([a, b], tmp_path / "sheet.png")
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (32, 4 * 24, 3)
    np.testing.assert_array_equal(img[16:32, 24:48], b[1])  # row 1, frame 1 (PNG is lossless)
    np.testing.assert_array_equal(img[0:16, 72:96], a[3])
    assert not img[16:32, 48:].any()  # short row padded with black
    labelled = write_contact_sheet([a, b], tmp_path / "labelled.png", row_labels=["real", "generated"])
    assert Image.open(labelled).size[0] > 4 * 24
    with pytest.raises(ValueError, match="same frame size"):
        write_contact_sheet([a, pattern_frames(2, 8, 8)], tmp_path / "x.png")
    with pytest.raises(ValueError, match="row labels"):
        write_contact_sheet([a], tmp_path / "x.png", row_labels=["a", "b"])


def test_resample_indices_and_decode_with_fps(tmp_path):
    from data_prep.video_io import resample_indices

    assert resample_indices(10, 8, 4).tolist() == [0, 2, 4, 6, 8]  # halve the rate: every second frame
    assert resample_indices(3, 4, 8).tolist() == [0, 0, 1, 1, 2, 2]  # double it: frames repeated
    assert resample_indices(7, 30, 12).tolist() == [0, 2, 5]  # 30 -> 12 fps: floor(k * 2.5)
    assert resample_indices(0, 8, 4).size == 0
    with pytest.raises(ValueError):
        resample_indices(5, 0, 4)
    write_pattern_video(tmp_path / "v.mp4", num_frames=11, fps=8)
    full, fps = decode_video(tmp_path / "v.mp4")
    half, half_fps = decode_video(tmp_path / "v.mp4", fps=4)
    assert fps == pytest.approx(8) and half_fps == 4.0
    np.testing.assert_array_equal(half, full[::2])
    first3, _ = decode_video(tmp_path / "v.mp4", max_frames=3, fps=4)
    np.testing.assert_array_equal(first3, full[0:5:2])


def test_clip_starts_uniform_placement():
    assert clip_starts(21, 5, 1, max_clips=1, placement="uniform") == [8]  # middle of starts 0..16
    assert clip_starts(21, 5, 1, max_clips=3, placement="uniform") == [0, 8, 16]
    assert clip_starts(6, 5, 1, max_clips=4, placement="uniform") == [0, 1]  # only 2 distinct starts
    assert clip_starts(4, 5, 1, max_clips=2, placement="uniform") == []
    assert clip_starts(21, 5, 1, placement="uniform") == clip_starts(21, 5, 1)
    with pytest.raises(ValueError):
        clip_starts(21, 5, placement="random")


def test_list_media_and_load_image(tmp_path):
    from data_prep.video_io import IMAGE_EXTENSIONS, list_media, load_image

    img = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    (tmp_path / "b").mkdir()
    Image.fromarray(img).save(tmp_path / "b/x.PNG")
    Image.fromarray(img).convert("RGBA").save(tmp_path / "a.png")
    (tmp_path / "b/notes.txt").write_text("x")
    media, others = list_media(tmp_path, IMAGE_EXTENSIONS)
    assert [p.relative_to(tmp_path).as_posix() for p in media] == ["a.png", "b/x.PNG"]
    assert [p.name for p in others] == ["notes.txt"]
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), img[None])  # RGBA -> RGB, lossless
    assert load_image(tmp_path / "b/x.PNG", size=8).shape == (1, 8, 8, 3)
    with pytest.raises(VideoDecodeError, match="cannot decode image"):
        load_image(tmp_path / "b/notes.txt")
