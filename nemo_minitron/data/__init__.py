"""The data stage: tokenize a corpus into train/valid indexed datasets, then read them as token streams (one
prepared dataset or a weighted blend of several)."""

from typing import Any

from nemo_minitron.data.blend import prepared_components
from nemo_minitron.data.config import BlendComponent, DataSource, PrepareDataConfig, blend_weights

_PREPARE = ("PreparedData", "load_tokenizer", "prepare_data", "read_text")
_DATASET = ("BlendedSampler", "HeldOut", "SequenceSampler", "TokenDataset", "eval_windows", "heldout_sets",
            "text_file_tokens", "train_sampler")

__all__ = ["BlendComponent", "DataSource", "PrepareDataConfig", "blend_weights", "prepared_components", *_PREPARE,
           *_DATASET]


def __getattr__(name: str) -> Any:
    # These modules bring torch and megatron: imported on first use, so that reading a config does not.
    if name in _PREPARE:
        from nemo_minitron.data import prepare

        return getattr(prepare, name)
    if name in _DATASET:
        from nemo_minitron.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
