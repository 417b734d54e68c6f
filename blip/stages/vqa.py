"""`blip vqa-finetune`: fine-tune VQA from the pretrained weights, then evaluate it.

Training (BLIP's recipe): the answer decoder's LM loss of each distinct answer of a question, weighted by the
share of annotators who gave it, summed per question, averaged over the batch; cosine schedule. Evaluation on
`vqa.eval_split`: ranking over the answer list (top k by first-token probability, re-scored by the
decoder's loss) and beam-search generation; the official VQA accuracy of each, against the majority-answer and
per-question-type baselines; results JSON in the official submission format (`[{"question_id", "answer"}]`).
Questions with fewer than three annotator answers are scored by exact match; metrics/<name>.json says which
(`metric`: vqa_accuracy, exact_match or mixed, then with figures per way of scoring).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blip.config.tasks import VqaFinetuneConfig
from blip.data.locations import split_urls
from blip.eval.answering import accuracy, answer_list, answer_split, baselines, read_questions, split_scoring
from blip.models.vqa import ANSWER_GENERATION
from blip.stages.driver import Recipe, Results, stage_main
from blip.training.loop import Trainer


def weighted_answers(records: list[dict]) -> tuple[list[str], list[int], list[float]]:
    """Each question's distinct answers with weight = share of its annotators (BLIP's VQA weighting)."""
    answers, per_question, weights = [], [], []
    for record in records:
        counts = Counter(record["answers"])
        answers += list(counts)
        weights += [n / len(record["answers"]) for n in counts.values()]
        per_question.append(len(counts))
    return answers, per_question, weights


class QuestionAnswering(Recipe):
    task, kind, title = "vqa", "vqa", "VQA fine-tune (weighted answer LM)"
    cfg: VqaFinetuneConfig

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        split = split_urls(self.params.data.shard_root, self.cfg.eval_split)
        split_scoring(read_questions(split), self.cfg.eval_split)  # an unscorable split fails before training

    def build_args(self) -> dict[str, Any]:
        return {"label_smoothing": self.cfg.label_smoothing}

    def loss(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        device = self.ctx.device
        question = self.tokens(batch["text"])
        answers, per_question, weights = weighted_answers(batch["record"])
        answer = self.tokenizer(answers, padding="longest", return_tensors="pt").to(device)
        loss = model(batch["image"].to(device), question.input_ids, question.attention_mask, answer.input_ids,
                     answer.attention_mask, torch.tensor(per_question, device=device),
                     torch.tensor(weights, device=device))  # fmt: skip
        return {"loss": loss}

    def evaluate(self, trainer: Trainer) -> Results:
        cfg, root = self.cfg, self.params.data.shard_root
        train = [q for split in cfg.splits for q in read_questions(split_urls(root, split))]
        test = read_questions(split_urls(root, cfg.eval_split))[: cfg.eval_questions]
        # The dataset's answer list (ingest writes it beside the shards, as VQA ships one), else the training answers.
        listed = root / cfg.eval_split / "answer_list.json"
        answers = json.loads(listed.read_text()) if listed.is_file() else answer_list(train)
        counts = split_scoring(test, cfg.eval_split)
        metrics: dict[str, Any] = {"questions": float(len(test)), "answer_list": float(len(answers))}
        metrics |= {f"questions_{kind}": float(n) for kind, n in counts.items() if len(counts) > 1}
        reports = Path("reports") / self.name
        reports.mkdir(parents=True, exist_ok=True)
        files = []
        for mode in cfg.inference:
            predictions = answer_split(trainer.model, split_urls(root, cfg.eval_split), self.tokenizer,
                                       self.params.model.image_size, self.params.tokenizer.max_length, answers, mode,
                                       cfg.k_test, replace(ANSWER_GENERATION, max_length=cfg.answer_max_length),
                                       len(test), self.ctx.device)  # fmt: skip
            metrics |= accuracy([predictions[q.question_id] for q in test], test, f"{mode}_accuracy")
            rows = [{"question_id": q, "answer": a} for q, a in predictions.items()]  # the official format
            files.append(reports / f"results_{mode}.json")
            files[-1].write_text(json.dumps(rows, indent=1))
        scored = [kind for kind in counts if kind != "unscored"]
        metrics |= baselines(train, test) | {"metric": scored[0] if len(scored) == 1 else "mixed"}
        return Results(metrics, files)


main = stage_main(QuestionAnswering, "vqa-finetune", "vqa", __doc__ or "")
