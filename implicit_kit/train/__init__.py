"""Training: the typed config, `fit` (jit-compiled steps, metrics, atomic checkpoints,
exact resume, plots, data parallelism); the `implicit-kit` command line drives it (and
the research commands of `implicit_kit.experiments`)."""

from ._build import build_model as build_model, count_params as count_params
from ._checkpoint import (
    CheckpointError as CheckpointError,
    list_checkpoints as list_checkpoints,
    load_checkpoint as load_checkpoint,
    read_header as read_header,
    save_checkpoint as save_checkpoint,
)
from ._config import (
    check_config as check_config,
    Config as Config,
    config_dir as config_dir,
    config_from_dict as config_from_dict,
    ConfigError as ConfigError,
    DataConfig as DataConfig,
    load_config as load_config,
    OptimConfig as OptimConfig,
    RegularizerConfig as RegularizerConfig,
    TrainConfig as TrainConfig,
)
from ._data import load_data as load_data
from ._loop import (
    evaluate_checkpoint as evaluate_checkpoint,
    fit as fit,
    FitResult as FitResult,
    TrainingError as TrainingError,
)
from ._models import (
    AugmentedNeuralODEConfig as AugmentedNeuralODEConfig,
    ClassifierConfig as ClassifierConfig,
    DEQConfig as DEQConfig,
    HomoODEConfig as HomoODEConfig,
    ModelConfig as ModelConfig,
    MonotoneDBMConfig as MonotoneDBMConfig,
    MonotoneDEQConfig as MonotoneDEQConfig,
    NeuralODEConfig as NeuralODEConfig,
)
from ._report import plot_history as plot_history
from ._rundir import RunDirError as RunDirError, TrainingInterrupted as TrainingInterrupted
