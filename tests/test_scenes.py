"""The scene generator: seeded, its ground truth is what the decoded pixels show, its files decode."""

import json

import numpy as np
import pytest

from streamchat.scenes import BACKGROUNDS, CAPTION, COLOURS, FLASH, Scene, generate
from test_sessions import cli, error_line  # noqa: F401 - fixtures

FPS = 8.0


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    scene = generate(7, seconds=12.0, width=160, height=128, flashes=4)
    path = scene.write(tmp_path_factory.mktemp("scenes") / "s7.mp4", fps=FPS)
    return scene, path


def decoded(path) -> np.ndarray:
    import decord

    return decord.VideoReader(str(path)).get_batch(list(range(len(decord.VideoReader(str(path)))))).asnumpy()


def nearest(rgb, palette: dict) -> str:
    return min(palette, key=lambda name: float(np.abs(np.asarray(palette[name], float) - rgb).sum()))


def test_same_seed_same_scene_and_frames_other_seed_differs():
    a, b, c = generate(3, seconds=10), generate(3, seconds=10), generate(4, seconds=10)
    assert a.to_json() == b.to_json() and a.to_json() != c.to_json()
    assert all(np.array_equal(x, y) for x, y in zip(a.frames(2.0), b.frames(2.0)))
    assert not np.array_equal(a.frame(9.0), c.frame(9.0))


def test_ground_truth_round_trips_through_json():
    scene = generate(11, seconds=15, flashes=5, words=2)
    doc = json.loads(json.dumps(scene.to_json()))
    assert Scene.from_json(doc) == scene
    assert np.array_equal(Scene.from_json(doc).frame(7.3), scene.frame(7.3))


def test_scene_has_distinct_appearances_and_well_separated_flashes():
    for seed in range(20):
        scene = generate(seed, seconds=20, flashes=6)
        appear = sorted(s.appear_s for s in scene.shapes)
        assert all(b - a >= 1.0 - 1e-9 for a, b in zip(appear, appear[1:])), seed
        for f in scene.flashes:
            assert f.start_s >= scene.shape(f.kind).appear_s and f.end_s <= scene.seconds
        for kind in {f.kind for f in scene.flashes}:
            mine = [f for f in scene.flashes if f.kind == kind]
            assert all(b.start_s - a.end_s >= 0.5 for a, b in zip(mine, mine[1:])), seed


def test_written_file_decodes_with_the_right_frame_count_and_duration(written):
    import decord

    scene, path = written
    reader = decord.VideoReader(str(path))
    assert len(reader) == 96  # 12 s at 8 fps
    assert reader[0].shape == (128, 160, 3)
    assert reader.get_frame_timestamp(95)[0] == pytest.approx(95 / FPS, abs=1e-3)
    assert reader.get_frame_timestamp(95)[1] == pytest.approx(12.0, abs=1e-3)


