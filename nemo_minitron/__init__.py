"""nemo_minitron: Minitron structured pruning and knowledge distillation on megatron-core."""

# The one place the version is written: setup.py reads this line without importing the package.
__version__ = "0.1.0"
