"""nemo_minitron: Minitron structured pruning and knowledge distillation on megatron-core."""

import ast
from pathlib import Path

from setuptools import find_packages, setup


def read_version() -> str:
    """``__version__`` of nemo_minitron/__init__.py, parsed, not imported: a build must not run the package's
    code (nor need whatever it may import one day)."""
    tree = ast.parse((Path(__file__).parent / "nemo_minitron" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__version__"]:
            return ast.literal_eval(node.value)
    raise RuntimeError("nemo_minitron/__init__.py sets no __version__")


setup(
    name="nemo_minitron",
    version=read_version(),
    description="Minitron pruning + knowledge distillation of Llama-family LLMs on megatron-core",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["nemo_minitron", "nemo_minitron.*"]),
    package_data={"nemo_minitron.chat": ["prompts/*.jsonl"]},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16,<0.20",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "gguf>=0.10",
        "safetensors>=0.4",
        "huggingface_hub>=0.34",
        "omegaconf>=2.3",
        "pydantic>=2.6,<3",
        "pyyaml>=6",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "matplotlib>=3.8",
        "numpy>=1.26",
    ],
    extras_require={
        # Transformer Engine builds against CUDA: install it on GPU machines (NGC containers ship it).
        "gpu": ["transformer_engine[pytorch]>=2.0"],
        "test": ["pytest>=8"],
        # NeMo-Run's `nemo` CLI and executors (the entry points below). Not in the pinned CPU set, which it cannot
        # share: its torchx needs urllib3<1.27 and its leptonai anyio<=4.9 (huggingface_hub's httpx2: >=4.10).
        # nemo-run 0.11.1 imports leptonai.api.v1, which leptonai 0.47 removed.
        "nemo-run": ["nemo-run>=0.11", "leptonai<0.47"],
    },
    entry_points={
        "console_scripts": ["nemo-minitron=nemo_minitron.cli:main"],
        # `nemo minitron prune|distill|eval config=RECIPE key=value ...` (nemo_minitron/launch/nemo_run.py).
        "nemo_run.cli": ["minitron=nemo_minitron.launch.nemo_run"],
    },
)
