"""The video source: sampling plans, resizing, chunking, prefetch and bad-input errors."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from streamchat.clips import frame_number, make_clip
from streamchat.errors import UserError
from streamchat.video import FrameChunk, Sampling, VideoSource, sha256_file, smart_resize

ALL_FRAMES = Sampling(fps=None, stride=1)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """3 s, 24 fps, 224x224: 72 frames."""
    return make_clip(tmp_path_factory.mktemp("clips") / "clip.mp4")


@pytest.fixture(scope="module")
def clip_frames(clip):
    """Every frame of `clip`, as the reference for truncated copies."""
    return VideoSource(clip, ALL_FRAMES).read(0, 72)


# --- plans -----------------------------------------------------------------


def test_fps2_plan_takes_a_frame_every_half_second(clip):
    src = VideoSource(clip)
    assert src.info.native_fps == 24.0
    assert src.info.frame_count == 72
    assert src.info.duration_s == 3.0
    assert (src.info.width, src.info.height) == (224, 224)
    assert (src.info.resized_width, src.info.resized_height) == (224, 224)
    assert [index for index, _ in src.plan] == [0, 12, 24, 36, 48, 60]
    assert [t for _, t in src.plan] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert src.sampling.sampled_fps(24.0) == 2.0


def test_fps3_plan_rounds_thirds_of_a_second_to_the_right_frame(clip):
    # i / 3 * 24 is 7.999999999999999 for i = 1 in floats; the plan must still pick frame 8.
    src = VideoSource(clip, Sampling(fps=3))
    assert [index for index, _ in src.plan] == [0, 8, 16, 24, 32, 40, 48, 56, 64]


def test_stride_plan_takes_every_kth_frame(clip):
    sampling = Sampling(fps=None, stride=10)
    src = VideoSource(clip, sampling)
    assert [index for index, _ in src.plan] == [0, 10, 20, 30, 40, 50, 60, 70]
    assert [t for _, t in src.plan] == pytest.approx([i / 24 for i in range(0, 72, 10)])
    assert sampling.sampled_fps(24.0) == 2.4


def test_start_and_duration_bound_the_plan(clip):
    # t = 0.7, 1.2, 1.7 (1.9 is the end) -> frames floor(16.8), floor(28.8), floor(40.8)
    src = VideoSource(clip, Sampling(fps=2, start=0.7, duration=1.2))
    assert [index for index, _ in src.plan] == [16, 28, 40]
    assert [t for _, t in src.plan] == pytest.approx([16 / 24, 28 / 24, 40 / 24])

    # stride from the start frame 24 while index / 24 < 1.5
    src = VideoSource(clip, Sampling(fps=None, stride=4, start=1.0, duration=0.5))
    assert [index for index, _ in src.plan] == [24, 28, 32]


def test_duration_past_the_end_stops_at_the_last_frame(clip):
    src = VideoSource(clip, Sampling(fps=2, start=2.0, duration=60))
    assert [index for index, _ in src.plan] == [48, 60]
    src = VideoSource(clip, Sampling(fps=None, stride=5, start=2.9))
    assert [index for index, _ in src.plan] == [69]


def test_max_frames_keeps_the_first_frames(clip):
    src = VideoSource(clip, Sampling(fps=2, max_frames=4))
    assert [index for index, _ in src.plan] == [0, 12, 24, 36]


def test_frames_until_counts_planned_frames_up_to_a_time(clip):
    src = VideoSource(clip)
    assert src.frames_until(-1.0) == 0
    assert src.frames_until(0.0) == 1
    assert src.frames_until(0.99) == 2
    assert src.frames_until(1.0) == 3
    assert src.frames_until(100.0) == 6


# --- frame times from the container ---------------------------------------

# 6 fps, then 30 fps from 3 s to 5 s, then 6 fps to 7.5 s: 18 + 60 + 15 = 93 frames, 12.4 fps on average
VFR_TIMES = [i / 6 for i in range(18)] + [3 + i / 30 for i in range(60)] + [5 + i / 6 for i in range(15)]


@pytest.fixture(scope="module")
def vfr_clip(tmp_path_factory):
    """A real variable-frame-rate H.264 file: every frame has its own pts (on a 1/30 s grid)."""
    return make_clip(tmp_path_factory.mktemp("vfr") / "vfr.mp4", fps=30, times=VFR_TIMES, width=112, height=112)


def test_variable_rate_frames_are_timed_by_their_own_timestamps(vfr_clip):
    src = VideoSource(vfr_clip, ALL_FRAMES)
    assert (src.info.frame_count, src.info.duration_s) == (93, 7.5)  # the last frame lasts 1/6 s like those before it
    assert [t for _, t in src.plan] == pytest.approx(VFR_TIMES, abs=1e-6)
    # index / average fps would put frame 18 at 1.45 s and frame 78 at 6.29 s
    assert (src.plan[18][1], src.plan[78][1]) == (3.0, 5.0)
    stride = VideoSource(vfr_clip, Sampling(fps=None, stride=10))
    assert [t for _, t in stride.plan] == pytest.approx([VFR_TIMES[i] for i in range(0, 93, 10)], abs=1e-6)


def test_fps_sampling_of_a_variable_rate_video_takes_the_frame_on_screen_at_each_time(vfr_clip):
    src = VideoSource(vfr_clip, Sampling(fps=2))
    # every half second is a frame's own time: 3 frames per half second at 6 fps, 15 at 30 fps
    assert [index for index, _ in src.plan] == [0, 3, 6, 9, 12, 15, 18, 33, 48, 63, 78, 81, 84, 87, 90]
    assert [t for _, t in src.plan] == [i / 2 for i in range(15)]
    assert [frame_number(f) for f in src.read(0, 15)] == [index for index, _ in src.plan]  # the pixels are those frames
    assert (src.frames_until(7.0), src.frames_until(6.99), src.frames_until(4.99)) == (15, 14, 10)

    src = VideoSource(vfr_clip, Sampling(fps=4))
    # at 0.25 s frame 1 (from 1/6 s) is on screen; at 3.25 s frame 25 (3 + 7/30 s); at 5.25 s frame 79 (5 + 1/6 s)
    picked = {4 * t: (index, t_frame) for t, (index, t_frame) in zip([i / 4 for i in range(30)], src.plan)}
    assert picked[1] == (1, pytest.approx(1 / 6, abs=1e-6))
    assert picked[13] == (25, pytest.approx(3 + 7 / 30, abs=1e-6))
    assert picked[21] == (79, pytest.approx(5 + 1 / 6, abs=1e-6))


def test_make_clip_rejects_times_off_its_grid(tmp_path):
    with pytest.raises(ValueError, match="1/30 s grid"):
        make_clip(tmp_path / "x.mp4", fps=30, times=[0, 0.01])
    with pytest.raises(ValueError, match="increasing"):
        make_clip(tmp_path / "x.mp4", fps=30, times=[0, 1, 1])


# --- pixels ----------------------------------------------------------------


def test_decoded_frames_are_the_planned_source_frames(clip):
    src = VideoSource(clip, Sampling(fps=None, stride=7))
    frames = src.read(0, len(src.plan))
    assert frames.dtype == np.uint8
    assert frames.shape == (11, 224, 224, 3)
    assert [frame_number(f) for f in frames] == [index for index, _ in src.plan]


def test_frames_at_different_timestamps_differ(clip):
    src = VideoSource(clip)
    frames = src.read(0, 6).astype(np.int16)
    for a in range(6):
        for b in range(a + 1, 6):
            assert np.abs(frames[a] - frames[b]).mean() > 2.0, (a, b)


def test_read_of_a_middle_range_matches_a_full_read(clip):
    src = VideoSource(clip)
    assert np.array_equal(src.read(2, 3), src.read(0, 6)[2:5])
    assert src.read(6, 0).shape == (0, 224, 224, 3)
    with pytest.raises(IndexError):
        src.read(5, 2)


def test_smart_resize_numbers():
    assert smart_resize(224, 224) == (224, 224)
    # 720x1280 rounds to 728x1288 = 937664 > 602112; beta = sqrt(921600 / 602112) = 1.2372,
    # 720 / beta = 581.97 -> 20 * 28 = 560, 1280 / beta = 1034.6 -> 36 * 28 = 1008
    assert smart_resize(720, 1280, max_pixels=602112) == (560, 1008)
    assert smart_resize(100, 150) == (112, 140)  # round(3.57) = 4, round(5.36) = 5
    # 28x28 = 784 < min 3136: beta = sqrt(3136 / 784) = 2
    assert smart_resize(28, 28, min_pixels=4 * 28 * 28) == (56, 56)
    assert smart_resize(10, 10, min_pixels=1, max_pixels=10**6) == (28, 28)
    with pytest.raises(UserError, match="aspect ratio"):
        smart_resize(10, 2010)


def test_frames_are_resized_during_decode_to_the_smart_resize_size(tmp_path):
    wide = make_clip(tmp_path / "wide.mp4", seconds=1.0, width=320, height=180)
    # 180x320 -> 168x308 (51744 px, within the budget)
    src = VideoSource(wide)
    assert (src.info.width, src.info.height) == (320, 180)
    assert (src.info.resized_height, src.info.resized_width) == (168, 308)
    assert src.read(0, 2).shape == (2, 168, 308, 3)
    # max 25088 px: beta = sqrt(57600 / 25088) = 1.5152, 180 / beta -> 112, 320 / beta -> 196
    src = VideoSource(wide, Sampling(max_pixels=32 * 28 * 28))
    assert (src.info.resized_height, src.info.resized_width) == (112, 196)
    frames = src.read(0, 2)
    assert frames.shape == (2, 112, 196, 3)
    assert [frame_number(f) for f in frames] == [0, 12]


# --- chunks ----------------------------------------------------------------


def test_even_total_chunks_without_padding(clip):
    src = VideoSource(clip, ALL_FRAMES)
    chunks = list(src.chunks(16))
    assert [c.index for c in chunks] == [0, 1, 2, 3, 4]
    assert [c.first for c in chunks] == [0, 16, 32, 48, 64]
    assert [len(c.frames) for c in chunks] == [16, 16, 16, 16, 8]
    assert not any(c.padded for c in chunks)
    assert [i for c in chunks for i in c.frame_indices] == list(range(72))
    assert np.array_equal(np.concatenate([c.frames for c in chunks]), src.read(0, 72))


def test_odd_total_repeats_the_last_frame_once(clip):
    src = VideoSource(clip, Sampling(fps=2, max_frames=5))  # frames 0, 12, 24, 36, 48
    chunks = list(src.chunks(4))
    assert [len(c.frames) for c in chunks] == [4, 2]
    assert [c.padded for c in chunks] == [False, True]
    last = chunks[-1]
    assert last.first == 4
    assert last.frame_indices == [48, 48]
    assert last.timestamps == [2.0, 2.0]
    assert np.array_equal(last.frames[1], last.frames[0])
    assert np.array_equal(last.frames[0], src.read(4, 1)[0])


def test_chunks_over_a_sub_range(clip):
    src = VideoSource(clip)  # frames 0, 12, 24, 36, 48, 60
    chunks = list(src.chunks(2, first=1, last=4))
    assert [c.first for c in chunks] == [1, 3]
    assert [c.frame_indices for c in chunks] == [[12, 24], [36, 36]]
    assert [c.padded for c in chunks] == [False, True]
    assert list(src.chunks(2, first=6)) == []


@pytest.mark.parametrize("bad", [3, 1, 0, -2])
def test_chunk_frames_must_be_even(clip, bad):
    src = VideoSource(clip)
    with pytest.raises(UserError, match=rf"--chunk-frames must be even .*; got {bad}"):
        src.chunks(bad)
    with pytest.raises(UserError, match="--chunk-frames must be even"):
        src.prefetch_chunks(bad)


def test_prefetch_chunks_yields_the_same_arrays_as_chunks(clip):
    src = VideoSource(clip, ALL_FRAMES)
    plain = list(src.chunks(10, first=3))
    ahead = list(src.prefetch_chunks(10, first=3, depth=2))
    assert len(ahead) == len(plain) == 7  # 69 frames: six of 10, then 9 padded to 10
    for a, b in zip(plain, ahead):
        assert isinstance(b, FrameChunk)
        assert (a.index, a.first, a.frame_indices, a.timestamps, a.padded) == (
            b.index,
            b.first,
            b.frame_indices,
            b.timestamps,
            b.padded,
        )
        assert np.array_equal(a.frames, b.frames)
    assert ahead[-1].padded


def test_prefetch_stops_its_thread_when_the_consumer_stops_early(clip):
    src = VideoSource(clip, ALL_FRAMES)
    chunks = src.prefetch_chunks(2, depth=1)
    first = next(chunks)
    assert first.frame_indices == [0, 1]
    chunks.close()
    assert not [t for t in threading.enumerate() if t.name == "streamchat-decode"]
    assert src.read(0, 1).shape == (1, 224, 224, 3)  # the decoder is free again


def test_prefetch_reraises_decode_errors_in_the_consumer(clip):
    src = VideoSource(clip)
    src.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(src.prefetch_chunks(2))


# --- damaged and wrong inputs ---------------------------------------------


def test_truncated_tail_counts_only_frames_that_decode(tmp_path, clip_frames):
    # faststart puts the index first, so the container still claims 72 frames.
    full = make_clip(tmp_path / "full.mp4", faststart=True)
    with av.open(str(full)) as container:
        last_packet = max((p for p in container.demux(video=0) if p.size), key=lambda p: p.pos)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: last_packet.pos + last_packet.size // 2])

    src = VideoSource(cut, ALL_FRAMES)
    assert src.info.frame_count == 71
    assert src.info.duration_s == pytest.approx(71 / 24)
    assert (src.info.container_frames, src.info.container_duration_s, src.info.truncated) == (72, 3.0, True)
    assert src.warning.startswith("cut.mp4: only the first 2.96 s of 3.00 s decode (71 of 72 frames)")
    assert [index for index, _ in src.plan] == list(range(71))
    assert np.array_equal(src.read(0, 71), clip_frames[:71])
    assert [index for index, _ in VideoSource(cut).plan] == [0, 12, 24, 36, 48, 60]


def cut_clip(folder) -> Path:
    """A 4 s, 96-frame clip with its index first, cut where frame 48's data starts: the index
    still claims 4 s and 96 frames, 2 s decode."""
    full = make_clip(folder / "full.mp4", seconds=4.0, faststart=True)
    with av.open(str(full)) as container:  # ultrafast x264 has no B-frames: packets are in display order
        packets = sorted((p for p in container.demux(video=0) if p.size), key=lambda p: p.pos)
    cut = folder / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: packets[48].pos])
    return cut


def test_a_file_cut_in_half_uses_what_decodes_and_says_how_much_that_is(tmp_path):
    src = VideoSource(cut_clip(tmp_path))
    assert src.info.to_json() == {
        "decodable_duration_s": 2.0, "container_duration_s": 4.0,
        "decodable_frames": 48, "container_frames": 96, "truncated": True,
    }
    assert src.warning == (
        "cut.mp4: only the first 2.00 s of 4.00 s decode (48 of 96 frames), the file is truncated or damaged; "
        "streamchat uses those 2.00 s (re-download the file for the rest)"
    )
    assert [index for index, _ in src.plan] == [0, 12, 24, 36]
    whole = VideoSource(tmp_path / "full.mp4")
    assert whole.warning is None and not whole.info.truncated
    assert (whole.info.container_duration_s, whole.info.duration_s, whole.info.container_frames) == (4.0, 4.0, 96)


@pytest.mark.parametrize("faststart", [False, True])
def test_truncated_file_is_a_user_error(tmp_path, faststart):
    full = make_clip(tmp_path / "full.mp4", faststart=faststart)
    cut = tmp_path / "cut.mp4"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) * 3 // 10])
    # faststart puts the index (moov) first: what was written can be re-encoded. Without it the index
    # was to come last and is gone: no ffmpeg command can read the file, it must be fetched again.
    advice = r"ffmpeg -i" if faststart else r"no moov atom.*export or download it again"
    with pytest.raises(UserError, match=r"cut\.mp4.*(truncated|corrupt).*" + advice) as e:
        VideoSource(cut)
    assert ("fixed.mp4" in str(e.value)) == faststart


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"video not found: .*nope\.mp4; check the path"):
        VideoSource(tmp_path / "nope.mp4")


def test_directory_is_a_user_error(tmp_path):
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(UserError, match=r"dir\.mp4 is a directory"):
        VideoSource(tmp_path / "dir.mp4")


def test_empty_file_is_a_user_error(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.mp4 is empty \(0 bytes\).*fetch it again"):
        VideoSource(tmp_path / "empty.mp4")


def test_text_file_named_mp4_is_a_user_error(tmp_path):
    (tmp_path / "x.mp4").write_text("this is not a video\n")
    with pytest.raises(UserError, match=r"x\.mp4 is a text file, not a video"):
        VideoSource(tmp_path / "x.mp4")


def test_binary_garbage_is_a_user_error(tmp_path):
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    with pytest.raises(UserError, match=r"noise\.mp4: ffmpeg cannot read it"):
        VideoSource(tmp_path / "noise.mp4")


def test_audio_only_file_is_a_user_error(tmp_path):
    path = tmp_path / "voice.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for _ in range(5):
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(UserError, match=r"voice\.m4a has no video stream"):
        VideoSource(path)


def test_start_past_the_end_is_a_user_error(clip):
    with pytest.raises(UserError, match=r"--start 5s is past the end of clip\.mp4 \(3\.00s long\)"):
        VideoSource(clip, Sampling(start=5.0))
    with pytest.raises(UserError, match="past the end"):
        VideoSource(clip, Sampling(start=3.0))


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        (Sampling(fps=2, stride=3), "--fps or --stride, not both"),
        (Sampling(fps=None), "give --fps"),
        (Sampling(fps=0), "--fps must be positive; got 0"),
        (Sampling(fps=-1.5), "--fps must be positive; got -1.5"),
        (Sampling(fps=None, stride=0), "--stride must be a positive"),
        (Sampling(duration=0), "--duration must be positive"),
        (Sampling(start=-1), "--start must be 0 or more"),
        (Sampling(max_frames=0), "--max-frames must be at least 1; got 0"),
        (Sampling(min_pixels=10_000, max_pixels=5_000), "min_pixels <= max_pixels"),
    ],
)
def test_bad_sampling_is_a_user_error(clip, sampling, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        VideoSource(clip, sampling)


# --- helpers ---------------------------------------------------------------


def test_sha256_file_matches_hashlib(clip):
    assert sha256_file(clip) == hashlib.sha256(clip.read_bytes()).hexdigest()
    assert sha256_file(clip, block=1000) == sha256_file(clip)


def test_make_clip_is_deterministic_and_fast(tmp_path):
    start = time.perf_counter()
    a = make_clip(tmp_path / "a.mp4")
    elapsed = time.perf_counter() - start
    b = make_clip(tmp_path / "b.mp4")
    assert a.read_bytes() == b.read_bytes()
    assert elapsed < 2.0  # ~0.07 s on a dev box; the bound leaves room for a loaded CI machine
    with pytest.raises(ValueError, match="even"):
        make_clip(tmp_path / "odd.mp4", width=225)
