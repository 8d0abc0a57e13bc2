"""Chat data and chat answers: the ``generate`` stage (a teacher's sampled answers to prompts, written in the
tokenizer's chat template as a prepared dataset) and side-by-side greedy answers of several models."""

from nemo_minitron.chat.config import GenerateConfig

__all__ = ["GenerateConfig"]
