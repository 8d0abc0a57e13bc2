"""Importance-estimation time vs plain forward passes over the same calibration batches, in one run.

The code is :mod:`nemo_minitron.bench.scripts.importance_overhead` (which ``nemo-minitron bench`` runs from an installed
package too); ``--help`` shows its arguments.
"""

from nemo_minitron.bench.scripts.importance_overhead import main

if __name__ == "__main__":
    main()
