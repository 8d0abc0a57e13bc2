"""The data stage: tokenize a corpus into train/valid indexed datasets, then read them as token streams."""

from nemo_minitron.data.dataset import SequenceSampler, TokenDataset, eval_windows, text_file_tokens
from nemo_minitron.data.prepare import PrepareDataConfig, PreparedData, load_tokenizer, prepare_data, read_text

__all__ = [
    "PrepareDataConfig",
    "PreparedData",
    "SequenceSampler",
    "TokenDataset",
    "eval_windows",
    "load_tokenizer",
    "prepare_data",
    "read_text",
    "text_file_tokens",
]
