"""Fleet tuning: many hosts of one hardware group search one shared Optuna study on PostgreSQL.

* :mod:`tuner.fleet.group`   which hosts may share a study (the group fingerprint) and its name;
* :mod:`tuner.fleet.session` the checks every fleet command runs before it touches a study;
* :mod:`tuner.fleet.worker`  one host's search worker (search only, trial-count limit, identity);
* :mod:`tuner.fleet.finish`  proving the group's winner on one host and writing the result file;
* :mod:`tuner.fleet.status`  per-group progress, best so far and ETA, computed from the trials.

The store itself (:mod:`tuner.store`: schema check, clear errors, the creation lock) is not here: it opens the
single-host SQLite store as well.

This package's ``__init__`` imports nothing: the command line reads the defaults below without loading Optuna.
"""

STORAGE_ENV = "LLAMAHOST_STORAGE"
# Seconds of sampling per trial at most, the same on every worker and in `fleet finish` (a single-host
# run derives it from its budget, but workers with different budgets must still measure alike).
DEFAULT_MEASURE_CAP_S = 30.0
