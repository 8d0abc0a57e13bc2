"""The Minitron pipeline (``nemo-minitron run``): stages chained in one resumable run directory, NAS,
iterative schedules and the report."""
