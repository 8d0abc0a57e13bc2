"""Config of the ``prepare-data`` stage, and how every other stage names the prepared data it reads (plain
data: no torch, no megatron)."""

from __future__ import annotations

import os
from typing import Annotated, Any, Union

from pydantic import AfterValidator, Discriminator, Field, Tag, field_validator

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


class BlendComponent(StrictModel):
    """One prepared dataset of a weighted blend, Megatron's ``--data-path WEIGHT PATH`` pair."""

    weight: float = Field(gt=0, description="relative share of training samples (weights need not sum to 1)")
    path: str = Field(min_length=1, description="prepared dataset directory (prepare-data)")


def _distinct_paths(components: list[BlendComponent]) -> list[BlendComponent]:
    seen: set[str] = set()
    for c in components:
        if c.path in seen:
            raise ValueError(f"{c.path} is listed twice: give each prepared dataset once, with its total weight")
        seen.add(c.path)
    return components


def _data_kind(value: Any) -> str:
    return "path" if isinstance(value, str) else "blend"


# What a stage's ``data`` key takes: one prepared dataset directory, or a weighted blend of several:
#   data: runs/data/shakespeare
#   data: [{weight: 0.7, path: runs/data/a}, {weight: 0.3, path: runs/data/b}]
# A one-path config dumps as the plain string it always was.
DataSource = Annotated[
    Union[
        Annotated[str, Field(min_length=1), Tag("path")],
        Annotated[list[BlendComponent], Field(min_length=1), AfterValidator(_distinct_paths), Tag("blend")],
    ],
    Discriminator(_data_kind),
]


def blend_weights(data: str | os.PathLike | list[BlendComponent]) -> list[tuple[str, float]]:
    """``(path, weight)`` of each component of ``data``, weights normalised to sum to 1 (a path alone: 1.0)."""
    if not isinstance(data, list):
        return [(os.fspath(data), 1.0)]
    total = sum(c.weight for c in data)
    return [(c.path, c.weight / total) for c in data]
