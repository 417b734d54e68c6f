"""The world's oracle on hand-made scenes, with answers decided by hand."""

from __future__ import annotations

import random

import pytest

from blip.data import language
from blip.data.language import Count, Desc, Exists, Pair, Relation
from blip.data.scene import Obj, Scene

# top-left small red circle, middle-right large blue square, bottom-centre small red triangle
SCENE = Scene(
    (
        Obj("circle", "red", "small", 0, 0),
        Obj("square", "blue", "large", 1, 2),
        Obj("triangle", "red", "small", 2, 1),
    ),
    background=40,
)


@pytest.mark.parametrize(
    ("caption", "truth"),
    [
        ("a red circle", True),
        ("a small red circle", True),
        ("a large red circle", False),
        ("a green circle", False),
        ("a red shape", True),
        ("a diamond", False),
        ("a red circle on the left", True),
        ("a red circle on the right", False),
        ("a blue square on the right", True),
        ("a red triangle at the bottom", True),
        ("a blue square in the middle", False),
        ("a red circle to the left of a blue square", True),
        ("a blue square to the left of a red circle", False),
        ("a red circle above a red triangle", True),
        ("a red triangle above a red circle", False),
        ("a blue square below a red circle", True),
        ("a red circle and a blue square", True),
        ("a red circle and a red circle", False),  # needs two distinct red circles
        ("three shapes", True),
        ("two shapes", False),
        ("two red shapes", True),
        ("one blue square", True),
        ("zero green shapes", True),
        ("an image of a blue square", True),
        ("a photo of two red shapes", True),
        ("free shipping on all orders", False),
        ("a red", False),
        ("", False),
    ],
)
def test_truth_by_hand(caption: str, truth: bool) -> None:
    assert language.is_true(caption, SCENE) is truth


def test_text_round_trips_through_the_parser() -> None:
    meanings = [
        Exists(Desc("small", "red", "circle")),
        Exists(Desc(None, "blue", None), "right"),
        Pair(Desc(None, None, "square"), Desc("large", None, "triangle")),
        Relation(Desc(None, "red", "circle"), "below", Desc(None, None, None)),
        Count(2, "red", None),
        Count(1, None, "diamond"),
        Count(3, None, "circle"),
    ]
    for meaning in meanings:
        for prefix in language.PREFIXES:
            assert language.parse(language.to_text(meaning, prefix)) == meaning


def test_true_meanings_hold_and_mutations_differ() -> None:
    rng = random.Random(0)
    for positions in (True, False):
        for meaning in language.true_meanings(SCENE, rng, positions):
            assert language.holds(meaning, SCENE), meaning
            assert language.mutate(meaning, rng) != meaning


@pytest.mark.parametrize(
    ("question", "answer"),
    [
        ("how many shapes are there?", "3"),
        ("how many red shapes are there?", "2"),
        ("how many green shapes are there?", "0"),
        ("is there a blue square?", "yes"),
        ("is there a blue circle?", "no"),
        ("what color is the square?", "blue"),
        ("where is the red triangle?", "bottom center"),
        ("where is the blue square?", "middle right"),
    ],
)
def test_vqa_answers_by_hand(question: str, answer: str) -> None:
    assert language.answer(question, SCENE) == answer
    assert answer in language.answer_list()


def test_nlvr_truth_by_hand() -> None:
    other = Scene((Obj("square", "green", "small", 1, 1),), background=30)
    assert language.nlvr_truth("the left image contains a red circle", SCENE, other)
    assert not language.nlvr_truth("the right image contains a red circle", SCENE, other)
    assert language.nlvr_truth("both images contain a square", SCENE, other)
    assert not language.nlvr_truth("both images contain a blue square", SCENE, other)
    assert language.nlvr_truth("exactly one image contains a blue square", SCENE, other)
    assert language.nlvr_truth("there are four shapes in total", SCENE, other)
    assert not language.nlvr_truth("there are three shapes in total", SCENE, other)
    assert language.nlvr_truth("the left image has more shapes than the right image", SCENE, other)
    assert not language.nlvr_truth("the left image has more shapes than the right image", other, SCENE)
    with pytest.raises(ValueError, match="not a statement"):
        language.nlvr_truth("the sky is blue", SCENE, other)
