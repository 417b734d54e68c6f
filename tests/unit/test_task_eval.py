"""Task evaluation: the retrieval pipeline equals brute force and splits over ranks; VQA weighting and
baselines; NLVR2 accuracy."""

from __future__ import annotations

import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blip.capfilt.bootstrap import keep
from blip.config import ConfigError
from blip.data import language
from blip.data.scene import sample_scene
from blip.data.tokenizer import load_tokenizer
from blip.eval.answering import Question, answer_list, baselines, question_type
from blip.eval.filter_quality import removal_quality, roc_auc
from blip.eval.retrieval import PairSplit, TopK, evaluate_retrieval, recall_at_k
from blip.eval.world import semantic_recall_at_1
from blip.models.factory import build_model
from blip.stages.ablation import results_by_seed
from blip.stages.ablation import table as ablation_table
from blip.stages.nlvr import accuracy
from blip.stages.vqa import weighted_answers
from tests.conftest import TINY_BERT
from tests.unit.test_retrieval_eval import brute_force

CPU = torch.device("cpu")
TEXTS = ["a red circle", "a blue square", "two green triangles", "a red square above a blue circle",
         "a yellow circle", "three shapes", "a purple triangle", "a blue circle left of a red square"]  # fmt: skip


def _model_and_split() -> tuple[torch.nn.Module, PairSplit]:
    torch.manual_seed(0)
    model = build_model("retrieval", TINY_BERT, load_tokenizer("bert-base-uncased-offline"), queue_size=0).eval()
    images = torch.randn(4, 3, TINY_BERT.image_size, TINY_BERT.image_size)
    return model, PairSplit(
        images, [f"i{n}" for n in range(4)], TEXTS, torch.arange(4).repeat_interleave(2), [None] * 4
    )


def _evaluate(model: torch.nn.Module, split: PairSplit, k: int) -> dict[str, dict[str, float]]:
    tokenizer = load_tokenizer("bert-base-uncased-offline")
    rankings = evaluate_retrieval(model, split, tokenizer, 35, k=k, chunk=3, itm_batch=5, device=CPU)
    return {name: recall_at_k(*pair, split.text_image) for name, pair in rankings.items()}


@torch.no_grad()
def test_retrieval_with_every_candidate_equals_brute_force_itm_plus_itc() -> None:
    model, split = _model_and_split()
    ours = _evaluate(model, split, k=len(TEXTS))
    tokens = load_tokenizer("bert-base-uncased-offline")(TEXTS, padding="longest", return_tensors="pt")
    embeds, image_feat = model.image_features(split.images)
    itc = image_feat @ model.text_features(tokens.input_ids, tokens.attention_mask).T
    itm = torch.stack([model.itm_logits(embeds[i : i + 1].expand(len(TEXTS), -1, -1), tokens.input_ids,
                                        tokens.attention_mask)[:, 1] for i in range(4)])  # fmt: skip
    expected = brute_force((itm + itc).numpy(), split.text_image.numpy())
    itc_only = brute_force(itc.numpy(), split.text_image.numpy())
    for name in expected:
        assert ours["itm"][name] == pytest.approx(expected[name], abs=1e-9), name
        assert ours["itc"][name] == pytest.approx(itc_only[name], abs=1e-9), name


def _rank_worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, split = _model_and_split()
        results[rank] = _evaluate(model, split, k=3)
    finally:
        dist.destroy_process_group()


def test_retrieval_split_over_two_ranks_equals_one_process() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank_worker, args=(port, results), nprocs=2, join=True)
    single = _evaluate(*_model_and_split(), k=3)
    assert results[0] == results[1] == single
    assert single["itm"] != single["itc"]  # re-ranking did something, so the comparison means something


def test_vqa_answers_weighted_by_annotator_share() -> None:
    records = [{"answers": ["2"] * 6 + ["3"] * 3 + ["two"]}, {"answers": ["yes"] * 10}]
    answers, per_question, weights = weighted_answers(records)
    assert answers == ["2", "3", "two", "yes"] and per_question == [3, 1]
    assert np.allclose(weights, [0.6, 0.3, 0.1, 1.0])


