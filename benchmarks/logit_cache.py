"""Distillation from a teacher logit cache vs online: tokens/s, held-out loss after the same KD budget (k = 16,
64, 256), and the cache's size on disk.

The code is :mod:`nemo_minitron.bench.scripts.logit_cache` (which ships inside the package); ``--help`` shows its
arguments.
"""

from nemo_minitron.bench.scripts.logit_cache import main

if __name__ == "__main__":
    main()
