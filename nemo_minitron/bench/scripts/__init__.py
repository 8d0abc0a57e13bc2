"""The scripts the ``bench`` stage runs, each in its own process (``python -m nemo_minitron.bench.scripts.<name>``).

They ship in the package so that the bench runs from an installed wheel; ``benchmarks/<name>.py`` in a source
checkout launches the same ``main()`` with the same arguments.
"""
