"""The notebooks in notebooks/ execute top to bottom without error, their cells asserting
what their text claims (markers `notebooks` and `slow`: the whole suite runs them, the
fast tier does not), and the committed copies carry outputs."""

import pathlib

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_equilibrium_and_implicit_gradients", "02_homotopy_and_homoode",
            "03_hyperparameters", "04_training_a_deq_from_a_config", "05_monotone_dbm",
            "06_neural_ode_time_series"]

pytestmark = [pytest.mark.notebooks, pytest.mark.slow]


def test_the_six_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path):
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    # committed executed, with outputs (the reader sees results without running it)
    assert code and all(c.execution_count is not None for c in code), f"{path.name}: run it"
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError with the cell and traceback on failure
    assert all(c.execution_count is not None for c in nb.cells if c.cell_type == "code")
