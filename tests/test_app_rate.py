"""The video panel's rate line, from hand-computed numbers."""

from streamchat.app.rate import duration, rate_text


def test_realtime_time_left_is_the_video_still_to_come_not_the_encoders_speed():
    # the case: 4 of 60 frames at 2 fps, the encoder did 4 frames in 1/14 s (56 fps, 28x real time);
    # the other 56 frames arrive over 28 s of video, so 28 s are left, not 56 / 56 = 1 s
    text = rate_text(done=4, total=60, frames_run=4, wall_s=1 / 14, sampled_fps=2.0, realtime=True, video_left_s=28.0)
    assert text == "4/60 frames · realtime\n28 s left · encoder 28× real time"


def test_realtime_with_an_encoder_slower_than_the_video_is_bound_by_the_encoder():
    # 10 frames in 20 s: 0.5 fps against 2 fps of video; 50 frames left take 100 s, more than the 25 s of video
    text = rate_text(done=10, total=60, frames_run=10, wall_s=20.0, sampled_fps=2.0, realtime=True, video_left_s=25.0)
    assert text == "10/60 frames · realtime\n1 min 40 s left · encoder 0.2× real time"


def test_as_fast_as_possible_rate_and_time_left():
    # resumed at 20 frames; this run encoded 10 more in 5 s: 2 fps, at 4 fps sampling 0.5x; 30 left take 15 s
    text = rate_text(done=30, total=60, frames_run=10, wall_s=5.0, sampled_fps=4.0, realtime=False, video_left_s=7.5)
    assert text == "30/60 frames · 2.0 fps\n15 s left · 0.5× real time"


def test_before_the_first_chunk_and_at_the_end():
    assert rate_text(done=0, total=8, frames_run=0, wall_s=0.0, sampled_fps=4.0, realtime=False, video_left_s=2.0) == "0/8 frames"
    assert rate_text(done=8, total=8, frames_run=8, wall_s=1.0, sampled_fps=4.0, realtime=True, video_left_s=0.0) == "8/8 frames · all in the cache"
    assert rate_text(done=8, total=8, frames_run=8, wall_s=1.0, sampled_fps=4.0, realtime=False, video_left_s=0.0,
                     archived_pages=3) == "8/8 frames · all encoded, 3 pages archived"
    assert [duration(s) for s in (0.4, 59.6, 60, 125)] == ["0 s", "1 min 00 s", "1 min 00 s", "2 min 05 s"]
