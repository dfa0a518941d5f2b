"""Training: one model per plan, resumable from checkpoints, data-parallel under torchrun."""

from experiments.train.trainer import (
    STATUS_FILE,
    DistInfo,
    TrainingFailed,
    TrainPlan,
    TrainResult,
    autocast_for,
    init_distributed,
    lr_factor,
    read_status,
    resolve_device,
    train_model,
    write_status,
)

__all__ = ["STATUS_FILE", "DistInfo", "TrainingFailed", "TrainPlan", "TrainResult", "autocast_for",
           "init_distributed", "lr_factor", "read_status", "resolve_device", "train_model",
           "write_status"]
