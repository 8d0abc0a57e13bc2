"""NAS wall time with and without a teacher logit cache (``distill.teacher_cache: auto``), side by side.

The code is :mod:`nemo_minitron.bench.scripts.nas_cache` (which ships inside the package); ``--help`` shows its
arguments.
"""

from nemo_minitron.bench.scripts.nas_cache import main

if __name__ == "__main__":
    main()
