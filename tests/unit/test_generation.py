"""Nucleus sampling: the rejection sampler draws from the renormalised nucleus, as sorting would."""

import pytest
import torch
from scipy.stats import chisquare

from blip.models.generation import in_nucleus, sample_top_p, top_k


def sorted_nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """The textbook definition: sort, keep the prefix whose mass before each token is below top_p; [N, V] bool."""
    probs = scores.softmax(-1)
    ordered, order = probs.sort(-1, descending=True)
    keep = (ordered.cumsum(-1) - ordered) < top_p
    return torch.zeros_like(keep).scatter(1, order, keep)


def test_nucleus_membership_matches_the_sorted_definition() -> None:
    scores = torch.randn(64, 500, generator=torch.Generator().manual_seed(0)) * 3
    probs = scores.softmax(-1)
    for top_p in (0.1, 0.5, 0.9, 0.99):
        expected = sorted_nucleus(scores, top_p)
        every = torch.arange(500).expand(64, -1)
        got = torch.stack([in_nucleus(probs, every[:, v], top_p) for v in range(500)], dim=1)
        assert torch.equal(got, expected)


# tries=0: only the sorted fallback
@pytest.mark.parametrize(("top_p", "tries"), [(0.9, 8), (0.5, 8), (0.9, 0), (1.0, 8)])
def test_samples_follow_the_renormalised_nucleus(top_p: float, tries: int) -> None:
    scores = torch.randn(40, generator=torch.Generator().manual_seed(1)) * 2
    scores[7] = -float("inf")  # a banned token (min_length bans the end token this way)
    draws = 40_000
    tokens = sample_top_p(scores.expand(draws, -1), top_p, torch.Generator().manual_seed(2), tries=tries)
    nucleus = sorted_nucleus(scores[None], top_p)[0] if top_p < 1 else scores > -float("inf")
    assert nucleus.sum() >= 2 and not nucleus[7]
    counts = torch.bincount(tokens, minlength=40)
    assert counts[~nucleus].sum() == 0  # nothing outside the nucleus, the banned token never
    expected = scores.double().softmax(-1)[nucleus]
    expected = expected / expected.sum() * draws
    assert chisquare(counts[nucleus].double().numpy(), expected.numpy()).pvalue > 1e-3


def test_a_peaked_distribution_samples_its_top_token_and_a_seed_repeats() -> None:
    scores = torch.randn(16, 30_522, generator=torch.Generator().manual_seed(3))
    scores[torch.arange(16), torch.arange(16) * 100] = 30.0  # one token holds nearly all the mass
    tokens = sample_top_p(scores, 0.9, torch.Generator().manual_seed(4))
    assert torch.equal(tokens, torch.arange(16) * 100)
    flat = torch.zeros(8, 1000)
    first = sample_top_p(flat, 0.9, torch.Generator().manual_seed(5))
    assert torch.equal(first, sample_top_p(flat, 0.9, torch.Generator().manual_seed(5)))
    assert len(set(first.tolist())) > 4  # a flat distribution spreads its draws


@pytest.mark.parametrize(("rows", "vocab", "k"), [(12, 30_524, 6), (3, 1000, 4), (5, 70, 6), (2, 4097, 1)])
def test_top_k_equals_torch_topk(rows: int, vocab: int, k: int) -> None:
    scores = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab))
    scores[0, :50] = -float("inf")  # banned tokens, and the best one in the padded last chunk
    scores[-1, -1] = 10.0
    values, index = top_k(scores, k)
    expected_values, expected_index = scores.topk(k, dim=-1)
    assert torch.equal(values, expected_values) and torch.equal(index, expected_index)


@pytest.mark.parametrize("method", ["greedy", "nucleus"])
def test_the_decoding_loop_on_a_static_cache_equals_the_growing_one(method: str) -> None:
    """Same tokens with the preallocated cache as with the growing one, and whether finished rows are checked
    every step or every 4 (rows done early get padding meanwhile, which the output drops)."""
    from blip.config.schema import ModelConfig
    from blip.models.generation import GenerationConfig, greedy_or_sample
    from blip.models.med import KVCache, StaticKVCache, TextDecoder

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, text_width=32, text_depth=2, text_heads=2, vision_width=24)
    decoder = TextDecoder(cfg).eval()
    with torch.no_grad():  # the end token about as likely as the best other one: rows end at different steps
        decoder.cls.predictions.bias[2] = 0.1
    image, prompt = torch.randn(16, 5, 24) * 10, torch.tensor([[1, 7, 8]]).expand(16, -1)
    config = GenerationConfig(method, max_length=14, min_length=4, top_p=0.9, repetition_penalty=1.3)

    def run(cache: KVCache, check_every: int) -> list[list[int]]:
        step = lambda ids: decoder.next_token_logits(ids, image, None, cache)  # noqa: E731
        generator = torch.Generator().manual_seed(3)
        return greedy_or_sample(step, prompt, config, eos=2, pad=0, generator=generator, check_every=check_every)

    growing = run(KVCache(), 1)
    assert run(StaticKVCache(14, image.device), 1) == growing
    assert run(StaticKVCache(14, image.device), 4) == growing
    lengths = {len(row) for row in growing}
    assert len(lengths) > 1 and max(lengths) <= 11  # rows ended at different steps, within max_length
