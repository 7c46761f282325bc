"""The research commands built on the training layer, each a config schema, a runner and
its results: `implicit-kit tune` (weight decay by hypergradients against a vmapped grid),
`implicit-kit stn` (Self-Tuning Networks against a grid and hypergradients) and
`implicit-kit forecast` (Neural ODE forecasting of Lorenz-63). Imported explicitly:
`import implicit_kit.experiments`."""

from ._config import (
    check_stn_config as check_stn_config,
    check_tune_config as check_tune_config,
    HyperConfig as HyperConfig,
    MLPConfig as MLPConfig,
    StnConfig as StnConfig,
    StnSettings as StnSettings,
    TuneConfig as TuneConfig,
)
from ._forecast import (
    check_forecast_config as check_forecast_config,
    ForecastConfig as ForecastConfig,
    ForecastSettings as ForecastSettings,
    run_forecast as run_forecast,
)
from ._stn import run_stn as run_stn
from ._tune import run_tune as run_tune
