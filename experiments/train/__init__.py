"""Training: one model per plan (``trainer``), resumable from checkpoints (``checkpoints``),
data-parallel under torchrun (``distributed``)."""

from experiments.train.checkpoints import STATUS_FILE, ModelDir, read_status, write_status
from experiments.train.distributed import DistInfo, init_distributed, resolve_device
from experiments.train.trainer import (
    TrainingFailed,
    TrainPlan,
    TrainResult,
    autocast_for,
    lr_factor,
    train_model,
)

__all__ = ["STATUS_FILE", "DistInfo", "ModelDir", "TrainingFailed", "TrainPlan", "TrainResult",
           "autocast_for", "init_distributed", "lr_factor", "read_status", "resolve_device",
           "train_model", "write_status"]
