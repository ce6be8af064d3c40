"""`--model tiny`: a randomly initialised LLaVA (tiny CLIP vision tower + tiny Llama) built offline.

Nothing is downloaded: the tokenizer is a word-level `tokenizers` model whose vocabulary is the demo
corpus's words (anything else maps to <unk>), wrapped in `PreTrainedTokenizerFast`; the image
processor and the chat template are configured here. The processor is a real `LlavaProcessor`, so
chat-formatted prompts contain the `<image>` slot and expand it to the vision tower's patch count,
exactly as for a hub LLaVA. `tiny-HxL` builds hidden size H with L text layers (the benchmark's
mid-size model is `tiny-512x4`). The same spec and seed always give the same weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from misp_dpo.embed import synth
from misp_dpo.optional import require

TINY_PATTERN = re.compile(r"^tiny(?:-(\d+)x(\d+))?$")
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN)
# LLaVA-1.5's conversation format, for a message list with {"type": "image"} / {"type": "text"} parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
IMAGE_SIZE = 32
PATCH_SIZE = 8


@dataclass(frozen=True)
class TinySize:
    """Text and vision widths and depths of a tiny LLaVA."""

    hidden: int = 64
    layers: int = 2
    vision_hidden: int = 32
    vision_layers: int = 2


def parse_tiny(spec: str) -> TinySize | None:
    """The size a `tiny` / `tiny-HxL` spec names, or None for any other model spec."""
    match = TINY_PATTERN.match(spec)
    if match is None:
        return None
    if match.group(1) is None:
        return TinySize()
    hidden, layers = int(match.group(1)), int(match.group(2))
    if hidden % 16 or hidden < 16 or layers < 1:
        raise ValueError(f"model {spec!r}: tiny-HxL needs H a multiple of 16 and L >= 1")
    return TinySize(hidden=hidden, layers=layers, vision_hidden=max(32, hidden // 4))


def _vocabulary() -> list[str]:
    """Every word of the demo corpus's prompts and answers, plus the chat template's, lower-cased."""
    attrs = {name: values[0] for name, values in synth.ATTRIBUTES.items()}
    texts = [question for question, _ in synth.QUESTIONS]
    texts += [synth.response(attrs, focus) for _, focus in synth.QUESTIONS]
    texts += [" ".join(values) for values in synth.ATTRIBUTES.values()]
    texts += ["user assistant system : . , ! ? yes no an the of it is and"]
    words = set()
    for text in texts:
        words.update(re.findall(r"\w+|[^\w\s]+", text.lower()))
    return sorted(words)


def tiny_processor() -> Any:
    """A LlavaProcessor (word-level tokenizer + CLIP image processor) built without any download."""
    require("train", "the tiny VLM")
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *_vocabulary()])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    images = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by the "default" strategy
    )


def tiny_model(size: TinySize, processor: Any, seed: int) -> Any:
    """A LlavaForConditionalGeneration of `size`, initialised from `seed` (fp32, on CPU)."""
    require("train", "the tiny VLM")
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=2 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=size.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=size.hidden,
        intermediate_size=2 * size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=max(2, size.hidden // 64),
        num_key_value_heads=max(1, size.hidden // 128),
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_layer=-1,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlavaForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()
