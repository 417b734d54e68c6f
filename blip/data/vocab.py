"""A WordPiece vocabulary trained on the ingested training text (the tiny preset's choice).

At width 96, BERT's 30,522-token LM head costs most of a training step; a vocabulary fitted to the corpus keeps
the tiny model fast. Its layout is BERT's (`[PAD]`=0, `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`, then pieces), so the
same tokenizer code loads it and adds `[DEC]` and `[ENC]` after the last piece. Base and large keep BERT's vocab.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

from tokenizers import BertWordPieceTokenizer

from blip.data.shards import read_records
from blip.files import atomic_write_text

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def split_texts(urls: list[str]) -> Iterator[str]:
    """Every text a model will read or write in these shards: captions, questions, answers, statements."""
    for record in read_records(urls):
        yield from record.get("captions", [])
        yield from (record[k] for k in ("question", "sentence") if k in record)
        yield from record.get("answers", [])


def train_vocab(urls: list[str], size: int, out: Path, extra_texts: list[str]) -> Path:
    tokenizer = BertWordPieceTokenizer(lowercase=True)
    texts = itertools.chain(extra_texts, split_texts(urls))
    tokenizer.train_from_iterator(texts, vocab_size=size, min_frequency=1, special_tokens=SPECIAL,
                                  show_progress=False)  # fmt: skip
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return atomic_write_text(out, "".join(f"{token}\n" for token, _ in vocab))
