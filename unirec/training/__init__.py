"""Training: the loop (AdamW, warm-up + cosine, clipping, early stopping), a run end to end, and the
hyper-parameter search."""
from ..runs import TrainConfig
from .progress import Progress
from .run import PROTOCOL, plot_history, train_run
from .trainer import Trainer, lr_at, make_optimizer

__all__ = ["Progress", "PROTOCOL", "plot_history", "train_run", "TrainConfig", "Trainer", "lr_at", "make_optimizer"]