def test_vqa_baselines_and_answer_list() -> None:
    train = [Question(1, "is there a red circle?", ["yes"] * 10),
             Question(2, "is there a blue square?", ["yes"] * 5 + ["no"] * 5),
             Question(3, "how many shapes are there?", ["two"] * 10), Question(4, "how many red shapes?", ["0"] * 10),
             Question(5, "how many blue shapes?", ["2"] * 10)]  # fmt: skip
    test = [Question(6, "is there a green circle?", ["no"] * 10), Question(7, "how many shapes are there?", ["2"] * 10)]
    assert question_type("How many red shapes?") == "how many"
    assert answer_list(train) == ["2", "yes", "0", "no"]  # "two" normalises to "2"; most frequent first
    # majority "2" is right for question 7 only; the per-type prior answers "yes" (wrong) and "2" (right)
    assert baselines(train, test) == {"majority_answer_accuracy": 50.0, "type_prior_accuracy": 50.0}
    test[0] = Question(6, "is there a green circle?", ["yes"] * 10)
    assert baselines(train, test) == {"majority_answer_accuracy": 50.0, "type_prior_accuracy": 100.0}


def test_nlvr_accuracy() -> None:
    truth = {"a": True, "b": False, "c": True, "d": False}
    assert accuracy({"a": True, "b": False, "c": False, "d": True}, truth) == 50.0
    assert accuracy(dict(truth), truth) == 100.0
    assert accuracy(dict.fromkeys(truth, True), truth) == 50.0
    with pytest.raises(ValueError, match="no prediction"):
        accuracy({"a": True}, truth)


def test_semantic_recall_counts_captions_true_of_the_image() -> None:
    rng = random.Random(0)
    scenes = [sample_scene(rng, 3) for _ in range(6)]
    texts = [language.to_text(language.true_meanings(s, rng, positions=False)[0]) for s in scenes]
    truth = torch.tensor([[language.is_true(t, s) for t in texts] for s in scenes])
    own = TopK(torch.arange(6)[:, None], torch.zeros(6, 1))
    as_json = [s.to_json() for s in scenes]
    perfect = semantic_recall_at_1(own, own, texts, as_json)
    assert perfect["semantic_txt_r1"] == perfect["semantic_img_r1"] == 100.0
    assert perfect["semantic_chance_r1"] == pytest.approx(100.0 * truth.double().mean().item())
    first = TopK(torch.zeros(6, 1, dtype=torch.long), torch.zeros(6, 1))  # every query retrieves item 0
    always = semantic_recall_at_1(first, first, texts, as_json)
    assert always["semantic_txt_r1"] == pytest.approx(100.0 * truth[:, 0].double().mean().item())
    assert always["semantic_img_r1"] == pytest.approx(100.0 * truth[0].double().mean().item())


def test_capfilt_rule_keeps_exactly_the_pairs_at_or_above_the_threshold() -> None:
    scores = torch.tensor([0.10, 0.4999, 0.5, 0.73, 0.5001, 0.0])
    assert keep(scores, 0.5, use_filter=True).tolist() == [False, False, True, True, True, False]
    assert keep(scores, 0.5, use_filter=False).all()  # the captioner-only arm keeps everything


def test_filter_quality_against_known_noise() -> None:
    noisy = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    match = torch.tensor([0.1, 0.3, 0.7, 0.2, 0.6, 0.8, 0.9, 0.95])  # one noisy scores high, one clean scores low
    # pairs (noisy, clean) where the noisy one has the lower match score: 5 + 4 + 3 = 12 of 15
    assert roc_auc(-match, noisy) == pytest.approx(12 / 15)
    assert roc_auc(torch.ones(8), noisy) == 0.5  # all tied: no information
    quality = removal_quality(match < 0.5, noisy)  # removes 0.1, 0.3 (noisy) and 0.2 (clean)
    assert quality == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "clean_removed": 1 / 5})


def test_ablation_table_reports_mean_and_std_over_seeds() -> None:
    arm = {"r1_mean": 2.0, "txt_r1": 3.0, "img_r1": 1.0, "semantic_r1_mean": 20.0, "CIDEr": 1.2}
    results = {
        0: {"none": arm, "both": {**arm, "r1_mean": 3.0, "filter_auc_itc": 0.8}},
        1: {"none": {**arm, "r1_mean": 4.0}, "both": {**arm, "r1_mean": 5.0, "filter_auc_itc": 0.9}},
    }
    markdown, summary = ablation_table(results)
    assert summary["none"]["r1_mean"] == {"mean": 3.0, "std": pytest.approx(2**0.5), "values": [2.0, 4.0]}
    assert summary["both"]["filter_auc_itc"]["mean"] == pytest.approx(0.85)
    assert "filter_auc_itc" not in summary["none"]  # no filter in that arm: shown as "-", not as a number
    assert markdown.splitlines()[2].startswith("| none | 3 ± 1.4 |") and "| - |" in markdown.splitlines()[2]
    assert markdown.count("\n") == 2 + 5  # header, rule, one row per arm (filter, captioner, itc_top30 empty)


