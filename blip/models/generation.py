"""Decoding for the image-grounded decoder: greedy, beam search and nucleus sampling, with a KV cache.

Semantics follow `transformers`' `generate` (which BLIP itself calls), so the same weights give the same
captions: `max_length` and `min_length` count the prompt; below `min_length` the end token is banned; the
repetition penalty divides positive and multiplies negative scores of tokens already in the sequence; beam search
keeps 2 x beams candidates per step, scores a finished hypothesis by sum(log p) / generated_length ** length_penalty,
and stops once no running beam can beat the worst of the `beams` finished ones. Decoding runs in inference mode
(no autograd bookkeeping per op: 6% of a tiny model's beam search on a CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# step(new_token_ids [N, l]) -> next-token logits [N, vocab]; the caller owns the KV cache (every row decodes in
# step, so no attention mask) and reorders it through `reorder(index)`, which may also grow it (beam search).
Step = Callable[[torch.Tensor], torch.Tensor]
Reorder = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class GenerationConfig:
    method: str = "beam"  # "beam" | "greedy" | "nucleus"
    num_beams: int = 3
    max_length: int = 20  # prompt included, as in transformers / BLIP
    min_length: int = 5
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0


def _process(scores: torch.Tensor, seqs: torch.Tensor, cfg: GenerationConfig, eos: int) -> torch.Tensor:
    if cfg.repetition_penalty != 1.0:
        seen = scores.gather(1, seqs)
        seen = torch.where(seen < 0, seen * cfg.repetition_penalty, seen / cfg.repetition_penalty)
        scores = scores.scatter(1, seqs, seen)
    if seqs.shape[1] < cfg.min_length:
        scores = scores.clone()
        scores[:, eos] = -float("inf")
    return scores


def _strip(seqs: torch.Tensor, prompt_length: int, eos: int) -> list[list[int]]:
    out = []
    for row in seqs[:, prompt_length:].tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


@torch.inference_mode()
def greedy_or_sample(
    step: Step, prompt: torch.Tensor, cfg: GenerationConfig, eos: int, pad: int,
    generator: torch.Generator | None = None, check_every: int | None = None,
) -> list[list[int]]:  # fmt: skip
    """Greedy decoding, or nucleus sampling (top-p) when `cfg.method == "nucleus"`. Tokens go into a buffer of
    `max_length` columns and finished rows are tracked on the device, so a step reads nothing back from it except,
    every `check_every` steps (default: 1 on a CPU, 4 on a GPU, where each read waits for every queued kernel),
    whether all rows are done; rows done early meanwhile get padding, which the output drops."""
    rows, start = prompt.shape
    check_every = check_every or (1 if prompt.device.type == "cpu" else 4)
    seqs = torch.full((rows, max(cfg.max_length, start)), pad, dtype=prompt.dtype, device=prompt.device)
    seqs[:, :start] = prompt
    done = torch.zeros(rows, dtype=torch.bool, device=prompt.device)
    logits = step(prompt)
    for length in range(start, cfg.max_length):
        scores = _process(logits, seqs[:, :length], cfg, eos)
        # max(-1): half of argmax's time on a CPU
        token = sample_top_p(scores, cfg.top_p, generator) if cfg.method == "nucleus" else scores.max(-1).indices
        token = torch.where(done, pad, token)
        seqs[:, length] = token
        done |= token == eos
        if length + 1 == cfg.max_length or ((length + 1 - start) % check_every == 0 and done.all()):
            break  # no decoder step for a token nobody will read
        logits = step(token[:, None])
    return _strip(seqs, start, eos)


def in_nucleus(probs: torch.Tensor, token: torch.Tensor, top_p: float) -> torch.Tensor:
    """Whether each row's `token` is in its nucleus: the most probable tokens whose mass first reaches `top_p`, i.e.
    the tokens more probable than it hold less than `top_p` (the most probable token always is)."""
    p = probs.gather(1, token[:, None])
    return (probs * (probs > p)).sum(-1) < top_p


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from unnormalised probabilities, by inverse CDF (a uniform per row and a binary search)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(len(probs), 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def sample_top_p(scores: torch.Tensor, top_p: float, generator: torch.Generator | None, tries: int = 8) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020) by rejection: draw from the whole distribution and redraw the rows
    whose token fell outside the nucleus. An accepted draw is distributed as the renormalised nucleus, exactly;
    the nucleus holds at least `top_p` of the mass, so a row redraws 1 / top_p times at worst on average. Each try
    is O(vocab): sorting the vocabulary and `torch.multinomial` (an exponential per token) cost ~20x more per step
    on a CPU at BERT's 30,522 tokens. The rare rows still outside after `tries` take the sorted nucleus."""
    probs = F.softmax(scores.float(), dim=-1)
    if top_p >= 1.0:  # the whole distribution (a sum of the others' mass can round to 1 and exclude a token)
        return _draw(probs, generator)
    if probs.is_cuda:  # sorting is cheap on a GPU, and the rejection loop reads back how many rows are left
        return _sorted_nucleus(probs, top_p, generator)
    token = torch.zeros(len(probs), dtype=torch.long, device=probs.device)
    rows = torch.arange(len(probs), device=probs.device)
    for _ in range(tries):
        candidates = probs if len(rows) == len(probs) else probs[rows]
        draw = _draw(candidates, generator)
        accepted = in_nucleus(candidates, draw, top_p)
        token[rows[accepted]] = draw[accepted]
        rows = rows[~accepted]
        if len(rows) == 0:
            return token
    token[rows] = _sorted_nucleus(probs[rows], top_p, generator)
    return token


