"""BLIP's losses against small cases computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blip.data.tokenizer import BERT_SPECIAL_TOKENS as T
from blip.models import contrastive as C
from blip.models.caption import BlipCaptioner
from blip.models.med import lm_loss
from blip.models.pretrain import BlipPretrain
from blip.models.retrieval import BlipRetrieval
from tests.conftest import TINY_BERT

CFG = TINY_BERT


def test_distilled_itc_targets_by_hand() -> None:
    sim_m = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, math.log(3.0)]])
    positives = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # row 1: two captions of the same image
    targets = C.distilled_targets(sim_m, positives, alpha=0.4)
    e2 = math.exp(2.0)
    row0 = [0.4 * e2 / (e2 + 2) + 0.6, 0.4 / (e2 + 2), 0.4 / (e2 + 2)]
    z1 = 1 + math.e + 3
    row1 = [0.4 / z1, 0.4 * math.e / z1 + 0.3, 0.4 * 3 / z1 + 0.3]
    assert torch.allclose(targets, torch.tensor([row0, row1]), atol=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(2))
    # alpha = 0: plain one-hot (or uniform over positives) targets; the loss is then cross-entropy.
    sim = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 1.0]])
    hard = C.distilled_targets(sim_m, positives, alpha=0.0)
    expected = (-F.log_softmax(sim, 1)[0, 0] - 0.5 * F.log_softmax(sim, 1)[1, 1:].sum()) / 2
    assert C.itc_loss(sim, hard) == pytest.approx(expected.item(), abs=1e-6)


def test_hard_negatives_never_positive_or_same_image() -> None:
    generator = torch.Generator().manual_seed(0)
    batch = 6
    image_ids = torch.tensor([0, 0, 1, 2, 2, 2])
    # Similarities that strongly favour the positives: sampling must still avoid them.
    sim = torch.randn(batch, batch, generator=generator) + 20 * (image_ids[:, None] == image_ids[None, :])
    embeds = torch.arange(batch, dtype=torch.float)[:, None, None].expand(batch, 2, 3).contiguous()
    ids = torch.arange(batch)[:, None].expand(batch, 4).contiguous()
    mask = torch.ones(batch, 4, dtype=torch.long)
    for _ in range(200):
        neg_images, neg_ids, _ = C.sample_negatives(sim, sim.T, embeds, ids, mask, image_ids, generator)
        image_rows, text_rows = neg_images[:, 0, 0].long(), neg_ids[:, 0]
        assert (image_ids[image_rows] != image_ids).all() and (image_ids[text_rows] != image_ids).all()
    # Without ids only the diagonal is excluded: a same-image caption may then be drawn.
    drawn = set()
    for _ in range(200):
        _, neg_ids, _ = C.sample_negatives(sim, sim.T, embeds, ids, mask, None, generator)
        assert (neg_ids[:, 0] != torch.arange(batch)).all()
        drawn |= {(i, int(j)) for i, j in enumerate(neg_ids[:, 0])}
    assert (0, 1) in drawn


def test_negative_weights_follow_similarity() -> None:
    sim = torch.tensor([[5.0, 1.0, 0.0]])
    weights = C.negative_weights(sim, torch.tensor([[True, False, False]]))
    expected = F.softmax(sim, 1) + 1e-4
    assert weights[0, 0] == 0 and torch.allclose(weights[0, 1:], expected[0, 1:])


def test_negative_weights_mix_hard_and_uniform_draws() -> None:
    sim = torch.tensor([[0.0, 30.0, 0.0, 0.0, 0.0]])  # column 1 is the only hard negative; column 0 the positive
    positives = torch.tensor([[True, False, False, False, False]])
    for share in (0.0, 0.25, 0.5):
        weights = C.negative_weights(sim, positives, share)
        probabilities = weights / weights.sum()
        # `share` of the draws follow the similarity (on column 1 but for BLIP's 1e-4 floor), the rest are uniform
        assert probabilities[0, 0] == 0
        assert probabilities[0, 1].item() == pytest.approx(share + (1 - share) / 4, abs=1e-3)
        assert torch.allclose(probabilities[0, 2:], torch.full((3,), (1 - share) / 4), atol=1e-3)
    draws = torch.multinomial(C.negative_weights(sim, positives, 0.5).expand(4000, -1), 1,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert (draws == 1).float().mean().item() == pytest.approx(0.625, abs=0.03) and (draws != 0).all()


def test_label_smoothed_lm_loss_by_hand() -> None:
    logits = torch.tensor([[[2.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 1.0]]])
    targets = torch.tensor([[1, -100]])  # only position 0 has a target (token 1); position 1 is ignored
    log_p = F.log_softmax(logits[0, 0], -1)
    eps = 0.1
    expected = (1 - eps) * -log_p[1] + eps * -log_p.mean()
    assert lm_loss(logits, targets, eps).item() == pytest.approx(expected.item(), abs=1e-6)
    both = torch.tensor([[1, 3]])
    second = F.log_softmax(logits[0, 1], -1)
    per_sequence = expected + (1 - eps) * -second[3] + eps * -second.mean()
    assert lm_loss(logits, both, eps, reduction="none").item() == pytest.approx(per_sequence.item(), abs=1e-5)
    assert lm_loss(logits, both, eps).item() == pytest.approx(per_sequence.item() / 2, abs=1e-5)


def test_captioner_masks_the_prompt_from_the_loss() -> None:
    torch.manual_seed(0)
    prompt_ids = [1037, 3861, 1997]  # "a picture of"
    model = BlipCaptioner(CFG.model_copy(update={"text_dropout": 0.0}), T, prompt_ids).eval()
    ids = torch.tensor([[T.cls, *prompt_ids, 2417, 4418, T.sep, T.pad]])
    mask = (ids != T.pad).long()
    images = torch.randn(1, 3, CFG.image_size, CFG.image_size)
    logits = model.logits(images, ids, mask)
    targets = torch.full_like(ids, -100)
    targets[0, 4:7] = ids[0, 4:7]  # caption tokens and [SEP]; not [DEC], the prompt or padding
    # Position t predicts token t + 1: the loss reads the logits the decoder gives at every position.
    expected = lm_loss(logits[:, :-1], targets[:, 1:], 0.1)
    assert model(images, ids, mask).item() == pytest.approx(expected.item(), abs=1e-6)
    assert model.prompt_length == 4 and model.prompt.tolist() == [T.bos, *prompt_ids]


def test_pretrain_step_losses_queue_and_momentum() -> None:
    torch.manual_seed(0)
    model = BlipPretrain(CFG, T, queue_size=16, momentum=0.9)
    images = torch.randn(4, 3, CFG.image_size, CFG.image_size)
    ids = torch.tensor([[T.cls, 1037, 2417, 4418, T.sep], [T.cls, 2048, 5741, T.sep, 0]] * 2)
    mask = (ids != 0).long()
    online = model.vision_proj.weight.detach().clone()
    before = model.vision_proj_m.weight.detach().clone()
    with torch.no_grad():
        model.vision_proj.weight.add_(1.0)  # make online and momentum differ
    out = model(images, ids, mask, alpha=0.4, image_ids=torch.tensor([0, 1, 0, 1]))
    assert torch.allclose(out.loss, out.itc + out.itm + out.lm)
    assert all(torch.isfinite(v) for v in (out.itc, out.itm, out.lm))
    assert torch.allclose(model.vision_proj_m.weight, 0.9 * before + 0.1 * (online + 1.0), atol=1e-6)
    assert int(model.queue_ptr) == 4
    out.loss.backward()
    assert model.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.text_decoder.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert model.visual_encoder_m.patch_embed.proj.weight.grad is None
    # Encoder and decoder share all but their self-attention, as BLIP ties them.
    enc, dec = model.text_encoder.encoder.layer[0], model.text_decoder.bert.encoder.layer[0]
    assert enc.crossattention is dec.crossattention and enc.output is dec.output
    assert enc.attention is not dec.attention
    decoder = model.text_decoder
    assert decoder.cls.predictions.decoder.weight is model.text_encoder.embeddings.word_embeddings.weight
    assert decoder.bert.embeddings is model.text_encoder.embeddings


def test_retrieval_id_queue_makes_queued_captions_of_the_same_image_positives(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = BlipRetrieval(CFG, T, queue_size=8, momentum=0.995)
    images = torch.randn(4, 3, CFG.image_size, CFG.image_size)
    ids = torch.tensor([[T.cls, 1037, 2417, 4418, T.sep], [T.cls, 2048, 5741, T.sep, 0]] * 2)
    mask = (ids != 0).long()
    seen: list[torch.Tensor] = []
    original = C.distilled_targets
    monkeypatch.setattr(C, "distilled_targets", lambda sim, pos, alpha: seen.append(pos) or original(sim, pos, alpha))
    model(images, ids, mask, torch.tensor([7, 8, 7, 9]), alpha=0.4)
    assert model.idx_queue[0, :4].tolist() == [7, 8, 7, 9] and int(model.ptr_queue) == 4
    seen.clear()
    out = model(images, ids, mask, torch.tensor([9, 5, 6, 7]), alpha=0.4)
    # columns: 4 in-batch momentum features, then the 8 queue slots (ids 7, 8, 7, 9, then empty = -100)
    positives = seen[0]
    assert positives[0].nonzero().flatten().tolist() == [0, 7]  # image 9: itself and the queued caption of 9
    assert positives[3].nonzero().flatten().tolist() == [3, 4, 6]  # image 7: itself and both queued captions of 7
    assert positives[1].nonzero().flatten().tolist() == [1]
    assert torch.isfinite(out.loss) and int(model.ptr_queue) == 0  # the queue wrapped around


def test_queue_update_stays_in_one_compiled_graph() -> None:
    # Reading the pointer on the host (int(pointer)) split torch.compile's graph and synced the GPU every step.
    queue, pointer = torch.zeros(2, 8), torch.zeros(1, dtype=torch.long)

    def step(feats: torch.Tensor) -> torch.Tensor:
        feats = feats * 2
        C.enqueue([queue], pointer, [feats])
        return feats.sum()

    explained = torch._dynamo.explain(step)(torch.ones(4, 2))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert queue[0].tolist() == [2, 2, 2, 2, 0, 0, 0, 0] and int(pointer) == 4


def test_momentum_update_is_an_exponential_moving_average() -> None:
    torch.manual_seed(0)
    online, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    C.momentum_update([(online, ema)], 0.995)
    for old, new, p in zip(before, ema.parameters(), online.parameters(), strict=True):
        assert torch.allclose(new, 0.995 * old + 0.005 * p.detach(), atol=1e-7)


def test_queue_must_divide_by_the_global_batch() -> None:
    queue = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="not a multiple of the global batch 4"):
        C.enqueue([queue], torch.zeros(1, dtype=torch.long), [torch.ones(4, 2)])
    pointer = torch.zeros(1, dtype=torch.long)
    queue, ids = torch.zeros(2, 8), torch.full((1, 8), -100)
    for step in range(3):
        # bf16 features (as under autocast) land in the float32 queue; image ids fill a [1, K] queue.
        feats = torch.full((4, 2), float(step + 1), dtype=torch.bfloat16)
        C.enqueue([queue, ids], pointer, [feats, torch.arange(4) + 10 * step])
    assert queue[0].tolist() == [3, 3, 3, 3, 2, 2, 2, 2] and int(pointer) == 4
    assert ids[0].tolist() == [20, 21, 22, 23, 10, 11, 12, 13] and queue.dtype == torch.float32


def test_alpha_ramps_linearly_over_the_first_epochs() -> None:
    assert C.ramped_alpha(0.4, 0, 100, 2) == 0.0
    assert C.ramped_alpha(0.4, 50, 100, 2) == pytest.approx(0.1)
    assert C.ramped_alpha(0.4, 200, 100, 2) == pytest.approx(0.4)
    assert C.ramped_alpha(0.4, 10_000, 100, 1) == pytest.approx(0.4)
    assert C.ramped_alpha(0.4, 0, 100, 0) == 0.4


@pytest.mark.parametrize("static", [False, True])
def test_kv_cache_decoding_equals_the_full_forward(static: bool) -> None:
    from blip.models.med import KVCache, StaticKVCache, TextDecoder

    torch.manual_seed(0)
    decoder = TextDecoder(CFG).eval()
    image = torch.randn(2, 5, CFG.vision_width)
    ids = torch.tensor([[T.bos, 1037, 2417, 4418, 2006], [T.bos, 2048, 5741, 1999, 1996]])
    full = decoder(ids, torch.ones_like(ids), image)
    cache = StaticKVCache(8, image.device) if static else KVCache()
    steps = [decoder.next_token_logits(ids[:, :2], image, None, cache)]
    for t in range(2, ids.shape[1]):
        steps.append(decoder.next_token_logits(ids[:, t : t + 1], image, None, cache))
    assert torch.allclose(torch.stack(steps, dim=1), full[:, 1:], atol=1e-5)
    if static:  # one buffer for all 8 slots, written up to the position, never reallocated
        assert int(cache.position) == 5 and cache.self_kv[0][0].shape[2] == 8
        assert cache.self_kv[0][0][:, :, 5:].abs().sum() == 0 and cache.self_kv[0][0][:, :, :5].abs().sum() > 0
        return
    cache.select(torch.tensor([1, 1]))  # beam reordering: both rows now continue the second sequence
    assert torch.equal(cache.self_kv[0][0][0], cache.self_kv[0][0][1])
