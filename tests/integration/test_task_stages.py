"""The task stages on a small world with untrained tiny models: what they write (metrics, official-format
results, plots, weights), and CapFilt's keep rule, origins and resume after SIGKILL."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from blip.cli import main as blip_main
from blip.config import load_params
from blip.data.locations import shard_urls
from blip.data.shards import read_records
from blip.data.tokenizer import load_tokenizer
from blip.models.checkpoint import save_weights
from blip.models.factory import build_model
from tests.integration.conftest import env_for

pytestmark = pytest.mark.slow
TINY_TRAIN = {"epochs": 1, "steps_per_epoch": 4, "batch_size": 8, "log_every": 2}


@pytest.fixture(scope="module")
def weights(project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained tiny pretrain / caption / retrieval weights with the project's fitted vocabulary."""
    folder = tmp_path_factory.mktemp("weights")
    vocab = str(project / "data/vocab/vocab.txt")
    params = load_params(project / "params.yaml", [f"tokenizer.name={vocab}"])
    out = {}
    for task in ("pretrain", "caption", "retrieval"):
        out[task] = save_weights(build_model(task, params.model, load_tokenizer(vocab), queue_size=0),
                                 folder / f"{task}.safetensors", vocab)  # fmt: skip
    return out


def args_for(project: Path, **sets: object) -> list[str]:
    sets = {"data.shard_root": project / "data/shards", "tokenizer.name": project / "data/vocab/vocab.txt", **sets}
    args = ["--params", str(project / "params.yaml")]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


def section(name: str, tmp_path: Path, init: Path, **extra: object) -> dict[str, object]:
    values = {**TINY_TRAIN, "init": init, "checkpoint_dir": tmp_path / f"ck_{name}", **extra}
    return {f"{name}.{key}": value for key, value in values.items()}


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def test_retrieval_finetune_and_zeroshot_report_blip_metrics(project: Path, weights: dict, here: Path) -> None:
    from blip.stages.retrieval import main, zeroshot_main

    eval_sets = {"split": "clean_test", "images": 10, "k_test": 4, "itc_chunk": 3, "itm_batch": 7}
    evaluation = {f"retrieval.eval.{k}": v for k, v in eval_sets.items()}
    assert main(args_for(project, **section("retrieval", here, weights["pretrain"]), **evaluation)) == 0
    zeroshot = {f"retrieval_zeroshot.eval.{k}": v for k, v in eval_sets.items()}
    assert zeroshot_main(args_for(project, **{"retrieval_zeroshot.weights": weights["pretrain"]}, **zeroshot)) == 0
    for name in ("retrieval", "retrieval_zeroshot"):
        metrics = json.loads(Path(f"metrics/{name}.json").read_text())
        for prefix in ("", "itc_"):
            for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"):
                assert 0 <= metrics[prefix + key] <= 100
        assert metrics["images"] == 10 and metrics["texts"] == 50 and metrics["chance_r1"] == 10.0
        assert 0 <= metrics["semantic_txt_r1"] <= 100 and 0 < metrics["semantic_chance_r1"] < 100
        assert Path(f"reports/{name}/recall_at_k.png").stat().st_size > 10_000
    assert Path("models/retrieval.safetensors").is_file() and Path("plots/retrieval.csv").is_file()


def test_vqa_finetune_writes_official_results(project: Path, weights: dict, here: Path) -> None:
    from blip.stages.vqa import main

    assert main(args_for(project, **section("vqa", here, weights["pretrain"], eval_questions=12, k_test=5))) == 0
    metrics = json.loads(Path("metrics/vqa.json").read_text())
    assert metrics["questions"] == 12 and metrics["answer_list"] == 21  # the world's answer list, from ingest
    for key in ("rank_accuracy", "generate_accuracy", "majority_answer_accuracy", "type_prior_accuracy"):
        assert 0 <= metrics[key] <= 100
    answers = set(json.loads((project / "data/shards/vqa_test/answer_list.json").read_text()))
    for mode in ("rank", "generate"):
        results = json.loads(Path(f"reports/vqa/results_{mode}.json").read_text())
        assert len(results) == 12 and all(set(r) == {"question_id", "answer"} for r in results)
        assert len({r["question_id"] for r in results}) == 12
    assert {r["answer"] for r in json.loads(Path("reports/vqa/results_rank.json").read_text())} <= answers


def test_nlvr_finetune_reports_accuracy(project: Path, weights: dict, here: Path) -> None:
    from blip.stages.nlvr import main

    assert main(args_for(project, **section("nlvr", here, weights["pretrain"]))) == 0
    metrics = json.loads(Path("metrics/nlvr.json").read_text())
    assert metrics["pairs"] == 10 and 0 <= metrics["accuracy"] <= 100
    results = json.loads(Path("reports/nlvr/results.json").read_text())
    assert len(results) == 10 and all(isinstance(r["label"], bool) for r in results)


def capfilt_args(project: Path, weights: dict, out: Path, **extra: object) -> list[str]:
    values = {"captioner": weights["caption"], "filter": weights["retrieval"], "out_dir": out / "capfilt",
              "work_dir": out / "work", "threshold_rule": "calibrated", "calibration_keep": 0.5,
              "batch_size": 10, "max_length": 12, "min_length": 3, "gallery_images": 4, **extra}  # fmt: skip
    return args_for(project, **{f"capfilt.{k}": v for k, v in values.items()})


def pairs(folder: Path) -> list[tuple[str, str, str]]:
    return sorted((r["image_id"], r["origin"], "|".join(r["captions"])) for r in read_records(shard_urls(folder)))


