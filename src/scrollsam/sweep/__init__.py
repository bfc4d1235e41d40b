"""Hyperparameter sweeps with Optuna: ``scrollsam sweep``.

:mod:`.space` reads the search space (config keys and their ranges), :mod:`.study` runs the
Optuna study (each trial an ordinary run dir, pruned on validation F0.5, resumable, shared by
many workers through one storage, :mod:`.storage`; Ctrl-C, :mod:`.stop`), :mod:`.report`
summarises it and writes the best config.
"""

from scrollsam.sweep.report import SweepResult, format_report
from scrollsam.sweep.space import Space, load_space
from scrollsam.sweep.study import make_pruner, run_sweep

__all__ = ["Space", "SweepResult", "format_report", "load_space", "make_pruner", "run_sweep"]
