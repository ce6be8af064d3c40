"""From (prompt, response, image) to summed response log-probs, for any processor with a chat template.

The prompt goes through the model's own chat template with one image slot, then through the
processor with the image (which expands the slot to the model's image tokens and makes
`pixel_values`, plus whatever else the model needs, e.g. Qwen2.5-VL's `image_grid_thw`). The
response is tokenised alone and appended with EOS, as TRL does, so its tokens are the same under
every image. Sequences are right-padded; only the positions that predict a response token are sent
through the output head (`logits_to_keep` mask), which keeps the vocabulary-sized logits small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from misp_dpo.errors import UserError

TEXT_KEYS = ("input_ids", "attention_mask")


@dataclass
class Encoded:
    """Sequences encoded by one processor call: token ids, response starts, image tensors.

    The image tensors are the processor's output for the group's images in order, kept as one block:
    their layout is the model's business (a row per image for LLaVA, patches plus a grid for
    Qwen2.5-VL), and concatenating blocks keeps images in sequence order for any layout.
    """

    input_ids: list[torch.Tensor]  # (L_i,) int64 each
    response_starts: list[int]
    images: dict[str, torch.Tensor]
    token_fields: dict[str, list[torch.Tensor]]  # other per-token outputs (Qwen's mm_token_type_ids)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    predicts_response: torch.Tensor  # (B, L) bool: position t's logits predict a response token t+1
    images: dict[str, torch.Tensor]
    token_fields: dict[str, torch.Tensor]  # (B, L) each, zero past the prompt

    def to(self, device: torch.device, dtype: torch.dtype) -> SequenceBatch:
        images = {
            k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in self.images.items()
        }
        fields = {k: v.to(device) for k, v in self.token_fields.items()}
        ids, mask, predicts = (
            t.to(device) for t in (self.input_ids, self.attention_mask, self.predicts_response)
        )
        return SequenceBatch(ids, mask, predicts, images, fields)


class SequenceEncoder:
    """Formats and tokenises sequences for one processor; prompts are formatted once and cached."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if getattr(processor, "chat_template", None) is None:
            raise UserError(
                f"--model: its processor ({type(processor).__name__}) has no chat template, so prompts "
                "cannot be formatted with an image slot; use an instruction-tuned VLM or --model tiny"
            )
        self._prompts: dict[str, str] = {}
        self._responses: dict[str, list[int]] = {}

    def prompt_text(self, prompt: str) -> str:
        if prompt not in self._prompts:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            self._prompts[prompt] = self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        return self._prompts[prompt]

    def response_ids(self, response: str) -> list[int]:
        if response not in self._responses:
            ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
            eos = self.tokenizer.eos_token_id
            self._responses[response] = list(ids) + ([eos] if eos is not None else [])
        return self._responses[response]

    def encode(self, items: list[tuple[str, str, Image.Image]]) -> Encoded:
        """One sequence per (prompt, response, image), all through one processor call (its fixed cost
        is paid once per micro-batch, not once per sequence)."""
        texts = [self.prompt_text(prompt) for prompt, _, _ in items]
        images = [image for _, _, image in items]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        shape = inputs["input_ids"].shape
        per_token = [
            k for k, v in inputs.items() if k not in TEXT_KEYS and getattr(v, "shape", None) == shape
        ]
        ids, starts = [], []
        fields: dict[str, list[torch.Tensor]] = {k: [] for k in per_token}
        for row, (_, response, _) in enumerate(items):
            keep = inputs["attention_mask"][row].bool() if "attention_mask" in inputs else slice(None)
            prompt_ids = inputs["input_ids"][row][keep].long()
            response_ids = torch.tensor(self.response_ids(response), dtype=torch.long)
            ids.append(torch.cat([prompt_ids, response_ids]))
            starts.append(len(prompt_ids))
            for key in per_token:
                fields[key].append(inputs[key][row][keep])
        tensors = {
            k: v
            for k, v in inputs.items()
            if k not in TEXT_KEYS and k not in fields and isinstance(v, torch.Tensor)
        }
        return Encoded(ids, starts, tensors, fields)


def collate(groups: list[Encoded], pad_id: int) -> SequenceBatch:
    """Right-pad every sequence of the groups to the longest; image blocks are concatenated in order."""
    sequences = [
        (ids, start) for g in groups for ids, start in zip(g.input_ids, g.response_starts, strict=True)
    ]
    length = max(len(ids) for ids, _ in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    predicts = torch.zeros((len(sequences), length), dtype=torch.bool)
    for row, (seq, start) in enumerate(sequences):
        n = len(seq)
        ids[row, :n] = seq
        mask[row, :n] = 1
        predicts[row, start - 1 : n - 1] = True
    fields = {}
    for key in groups[0].token_fields:
        values = [v for g in groups for v in g.token_fields[key]]
        fields[key] = torch.zeros((len(sequences), length), dtype=values[0].dtype)
        for row, value in enumerate(values):
            fields[key][row, : len(value)] = value
    images = {k: torch.cat([g.images[k] for g in groups]) for k in groups[0].images}
    return SequenceBatch(ids, mask, predicts, images, fields)


def sequence_logps(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Summed log-probs of each sequence's response tokens, (B,) in float32."""
    outputs = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        logits_to_keep=batch.predicts_response,
        use_cache=False,
        **batch.images,
        **batch.token_fields,
    )
    logits = outputs.logits
    if logits.dim() == 3:  # a model that ignores the mask: select the positions here
        logits = logits[batch.predicts_response]
    rows, cols = batch.predicts_response.nonzero(as_tuple=True)
    targets = batch.input_ids[rows, cols + 1]
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    total = torch.zeros(batch.input_ids.shape[0], dtype=torch.float32, device=token_logps.device)
    return total.index_add(0, rows, token_logps)
