"""VQA: the question encoder cross-attends to the image; the answer decoder cross-attends to the question.

Training: LM loss of each answer given its question, answers of a question weighted (VQA's soft scores), summed
per question and averaged over the batch, as BLIP does. Inference, as in BLIP: generation (beam 3, max 10 tokens),
or ranking over an answer list (top k answers by the probability of their first token, re-scored by the
decoder's full-sequence loss). Keys match the official VQA checkpoints (`visual_encoder`, `text_encoder`,
`text_decoder`).
"""

from __future__ import annotations

import torch
from torch import nn

from blip.config.schema import ModelConfig
from blip.data.tokenizer import SpecialTokens
from blip.models.caption import decode
from blip.models.generation import GenerationConfig
from blip.models.med import MED, TextDecoder
from blip.models.vit import create_vit

ANSWER_GENERATION = GenerationConfig(method="beam", num_beams=3, max_length=10, min_length=1)


class BlipVQA(nn.Module):
    def __init__(self, cfg: ModelConfig, tokens: SpecialTokens, label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.tokens, self.label_smoothing = tokens, label_smoothing
        self.visual_encoder = create_vit(cfg)
        self.text_encoder = MED(cfg)
        # The answer decoder attends to the question states: text width (BLIP's VQA leaves its decoder config's
        # encoder_width at the text width; it differs from the vision width in ViT-L models).
        self.text_decoder = TextDecoder(cfg, context_width=cfg.text_width)

    def encode_question(
        self, images: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor
    ) -> torch.Tensor:
        """Question states [B, L, D] grounded in the image; [ENC] replaces the leading [CLS]."""
        ids = question_ids.clone()
        ids[:, 0] = self.tokens.enc
        return self.text_encoder(ids, question_mask, self.visual_encoder(images))

    def answer_loss(self, states: torch.Tensor, state_mask: torch.Tensor | None, answer_ids: torch.Tensor,
                    answer_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Each answer's summed LM loss ([DEC] answer [SEP]) given its question's states."""
        ids = answer_ids.clone()
        ids[:, 0] = self.tokens.bos
        labels = ids.masked_fill(answer_mask == 0, -100)
        return self.text_decoder.loss(ids, answer_mask, states, labels, self.label_smoothing, state_mask,
                                      reduction="none")  # fmt: skip

    def forward(
        self,
        images: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        answers_per_question: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """`answer_ids` holds every answer of every question, question by question (`answers_per_question`)."""
        states = self.encode_question(images, question_ids, question_mask)
        states = states.repeat_interleave(answers_per_question, dim=0)
        mask = question_mask.repeat_interleave(answers_per_question, dim=0)
        per_answer = self.answer_loss(states, mask, answer_ids, answer_mask)
        return (weights * per_answer).sum() / images.shape[0]

    @torch.inference_mode()
    def generate(self, images: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor,
                 config: GenerationConfig = ANSWER_GENERATION) -> list[list[int]]:  # fmt: skip
        states = self.encode_question(images, question_ids, question_mask)
        prompt = torch.tensor([self.tokens.bos], device=states.device)
        # BLIP (and transformers) let the answer decoder attend to every question position here, padding included.
        return decode(self.text_decoder, states, prompt, config, self.tokens)

    @torch.no_grad()
    def rank_answers(
        self,
        images: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        k: int,
    ) -> torch.Tensor:
        """Index into the answer list of each question's best answer.

        `answer_ids` [A, L] tokenises the whole answer list ([CLS] answer [SEP], padded).
        """
        states = self.encode_question(images, question_ids, question_mask)
        questions, k = states.shape[0], min(k, answer_ids.shape[0])
        start = torch.full((questions, 1), self.tokens.bos, device=states.device)
        first = self.text_decoder(start, torch.ones_like(start), states, question_mask)[:, 0]
        first_token_probs = first.softmax(-1).index_select(1, answer_ids[:, 1])
        top_ids = first_token_probs.topk(k, dim=1).indices  # [Q, k]

        candidates = answer_ids[top_ids.flatten()]
        candidate_mask = answer_mask[top_ids.flatten()]
        # BLIP re-scores with its training loss (label smoothing included): lowest loss wins.
        loss = self.answer_loss(
            states.repeat_interleave(k, 0), question_mask.repeat_interleave(k, 0), candidates, candidate_mask
        ).view(questions, k)
        return top_ids.gather(1, loss.argmin(1, keepdim=True)).squeeze(1)
