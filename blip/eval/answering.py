"""VQA evaluation: answer a split's questions by ranking over an answer list or by generation, score them (the
official VQA accuracy, or exact match where a question has fewer than three answers), and the trivial baselines
any model must beat (one answer for all, a per-type prior), scored the same way."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from statistics import mean

import torch
from transformers import PreTrainedTokenizer

from blip.config import ConfigError
from blip.data.loader import eval_pipeline, make_loader
from blip.data.shards import read_records
from blip.data.transforms import eval_transform
from blip.eval.vqa_accuracy import normalize_answer, question_score, scoring
from blip.models.generation import GenerationConfig
from blip.models.vqa import BlipVQA


@dataclass
class Question:
    question_id: int
    question: str
    answers: list[str]  # the annotators' answers


def question_type(question: str) -> str:
    """The question's first two words ("how many", "is there", "what color"): the prior baseline's key."""
    return " ".join(question.lower().split()[:2])


def read_questions(urls: list[str]) -> list[Question]:
    return [Question(r["question_id"], r["question"], r["answers"]) for r in read_records(urls)]


def answer_list(train: list[Question]) -> list[str]:
    """Every distinct (normalised) training answer, most frequent first: BLIP ranks over such a list."""
    counts = Counter(normalize_answer(a) for q in train for a in q.answers)
    return [answer for answer, _ in counts.most_common()]


def split_scoring(questions: list[Question], split: str) -> dict[str, int]:
    """Questions per way of scoring them (`vqa_accuracy`, `exact_match`, `unscored`: no answers); a split where
    none can be scored is an error, never an accuracy of 0."""
    counts = Counter(scoring(q.answers) or "unscored" for q in questions)
    if not set(counts) - {"unscored"}:
        raise ConfigError(f"VQA split {split!r}: none of its {len(questions)} questions has an answer to score "
                          "against (an unannotated test split?): choose an annotated eval_split")  # fmt: skip
    return dict(counts)


def accuracy(predictions: list[str], questions: list[Question], name: str) -> dict[str, float]:
    """`name`: the mean score (%) of each question's prediction over the questions that have answers; on a split
    that mixes ways of scoring, also `<name>_<way>` for each."""
    scores: dict[str, list[float]] = {}
    for prediction, q in zip(predictions, questions, strict=True):
        if kind := scoring(q.answers):
            scores.setdefault(kind, []).append(question_score(prediction, q.answers))
    out = {name: 100.0 * mean(s for values in scores.values() for s in values)}
    if len(scores) > 1:
        out |= {f"{name}_{kind}": 100.0 * mean(values) for kind, values in sorted(scores.items())}
    return out


def baselines(train: list[Question], test: list[Question]) -> dict[str, float]:
    """The accuracy of the majority training answer, and of the majority answer per question type."""
    overall = Counter(normalize_answer(a) for q in train for a in q.answers).most_common(1)[0][0]
    by_type: dict[str, Counter] = {}
    for q in train:
        by_type.setdefault(question_type(q.question), Counter()).update(normalize_answer(a) for a in q.answers)

    def prior(q: Question) -> str:
        counts = by_type.get(question_type(q.question))
        return counts.most_common(1)[0][0] if counts else overall

    majority = accuracy([overall] * len(test), test, "majority_answer_accuracy")
    return majority | accuracy([prior(q) for q in test], test, "type_prior_accuracy")


@torch.no_grad()
def answer_split(
    model: BlipVQA,
    urls: list[str],
    tokenizer: PreTrainedTokenizer,
    image_size: int,
    max_length: int,
    answers: list[str],
    mode: str,
    k: int,
    generation: GenerationConfig,
    max_questions: int,
    device: torch.device,
) -> dict[int, str]:
    """question_id -> predicted answer, by `mode` "rank" (over `answers`) or "generate"."""
    was_training = model.training
    model.eval()
    answer_tokens = tokenizer(answers, padding="longest", return_tensors="pt").to(device)
    predictions: dict[int, str] = {}
    for batch in make_loader(eval_pipeline(urls, "vqa", eval_transform(image_size), 64), 0):
        keep = min(len(batch["key"]), max_questions - len(predictions))
        if keep <= 0 or "image" not in batch:
            break
        question = tokenizer(batch["text"][:keep], padding="longest", truncation=True, max_length=max_length,
                             return_tensors="pt").to(device)  # fmt: skip
        images = batch["image"][:keep].to(device)
        if mode == "rank":
            best = model.rank_answers(images, question.input_ids, question.attention_mask, answer_tokens.input_ids,
                                      answer_tokens.attention_mask, k)  # fmt: skip
            texts = [answers[i] for i in best.tolist()]
        else:
            generated = model.generate(images, question.input_ids, question.attention_mask, generation)
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        for record, text in zip(batch["record"], texts, strict=False):
            predictions[record["question_id"]] = text
    model.train(was_training)
    return predictions
