"""Greedy answers of an image-text-to-text model to (question, image) prompts, batched, left-padded.

Prompts go through the model's own chat template with one image slot (`SequenceEncoder.prompt_text`,
the trainer's formatting), so a LLaVA sees `USER: <image>\\n{question} ASSISTANT:`. Left padding keeps
every prompt's last token at the end of the row, where generation continues.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from PIL import Image

from misp_dpo.dpo.sequences import SequenceEncoder


@contextmanager
def _left_padding(tokenizer: Any) -> Iterator[None]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    encoder: SequenceEncoder,
    device: torch.device,
    questions: list[str],
    images: list[Image.Image],
    max_new_tokens: int,
) -> list[str]:
    """One greedy answer per (question, image), all in one `generate` call (the caller batches)."""
    if not questions:
        return []
    tokenizer = encoder.tokenizer
    texts = [encoder.prompt_text(question) for question in questions]
    with _left_padding(tokenizer):
        inputs = encoder.processor(text=texts, images=images, padding=True, return_tensors="pt")
    dtype = next(model.parameters()).dtype
    tensors = {
        k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
        for k, v in inputs.items()
        if isinstance(v, torch.Tensor)
    }
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = cast(Any, model).generate(  # a transformers GenerationMixin
        **tensors,
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    new_tokens = output[:, tensors["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
