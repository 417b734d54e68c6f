"""Embeddings and search: `blip embed` writes ITC embeddings to Parquet; `blip search` ranks such a file for a query.

ITC similarity is the cosine of an image's and a text's embeddings, each computed alone: one vector per item, so a
gallery of millions is ranked with one matrix product. ITM probability reads the image and the text together
(cross-attention) and says how likely they match: better at telling a true caption from a near miss, but one
forward pass per pair, so it only re-ranks the ITC top k (`--rerank`), as BLIP's retrieval does.

A Parquet file holds `id` (row number), `path` (image file, or shard URL#key) or `text`, and `vector` (float32,
L2-normalised), written in row groups as it goes (memory flat in the number of items) to a temporary file renamed
at the end; its metadata names the kind and the weights (SHA-256), which a search checks.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm
from transformers import PreTrainedTokenizer

from blip.config import load_params
from blip.data.loader import eval_pipeline, make_loader
from blip.data.locations import split_urls
from blip.data.shards import IMAGE_MEMBERS, shard_samples
from blip.data.transforms import eval_transform
from blip.eval.retrieval import TopK, merge_best
from blip.models.contrastive import DualEncoder
from blip.models.factory import load_trained

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
LABEL = {"image": "path", "text": "text"}


def weights_digest(weights: Path) -> str:
    digest = hashlib.sha256()
    with weights.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(weights: Path, params: Path, overrides: list[str]) -> tuple[DualEncoder, PreTrainedTokenizer, int]:
    """(retrieval model, tokenizer, text tokens kept): our weights describe themselves; others need params."""
    if weights.suffix == ".safetensors" and not overrides:
        model, tokenizer = load_trained("retrieval", weights, None, None)
        max_length = load_params(params).tokenizer.max_length if params.is_file() else 35
    else:
        config = load_params(params, overrides)
        model, tokenizer = load_trained("retrieval", weights, config.model, config.tokenizer.name)
        max_length = config.tokenizer.max_length
    return model.eval(), tokenizer, max_length


# ---------------------------------------------------------------- sources
def image_batches(
    source: str, shard_root: Path, image_size: int, batch: int
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(labels, pixels) of a folder of image files (recursive, sorted; unreadable files skipped and logged) or of
    a shard split (a name under data.shard_root or a location; label = shard URL#key)."""
    transform = eval_transform(image_size)
    folder = Path(source)
    if folder.is_dir() and not is_shards(folder):
        files = image_files(folder)
        for start in range(0, len(files), batch):
            labels, pixels = [], []
            for path in files[start : start + batch]:
                try:
                    with Image.open(path) as image:
                        pixels.append(transform(image.convert("RGB")))
                except (OSError, ValueError, Image.DecompressionBombError) as exc:  # not an image, truncated, huge
                    log.warning("skipping unreadable image %s: %s", path, exc)
                    continue
                labels.append(str(path))
            if labels:
                yield labels, torch.stack(pixels)
        return
    for url in split_urls(shard_root, source):  # shard by shard, so that each label names its shard
        for got in make_loader(eval_pipeline([url], "pairs", transform, batch), 0):
            if got.get("image") is not None:
                yield [f"{url}#{key}" for key in got["key"]], got["image"]


def image_files(folder: Path) -> list[Path]:
    """The image files under a folder (none for anything else)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def is_shards(folder: Path) -> bool:
    """A folder of shards (a split), as opposed to one of image files."""
    return folder.is_dir() and any(folder.glob("*.tar"))


def has_images(folder: Path) -> bool:
    """Whether a folder holds shards or image files (embedding an empty folder is an error, not an empty file)."""
    return is_shards(folder) or bool(image_files(folder))


def text_batches(path: Path, batch: int) -> Iterator[tuple[list[str], torch.Tensor | None]]:
    """Lines of a UTF-8 text file, one text each (blank lines skipped)."""
    with path.open(encoding="utf-8") as f:
        texts: list[str] = []
        for line in f:
            if line.strip():
                texts.append(line.strip())
            if len(texts) == batch:
                yield texts, None
                texts = []
        if texts:
            yield texts, None


def load_image(label: str) -> Image.Image:
    """The image an index row names: a file, or URL#key of a shard sample."""
    if "#" in label and not Path(label).is_file():
        url, key = label.rsplit("#", 1)
        for sample in shard_samples(url):
            if sample.get("__key__") == key:
                member = next(m for m in IMAGE_MEMBERS if m in sample)
                return Image.open(io.BytesIO(sample[member])).convert("RGB")
        raise ValueError(f"{label}: no sample {key!r} in {url}")
    return Image.open(label).convert("RGB")


