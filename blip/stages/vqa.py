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
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from transformers import PreTrainedTokenizer

from blip.config import Params
from blip.eval.answering import accuracy, answer_list, answer_split, baselines, read_questions, split_scoring
from blip.models.checkpoint import save_weights
from blip.models.vqa import ANSWER_GENERATION
from blip.stages.common import parse_stage_args, stage_parser, write_metrics
from blip.stages.training import finetune_setup, fit_and_finish, save_curves, with_init_model
from blip.tracking.runs import StageRun
from blip.training.distributed import setup, teardown
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


def main(argv: Sequence[str] | None = None) -> int:
    _, params = parse_stage_args(stage_parser("vqa-finetune", __doc__ or ""), argv)
    params = with_init_model(params, params.vqa.init)
    cfg = params.vqa
    split_scoring(read_questions(params.data.shard_root / cfg.eval_split), cfg.eval_split)  # before training
    ctx = setup()
    try:
        trainer, tokenizer, batches = finetune_setup(
            "vqa", params, cfg, ctx, "vqa", label_smoothing=cfg.label_smoothing
        )
        max_length = params.tokenizer.max_length

        def compute(forward: torch.nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
            question = tokenizer(batch["text"], padding="longest", truncation=True, max_length=max_length,
                                 return_tensors="pt").to(ctx.device)  # fmt: skip
            answers, per_question, weights = weighted_answers(batch["record"])
            answer = tokenizer(answers, padding="longest", return_tensors="pt").to(ctx.device)
            loss = forward(batch["image"].to(ctx.device), question.input_ids, question.attention_mask,
                           answer.input_ids, answer.attention_mask, torch.tensor(per_question, device=ctx.device),
                           torch.tensor(weights, device=ctx.device))  # fmt: skip
            return {"loss": loss}

        fit_and_finish(cfg.name, params, trainer, batches, compute, lambda run: finish(params, trainer, tokenizer, run))
    finally:
        teardown()
    return 0


def finish(params: Params, trainer: Trainer, tokenizer: PreTrainedTokenizer, run: StageRun) -> None:
    cfg = params.vqa
    train = [q for split in cfg.splits for q in read_questions(params.data.shard_root / split)]
    test = read_questions(params.data.shard_root / cfg.eval_split)[: cfg.eval_questions]
    # The dataset's answer list (ingest writes it beside the shards, as VQA ships one), else the training answers.
    listed = params.data.shard_root / cfg.eval_split / "answer_list.json"
    answers = json.loads(listed.read_text()) if listed.is_file() else answer_list(train)
    generation = replace(ANSWER_GENERATION, max_length=cfg.answer_max_length)
    reports = Path("reports") / cfg.name
    reports.mkdir(parents=True, exist_ok=True)
    counts = split_scoring(test, cfg.eval_split)
    metrics: dict[str, float] = {"questions": float(len(test)), "answer_list": float(len(answers))}
    metrics |= {f"questions_{kind}": float(n) for kind, n in counts.items() if len(counts) > 1}
    for mode in cfg.inference:
        predictions = answer_split(trainer.model, params.data.shard_root / cfg.eval_split, tokenizer,
                                   params.model.image_size, params.tokenizer.max_length, answers, mode, cfg.k_test,
                                   generation, len(test), trainer.ctx.device)  # fmt: skip
        metrics |= accuracy([predictions[q.question_id] for q in test], test, f"{mode}_accuracy")
        results = reports / f"results_{mode}.json"
        results.write_text(json.dumps([{"question_id": q, "answer": a} for q, a in predictions.items()], indent=1))
        run.log_artifact(results)
    metrics |= baselines(train, test)
    run.log_metrics(metrics, step=trainer.step)
    scored = [kind for kind in counts if kind != "unscored"]
    kind = scored[0] if len(scored) == 1 else "mixed"
    save_curves(cfg.name, trainer, run, "VQA fine-tune (weighted answer LM)")
    weights = save_weights(trainer.model, cfg.output, params.tokenizer.name)
    for artifact in (write_metrics(cfg.name, {**metrics, "metric": kind}), weights):
        run.log_artifact(artifact)
    print(f"{cfg.name} ({kind}): " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
