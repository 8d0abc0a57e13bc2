"""prepare-data tokens/s at 1 and 2 tokenizing workers on the embedded corpus, side by side in one run.

The code is :mod:`nemo_minitron.bench.scripts.prepare_speed` (which runs from an installed package too);
``--help`` shows its arguments.
"""

from nemo_minitron.bench.scripts.prepare_speed import main

if __name__ == "__main__":
    main()
