"""Untrusted files: nothing the tool reads can make it run code. Checkpoints and caches load through
safetensors or ``torch.load(weights_only=True)``; configs through ``yaml.safe_load``; no config names a class or
function to instantiate; and no config chooses where inside a run directory a file is written."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch

from conftest import destroy_state

from .reliability_helpers import STEPS, checkpoint_dirs, copy_run, distill_args

PACKAGE = Path(__file__).resolve().parents[2] / "nemo_minitron"
ROOT = PACKAGE.parent


def run_main(args: list[str]) -> int:
    from nemo_minitron.cli import main

    try:
        return main(args)
    finally:
        destroy_state()


# ------------------------------------------------------------------------------------------ loaders in the source


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


# Calls that unpickle or construct arbitrary objects from a file or string.
UNSAFE_CALLS = {"pickle.load", "pickle.loads", "dill.load", "dill.loads", "marshal.load", "marshal.loads",
                "yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all",
                "shelve.open", "joblib.load", "importlib.import_module", "hydra.utils.instantiate",
                "np.load", "numpy.load"}


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """``file:line call`` of every call in ``source`` that may run code from the data it reads: the calls of
    UNSAFE_CALLS (``np.load`` only with ``allow_pickle=True``), and ``torch.load`` without
    ``weights_only=True``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if name == "torch.load":
            weights_only = keywords.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{filename}:{node.lineno} torch.load without weights_only=True")
        elif name in ("np.load", "numpy.load"):
            allow = keywords.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{filename}:{node.lineno} {name} with allow_pickle")
        elif name in UNSAFE_CALLS or name in ("eval", "exec", "__import__"):
            found.append(f"{filename}:{node.lineno} {name}")
    return found


def test_the_source_checker_finds_unsafe_loads():
    bad = "\n".join([
        "import torch, pickle, yaml, numpy as np",
        "torch.load(f)",
        "torch.load(f, weights_only=False)",
        "torch.load(f, weights_only=flag)",
        "pickle.loads(b)",
        "yaml.load(text, Loader=yaml.Loader)",
        "np.load(f, allow_pickle=True)",
        "eval(text)",
    ])
    assert [line.split(" ", 1)[0] for line in unsafe_loads(bad)] == [f"<source>:{i}" for i in range(2, 9)]
    good = "torch.load(f, weights_only=True, map_location='cpu')\nyaml.safe_load(t)\nnp.load(f)\nmodel.eval()"
    assert unsafe_loads(good) == []


