"""Peak memory of a training step's forward and backward with ``train.recompute`` none, selective and full.

The code is :mod:`nemo_minitron.bench.scripts.recompute_memory`; ``--help`` shows its arguments.
"""

from nemo_minitron.bench.scripts.recompute_memory import main

if __name__ == "__main__":
    main()
