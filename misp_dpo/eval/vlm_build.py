"""The demo VLM's parts: a LlavaProcessor for 64 px images and a LLaVA whose vision tower sees them whole.

The model is a real `LlavaForConditionalGeneration` (a `CLIPVisionModel` tower, a two-layer MLP
projector, a small Llama), the processor a real `LlavaProcessor` with the word-level tokenizer and
chat template of `misp_dpo.dpo.tiny`, so `AutoModelForImageTextToText` / `AutoProcessor` load the
saved folder and `misp-dpo train --model DIR` trains it as it would a hub LLaVA. Unlike `--model
tiny` the tower keeps its CLS token (`vision_feature_select_strategy="full"`): the fitting teaches
the CLS token every attribute, and with 16 px patches the language model reads 17 image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from misp_dpo.dpo.tiny import CHAT_TEMPLATE, IMAGE_TOKEN, tiny_processor
from misp_dpo.optional import require


@dataclass(frozen=True)
class VlmSize:
    """Widths and depths of the demo VLM (64 px images, `patch` px patches)."""

    image: int = 64
    patch: int = 16
    vision_hidden: int = 128
    vision_layers: int = 4
    hidden: int = 128
    layers: int = 2

    @property
    def image_tokens(self) -> int:
        return (self.image // self.patch) ** 2 + 1  # patches + CLS


def build_processor(size: VlmSize) -> Any:
    """A LlavaProcessor for `size`: the tiny model's tokenizer and chat template, CLS token kept."""
    require("train", "the demo VLM")
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(
        size={"shortest_edge": size.image}, crop_size={"height": size.image, "width": size.image}
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tiny_processor().tokenizer,
        patch_size=size.patch,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def build_model(size: VlmSize, processor: Any, seed: int) -> Any:
    """A randomly initialised LlavaForConditionalGeneration of `size` (fp32, CPU), the same for a seed."""
    require("train", "the demo VLM")
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=2 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=max(2, size.vision_hidden // 32),
        image_size=size.image,
        patch_size=size.patch,
        projection_dim=size.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=size.hidden,
        intermediate_size=4 * size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=max(2, size.hidden // 32),
        num_key_value_heads=max(2, size.hidden // 32),
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=size.image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlavaForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()
