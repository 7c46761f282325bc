"""Lorenz-63 forecasting: the data against its equations, the valid prediction time
against its definition, and `implicit-kit forecast` end to end."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import implicit_kit as ik
from implicit_kit.data import lorenz63, lorenz63_field, valid_prediction_time


def test_lorenz_trajectories_solve_the_lorenz_equations_on_the_attractor():
    """Central differences of the saved states equal the field (to the O(dt²) of the
    difference), and a long trajectory has the attractor's mean height (z ≈ 23.5)."""
    ts, ys = lorenz63(2, 3000, 0.005, seed=3)
    assert ys.shape == (2, 3000, 3) and ts[1] == pytest.approx(0.005)
    y = ys[0].astype(np.float64)
    deriv = (y[2:] - y[:-2]) / (2 * 0.005)
    field = np.stack([np.asarray(lorenz63_field(0.0, jnp.asarray(v), (10.0, 28.0, 8 / 3)))
                      for v in y[1:-1:50]])
    scale = np.abs(deriv[::50]).mean()
    np.testing.assert_allclose(deriv[::50], field, atol=0.02 * scale)
    assert abs(float(ys[:, :, 2].mean()) - 23.5) < 2.0
    assert not np.allclose(ys[0], ys[1])  # different starts


def test_valid_prediction_time_is_the_first_crossing_in_lyapunov_times():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(100, 3))
    scale = np.array([1.0, 2.0, 0.5])
    lam = ik.data.LORENZ63_LYAPUNOV
    assert valid_prediction_time(truth, truth, scale, 0.01) == pytest.approx(lam * 1.0)
    assert valid_prediction_time(truth + 0.6 * scale, truth, scale, 0.01) == 0.0
    pred = truth.copy()
    pred[37:] += 0.51 * scale  # NRMSE 0.51 > 0.5 from step 37
    assert valid_prediction_time(pred, truth, scale, 0.01) == pytest.approx(lam * 0.37)
    pred[20] = np.nan  # a forecast that blew up has crossed
    assert valid_prediction_time(pred, truth, scale, 0.01) == pytest.approx(lam * 0.20)
    with pytest.raises(ValueError, match="same \\(length, dim\\) shape"):
        valid_prediction_time(pred[:5], truth, scale, 0.01)


@pytest.mark.slow
def test_forecast_cli_beats_persistence_and_writes_its_results(tmp_path, capsys):
    """A small run through the CLI: the Neural ODE forecasts longer than persistence,
    the results and the figure are written, and a bad setting is named."""
    from implicit_kit._cli import main

    out = tmp_path / "fc"
    rc = main(["forecast", "configs/lorenz63_forecast.yaml", "forecast.seeds=1",
               "forecast.steps=200", "forecast.train_trajectories=2",
               "forecast.train_length=400", "forecast.test_trajectories=4",
               "forecast.horizon=200", f"forecast.out_dir={out}"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    s = res["summary"]
    assert s["neural_ode"]["mean"] > s["persistence"]["mean"] + 0.1, s
    assert res["seeds"][0]["node_forecast_failures"] == 0
    assert (out / "forecast.png").stat().st_size > 1000
    assert main(["forecast", "configs/lorenz63_forecast.yaml", "forecast.window=1"]) == 2
    assert "forecast.window must be in [2, train_length)" in capsys.readouterr().err


@pytest.mark.slow
def test_the_rnode_regularisers_shrink_the_field_s_kinetic_energy(tmp_path):
    """`forecast.kinetic` and `forecast.jacobian` train through the RNODE augmented field:
    with large weights the learned field moves the state less (its kinetic energy over
    the training states is lower than without them, from the same seed and batches)."""
    from implicit_kit.experiments import ForecastConfig, run_forecast
    from implicit_kit.train import load_config

    small = ["forecast.seeds=1", "forecast.steps=150", "forecast.train_trajectories=2",
             "forecast.train_length=300", "forecast.test_trajectories=2",
             "forecast.horizon=50"]
    energy = {}
    for name, extra in (("plain", []), ("rnode", ["forecast.kinetic=5.0",
                                                  "forecast.jacobian=5.0"])):
        cfg = load_config("configs/lorenz63_forecast.yaml",
                          small + extra + [f"forecast.out_dir={tmp_path / name}"],
                          schema=ForecastConfig)
        energy[name] = run_forecast(cfg, log=lambda *a: None)["seeds"][0]["field_kinetic"]
    assert energy["rnode"] < 0.7 * energy["plain"], energy
