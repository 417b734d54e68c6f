"""BLIP's text cleaning, applied once at ingest so every stage sees the same text."""

from __future__ import annotations

import re

# The characters BLIP's `pre_caption` / `pre_question` remove (a question keeps its "?").
_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")


def pre_caption(caption: str, max_words: int) -> str:
    """Lower-case, punctuation to spaces, whitespace collapsed, at most `max_words` words."""
    words = _PUNCTUATION.sub(" ", caption.lower()).split()
    return " ".join(words[:max_words])


def pre_question(question: str, max_words: int) -> str:
    """Lower-case, punctuation removed (not spaced), whitespace collapsed, at most `max_words` words."""
    words = _PUNCTUATION.sub("", question.lower()).split()
    return " ".join(words[:max_words])
