"""NVIDIA ModelOpt's Minitron pruning (mode ``mcore_minitron``) next to ours, on the same teacher and batches.

The code is :mod:`nemo_minitron.bench.scripts.modelopt_peer` (which ``nemo-minitron bench`` runs from an installed
package too); ``--help`` shows its arguments.
"""

from nemo_minitron.bench.scripts.modelopt_peer import main

if __name__ == "__main__":
    main()
