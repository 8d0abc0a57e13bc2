"""Config of the ``generate`` stage (plain data: no torch, no megatron)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from nemo_minitron.config import StrictModel
from nemo_minitron.embedded import CHAT_PROMPTS as SHIPPED_PROMPTS  # the package's own prompt file


class SamplingConfig(StrictModel):
    """How answers are drawn: ``temperature: 0`` is greedy decoding (``top_p`` and ``top_k`` then unused)."""

    temperature: float = Field(0.7, ge=0.0, description="0: greedy")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="nucleus sampling mass (1: off)")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens (0: off)")
    max_new_tokens: int = Field(192, ge=1, description="an answer without EOS by then is kept, cut there")
    samples_per_prompt: int = Field(1, ge=1, description="answers drawn per prompt (1 when greedy)")
    seed: int = 1234

    @field_validator("samples_per_prompt")
    @classmethod
    def _one_greedy_answer(cls, value: int, info) -> int:
        if value > 1 and info.data.get("temperature") == 0:
            raise ValueError("greedy decoding (temperature 0) gives one answer per prompt: set samples_per_prompt 1")
        return value


class GenerateSettings(StrictModel):
    """What is asked and how it is answered: the part of the ``generate`` stage's config that does not name the
    model or the output (the ``run`` job's ``data.generated`` takes these from the run's teacher and directory)."""

    prompts: str = Field(SHIPPED_PROMPTS, min_length=1,
                         description="JSON lines file, one prompt per record under `prompt_key`; "
                                     f"{SHIPPED_PROMPTS}: the package's general prompts")
    prompt_key: str = Field("prompt", min_length=1)
    max_prompts: Optional[int] = Field(None, ge=2, description="the first N prompts only")
    system_prompt: Optional[str] = Field(None, min_length=1,
                                         description="a system message before each prompt (none: the template's own)")
    sampling: SamplingConfig = SamplingConfig()
    batch_size: int = Field(8, ge=1, description="prompts decoded together (left-padded)")
    dtype: Literal["float32", "bfloat16"] = "float32"
    valid_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of prompts held out (by a stable hash)")


class GenerateConfig(GenerateSettings):
    """The ``generate`` stage: ``model`` answers each prompt of ``prompts``; every (prompt, answer) pair is
    rendered with the model tokenizer's chat template and written to ``output_dir`` as a prepared dataset
    (``train``/``valid`` indexed datasets and ``meta.json``, like ``prepare-data``), ready to blend."""

    model: str = Field(min_length=1, description="Hugging Face model directory with a chat template, or embedded:...")
    output_dir: str = Field(min_length=1)
    split_seed: int = 1234
