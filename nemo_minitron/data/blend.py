"""The prepared datasets a stage reads: one, or a weighted blend of several (torch-free checks).

Blends follow Megatron's ``--data-path 0.7 A 0.3 B``: weights are normalised to sum to 1, training samples
are drawn from the components in those proportions (see :class:`~nemo_minitron.data.dataset.BlendedSampler`),
and every component keeps its own held-out split, evaluated on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nemo_minitron.data.config import BlendComponent, blend_weights
from nemo_minitron.errors import UserError

META_FILE = "meta.json"


@dataclass(frozen=True)
class Prepared:
    """One component: its directory, its normalised weight and its ``meta.json``."""

    path: Path
    weight: float
    meta: dict


def prepared_components(data: str | list[BlendComponent], key: str = "data") -> list[Prepared]:
    """Every component of ``data`` with its meta; a UserError naming ``key`` when one is not prepared data or
    when they were tokenized differently (a blend mixes token ids of one vocabulary only)."""
    found = []
    for path, weight in blend_weights(data):
        folder = Path(path).expanduser()
        if not (folder / META_FILE).is_file():
            raise UserError(f"{key}: {folder} is not a prepared dataset (run prepare-data first)")
        found.append(Prepared(folder, weight, json.loads((folder / META_FILE).read_text(encoding="utf-8"))))
    first = found[0]
    for other in found[1:]:
        for field in ("vocab_size", "eos_id", "dtype"):
            if other.meta.get(field) != first.meta.get(field):
                raise UserError(f"{key}: {other.path} and {first.path} were tokenized differently ({field} "
                                f"{other.meta.get(field)} vs {first.meta.get(field)}): prepare every component of a "
                                "blend with the same tokenizer")
    return found
