"""The format of ``eos_history.csv``, shared by the monitors that write it and the report.

One row per logged ``eos/*`` value, appended and never rewritten (see
:mod:`lightning_eos.callbacks._history_file` and :mod:`lightning_eos.report`).
"""

HISTORY_FILE = "eos_history.csv"
HISTORY_COLUMNS = ("run_id", "step", "key", "value")
