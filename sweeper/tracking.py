"""Old import paths, for Tune experiment states pickled before the split (resume reads them).

The code lives in ``sweeper.callbacks`` (MlflowTrialLogger), ``sweeper.mlflow_writer``
(RunWriter), ``sweeper.mlflow_runs`` (MlflowRun, SweepParentRun) and ``sweeper.mlflow_retry``.
"""

from sweeper.callbacks import MlflowTrialLogger
from sweeper.mlflow_runs import MlflowRun, SweepParentRun
from sweeper.mlflow_writer import RunWriter

__all__ = ["MlflowRun", "MlflowTrialLogger", "RunWriter", "SweepParentRun"]
