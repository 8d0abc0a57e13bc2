"""Config of the ``prepare-data`` stage (plain data: no torch, no megatron)."""

from __future__ import annotations

from pydantic import Field, field_validator

from nemo_minitron.config import StrictModel


class PrepareDataConfig(StrictModel):
    """The ``prepare-data`` stage: which corpus, which tokenizer, where to write, how to split."""

    input: str = Field(min_length=1, description="file, folder (recursive *.txt/*.md/*.jsonl and their .gz), glob, "
                                                 "embedded:...")
    tokenizer: str = Field(min_length=1, description="Hugging Face tokenizer folder or embedded: reference")
    output_dir: str = Field(min_length=1)
    valid_fraction: float = 0.1
    split_seed: int = 1234
    jsonl_text_key: str = Field("text", min_length=1)
    # Left out of dumps: the output is byte-identical whatever the number of workers, so a prepared folder is
    # reused with any, and a run's pipeline.json digests of its finished data stage stay valid.
    num_workers: int = Field(1, ge=1, exclude=True, description="tokenizing processes")

    @field_validator("valid_fraction")
    @classmethod
    def _open_unit_interval(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError("must be strictly between 0 and 1")
        return value
