"""Template questions over a hand-built scene, whose answers are worked out by hand, and the scorer."""

import pytest

from streamchat.questions import QA, accuracy, exact_match, normalise, questions
from streamchat.scenes import Flash, Scene, Shape, Word, clock, generate


def hand_scene() -> Scene:
    """A circle from 1 s (red, blue from 6 s), a square from 3 s (green, flashing at 4 s and 7 s),
    'tiger' shown from 2 s to 3 s."""
    still = dict(x0=0.5, vx=0.0, y0=0.5, vy=0.0)
    return Scene(seed=0, seconds=10.0, width=64, height=64, background="black",
                 shapes=[Shape("circle", [(1.0, "red"), (6.0, "blue")], 1.0, 0, **still),
                         Shape("square", [(3.0, "green")], 3.0, 1, **still)],
                 flashes=[Flash("square", 4.0, 4.5), Flash("square", 7.0, 7.5)],
                 words=[Word("tiger", 2.0, 3.0)])


def by_kind(qas: list[QA], kind: str) -> list[QA]:
    return [q for q in qas if q.kind == kind]


def test_hand_scene_questions_have_the_hand_worked_answers():
    qas = questions(hand_scene(), seed=0)
    assert [q.kind for q in qas] == ["colour", "colour", "shape", "shape", "word", "flashes", "flashes", "order", "count"]
    assert [(q.question, q.answer) for q in by_kind(qas, "word") + by_kind(qas, "flashes")] == [
        ("What word was shown?", "tiger"),
        ("How many times did the circle flash?", "0"),
        ("How many times did the square flash?", "2"),
    ]
    (order,) = by_kind(qas, "order")
    assert order.question in ("What appeared first, the circle or the square?", "What appeared first, the square or the circle?")
    assert order.answer == "circle"


def test_moments_avoid_changes_and_the_answer_is_the_colour_then():
    circle, square, counts = set(), set(), set()
    for seed in range(60):
        qas = questions(hand_scene(), seed=seed)
        for q in by_kind(qas, "colour"):
            assert q.question == f"What colour is the {q.question.split()[4]} at {clock(q.at_s)}?"
            if "circle" in q.question:
                circle.add(q.at_s)
                assert q.answer == ("red" if q.at_s < 6 else "blue")
            else:
                square.add(q.at_s)
                assert q.answer == "green"
        (count,) = by_kind(qas, "count")
        counts.add((count.at_s, count.answer))
    # circle: on screen from 1 s, changes at 6 s; square: from 3 s, flashes 4-4.5 and 7-7.5; 0.5 s margins
    assert circle == {2.0, 3.0, 4.0, 5.0, 7.0, 8.0, 9.0}
    assert square == {6.0, 9.0}
    # appearances at 1 s and 3 s; the last moment is 9 (10 s would leave no margin at the end)
    assert counts == {(0.0, "0"), (2.0, "1")} | {(float(t), "2") for t in range(4, 10)}


def test_generated_scene_questions_agree_with_its_ground_truth():
    for seed in range(10):
        scene = generate(seed, seconds=20.0)
        for q in questions(scene, seed=seed):
            if q.kind == "colour":
                kind = q.question.split()[4]
                assert scene.at(q.at_s)["shapes"][kind]["colour"] == q.answer
                assert scene.shape(kind).colour_at(q.at_s - 0.5) == scene.shape(kind).colour_at(q.at_s + 0.5) == q.answer


def test_shape_questions_ask_the_colour_question_backwards_and_only_when_one_shape_has_that_colour():
    for seed in range(20):
        qas = questions(hand_scene(), seed=seed)
        colour = {q.question.split()[4]: q for q in by_kind(qas, "colour")}
        shape = by_kind(qas, "shape")
        assert [(q.question, q.answer, q.at_s) for q in shape] == [
            (f"Which shape is {c.answer} at {clock(c.at_s)}?", kind, c.at_s) for kind, c in colour.items()]
    # the circle stays red, the square turns red at 8 s: from 7.5 s "which shape is red" has two answers
    scene = hand_scene()
    scene.shapes[0].colours[1] = (6.0, "red")
    scene.shapes[1].colours.append((8.0, "red"))
    asked, left_out = set(), set()
    for seed in range(40):
        qas = questions(scene, seed=seed)
        shape = {(q.answer, q.at_s, q.question) for q in by_kind(qas, "shape")}
        for q in by_kind(qas, "colour"):
            kind = q.question.split()[4]
            mine = (kind, q.at_s, f"Which shape is {q.answer} at {clock(q.at_s)}?")
            (asked if mine in shape else left_out).add((kind, q.answer, q.at_s))
    assert asked == {("circle", "red", t) for t in (2.0, 3.0, 4.0, 5.0, 7.0)} | {("square", "green", 6.0)}
    assert left_out == {("circle", "red", 8.0), ("circle", "red", 9.0), ("square", "red", 9.0)}


def test_clock_names_whole_seconds():
    assert (clock(0), clock(12), clock(75.9), clock(3600)) == ("00:00", "00:12", "01:15", "60:00")


@pytest.mark.parametrize("prediction, answer, same", [
    ("The Star.", "star", True),
    ("Two", "2", True),
    ("blue!", "Blue", True),
    ("  the   circle ", "circle", True),
    ("a red", "red", True),
    ("dark blue", "blue", False),
    ("3", "2", False),
    ("", "red", False),
])
def test_exact_match_normalises_case_punctuation_articles_and_number_words(prediction, answer, same):
    assert exact_match(prediction, answer) is same


def test_normalise_and_accuracy_numbers():
    assert normalise("It's TWELVE, the end.") == "it s 12 end"
    qa = [QA("colour", "q1", "red"), QA("colour", "q2", "blue"), QA("word", "q3", "tiger")]
    table = accuracy(list(zip(qa, ["Red.", "green", "tiger"])))
    assert table["colour"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert table["word"] == {"n": 1, "correct": 1, "accuracy": 1.0}
    assert table["all"]["correct"] == 2 and table["all"]["accuracy"] == pytest.approx(2 / 3)
