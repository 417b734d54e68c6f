"""`blip embed` and `blip search`: Parquet embeddings, ITC ranking equal to the retrieval stage's, ITM re-ranking."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from blip.cli import main as blip_main
from blip.data.locations import split_urls
from blip.data.tokenizer import load_tokenizer
from blip.data.transforms import eval_transform
from blip.eval.retrieval import best_k, evaluate_retrieval, load_pair_split, recall_at_k
from blip.models.checkpoint import save_weights
from blip.models.factory import build_model, load_trained
from blip.search import top_k, vectors_of
from blip.stages.ingest import main as ingest_main
from tests.conftest import TINY_BERT

TOKENIZER = load_tokenizer()


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("retrieval", TINY_BERT, TOKENIZER, queue_size=16)
    return save_weights(model, tmp_path / "retrieval.safetensors", "bert-base-uncased-offline")


def vectors(path: str) -> torch.Tensor:
    return torch.cat([vectors_of(part) for part in pq.read_table(path).to_batches()])


def test_best_k_ranks_ties_by_index_whatever_k() -> None:
    scores = torch.randn(32, 300, generator=torch.Generator().manual_seed(0)).round(decimals=1)  # many ties
    order = torch.sort(scores, dim=1, descending=True, stable=True)  # the definition: ties to the lower column
    for k in (1, 5, 300, 400):
        values, columns = best_k(scores, k)
        assert torch.equal(columns, order.indices[:, :k]) and torch.equal(values, order.values[:, :k])


def test_embed_and_search_reproduce_the_retrieval_stages_itc_recall(small_params: Path, weights: Path) -> None:
    assert ingest_main(["--params", str(small_params), "--no-progress"]) == 0
    split = load_pair_split(split_urls(Path("data/shards"), "clean_test"), TINY_BERT.image_size, 10**9)
    assert len(set(split.texts)) < len(split.texts)  # the world repeats captions: equal scores must rank alike
    Path("texts.txt").write_text("\n".join(split.texts) + "\n")
    common = ["--params", str(small_params), "--weights", str(weights)]
    assert blip_main(["embed", *common, "--images", "clean_test", "--out", "images.parquet"]) == 0
    assert blip_main(["embed", *common, "--texts", "texts.txt", "--out", "texts.parquet", "--batch-size", "16"]) == 0
    images = pq.read_table("images.parquet")
    assert images.num_rows == len(split.image_ids) and images.column_names == ["id", "path", "vector"]
    assert images.column("path")[0].as_py().startswith(split_urls(Path("data/shards"), "clean_test")[0] + "#")
    norms = vectors("images.parquet").norm(dim=1)
    assert torch.allclose(norms, torch.ones(len(norms)), atol=1e-5)  # L2-normalised

    for index, queries in (("images", "texts"), ("texts", "images")):
        argv = ["search", "--index", f"{index}.parquet", "--queries", f"{queries}.parquet", "--k", "1"]
        assert blip_main([*argv, "--out", f"{queries}_to_{index}.parquet"]) == 0
    t2i = pq.read_table("texts_to_images.parquet").to_pydict()
    i2t = pq.read_table("images_to_texts.parquet").to_pydict()
    text_image = split.text_image.tolist()
    img_r1 = 100.0 * sum(text_image[q] == i for q, i in zip(t2i["query_id"], t2i["id"], strict=True)) / len(t2i["id"])
    txt_r1 = 100.0 * sum(text_image[i] == q for q, i in zip(i2t["query_id"], i2t["id"], strict=True)) / len(i2t["id"])

    model, _ = load_trained("retrieval", weights, None, None)
    stage = evaluate_retrieval(model, split, TOKENIZER, 35, 16, 8, 32, torch.device("cpu"))
    expected = recall_at_k(*stage["itc"], split.text_image)
    assert (txt_r1, img_r1) == (expected["txt_r1"], expected["img_r1"])

    # A text's vector does not depend on its batch: equal texts next to a long one and next to a short one.
    Path("pairs.txt").write_text("a red circle\n" + "a large red circle to the left of a small blue square " * 3
                                 + "\na red circle\na\n")  # fmt: skip
    assert blip_main(["embed", *common, "--texts", "pairs.txt", "--out", "pairs.parquet", "--batch-size", "2"]) == 0
    pairs = vectors("pairs.parquet")
    assert torch.equal(pairs[0], pairs[2]) and not torch.equal(pairs[0], pairs[3])

    # Read a few rows at a time (memory flat in the index size), the ranking is the same.
    queries = vectors("texts.parquet")
    whole, streamed = top_k(Path("images.parquet"), queries, 5), top_k(Path("images.parquet"), queries, 5, rows=7)
    assert torch.equal(whole.indices, streamed.indices) and torch.equal(whole.scores, streamed.scores)


def test_search_answers_a_query_reranks_by_itm_and_refuses_what_it_cannot_do(
    tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for name, colour in (("red.png", (200, 20, 20)), ("blue.jpg", (20, 20, 200)), ("more/green.png", (20, 200, 20))):
        Image.new("RGB", (80, 60), colour).save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image")  # skipped and logged
    index = tmp_path / "photos.parquet"
    assert blip_main(["embed", "--weights", str(weights), "--images", str(folder), "--out", str(index)]) == 0
    assert capsys.readouterr().out.strip().endswith("(1 unreadable images skipped)")
    table = pq.read_table(index).to_pydict()
    assert sorted(Path(p).name for p in table["path"]) == ["blue.jpg", "green.png", "red.png"]
    capsys.readouterr()

    query = ["search", "--index", str(index), "--weights", str(weights), "--k", "2"]
    assert blip_main([*query, "--text", "a red square"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert lines[0] == ["rank", "itc_similarity", "id", "path"] and len(lines) == 3
    assert float(lines[1][1]) >= float(lines[2][1])

    assert blip_main([*query, "--text", "a red square", "--rerank"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert lines[0] == ["rank", "itm_probability", "itc_similarity", "id", "path"]
    model, _ = load_trained("retrieval", weights, None, None)
    transform = eval_transform(TINY_BERT.image_size)
    pixels = torch.stack([transform(Image.open(row[4]).convert("RGB")) for row in lines[1:]])
    tokens = TOKENIZER(["a red square"] * 2, return_tensors="pt")
    probability, _ = model.eval().score_pairs(pixels, tokens.input_ids, tokens.attention_mask)
    assert [float(row[1]) for row in lines[1:]] == pytest.approx(probability.tolist(), abs=1e-4)
    assert probability[0] >= probability[1]

    with pytest.raises(SystemExit):  # an image index re-ranked for an image query: ITM needs a text
        blip_main([*query, "--image", str(folder / "red.png"), "--rerank"])
    assert "re-ranks an index of the other kind" in capsys.readouterr().err
    torch.manual_seed(1)
    other = save_weights(build_model("retrieval", TINY_BERT, TOKENIZER, queue_size=16), tmp_path / "other.safetensors",
                         "bert-base-uncased-offline")  # fmt: skip
    with pytest.raises(SystemExit):
        blip_main(["search", "--index", str(index), "--weights", str(other), "--text", "a red square"])
    assert "was embedded with" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        blip_main(["embed", "--weights", str(weights), "--images", str(empty), "--out", str(tmp_path / "e.parquet")])
    assert "no image files" in capsys.readouterr().err and not (tmp_path / "e.parquet").exists()
