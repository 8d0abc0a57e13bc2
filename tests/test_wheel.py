"""The built wheel, installed into a fresh virtual environment, runs from outside the source tree.

The new environment gets the wheel alone (``--no-deps``); a ``.pth`` line lends it the dependencies of the
environment running the tests, so that nothing is downloaded or reinstalled. A directory named in a ``.pth`` is
only put on ``sys.path``: the ``.pth`` files inside it, among them the editable install's finder that maps
``nemo_minitron`` to this checkout, do not run there, and the wheel's copy, earlier on ``sys.path``, is the one
imported. Every command runs in a working directory outside the checkout; the probe checks where its imports
came from.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

from nemo_minitron import __version__, embedded

ROOT = Path(__file__).resolve().parents[1]

# Imports every script the bench runs and runs one through the bench's own runner, then says where the
# package, its version and its installed metadata came from.
PROBE = textwrap.dedent("""
    import importlib, importlib.metadata, json, sys
    from pathlib import Path
    import nemo_minitron
    from nemo_minitron.bench.run import SCRIPTS, SPEED_SCRIPTS, _script
    files = [importlib.import_module(f"{SCRIPTS}.{name}").__file__ for name in (*SPEED_SCRIPTS, "modelopt_peer")]
    kl = _script("kl_memory", ["--tokens", "64", "--vocab", "512", "--hidden", "32", "--chunk-tokens", "16"],
                 Path("kl_memory.json"))
    print(json.dumps({"files": [nemo_minitron.__file__, *files], "version": nemo_minitron.__version__,
                      "metadata": importlib.metadata.version("nemo_minitron"), "kl": kl}))
""")


def source_tree(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked, or untracked and not ignored) copied to ``dest``.

    Not built in place: setuptools leaves build/ behind, and its build/lib keeps modules deleted since,
    which the next wheel would ship.
    """
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():  # a path deleted but not yet committed is still listed
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def fresh_venv(root: Path, wheel: Path) -> Path:
    """A virtual environment holding ``wheel`` and seeing this environment's packages; its bin/ directory."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    # Installed by this environment's pip, before the .pth below exists: the new one would otherwise see the
    # editable nemo_minitron of this environment as already installed.
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(python), "install",
                    "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "dependencies.pth").write_text("".join(f"{path}\n" for path in ours))
    return root / "bin"


def test_installed_metadata_version_is_the_package_version():
    import importlib.metadata

    assert importlib.metadata.version("nemo_minitron") == __version__


def test_wheel_runs_outside_the_source_tree(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", "-w", str(dist), str(source_tree(tmp_path / "src"))],
                   check=True)
    (wheel,) = dist.glob("nemo_minitron-*.whl")
    assert wheel.name.startswith(f"nemo_minitron-{__version__}-")
    venv = tmp_path / "venv"
    bin_dir = fresh_venv(venv, wheel)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}

    def run(*cmd: str | Path) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(c) for c in cmd], cwd=work, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    probe = json.loads(run(bin_dir / "python", "-c", PROBE).stdout.strip().splitlines()[-1])
    assert all(Path(f).is_relative_to(venv) for f in probe["files"]), probe["files"]
    assert probe["version"] == probe["metadata"] == __version__
    assert probe["kl"]["tokens"] == 64 and probe["kl"]["relative_loss_difference"] < 1e-5

    assert "prepare-data" in run(bin_dir / "nemo-minitron", "--help").stdout
    with (work / "corpus.jsonl").open("w") as f:
        for i in range(8):
            f.write(json.dumps({"text": f"Document {i}. " + "The quick brown fox. " * 16}) + "\n")
    run(bin_dir / "nemo-minitron", "prepare-data", "input=corpus.jsonl", f"tokenizer={embedded.teacher_dir()}",
        "output_dir=data", "valid_fraction=0.25")
    meta = json.loads((work / "data" / "meta.json").read_text())
    assert meta["num_train_documents"] + meta["num_valid_documents"] == 8
    assert meta["num_train_tokens"] > 0 and meta["num_valid_tokens"] > 0
