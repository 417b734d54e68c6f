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


def test_registered_captioner_captions_by_alias_and_refuses_a_bad_row_with_its_problem_alone(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    write_candidate("caption", seed=0, cider=1.0)
    promote(load_params(REPO / "params.yaml"))
    model = mlflow.pyfunc.load_model("models:/blip-captioner@champion")
    out = model.predict(pd.DataFrame({"image": [image_b64((200, 30, 30)), image_b64((30, 30, 200))]}))
    assert list(out.columns) == ["caption"] == model.metadata.get_output_schema().input_names() and len(out) == 2
    assert all(isinstance(c, str) and c for c in out["caption"])  # untrained weights: some words, 5+ tokens
    with pytest.raises(ValueError, match="row 0: `image` is not a base64-encoded image"):
        model.predict(pd.DataFrame({"image": ["bm90IGFuIGltYWdl"]}))
    with pytest.raises(MlflowException, match="missing inputs \\['image'\\]"):  # the logged signature
        model.predict(pd.DataFrame({"text": ["a red circle"]}))

    # Served (`mlflow models serve`'s app): a bad row is a 400 whose message is the row and its problem, no trace.
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "false")  # init() sets it process-wide: restored after
    server = TestClient(scoring_server.init(model))

    def answer(body: dict) -> tuple[int, dict]:
        response = server.post("/invocations", json=body)
        assert "Traceback" not in response.text and "stack_trace" not in response.json(), response.text
        return response.status_code, response.json()

    def images(*values: object) -> dict:
        return {"dataframe_split": {"columns": ["image"], "data": [[value] for value in values]}}

    red = image_b64((200, 30, 30))
    wrapped = "\n".join(red[i : i + 76] for i in range(0, len(red), 76))  # as `base64` writes it by default
    status, body = answer(images(red, wrapped))
    assert status == 200 and len(body["predictions"]) == 2
    problem = "`image` is not a base64-encoded image"
    status, body = answer(images(red, "bm90IGFuIGltYWdl"))
    assert (status, body["message"]) == (400, f"row 1: {problem} (base64, but not an image format PIL reads)")
    status, body = answer(images("not base64!"))
    assert status == 400 and body["message"].startswith(f"row 0: {problem} (not base64: "), body
    assert answer(images(7))[1]["message"] == f"row 0: {problem} (it is int)"
    # A missing column is refused by the signature before the model runs: MLflow's words, naming the column.
    status, body = answer({"dataframe_split": {"columns": ["text"], "data": [["a red circle"]]}})
    assert status == 400 and "Model is missing inputs ['image']" in body["message"], body
    # No table at all is refused by the scoring server before the model is consulted (its message, not ours).
    status, body = answer({})
    assert status == 400 and body["error_code"] == "BAD_REQUEST"


def test_registered_filter_scores_pairs_and_is_described_with_an_example_by_a_quiet_promote(
    workdir: Path, capsys: pytest.CaptureFixture[str], recwarn: pytest.WarningsRecorder
) -> None:
    write_candidate("retrieval", seed=0, cider=10.0, task="retrieval")
    assert main(["--params", str(REPO / "params.yaml")]) == 0  # `blip promote`
    stderr = capsys.readouterr().err  # MLflow's log, its progress bars and its prints all go to sys.stderr
    assert not [line for line in stderr.splitlines() if "warn" in line.lower() or "Downloading" in line], stderr
    # Python shows no deprecation warning raised in library code (here pandas' about MLflow's own code) by default.
    shown = [str(w.message) for w in recwarn if not issubclass(w.category, DeprecationWarning)]
    assert not shown, shown

    model = mlflow.pyfunc.load_model("models:/blip-retrieval@champion")
    out = model.predict(pd.DataFrame({"image": [image_b64((200, 30, 30))] * 2, "text": ["a red circle", "a cat"]}))
    assert list(out.columns) == ["itm_probability", "itc_similarity"]
    assert ((out["itm_probability"] > 0) & (out["itm_probability"] < 1)).all()
    assert (out["itc_similarity"].abs() <= 1 + 1e-5).all()

    # A request's rows run as batches: 40 rows, two forward passes (BATCH = 32), not 40.
    served = model.unwrap_python_model()
    calls = []
    score_pairs = served.model.score_pairs
    served.model.score_pairs = lambda images, *texts: calls.append(len(images)) or score_pairs(images, *texts)
    many = model.predict(pd.DataFrame({"image": [image_b64((200, 30, 30))] * 40, "text": ["a red circle"] * 40}))
    assert calls == [32, 8] and len(many) == 40
    assert many["itm_probability"].max() - many["itm_probability"].min() < 1e-5  # one pair, one score
    served.model.score_pairs = score_pairs

    outputs = model.metadata.get_output_schema().to_dict()
    assert [(c["name"], c["type"]) for c in outputs] == [("itm_probability", "double"), ("itc_similarity", "double")]
    example = model.input_example
    assert list(example.columns) == ["image", "text"] and len(example) == 1
    assert Image.open(io.BytesIO(base64.b64decode(example["image"][0]))).format == "PNG"  # a real image
    assert list(model.predict(example).columns) == ["itm_probability", "itc_similarity"]
    client = MlflowClient()
    description = client.get_registered_model("blip-retrieval").description
    assert all(f"`{column}`" in description for column in ("image", "text", "itm_probability", "itc_similarity"))
    assert "retrieval" in description.splitlines()[0].lower()  # what it does, first
    version = client.get_model_version_by_alias("blip-retrieval", "champion")
    assert all(part in version.description for part in ("`retrieval`", "r_mean 10", version.run_id)), version


def test_registered_nlvr_model_judges_a_statement_about_two_images(workdir: Path) -> None:
    write_candidate("nlvr", seed=0, cider=60.0, task="nlvr")
    promote(load_params(REPO / "params.yaml"))
    model = mlflow.pyfunc.load_model("models:/blip-nlvr@champion")
    red, blue = image_b64((200, 30, 30)), image_b64((30, 30, 200))
    rows = pd.DataFrame({"image": [red, blue], "image2": [blue, red], "text": ["a red circle", "two squares"]})
    out = model.predict(rows)
    assert list(out.columns) == ["probability_true", "label"] == model.metadata.get_output_schema().input_names()
    assert len(out) == 2 and out["label"].dtype == bool
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