# ---------------------------------------------------------------- writing and reading an index
def write_embeddings(
    batches: Iterator[tuple[list[str], torch.Tensor | None]],
    kind: str,
    encode: Callable[[list[str], torch.Tensor | None], torch.Tensor],
    out: Path,
    meta: dict,
) -> int:
    """Encode each (labels, data) batch and append it as a row group; the file appears complete or not at all."""
    dim = meta["dim"]
    schema = pa.schema([("id", pa.int64()), (LABEL[kind], pa.string()), ("vector", pa.list_(pa.float32(), dim))],
                       metadata={b"blip": json.dumps({**meta, "kind": kind}).encode()})  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    rows = 0
    with pq.ParquetWriter(tmp, schema) as writer, tqdm(unit=kind, desc="embed") as bar:
        for labels, data in batches:
            vectors = encode(labels, data).float().cpu().numpy()
            vector = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
            ids = pa.array(range(rows, rows + len(labels)), pa.int64())
            writer.write_table(pa.Table.from_arrays([ids, pa.array(labels, pa.string()), vector], schema=schema))
            rows += len(labels)
            bar.update(len(labels))
    os.replace(tmp, out)
    return rows


def index_meta(path: Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    if b"blip" not in meta:
        raise ValueError(f"{path}: not an embeddings file written by `blip embed`")
    return json.loads(meta[b"blip"])


def top_k(index: Path, queries: torch.Tensor, k: int, rows: int = 65536) -> TopK:
    """Each query's k best rows of the index by ITC similarity (ties to the lower id, as the retrieval stage
    ranks), reading `rows` vectors at a time."""
    best = None
    for part in pq.ParquetFile(index).iter_batches(batch_size=rows, columns=["id", "vector"]):
        best = merge_best(best, queries @ vectors_of(part).T, torch.from_numpy(part.column("id").to_numpy().copy()), k)
    return best or TopK(torch.empty(len(queries), 0, dtype=torch.long), torch.empty(len(queries), 0))


def labels_of(index: Path, ids: set[int], rows: int = 65536) -> dict[int, str]:
    column = LABEL[index_meta(index)["kind"]]
    found = {}
    for part in pq.ParquetFile(index).iter_batches(batch_size=rows, columns=["id", column]):
        for i, label in zip(part.column("id").to_pylist(), part.column(column).to_pylist(), strict=True):
            if i in ids:
                found[i] = label
    return found


def vectors_of(part: pa.RecordBatch) -> torch.Tensor:
    dim = part.schema.field("vector").type.list_size
    return torch.from_numpy(part.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).copy())


def write_rankings(queries: Path, index: Path, k: int, out: Path, rows: int = 1024) -> None:
    """The top k rows of `index` for every row of `queries` (both embeddings files), `rows` queries at a time."""
    schema = pa.schema([("query_id", pa.int64()), ("rank", pa.int32()), ("id", pa.int64()),
                        ("itc_similarity", pa.float32())])  # fmt: skip
    tmp = out.with_name(out.name + ".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for part in tqdm(pq.ParquetFile(queries).iter_batches(batch_size=rows, columns=["id", "vector"]),
                         desc="search", unit="batch"):  # fmt: skip
            best = top_k(index, vectors_of(part), k)
            n, got = best.indices.shape
            query_ids = torch.from_numpy(part.column("id").to_numpy().copy()).repeat_interleave(got)
            columns = [query_ids.numpy(), torch.arange(1, got + 1).repeat(n).int().numpy(),
                       best.indices.flatten().numpy(), best.scores.flatten().numpy()]  # fmt: skip
            writer.write_table(pa.Table.from_arrays([pa.array(c) for c in columns], schema=schema))
    os.replace(tmp, out)


@torch.inference_mode()
def answer(model: DualEncoder, tokenizer: PreTrainedTokenizer, max_length: int, index: Path, text: str | None,
           image: Path | None, k: int, rerank: bool) -> list[list[str]]:  # fmt: skip
    """A header and one row per hit, best first: rank, (ITM probability,) ITC similarity, id, path or text."""
    kind = index_meta(index)["kind"]
    transform = eval_transform(model.model_config.image_size)

    def tokens(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        t = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        return t.input_ids, t.attention_mask

    if text is not None:
        query, query_kind = model.text_features(*tokens([text])), "text"
    else:
        pixels = transform(load_image(str(image)))[None]
        query, query_kind = model.image_features(pixels)[1], "image"
    best = top_k(index, query.float(), k)
    ids, itc = best.indices[0].tolist(), best.scores[0].tolist()
    labels = labels_of(index, set(ids))
    if not rerank:
        rows = [[str(r), f"{s:.4f}", str(i), labels[i]] for r, (i, s) in enumerate(zip(ids, itc, strict=True), 1)]
        return [["rank", "itc_similarity", "id", LABEL[kind]], *rows]
    if kind == query_kind:
        raise ValueError(f"ITM scores an image with a text: a {query_kind} query re-ranks an index of the other kind, "
                         f"and {index} holds {kind}s")  # fmt: skip
    if kind == "image":
        images, texts = torch.stack([transform(load_image(labels[i])) for i in ids]), [text] * len(ids)
    else:
        images, texts = pixels.expand(len(ids), -1, -1, -1), [labels[i] for i in ids]
    probability, _ = model.score_pairs(images, *tokens(texts))
    order = probability.argsort(descending=True).tolist()
    rows = [[str(rank), f"{probability[j]:.4f}", f"{itc[j]:.4f}", str(ids[j]), labels[ids[j]]]
            for rank, j in enumerate(order, 1)]  # fmt: skip
    return [["rank", "itm_probability", "itc_similarity", "id", LABEL[kind]], *rows]