def test_capfilt_keeps_by_threshold_and_marks_origins(project: Path, weights: dict, here: Path) -> None:
    from blip.stages.capfilt import main

    assert main(capfilt_args(project, weights, here)) == 0
    metrics = json.loads(Path("metrics/capfilt.json").read_text())
    records = read_records(shard_urls(here / "capfilt/bootstrapped"))
    origins = Counter(r["origin"] for r in records)
    assert set(origins) == {"web", "synthetic", "human"}
    assert origins["human"] == metrics["human_total"] == 40  # clean_train copied whole, all captions kept
    assert all(len(r["captions"]) == 5 for r in records if r["origin"] == "human")
    assert metrics["web_total"] == metrics["synthetic_total"] == 200
    assert (origins["web"], origins["synthetic"]) == (metrics["web_kept"], metrics["synthetic_kept"])
    assert 0 < metrics["web_removed"] < 200  # the calibrated threshold (median of held-out pairs) splits them
    bootstrapped = [r for r in records if r["origin"] != "human"]
    assert all(r["capfilt"]["itm"] >= metrics["threshold"] and len(r["captions"]) == 1 for r in bootstrapped)
    assert 0 <= metrics["filter_auc_itm"] <= 1 and 0 <= metrics["filter_precision"] <= 1
    manifest = json.loads((here / "capfilt/manifest.json").read_text())
    assert sum(manifest["histograms"]["counts"]["web_itm"]) == 200
    for name in ("scores.png", "gallery.png"):
        assert Path(f"reports/capfilt/{name}").stat().st_size > 10_000


def test_capfilt_top_fraction_keeps_that_share_of_the_web_pairs(project: Path, weights: dict, here: Path) -> None:
    from blip.stages.capfilt import main

    datacomp = {"threshold_rule": "top_fraction", "keep_fraction": 0.25, "score": "itc", "use_captioner": False}
    assert main(capfilt_args(project, weights, here, **datacomp)) == 0
    metrics = json.loads(Path("metrics/capfilt.json").read_text())
    assert metrics["web_total"] == 200 and metrics["web_kept"] == 50 and metrics["synthetic_total"] == 0
    records = read_records(shard_urls(here / "capfilt/bootstrapped"))
    kept = [r["capfilt"]["itc"] for r in records if r["origin"] == "web"]
    assert len(kept) == 50 and min(kept) >= metrics["threshold"]


def test_capfilt_killed_then_resumed_loses_and_duplicates_nothing(project: Path, weights: dict, here: Path) -> None:
    command = [sys.executable, "-m", "blip", "capfilt"]
    straight, killed = here / "straight", here / "killed"
    for out in (straight, killed):
        out.mkdir()
        (out / "reports").mkdir()
    extra = {"synthetic_per_image": 2}
    done = subprocess.run(command + capfilt_args(project, weights, straight, **extra), cwd=straight,
                          env=env_for(straight), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    process = subprocess.Popen(command + capfilt_args(project, weights, killed, **extra), cwd=killed,
                               env=env_for(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    units = killed / "work/units"
    deadline = time.monotonic() + 300
    while not (units / "unit-000001.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "capfilt ended before the kill"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    finished = len(list(units.glob("unit-*.json")))
    assert 2 <= finished < 10  # killed mid-way: 8 web + 2 human units in all
    resumed = subprocess.run(command + capfilt_args(project, weights, killed, **extra), cwd=killed,
                             env=env_for(killed), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{finished} units already done" in resumed.stdout
    result = pairs(killed / "capfilt/bootstrapped")
    assert result == pairs(straight / "capfilt/bootstrapped")  # same pairs, same captions
    keys = [(image, origin, caption) for image, origin, caption in result]
    assert len(keys) == len(set(keys))


def test_capfilt_under_torchrun_equals_one_process(project: Path, weights: dict, here: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outputs = {}
    for name, launcher in (("one", [sys.executable, "-m", "blip"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                    f"--master_port={port}", "-m", "blip"])):  # fmt: skip
        out = here / name
        out.mkdir()
        done = subprocess.run([*launcher, "capfilt", *capfilt_args(project, weights, out, num_workers=2)], cwd=out,
                              env=env_for(out), capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[name] = pairs(out / "capfilt/bootstrapped")
    # ranks took turns at the units (and two workers decoded each): the same pairs as one process
    assert outputs["two"] == outputs["one"] and len(outputs["one"]) > 40


def test_capfilt_from_transformers_folders_equals_capfilt_from_our_weights(
    project: Path, weights: dict, here: Path
) -> None:
    from blip.stages.capfilt import main

    for task in ("caption", "retrieval"):  # the same weights as transformers folders (their own tokenizer files)
        assert blip_main(["export-hf", "--weights", str(weights[task]), "--task", task,
                          "--out", str(here / f"hf-{task}")]) == 0  # fmt: skip
    folders = {"caption": here / "hf-caption", "retrieval": here / "hf-retrieval"}
    outputs = {}
    for name, source in (("ours", weights), ("transformers", folders)):
        (here / name).mkdir()
        assert main(capfilt_args(project, source, here / name)) == 0
        manifest = json.loads((here / name / "capfilt/manifest.json").read_text())
        outputs[name] = (pairs(here / name / "capfilt/bootstrapped"), manifest["threshold"])
    assert outputs["transformers"][0] == outputs["ours"][0] and len(outputs["ours"][0]) > 40
    assert outputs["transformers"][1] == pytest.approx(outputs["ours"][1], abs=1e-6)
