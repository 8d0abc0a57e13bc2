"""Peak memory of FusedLogitKD (forward + backward) against a naive full-softmax KL, from one run.

The code is :mod:`nemo_minitron.bench.scripts.kl_memory` (which ``nemo-minitron bench`` runs from an installed
package too); ``--help`` shows its arguments.
"""

from nemo_minitron.bench.scripts.kl_memory import main

if __name__ == "__main__":
    main()
