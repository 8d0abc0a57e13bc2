"""Launchers: run a stage on a cluster.

:mod:`nemo_minitron.launch.slurm` renders and submits an sbatch script (``nemo-minitron launch slurm``).
:mod:`nemo_minitron.launch.nemo_run` registers the stages with NeMo-Run; it needs the optional ``nemo-run``
extra, so nothing else imports it.
"""
