"""Training: configs, optimizer and schedules, checkpoints, metrics, diagnostics, tasks, the loop."""

from speechvq.train.config import PretrainConfig, load_config
from speechvq.train.loop import NonFiniteError, RunSummary, pretrain
