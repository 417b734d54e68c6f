"""The promotion gate (`blip promote`) and the registered pyfunc models, on a local SQLite MLflow store."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from blip.config import ConfigError, load_params
from blip.data.tokenizer import load_tokenizer
from blip.data.transforms import eval_transform
from blip.models.checkpoint import save_weights
from blip.models.factory import build_model, load_trained
from blip.registry import REPORT, main, promote
from tests.conftest import REPO, TINY_BERT

TOKENIZER = "bert-base-uncased-offline"


def write_candidate(stem: str, seed: int, cider: float, task: str = "caption") -> None:
    torch.manual_seed(seed)
    model = build_model(task, TINY_BERT, load_tokenizer(TOKENIZER))
    save_weights(model, Path(f"models/{stem}.safetensors"), TOKENIZER)
    Path("metrics").mkdir(exist_ok=True)
    metrics = {"CIDEr": cider, "r_mean": cider, "accuracy": cider, "images": 10}
    Path(f"metrics/{stem}.json").write_text(json.dumps(metrics))


def image_b64(colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def champion(client: MlflowClient, name: str = "blip-captioner") -> str:
    return str(client.get_model_version_by_alias(name, "champion").version)


def test_gate_registers_new_models_and_moves_the_alias_only_to_a_better_one(workdir: Path) -> None:
    params = load_params(REPO / "params.yaml")
    write_candidate("caption", seed=0, cider=1.2)
    write_candidate("caption_capfilt", seed=1, cider=1.5)
    report = promote(params)
    client = MlflowClient()
    versions = {str(v.version): v for v in client.search_model_versions("name = 'blip-captioner'")}
    assert sorted(versions) == ["1", "2"] and champion(client) == "2"  # the better of the two
    tags = versions["2"].tags
    assert tags["blip.stem"] == "caption_capfilt" and float(tags["blip.metric_value"]) == 1.5
    assert tags["dvc.md5.weights"].startswith("sha256:") and tags["git.commit"] and tags["blip.run_id"]
    assert versions["2"].run_id == tags["blip.run_id"]
    assert "| blip-retrieval | retrieval | - | not built |" in report

    again = promote(params)  # nothing new: nothing registered, nothing moved
    assert len(client.search_model_versions("name = 'blip-captioner'")) == 2 and champion(client) == "2"
    assert again.count("already registered") == 2

    write_candidate("caption", seed=2, cider=1.4)  # new weights, worse than the champion
    promote(params)
    assert len(client.search_model_versions("name = 'blip-captioner'")) == 3 and champion(client) == "2"
    write_candidate("caption", seed=3, cider=1.6)  # better: the alias moves
    report = promote(params)
    assert "now `champion` (was version 2)" in report, report
    assert champion(client) == "4"


def test_dvc_hashes_tag_the_version_when_dvc_lock_knows_the_files(workdir: Path) -> None:
    write_candidate("caption", seed=0, cider=1.0)
    outs = [{"path": "models/caption.safetensors", "md5": "abc123"}, {"path": "metrics/caption.json", "md5": "def"}]
    Path("dvc.lock").write_text(json.dumps({"schema": "2.0", "stages": {"caption-finetune@pretrain": {"outs": outs}}}))
    assert main(["--params", str(REPO / "params.yaml")]) == 0
    version = MlflowClient().get_model_version_by_alias("blip-captioner", "champion")
    assert version.tags["dvc.md5.weights"] == "abc123" and version.tags["dvc.md5.metrics"] == "def"
    assert "registered as version 1" in REPORT.read_text()


def test_a_metric_the_stage_does_not_write_is_a_config_error(workdir: Path) -> None:
    write_candidate("caption", seed=0, cider=1.0)
    params = load_params(REPO / "params.yaml", ["promotion.models.blip-captioner.metric=SPICEY"])
    with pytest.raises(ConfigError, match=r"'SPICEY' is not in metrics/caption\.json"):
        promote(params)


def test_registered_captioner_captions_images_by_alias(workdir: Path) -> None:
    write_candidate("caption", seed=0, cider=1.0)
    promote(load_params(REPO / "params.yaml"))
    model = mlflow.pyfunc.load_model("models:/blip-captioner@champion")
    out = model.predict(pd.DataFrame({"image": [image_b64((200, 30, 30)), image_b64((30, 30, 200))]}))
    assert list(out.columns) == ["caption"] and len(out) == 2
    assert all(isinstance(c, str) and c for c in out["caption"])  # untrained weights: some words, 5+ tokens
    with pytest.raises(ValueError, match="row 0: `image` is not a base64-encoded image"):
        model.predict(pd.DataFrame({"image": ["bm90IGFuIGltYWdl"]}))
    with pytest.raises(MlflowException, match="missing inputs \\['image'\\]"):  # the logged signature
        model.predict(pd.DataFrame({"text": ["a red circle"]}))


def test_registered_filter_scores_pairs(workdir: Path) -> None:
    write_candidate("retrieval", seed=0, cider=10.0, task="retrieval")
    promote(load_params(REPO / "params.yaml"))
    model = mlflow.pyfunc.load_model("models:/blip-retrieval@champion")
    out = model.predict(pd.DataFrame({"image": [image_b64((200, 30, 30))] * 2, "text": ["a red circle", "a cat"]}))
    assert list(out.columns) == ["itm_probability", "itc_similarity"]
    assert ((out["itm_probability"] > 0) & (out["itm_probability"] < 1)).all()
    assert (out["itc_similarity"].abs() <= 1 + 1e-5).all()


def test_registered_nlvr_model_judges_a_statement_about_two_images(workdir: Path) -> None:
    write_candidate("nlvr", seed=0, cider=60.0, task="nlvr")
    promote(load_params(REPO / "params.yaml"))
    model = mlflow.pyfunc.load_model("models:/blip-nlvr@champion")
    red, blue = image_b64((200, 30, 30)), image_b64((30, 30, 200))
    rows = pd.DataFrame({"image": [red, blue], "image2": [blue, red], "text": ["a red circle", "two squares"]})
    out = model.predict(rows)
    assert list(out.columns) == ["probability_true", "label"] and len(out) == 2
    assert (out["label"] == (out["probability_true"] > 0.5)).all()
    # The same weights run directly: the pyfunc feeds `image` as the left image and `image2` as the right one.
    nlvr, tokenizer = load_trained("nlvr", Path("models/nlvr.safetensors"), None, None)
    transform = eval_transform(nlvr.model_config.image_size)
    tokens = tokenizer(rows["text"].tolist(), padding="longest", return_tensors="pt")
    with torch.no_grad():
        left, right = (torch.stack([transform(Image.open(io.BytesIO(base64.b64decode(b)))) for b in rows[column]])
                       for column in ("image", "image2"))  # fmt: skip
        expected = nlvr.eval().logits(left, right, tokens.input_ids, tokens.attention_mask).softmax(-1)[:, 1]
    assert out["probability_true"].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="row 1: `image2` is not a base64-encoded image"):
        model.predict(pd.DataFrame({"image": [red, red], "image2": [red, "bm90IGFuIGltYWdl"], "text": ["a", "b"]}))


def test_promotion_leaves_the_training_run_as_it_ended(workdir: Path) -> None:
    from blip.tracking.runs import use_experiment

    use_experiment()
    with mlflow.start_run(run_name="caption", tags={"blip.stage": "caption"}) as run:
        mlflow.log_metric("loss", 1.0)
    client = MlflowClient()
    before = client.get_run(run.info.run_id).info
    write_candidate("caption", seed=0, cider=1.2)
    promote(load_params(REPO / "params.yaml"))
    (version,) = client.search_model_versions("name = 'blip-captioner'")
    assert version.run_id == version.tags["blip.run_id"] == run.info.run_id  # lineage to the training run
    after = client.get_run(run.info.run_id).info
    assert (after.end_time, after.status) == (before.end_time, before.status)  # its history is not rewritten
