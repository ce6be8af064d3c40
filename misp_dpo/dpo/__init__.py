"""The trainer core: losses, negative sampling, reference log-probs, the model with LoRA, the loop.

A minimal multi-negative DPO trainer in plain PyTorch + transformers + peft (docs/method.md §4):
`losses` (Plackett-Luce image term, text DPO, anchor), `sampling` (importance-sampled negatives),
`model` / `tiny` (any image-text-to-text model; the offline tiny LLaVA), `sequences` (chat-formatted
prompts and summed response log-probs), `reference` (the log pi_ref pass), `step` / `loop` / `trainer`
(micro-batches, DDP, AdamW, checkpoints); `trainer.train_policy` is the train stage's entry point.
No module here imports `misp_dpo.pipelines`.
"""
