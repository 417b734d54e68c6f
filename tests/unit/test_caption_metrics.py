"""Our caption metrics equal pycocoevalcap's, computed the way COCOEvalCap does, on random captions."""

from __future__ import annotations

import random

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from blip.eval.caption_metrics import caption_scores, spice_unavailable_reason

WORDS = [
    "a",
    "the",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "circle",
    "square",
    "triangle",
    "diamond",
    "left",
    "right",
    "of",
    "above",
    "below",
    "two",
    "shapes",
]


def random_caption(rng: random.Random) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
    return text.capitalize() + rng.choice(["", ".", "!", " ,"])


def test_scores_equal_pycocoevalcap_and_spice_is_never_made_up() -> None:
    rng = random.Random(0)
    references = {f"img{i}": [random_caption(rng) for _ in range(5)] for i in range(40)}
    predictions = {i: random_caption(rng) if int(i[3:]) % 4 else refs[0] for i, refs in references.items()}
    ours = caption_scores(predictions, references)

    # The reference computation: PTB tokenisation of COCO-format dicts, then each scorer (image ids as ints).
    ids = {key: n for n, key in enumerate(sorted(references))}
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({ids[k]: [{"caption": c} for c in v] for k, v in references.items()})
    res = tokenizer.tokenize({ids[k]: [{"caption": v}] for k, v in predictions.items()})
    bleu, _ = Bleu(4).compute_score(gts, res)
    expected = {f"BLEU_{n}": b for n, b in enumerate(bleu, start=1)}
    expected["METEOR"] = Meteor().compute_score(gts, res)[0]
    expected["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    expected["CIDEr"] = Cider().compute_score(gts, res)[0]
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    assert 0 < ours["BLEU_4"] < ours["BLEU_1"] < 1 and ours["CIDEr"] > 0
    assert ours["SPICE"] is None  # not installed here: never a made-up number
    assert spice_unavailable_reason().startswith("SPICE needs stanford-corenlp-3.6.0")


def test_perfect_and_mismatched_inputs() -> None:
    references = {"a": ["a red circle on the left", "a small red circle"], "b": ["two blue squares", "two squares"]}
    perfect = caption_scores({"a": "a red circle on the left", "b": "two blue squares"}, references)
    assert perfect["BLEU_1"] == pytest.approx(1.0) and perfect["ROUGE_L"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different images"):
        caption_scores({"a": "x"}, references)


def test_without_java_every_score_is_unavailable_with_the_reason(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from blip.eval.caption_metrics import coco_unavailable_reason

    monkeypatch.setenv("PATH", str(tmp_path))  # no java on it
    reason = coco_unavailable_reason()
    assert reason is not None and "java" in reason and spice_unavailable_reason() == reason
    scores = caption_scores({"1": "a red circle"}, {"1": ["a red circle", "a circle"]})
    assert set(scores) >= {"BLEU_4", "METEOR", "CIDEr", "SPICE"} and all(v is None for v in scores.values())
