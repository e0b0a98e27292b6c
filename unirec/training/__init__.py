"""Training: the loop (AdamW, warm-up + cosine, clipping, early stopping), checkpoints and run folders."""
from .checkpoint import load_model, load_training_state, save_model, save_training_state
from .progress import Progress
from .run import default_run_dir, evaluate_run_model, load_data, plot_history, train_run
from .trainer import TrainConfig, Trainer, lr_at, make_optimizer

__all__ = ["load_model", "load_training_state", "save_model", "save_training_state", "Progress", "default_run_dir",
           "evaluate_run_model", "load_data", "plot_history", "train_run", "TrainConfig", "Trainer", "lr_at",
           "make_optimizer"]
