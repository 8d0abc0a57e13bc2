"""The ``generation-speed`` stage: greedy decoding tokens/s of a teacher and a student in transformers."""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_minitron.checkpoint.io import resolve_model_dir
from nemo_minitron.evaluation.config import GenerationConfig


def generation_speed(cfg: GenerationConfig) -> dict:
    """Tokens/s of greedy generation (``new_tokens`` per prompt) for both models; the best of ``repeats``."""
    paths = {"teacher": resolve_model_dir(cfg.teacher), "student": resolve_model_dir(cfg.student)}
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    models = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
              for name, path in paths.items()}
    prompts = [tokenizer(p, return_tensors="pt").input_ids for p in cfg.prompts]

    def one_pass(model) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for ids in prompts:
                model.generate(ids, max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens, do_sample=False,
                               pad_token_id=tokenizer.eos_token_id)
        return time.perf_counter() - start

    for model in models.values():  # warm-up
        model.generate(prompts[0], max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    best = {name: float("inf") for name in models}
    for _ in range(cfg.repeats):
        for name, model in models.items():
            best[name] = min(best[name], one_pass(model))
    tokens = cfg.new_tokens * len(prompts)
    speed = {name: tokens / seconds for name, seconds in best.items()}
    return {"teacher_tokens_per_second": speed["teacher"], "student_tokens_per_second": speed["student"],
            "speedup": speed["student"] / speed["teacher"], "new_tokens": tokens}
