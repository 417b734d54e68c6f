"""The captioner: image encoder + image-grounded decoder, trained with the LM loss after a prompt.

As in BLIP, the text is "a picture of " + caption, with [DEC] replacing [CLS]; the prompt's tokens are masked from
the loss and cut from generated captions. Keys match the official caption checkpoints (`visual_encoder.*`,
`text_decoder.bert.*`, `text_decoder.cls.*`).
"""

from __future__ import annotations

import torch
from torch import nn

from blip.config.schema import ModelConfig
from blip.data.tokenizer import SpecialTokens
from blip.models.generation import GenerationConfig, beam_search, greedy_or_sample
from blip.models.med import KVCache, StaticKVCache, TextDecoder
from blip.models.vit import create_vit

PROMPT = "a picture of "


class BlipCaptioner(nn.Module):
    def __init__(self, cfg: ModelConfig, tokens: SpecialTokens, prompt_ids: list[int], label_smoothing: float = 0.1):
        """`prompt_ids`: the tokenised prompt without [CLS]/[SEP] (e.g. "a picture of" -> 3 ids)."""
        super().__init__()
        self.tokens, self.label_smoothing = tokens, label_smoothing
        self.visual_encoder = create_vit(cfg)
        self.text_decoder = TextDecoder(cfg)
        self.register_buffer("prompt", torch.tensor([tokens.bos, *prompt_ids]), persistent=False)

    @property
    def prompt_length(self) -> int:
        return len(self.prompt)

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """LM loss of prompt + caption (`text_ids` tokenised from PROMPT + caption, starting with [CLS])."""
        return self._caption_loss(images, text_ids, text_mask, self.label_smoothing, "mean")

    def negative_log_likelihood(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
                                ) -> torch.Tensor:  # fmt: skip
        """Each caption's summed -log p(caption tokens, [SEP] included | image, prompt), without label smoothing."""
        return self._caption_loss(images, text_ids, text_mask, 0.0, "none")

    def _caption_loss(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                      label_smoothing: float, reduction: str) -> torch.Tensor:  # fmt: skip
        image_embeds = self.visual_encoder(images)
        ids = text_ids.clone()
        ids[:, 0] = self.tokens.bos
        labels = ids.masked_fill(ids == self.tokens.pad, -100)
        labels[:, : self.prompt_length] = -100
        # The last prompt position predicts the first caption token; the ones before it predict nothing.
        first = self.prompt_length - 1
        return self.text_decoder.loss(ids, text_mask, image_embeds, labels, label_smoothing, first=first,
                                      reduction=reduction)  # fmt: skip

    def logits(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        ids = text_ids.clone()
        ids[:, 0] = self.tokens.bos
        return self.text_decoder(ids, text_mask, self.visual_encoder(images))

    @torch.inference_mode()
    def generate(
        self, images: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None = None
    ) -> list[list[int]]:
        """Caption token ids per image (prompt and end token removed)."""
        image_embeds = self.visual_encoder(images)
        return decode(self.text_decoder, image_embeds, self.prompt, config, self.tokens, generator)


def decode(
    decoder: TextDecoder,
    context: torch.Tensor,
    prompt: torch.Tensor,
    config: GenerationConfig,
    tokens: SpecialTokens,
    generator: torch.Generator | None = None,
    context_mask: torch.Tensor | None = None,
) -> list[list[int]]:
    """Run the decoder on `context` (image tokens, or VQA question states) from `prompt`, one KV cache per row
    (preallocated for `max_length` positions unless beam search reorders the rows)."""
    rows = context.shape[0]
    beam = config.method == "beam"
    cache = KVCache() if beam else StaticKVCache(max(config.max_length, len(prompt)), context.device)
    state = {"context": context, "mask": context_mask, "cache": cache}

    def step(ids: torch.Tensor) -> torch.Tensor:
        return decoder.next_token_logits(ids, state["context"], state["mask"], state["cache"])

    def reorder(index: torch.Tensor) -> None:
        if len(index) != len(state["context"]):  # beams branch off their image: context and mask per beam
            state["context"] = state["context"].index_select(0, index)
            state["mask"] = None if state["mask"] is None else state["mask"].index_select(0, index)
        state["cache"].select(index)

    batch_prompt = prompt[None].expand(rows, -1)
    if beam:
        return beam_search(step, reorder, batch_prompt, config, tokens.sep, tokens.pad)
    return greedy_or_sample(step, batch_prompt, config, tokens.sep, tokens.pad, generator)
