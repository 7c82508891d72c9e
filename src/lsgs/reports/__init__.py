"""Presentation: tables, figures and the run report.

- :mod:`lsgs.reports.tables`, :mod:`lsgs.reports.figures`: pure formatting and drawing (no run folder); any layer
  above the foundation may use them (the stages log image grids, the harness writes its tables and panels).
- :mod:`lsgs.reports.summary`, :mod:`lsgs.reports.html`: the report of a run folder (``summary.{md,csv}``,
  ``report.html``), built from what the method registry finds in it.

This ``__init__`` imports nothing, so importing the pure modules never loads the run report.
"""
