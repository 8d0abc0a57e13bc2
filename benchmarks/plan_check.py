"""The memory plan (``nemo-minitron plan``) against measured per-rank bytes for several DP x TP x PP layouts on CPU.

The code is :mod:`nemo_minitron.bench.scripts.plan_check`; ``--help`` shows its arguments.
"""

from nemo_minitron.bench.scripts.plan_check import main

if __name__ == "__main__":
    main()
