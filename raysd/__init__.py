"""raysd: hyperparameter studies of self-distillation for further pre-training, on Ray."""

__version__ = "0.1.0"
