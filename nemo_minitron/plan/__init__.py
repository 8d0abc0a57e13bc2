"""``nemo-minitron plan``: per-GPU memory, speed, wall time and checkpoint sizes of a job before it is submitted.

:mod:`~nemo_minitron.plan.memory` holds the arithmetic (what megatron-core allocates per rank, what a training
step keeps for backward), :mod:`~nemo_minitron.plan.stage` turns a job config into per-stage plans and renders
them, :mod:`~nemo_minitron.plan.gpus` knows GPU memory and peak FLOP/s. Nothing here reads weights or imports
megatron-core.
"""