def test_every_load_in_the_package_is_safe():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = [hit for f in files for hit in unsafe_loads(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    # The stage registry imports its stages' modules by name, from its own table only (checked just below).
    assert [hit.split(":")[0] + " " + hit.split(" ", 1)[1] for hit in found] == [
        "nemo_minitron/stages.py importlib.import_module"]
    from nemo_minitron import stages

    with pytest.raises(ValueError, match="not a reference of the stage table"):
        stages._resolve("os:system")
    # The place that reads training checkpoints guards what the libraries it calls unpickle.
    source = (PACKAGE / "distill" / "checkpointing.py").read_text()
    assert "weights_only=True" in source and source.count("mcore_fixes.apply()") >= 2


# ------------------------------------------------------------------------------------------ pickle bombs


class Bomb:
    """Unpickling it would create ``marker`` (through os.system, as a real exploit would run any command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# Every file of a training checkpoint that is unpickled when it is read: torch's checkpoint metadata (plain
# pickle), megatron's common state (a torch zip) and a rank's random-generator states (a torch zip).
BOMB_TARGETS = [".metadata", "common.pt", "rng/rank00000.pt"]


def plant_bomb(file: Path, marker: Path) -> None:
    if file.name == ".metadata":
        file.write_bytes(pickle.dumps(Bomb(marker)))
    else:
        torch.save({"train": Bomb(marker)}, file)


def detonate(file: Path) -> None:
    """Unpickle ``file`` without any guard."""
    with open(file, "rb") as f:
        pickle.load(f) if file.name == ".metadata" else torch.load(f, weights_only=False)  # noqa: S301


@pytest.mark.parametrize("target", BOMB_TARGETS)
def test_distill_refuses_to_resume_from_a_pickle_bomb(models, reference, tmp_path, capsys, target):
    out = copy_run(reference, tmp_path / "run", drop_final=True)
    newest = checkpoint_dirs(out)[STEPS]
    marker = tmp_path / "exploited"
    plant_bomb(newest / target, marker)
    capsys.readouterr()
    assert run_main(distill_args(models, out, **{"train.max_steps": STEPS + 1})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"nemo-minitron distill: error: {newest}: refused: it holds objects other than tensors and "
                   "plain data"]
    assert not marker.exists()
    # The same bytes, unpickled without the guard, would have run the command: the test bomb is live.
    detonate(newest / target)
    assert marker.exists()


def test_checkpoint_byte_items_load_as_plain_data_only(tmp_path):
    """megatron's ShardedObjects (a layer's ``_extra_state``) are byte items in torch's checkpoint files, which
    torch unpickles with ``weights_only=False``: after the fixes they load with ``weights_only=True``."""
    import io

    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from nemo_minitron.parallel import mcore_fixes

    mcore_fixes.apply()
    marker = tmp_path / "exploited"
    buffer = io.BytesIO()
    torch.save(Bomb(marker), buffer)
    planner = DefaultLoadPlanner(flatten_state_dict=False)
    planner.state_dict = {}

    class Item:
        class dest_index:
            fqn = "layer._extra_state"

    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(Item, buffer)
    assert not marker.exists()
    plain = io.BytesIO()
    torch.save({"scale": torch.ones(2)}, plain)
    plain.seek(0)
    planner.load_bytes(Item, plain)
    assert torch.equal(planner.state_dict["layer._extra_state"]["scale"], torch.ones(2))


# ------------------------------------------------------------------------------------------ configs


def test_a_python_yaml_tag_is_refused_in_a_file_and_in_an_override(models, tmp_path, capsys):
    marker = tmp_path / "exploited"
    config = tmp_path / "job.yaml"
    config.write_text(f'student: !!python/object/apply:os.system ["touch {marker}"]\n')
    tag = "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"
    capsys.readouterr()
    assert run_main(["distill", str(config)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"nemo-minitron distill: error: {config}: not valid YAML ({tag})"]
    override = f'student=!!python/object/apply:os.system ["touch {marker}"]'
    assert run_main(distill_args(models, tmp_path / "out")[:1] + [override]
                    + distill_args(models, tmp_path / "out")[2:]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"nemo-minitron distill: error: bad override: {tag}"]
    assert not marker.exists() and not (tmp_path / "out").exists()


def _strict_models(cls, seen: set) -> None:
    """Every pydantic model reachable from ``cls`` (field types, nested generics) into ``seen``."""
    from typing import get_args

    from pydantic import BaseModel

    if cls in seen:
        return
    seen.add(cls)
    for field in cls.model_fields.values():
        stack = [field.annotation]
        while stack:
            t = stack.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                _strict_models(t, seen)
            stack.extend(get_args(t))


def test_no_config_names_code_to_instantiate():
    """Every section of every stage's config forbids unknown keys and has no field that takes a class, a
    function or an import path: a ``_target_`` (Hydra's instantiation key) can only be an unknown key."""
    import collections.abc
    import typing
    from typing import get_args, get_origin

    from pydantic import ImportString

    from nemo_minitron.launch.slurm import ClusterConfig
    from nemo_minitron.stages import STAGES

    seen: set = set()
    for stage in STAGES.values():
        _strict_models(stage.config_class(), seen)
    _strict_models(ClusterConfig, seen)
    assert len(seen) > 15
    for cls in seen:
        assert cls.model_config.get("extra") == "forbid", cls
        for name, field in cls.model_fields.items():
            stack = [field.annotation]
            while stack:
                t = stack.pop()
                code_like = (type, typing.Callable, collections.abc.Callable)
                assert t not in code_like and get_origin(t) not in code_like, f"{cls.__name__}.{name}"
                assert "ImportString" not in repr(t) and t is not ImportString, f"{cls.__name__}.{name}"
                stack.extend(get_args(t))


LAUNCH = ["launch", "slurm", str(ROOT / "conf/prune/smollm2_width_55.yaml"),
          f"cluster={ROOT / 'conf/cluster/local_cpu.yaml'}", "dry_run=true"]
DISTILL = ["distill", str(ROOT / "conf/distill/smollm2_width_55.yaml")]
PRUNE = ["prune", str(ROOT / "conf/prune/smollm2_width_55.yaml")]


@pytest.mark.parametrize(
    "args, message",
    [
        (DISTILL + ["_target_=os.system"],
         "_target_: unknown key (configs never name a class or function to instantiate)"),
        (PRUNE + ["target._target_=builtins.exec"], "target._target_: unknown key (configs never name"),
        (LAUNCH + ["cluster._target_=subprocess.run"], "cluster: _target_: unknown key (configs never name"),
    ],
)
def test_a_target_key_is_refused(args, message, capsys):
    assert run_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


# ------------------------------------------------------------------------------------------ paths


@pytest.mark.parametrize(
    "args, message",
    [
        # The one config value that becomes a name inside a folder: <cluster.output_dir>/<job_name>-<time>.
        (LAUNCH + ["cluster.job_name=../../escaped"], "cluster: job_name: String should match pattern"),
        # Checkpoints, logs and the final model have fixed names under `output`; no key moves them.
        (DISTILL + ["checkpoint.dir=../../escaped"], "checkpoint.dir: unknown key"),
        (DISTILL + ["log.dir=../../escaped"], "log.dir: unknown key"),
    ],
)
def test_no_config_writes_outside_its_run_directory(args, message, tmp_path, monkeypatch, capsys):
    here = tmp_path / "a" / "b"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    assert run_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert [str(p.relative_to(tmp_path)) for p in sorted(tmp_path.rglob("*"))] == ["a", "a/b"]
