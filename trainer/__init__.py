"""The projector-regularisation trainer. Knows nothing of Ray or MLflow: it takes a `report`."""

from trainer.config import TrainerConfig, load_config
from trainer.loop import TrainResult, train
from trainer.sources import SourceError

__all__ = ["SourceError", "TrainResult", "TrainerConfig", "load_config", "train"]
