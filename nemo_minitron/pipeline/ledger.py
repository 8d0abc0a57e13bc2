"""``<run>/pipeline.json``: which stages of a run have finished, with which config, and what they returned.

A stage recorded with the same config is skipped on the next ``run`` and its recorded result reused; one
recorded with a different config stops the run with the first key that changed, instead of silently reusing
an output made from other settings. How a distillation writes checkpoints and logs (its ``checkpoint`` and
``log`` sections) and how often it measures its held-out loss on the way (``eval.every_steps``) are not part of
what it computes: those may change between runs. The file is replaced atomically after every stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from nemo_minitron.errors import UserError

LEDGER_FILE = "pipeline.json"


# Sections that decide how a distillation writes checkpoints and logs, not what it computes (a resumed run
# reproduces the uninterrupted one wherever it saved): at the top of a stage's config or in its distill section.
_IO_ONLY = ("checkpoint", "log")


def _outcome(config: dict) -> dict:
    """``config`` without the sections that leave the stage's result as it is."""
    kept = {key: value for key, value in config.items() if key not in _IO_ONLY}
    if isinstance(kept.get("distill"), dict):
        kept["distill"] = _outcome(kept["distill"])
    # A distillation's periodic held-out loss: how many points its curve has (the weights, and the final
    # held-out loss on the same windows, do not depend on it).
    if isinstance(kept.get("eval"), dict) and "every_steps" in kept["eval"]:
        kept["eval"] = {key: value for key, value in kept["eval"].items() if key != "every_steps"}
    return kept


def _digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(_outcome(config), sort_keys=True, default=str).encode()).hexdigest()


def _first_difference(old: Any, new: Any, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


class Ledger:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LEDGER_FILE
        self.stages: dict[str, dict] = {}
        if self.path.is_file():
            try:
                self.stages = json.loads(self.path.read_text(encoding="utf-8"))["stages"]
            except (ValueError, KeyError) as exc:
                raise UserError(f"{self.path}: unreadable ({exc}); remove it to start the run again") from None

    def finished(self, key: str, config: dict) -> Optional[dict]:
        """The recorded entry of ``key`` if it finished with ``config``; None if it has not finished."""
        entry = self.stages.get(key)
        if entry is None:
            return None
        if _digest(entry["config"]) != _digest(config):
            difference = _first_difference(_outcome(entry["config"]), _outcome(config))
            raise UserError(
                f"stage {key} finished with another config ({difference}); "
                f"set rerun_from={key} to redo it and the stages after it, or use a new output directory"
            )
        return entry

    def record(self, key: str, config: dict, result: Any, seconds: float, outputs: list[str]) -> None:
        self.stages[key] = {"config": config, "result": result, "seconds": seconds, "outputs": outputs}
        self._save()

    def forget_from(self, key: str) -> list[str]:
        """Drop ``key`` and every stage recorded after it, deleting their outputs; the keys dropped."""
        keys = list(self.stages)
        if key not in keys:
            return []
        dropped = keys[keys.index(key):]
        for name in dropped:
            for output in self.stages.pop(name)["outputs"]:
                path = Path(output)
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        self._save()
        return dropped

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"stages": self.stages}, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)