def _sorted_nucleus(probs: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """The textbook nucleus draw: sort, keep the prefix whose mass before each token is below `top_p`, draw."""
    ordered, order = probs.sort(-1, descending=True)
    nucleus = ordered * ((ordered.cumsum(-1) - ordered) < top_p)
    return order.gather(1, _draw(nucleus, generator)[:, None]).squeeze(1)


def top_k(scores: torch.Tensor, k: int, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores.topk(k, dim=-1)` of a [rows, vocab] tensor (ties in any order). The k best lie in the k chunks with
    the highest maxima (or in the short tail after the last whole chunk), and a chunk maximum (`amax`, vectorised)
    is ~15x cheaper per element on a CPU than `topk` (one scan per row): ~4x faster at BERT's vocabulary."""
    rows, vocab = scores.shape
    whole = vocab - vocab % chunk
    if vocab <= 4 * k * chunk:
        return scores.topk(k, dim=-1)
    blocks = scores[:, :whole].view(rows, -1, chunk)
    best = blocks.amax(-1).topk(k, dim=-1).indices  # [rows, k] chunks
    picked = blocks.gather(1, best[:, :, None].expand(-1, -1, chunk)).view(rows, -1)
    positions = (best[:, :, None] * chunk + torch.arange(chunk, device=scores.device)).view(rows, -1)
    tail = torch.arange(whole, vocab, device=scores.device).expand(rows, -1)
    values, where = torch.cat([picked, scores[:, whole:]], dim=1).topk(k, dim=-1)
    return values, torch.cat([positions, tail], dim=1).gather(1, where)


@torch.inference_mode()
def beam_search(
    step: Step, reorder: Reorder, prompt: torch.Tensor, cfg: GenerationConfig, eos: int, pad: int
) -> list[list[int]]:
    """`prompt` is [B, P]. The first step gets the B prompts; then `reorder(index)` with B * num_beams rows (beam-major
    within each image) turns the cache into one per beam, and every later step and reorder hold those rows."""
    batch, prompt_length = prompt.shape
    beams, device = cfg.num_beams, prompt.device
    keep = 2 * beams
    running = prompt.repeat_interleave(beams, dim=0).view(batch, beams, prompt_length)
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = -1e9  # all beams start identical: only the first may expand at step one
    finished = torch.full((batch, beams, cfg.max_length), pad, dtype=torch.long, device=device)
    finished_scores = torch.full((batch, beams), -1e9, device=device)
    finished_done = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    may_improve = torch.ones(batch, 1, dtype=torch.bool, device=device)
    top_ranks = torch.arange(keep, device=device) < beams
    offsets = torch.arange(batch, device=device)[:, None] * beams

    # The prompt runs once per image; `reorder` then gives each beam its image's cache.
    logits = step(prompt).repeat_interleave(beams, dim=0)
    reorder(torch.arange(batch, device=device).repeat_interleave(beams))
    flat = running.view(batch * beams, -1)
    length = prompt_length
    while True:
        log_probs = _process(F.log_softmax(logits.float(), dim=-1), flat, cfg, eos)
        # The best `keep` continuations of the batch's beams are among each beam's own best `keep`.
        beam_scores, beam_tokens = top_k(log_probs, keep)
        total = (beam_scores.view(batch, beams, keep) + running_scores[:, :, None]).view(batch, -1)
        top_scores, top_index = total.topk(keep, dim=1)
        parent = top_index // keep
        candidates = torch.cat([running.gather(1, parent[:, :, None].expand(-1, -1, length)),
                                beam_tokens.view(batch, -1).gather(1, top_index)[:, :, None]], dim=2)  # fmt: skip
        hits = (candidates[:, :, -1] == eos) | (length + 1 >= cfg.max_length)

        # Continue with the best candidates that have not just finished.
        running_candidates = top_scores + hits.float() * -1e9
        chosen = running_candidates.topk(beams, dim=1).indices
        running = candidates.gather(1, chosen[:, :, None].expand(-1, -1, length + 1))
        running_scores = running_candidates.gather(1, chosen)
        reorder((parent.gather(1, chosen) + offsets).view(-1))

        # Candidates among the top `beams` ranks that just finished compete for the finished slots (most steps
        # none has: the merge is skipped).
        just_finished = hits & top_ranks[None, :]
        if just_finished.any():
            scores = top_scores / ((length + 1 - prompt_length) ** cfg.length_penalty)
            scores = scores + (~may_improve).float() * -1e9 + (~just_finished).float() * -1e9
            padded = F.pad(candidates, (0, cfg.max_length - length - 1), value=pad)
            merged = torch.cat([finished, padded], dim=1)
            merged_scores = torch.cat([finished_scores, scores], dim=1)
            merged_done = torch.cat([finished_done, just_finished], dim=1)
            best = merged_scores.topk(beams, dim=1).indices
            finished = merged.gather(1, best[:, :, None].expand(-1, -1, cfg.max_length))
            finished_scores = merged_scores.gather(1, best)
            finished_done = merged_done.gather(1, best)

        length += 1
        best_running = running_scores[:, :1] / ((length - prompt_length) ** cfg.length_penalty)
        worst_finished = torch.where(finished_done, finished_scores.min(1, keepdim=True).values, -1e9)
        may_improve &= (best_running > worst_finished).any(dim=-1, keepdim=True)
        if not may_improve.any() or hits.all():
            break
        flat = running.view(batch * beams, -1)
        logits = step(flat[:, -1:])
    return _strip(finished[:, 0], prompt_length, eos)
