"""Training: configs, optimizer and schedules, checkpoints, metrics, diagnostics, tasks, the loop."""

from speechvq.train.config import PretrainConfig, load_config
from speechvq.train.loop import NonFiniteError, RunSummary
from speechvq.train.tasks.pretrain import pretrain
