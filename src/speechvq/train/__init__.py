"""Pretraining: config, optimizer and schedules, checkpoints, metrics, diagnostics, the loop."""

from speechvq.train.config import PretrainConfig, load_config
from speechvq.train.loop import NonFiniteError, RunSummary, pretrain