def _experiment(name: str, seed: int, arm: tuple[bool, bool], r1: float, base_r1: float, **capfilt: object) -> dict:
    retrieval = lambda value: {"data": {"txt_r1": value + 1, "img_r1": value - 1}}  # noqa: E731
    metrics = {"metrics/retrieval.json": retrieval(base_r1), "metrics/retrieval_capfilt.json": retrieval(r1),
               "metrics/caption.json": {"data": {"CIDEr": 1.0}},
               "metrics/caption_capfilt.json": {"data": {"CIDEr": 2.0}},
               "metrics/capfilt.json": {"data": {"filter_auc_itc": 0.8, "threshold": 0.3}},
               "metrics/vqa.json": {"error": {"type": "FileNotFoundError"}}}  # fmt: skip
    params = {"capfilt": {"use_captioner": arm[0], "use_filter": arm[1], **capfilt}, "pretrain": {"seed": seed}}
    return {"revs": [{"rev": f"{name}-rev", "name": name, "data": {"params": {"params.yaml": {"data": params}},
                                                                   "metrics": metrics}}]}  # fmt: skip


DATACOMP = {"threshold_rule": "top_fraction", "score": "itc", "keep_fraction": 0.3}


def test_ablation_reads_arms_and_seeds_from_dvc_experiments() -> None:
    shown = [{"rev": "workspace", "data": {}},
             {"rev": "abc", "experiments": [_experiment("e1", 0, (True, True), 8.0, 5.0),
                                            _experiment("e2", 0, (False, True), 7.0, 5.0),
                                            _experiment("e3", 1, (True, True), 10.0, 6.0),
                                            _experiment("off", 1, (False, False), 1.0, 6.0),
                                            _experiment("dc", 1, (False, True), 9.0, 6.0, **DATACOMP),
                                            _experiment("top50", 1, (False, True), 9.0, 6.0,
                                                        **{**DATACOMP, "keep_fraction": 0.5})]}]  # fmt: skip
    results, names = results_by_seed(shown)
    # No CapFilt part, or a top fraction other than DataComp's: not an arm.
    assert names == {(0, "both"): "e1", (0, "filter"): "e2", (1, "both"): "e3", (1, "itc_top30"): "dc"}
    assert results[0]["both"] == {"txt_r1": 9.0, "img_r1": 7.0, "CIDEr": 2.0, "r1_mean": 8.0, "filter_auc_itc": 0.8}
    assert results[1]["none"] == {"txt_r1": 7.0, "img_r1": 5.0, "CIDEr": 1.0, "r1_mean": 6.0}  # its @pretrain runs
    _, summary = ablation_table(results)
    assert summary["both"]["r1_mean"]["values"] == [8.0, 10.0] and summary["none"]["r1_mean"]["mean"] == 5.5
    shown[1]["experiments"].append(_experiment("again", 0, (True, True), 9.0, 5.0))
    with pytest.raises(ConfigError, match="experiments e1 and again are both seed 0, arm both"):
        results_by_seed(shown)


def test_vqa_accuracy_of_a_split_scores_each_question_its_own_way() -> None:
    from blip.config import ConfigError
    from blip.eval.answering import accuracy, split_scoring

    single = [Question(1, "what is it?", ["dog"]), Question(2, "what colour?", ["red"]),
              Question(3, "where?", ["left", "on the left"]), Question(4, "how many?", ["two"])]  # fmt: skip
    predictions = ["a dog", "blue", "on the left", "2"]  # right, wrong, right (second answer), right
    assert split_scoring(single, "own") == {"exact_match": 4}
    assert accuracy(predictions, single, "rank_accuracy") == {"rank_accuracy": 75.0}
    # A mix: the overall mean and one figure per way of scoring; a question without answers is not scored.
    mixed = [*single, Question(5, "is it?", ["yes"] * 10), Question(6, "what?", [])]
    assert split_scoring(mixed, "own") == {"exact_match": 4, "vqa_accuracy": 1, "unscored": 1}
    assert accuracy([*predictions, "yes", "x"], mixed, "rank_accuracy") == {
        "rank_accuracy": 80.0, "rank_accuracy_exact_match": 75.0, "rank_accuracy_vqa_accuracy": 100.0}  # fmt: skip
    # Baselines are scored the same way: "dog" (first of equally frequent answers) is right for one question of 4.
    assert baselines(single, single)["majority_answer_accuracy"] == 25.0
    with pytest.raises(ConfigError, match="'vqa_test': none of its 2 questions"):
        split_scoring([Question(7, "what?", []), Question(8, "why?", [])], "vqa_test")
