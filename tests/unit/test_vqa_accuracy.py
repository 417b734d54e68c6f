"""VQA accuracy against hand-checked cases, the normalisation edge cases included."""

from __future__ import annotations

import pytest

from blip.eval.vqa_accuracy import normalize_answer, process_punctuation, vqa_accuracy


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("two", "2"),
        ("Two", "2"),
        ("none", "0"),
        ("a dog", "dog"),
        ("The Dog", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("don't", "don't"),
        ("yes!", "yes"),
        ("yes.", "yes"),
        ("3.5", "3.5"),  # a decimal point stays
        ("1,000", "1000"),  # a comma between digits is removed everywhere in the answer
        ("red, white", "red white"),  # a mark next to a space is deleted
        ("black/white", "black white"),  # elsewhere it becomes a space
        ("  tennis\tball\n", "tennis ball"),
    ],
)
def test_normalisation(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def test_unanimous_annotators() -> None:
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    assert vqa_accuracy("a dog", ["dog"] * 10) == 1.0
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0


def test_leave_one_out_by_hand() -> None:
    # 3 of 10 say "2": leaving out one of those three leaves 2 matches (2/3), leaving out another answer leaves 3.
    answers = ["2", "2", "2", "3", "3", "3", "3", "4", "4", "4"]
    assert vqa_accuracy("2", answers) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)
    # 1 of 10: 9 subsets keep the match (1/3), one loses it.
    assert vqa_accuracy("4", ["4"] + ["5"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    # 4 or more matches: every subset keeps at least 3.
    assert vqa_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == 1.0


def test_annotators_normalised_for_punctuation_only_when_they_disagree() -> None:
    assert process_punctuation("t-shirt") == "t shirt"
    # Disagreeing annotators: "t-shirt" becomes "t shirt" and matches the normalised prediction.
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 3 + ["shirt"] * 7) == pytest.approx(0.9)
    # Unanimous annotators are compared as written: the prediction "t shirt" does not match "t-shirt".
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0


def test_single_answer_questions_score_exact_match_of_normalised_answers() -> None:
    from blip.eval.vqa_accuracy import EXACT_MATCH, VQA_ACCURACY, question_score, scoring

    assert scoring(["2"]) == scoring(["2", "two"]) == EXACT_MATCH
    assert scoring(["2"] * 3) == VQA_ACCURACY and scoring([]) is None
    # Hand-made predictions against one or two answers: normalised on both sides, any answer may match.
    assert question_score("Two", ["2"]) == 1.0
    assert question_score("the dog", ["Dog."]) == 1.0
    assert question_score("cat", ["dog", "cat"]) == 1.0
    assert question_score("cats", ["cat"]) == 0.0
    assert vqa_accuracy("dog", ["dog"]) == 0.0  # the official formula on one answer: why exact match is needed
