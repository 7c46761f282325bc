"""Training: the typed config, `fit` (jit-compiled steps, metrics, atomic checkpoints,
exact resume, plots, data parallelism), and the `implicit-kit` CLI."""

from ._build import build_model as build_model, count_params as count_params
from ._checkpoint import (
    CheckpointError as CheckpointError,
    list_checkpoints as list_checkpoints,
    load_checkpoint as load_checkpoint,
    read_header as read_header,
    save_checkpoint as save_checkpoint,
)
from ._cli import config_dir as config_dir
from ._config import (
    check_config as check_config,
    check_stn_config as check_stn_config,
    check_tune_config as check_tune_config,
    Config as Config,
    config_from_dict as config_from_dict,
    ConfigError as ConfigError,
    DataConfig as DataConfig,
    HyperConfig as HyperConfig,
    load_config as load_config,
    MLPConfig as MLPConfig,
    ModelConfig as ModelConfig,
    OptimConfig as OptimConfig,
    RegularizerConfig as RegularizerConfig,
    StnConfig as StnConfig,
    StnSettings as StnSettings,
    TrainConfig as TrainConfig,
    TuneConfig as TuneConfig,
)
from ._data import load_data as load_data
from ._forecast import (
    check_forecast_config as check_forecast_config,
    ForecastConfig as ForecastConfig,
    ForecastSettings as ForecastSettings,
    run_forecast as run_forecast,
)
from ._loop import (
    evaluate_checkpoint as evaluate_checkpoint,
    fit as fit,
    FitResult as FitResult,
    TrainingError as TrainingError,
)
from ._report import plot_history as plot_history
from ._rundir import RunDirError as RunDirError, TrainingInterrupted as TrainingInterrupted
from ._self_tuning import run_stn as run_stn
from ._tuning import run_tune as run_tune
