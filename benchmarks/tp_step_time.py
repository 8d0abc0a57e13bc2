"""Distillation step time at TP=2 against TP=1 on this CPU, from one run.

The code is :mod:`nemo_minitron.bench.scripts.tp_step_time` (which ``nemo-minitron bench`` runs from an installed
package too); ``--help`` shows its arguments.
"""

from nemo_minitron.bench.scripts.tp_step_time import main

if __name__ == "__main__":
    main()
