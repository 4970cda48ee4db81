"""Build tiny randomly initialised causal LMs for tests, with the packaged SmolLM2 tokenizer."""

from __future__ import annotations

import random
from pathlib import Path


def build_tiny_model(folder: Path, *, seed: int = 0, hidden_size: int = 64) -> Path:
    """Save a 2-layer Llama with SmolLM2's tokenizer to `folder` (a few MB, milliseconds per step)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from nesycd.lm.registry import resolve_model

    if (folder / "config.json").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# Replies without repeated words, so that a 2-layer model memorises them in a few hundred steps.
TEACHER_RATIONALE = "Evaluate leftwards."
TEACHER_SUMMARY = "Apply negation first"
TEACHER_KNOWLEDGE = "1. Negation flips values."


def train_tiny_teacher(folder: Path, prompts: dict[str, list[str]], *, steps: int = 300, seed: int = 0) -> Path:
    """Save a tiny model trained to give one fixed reply per kind of prompt.

    `prompts["cot"]` are reasoning prompts: the model learns to answer
    "<rationale> Therefore, the answer is True." `prompts["knowledge"]` are knowledge-writing
    prompts: it learns a two-part learning summary / supplementary knowledge reply. The result is
    a real transformers model that runs through the whole compile, fast enough for tests.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (folder / "config.json").exists():
        return folder
    base = build_tiny_model(folder.parent / f"{folder.name}-init", seed=seed, hidden_size=64)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    replies = {
        "cot": f" {TEACHER_RATIONALE} Therefore, the answer is True.",
        "knowledge": f" {TEACHER_SUMMARY}\nSupplementary Knowledge:\n{TEACHER_KNOWLEDGE}",
    }
    sequences = []
    for kind, texts in prompts.items():
        for text in texts:
            prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            reply_ids = tokenizer(replies[kind], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            sequences.append((prompt_ids, reply_ids))

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    model.train()
    order = random.Random(seed)
    for _ in range(steps):
        for prompt_ids, reply_ids in order.sample(sequences, k=min(4, len(sequences))):
            input_ids = torch.tensor([prompt_ids + reply_ids])
            # Only the reply positions need logits; the 49k-token head over the whole prompt is the slow part.
            logits = model(input_ids=input_ids, logits_to_keep=len(reply_ids) + 1).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor(reply_ids)) / 4
            loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
