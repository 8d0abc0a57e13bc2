"""Distillation step throughput: nemo_minitron's trainer vs a plain Hugging Face transformers KD loop.

The code is :mod:`nemo_minitron.bench.scripts.kd_throughput` (which ``nemo-minitron bench`` runs from an installed
package too); ``--help`` shows its arguments.
"""

from nemo_minitron.bench.scripts.kd_throughput import main

if __name__ == "__main__":
    main()