def test_colour_at_a_shapes_recorded_centre_is_its_recorded_colour_in_the_decoded_video(written):
    scene, path = written
    frames = decoded(path)
    checked = 0
    for i, frame in enumerate(frames):
        t = i / FPS
        for kind, where in scene.at(t)["shapes"].items():
            x, y = (int(round(v)) for v in where["centre"])
            pixel = frame[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(axis=0)
            expected = "flash" if where["flashing"] else where["colour"]
            assert nearest(pixel, {**COLOURS, "flash": FLASH}) == expected, (t, kind, pixel)
            checked += 1
    assert checked > 150


def test_shapes_are_absent_before_they_appear(written):
    scene, path = written
    frames = decoded(path)
    late = max(scene.shapes, key=lambda s: s.appear_s)
    i = int(late.appear_s * FPS) - 1  # the last frame before it appears
    x, y = (int(round(v)) for v in scene.centre(late.kind, i / FPS))
    assert nearest(frames[i][y, x].astype(float), BACKGROUNDS) == scene.background


def test_the_word_is_in_the_caption_strip_exactly_while_it_is_shown(written):
    scene, path = written
    frames = decoded(path)
    top = int(scene.height * (1 - CAPTION))
    word = scene.words[0]
    white = [(frames[i, top:] > 200).all(axis=-1).sum() for i in range(len(frames))]
    shown = [i for i in range(len(frames)) if word.start_s <= i / FPS < word.end_s]
    assert len(shown) == 8  # 1 s at 8 fps
    assert all(white[i] > 30 for i in shown)
    assert all(white[i] == 0 for i in range(len(frames)) if i not in shown)


def test_frames_come_directly_as_uint8_at_any_resolution():
    scene = generate(1, seconds=2.0, width=64, height=48)
    frames = list(scene.frames(5.0))
    assert len(frames) == 10 and frames[0].dtype == np.uint8 and frames[0].shape == (48, 64, 3)


def test_make_clip_scene_shapes_writes_the_clip_and_its_ground_truth(capsys, tmp_path):
    clip = tmp_path / "s.mp4"
    rc, out, err = cli(capsys, "make-clip", clip, "--scene", "shapes", "--seed", 9, "--seconds", 3, "--fps", 8, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    truth = json.loads((tmp_path / "s.mp4.json").read_text())
    assert doc["seed"] == 9 and truth == generate(9, seconds=3.0).to_json() == doc["ground_truth"]
    assert len(decoded(clip)) == 24
    assert "--scene shapes" in error_line(capsys, "make-clip", tmp_path / "d.mp4", "--seed", 3)


def test_the_clock_strip_shows_whole_seconds_above_the_lanes():
    from streamchat.scenes import CLOCK, clock

    scene = generate(5, seconds=20.0)
    strip = int(scene.height * CLOCK)
    assert scene.clock and clock(12.7) == "00:12" and clock(75) == "01:15"
    a, b, c = (scene.frame(t)[:strip] for t in (3.0, 3.5, 4.0))
    assert (a == 255).all(axis=-1).sum() > 20  # white digits drawn
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # one second, one picture; the next second differs
    for kind in (s.kind for s in scene.shapes):  # the lanes start below the strip
        assert scene._lane(scene.shape(kind).lane)[0] >= strip
    plain = Scene.from_json({**scene.to_json(), "clock": False})
    assert plain._lane(0)[0] == 0.0  # without a clock the lanes take the top rows
    assert Scene.from_json({k: v for k, v in scene.to_json().items() if k != "clock"}).clock is False  # older ground truth


def test_a_late_clock_shows_its_own_minutes_and_questions_name_moments_by_it():
    import dataclasses

    from streamchat.questions import questions
    from streamchat.scenes import CLOCK

    scene = generate(5, seconds=20.0)
    late = dataclasses.replace(scene, clock_start=5 * 60 + 50)
    strip = int(scene.height * CLOCK)
    assert late.clock_at(12.7) == "06:02" and scene.clock_at(12.7) == "00:12"  # 350 s + 12 s
    assert np.array_equal(late.frame(3.0)[strip:], scene.frame(3.0)[strip:])  # only the strip differs ...
    assert not np.array_equal(late.frame(3.0)[:strip], scene.frame(3.0)[:strip])
    at_zero = dataclasses.replace(scene, clock_start=3)
    assert np.array_equal(at_zero.frame(0.0)[:strip], scene.frame(3.0)[:strip])  # ... and it shows the clock's reading
    timed = [(a, b) for a, b in zip(questions(scene), questions(late)) if a.at_s is not None]
    assert timed and all(a.answer == b.answer and a.at_s == b.at_s for a, b in timed)
    for a, b in timed:  # the same moment, named by what each clock shows then
        m = int(a.at_s) + 350
        assert b.question == a.question.replace(f"00:{int(a.at_s):02d}", f"{m // 60:02d}:{m % 60:02d}")
    assert Scene.from_json(late.to_json()) == late and Scene.from_json(scene.to_json()).clock_start == 0
