"""Caption metrics exactly as the COCO caption evaluation computes them (`pycocoevalcap`).

References and candidates go through the PTB tokenizer, then BLEU-1..4, METEOR, ROUGE-L and CIDEr are computed
by pycocoevalcap's own scorers, one by one (its `COCOEvalCap.evaluate` always runs SPICE, which downloads
Stanford CoreNLP on first use). SPICE is computed only when those models are installed, and otherwise reported as
unavailable with the reason, never estimated; so is every score where pycocoevalcap or Java is missing.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

SPICE_MODELS = "stanford-corenlp-3.6.0"
METRICS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")


def coco_unavailable_reason() -> str | None:
    """Why no COCO caption metric can be computed here (pycocoevalcap missing, or no Java for its PTB tokenizer
    and METEOR, e.g. on a GPU image), or None."""
    if importlib.util.find_spec("pycocoevalcap") is None:
        return "pycocoevalcap is not installed"
    if shutil.which("java") is None:
        return "no `java` on PATH (pycocoevalcap's PTB tokenizer and METEOR are Java programs)"
    return None


def spice_unavailable_reason() -> str | None:
    if reason := coco_unavailable_reason():
        return reason
    import pycocoevalcap.spice.spice as spice_module

    lib = Path(spice_module.__file__).parent / "lib"
    jars = [f"{SPICE_MODELS}{suffix}.jar" for suffix in ("", "-models")]
    missing = [jar for jar in jars if not (lib / jar).exists()]
    if missing:
        return f"SPICE needs {', '.join(missing)} in {lib} (pycocoevalcap downloads them at first use; offline here)"
    return None


def caption_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float | None]:
    """Corpus-level scores for `predictions[image_id]` against `references[image_id]` (same ids in both); SPICE is
    None when its models are not installed, every score None where coco_unavailable_reason() says why."""
    if coco_unavailable_reason():
        return dict.fromkeys((*METRICS, "SPICE"))
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if set(predictions) != set(references):
        raise ValueError(f"predictions and references cover different images: {len(predictions)} vs {len(references)}")
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in predictions.items()})
    scores: dict[str, float | None] = {}
    bleu, _ = Bleu(4).compute_score(gts, res)
    scores.update({f"BLEU_{n}": float(value) for n, value in enumerate(bleu, start=1)})
    meteor = Meteor()  # a Java process; pycocoevalcap stops it when the scorer is garbage-collected
    scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
    del meteor
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    reason = spice_unavailable_reason()
    if reason is None:
        from pycocoevalcap.spice.spice import Spice

        scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
    else:
        scores["SPICE"] = None  # never estimated: spice_unavailable_reason() says why
    return scores
