"""The distillation trainer on megatron-core's engine at 8 CPU ranks (DP2 x TP2 x PP2, sequence parallel).

The code is :mod:`nemo_minitron.bench.scripts.scale_check`; ``--help`` shows its arguments.
"""

from nemo_minitron.bench.scripts.scale_check import main

if __name__ == "__main__":
    main()
