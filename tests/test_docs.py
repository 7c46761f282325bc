"""Documentation: every public name has a docstring, the README's examples run and say
what they claim, and the README's benchmark summary is the one in RESULTS.md."""

import importlib
import inspect
import pathlib
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicit_kit.experiments  # noqa: F401
import implicit_kit.train  # noqa: F401


ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = ["implicit_kit", "implicit_kit.solvers", "implicit_kit.models", "implicit_kit.nn",
           "implicit_kit.homotopy", "implicit_kit.regularizers", "implicit_kit.data",
           "implicit_kit.hyper", "implicit_kit.train", "implicit_kit.experiments"]


def _public(module_name):
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None) or [n for n in dir(module)
                                                 if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name)
        if not inspect.ismodule(obj) and (inspect.isclass(obj) or callable(obj)):
            yield f"{module_name}.{name}", obj


def _undocumented(obj):
    """The public names of `obj` (itself and, for a class, its own public methods)
    without a real docstring. A dataclass's generated `Name(field, ...)` doesn't count."""
    out = []
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else inspect.getdoc(obj)
    if not doc or len(doc.strip()) < 20 or (inspect.isclass(obj)
                                            and doc.startswith(obj.__name__ + "(")):
        out.append("")
    if inspect.isclass(obj):
        for attr, value in obj.__dict__.items():
            fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if (not attr.startswith("_") and inspect.isfunction(fn)
                    and len((inspect.getdoc(getattr(obj, attr)) or "").strip()) < 10):
                out.append("." + attr)  # inherited docs (e.g. optimistix's `step`) count
    return out


def test_every_public_name_has_a_docstring():
    missing = [name + m for module in MODULES for name, obj in _public(module)
               for m in _undocumented(obj)]
    assert not missing, f"public names without a docstring: {missing}"


def test_the_docstring_check_can_fail():
    class Bare:
        def method(self):
            pass

    import dataclasses

    @dataclasses.dataclass
    class Data:
        x: int

    assert _undocumented(Bare) == ["", ".method"]
    assert _undocumented(Data) == [""]


def _python_blocks(text):
    """The Python code blocks of `text`, dedented (a block inside a list item is
    indented with it)."""
    return [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)]


def test_readme_examples_run_and_hold():
    """The Python blocks of the README (its one 20-line example) and of the user guide
    (docs/guide.md), run in order in one namespace, then checked against what they
    claim."""
    readme = _python_blocks((ROOT / "README.md").read_text())
    guide = _python_blocks((ROOT / "docs" / "guide.md").read_text())
    assert len(readme) == 1 and len(readme[0].strip().splitlines()) <= 25
    assert len(guide) >= 2
    ns = {}
    for name, block in [("README.md", readme[0])] + [("docs/guide.md", b) for b in guide]:
        exec(compile(block, name, "exec"), ns)
    f, x, sol = ns["f"], ns["x"], ns["sol"]
    # the solve is a fixed point, to its tolerance
    assert float(jnp.linalg.norm(f(sol.value, x) - sol.value)) < 1e-5
    assert ns["ik"].RESULTS[sol.result] == "The solve succeeded."
    # the implicit gradient equals central finite differences of the solve
    loss = ns["loss_of_x"]
    g = jax.grad(loss)(x)
    eps = 1e-3
    fd = np.array([(loss(x.at[i].add(eps)) - loss(x.at[i].add(-eps))) / (2 * eps)
                   for i in range(3)])
    np.testing.assert_allclose(g, fd, rtol=2e-3, atol=1e-4)
    # per-sample steps under vmap: larger inputs need more steps
    steps = np.asarray(ns["sols"].stats["num_steps"])
    assert steps.shape == (8,) and steps[0] < steps[-1]
    stats = ns["ik"].backward_stats(ns["probe_grad"])
    assert int(stats.num_failed) == 0 and int(stats.num_steps) > 0
    # the lasso: two non-zero weights, and on them dw/dλ = −n (X_SᵀX_S)⁻¹ sign(w_S)
    w, dw, X = (np.asarray(ns[k]) for k in ("w", "dw_dlam", "X"))
    support = np.abs(w) > 1e-6
    assert support.tolist() == [True, True] + [False] * 6
    xs = X[:, support]
    want = -X.shape[0] * np.linalg.solve(xs.T @ xs, np.sign(w[support]))
    np.testing.assert_allclose(dw[support], want, rtol=1e-3)
    np.testing.assert_allclose(dw[~support], 0.0, atol=1e-6)
    # the QP: the bounds inactive, x solves [[Q, 1], [1^T, 0]] (x, nu) = (-c, 1), which
    # is (1/4, 3/4); dx1/dc is the first row of -Z (Z^T Q Z)^-1 Z^T, Z = (1, -1)/sqrt 2
    np.testing.assert_allclose(ns["x_qp"], [0.25, 0.75], atol=1e-6)
    np.testing.assert_allclose(ns["dx1_dc"], [-0.5, 0.5], atol=1e-6)
    # evaluated with other solver settings: the learned start kept, the new tolerance met
    assert ns["deq_eval"].z0 is ns["deq"].z0 and ns["deq_eval"].max_steps == 300
    assert int(ns["st_eval"].num_steps) > int(ns["st"].num_steps)
    assert float(ns["st_eval"].residual) < 1e-7 < float(ns["st"].residual)
    # every layer of the cell normalised: a contraction in z, solved
    cell = ns["cell"]
    assert all(isinstance(layer, ns["ik"].nn.SpectralNorm) for layer in cell.mlp.layers)
    assert ns["st_normed"].result == ns["ik"].RESULTS.successful
    # the best iterate, with its own residual
    best = ns["best"]
    np.testing.assert_allclose(float(best.stats["residual"]), float(jnp.linalg.norm(
        f(best.value, x) - best.value)), rtol=1e-5)
    # a tuple state: both resolutions returned
    assert ns["z_high"].shape == (4, 4, 4) and ns["z_low"].shape == (8, 2, 2)
    # the trajectory fit recovers the field that made the data
    assert float(ns["fit_loss"]) < 1e-4
    np.testing.assert_allclose(ns["node"].field.vector_field.a, ns["a_true"], atol=2e-2)


def _summary(text):
    begin = text.index("<!-- results-summary: begin")
    return text[begin:text.index("<!-- results-summary: end -->")]


def test_readme_benchmark_summary_matches_results_md():
    readme = (ROOT / "README.md").read_text()
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    summary = _summary(readme)
    assert _summary(results) == summary, "run `python benchmarks/report.py --render`"
    assert re.search(r"\d+\.\d+× faster", summary)  # it holds measured ratios


def test_results_md_is_rendered_from_the_stored_results():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "benchmarks/report.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", ["README.md", "benchmarks/RESULTS.md", "docs/guide.md",
                                  "docs/cli.md", "docs/design.md", "docs/extending.md"])
def test_no_placeholder_text(name):
    text = (ROOT / name).read_text()
    assert not re.search(r"\bTODO\b|\bTBD\b|XXX", text)


def test_ci_runs_the_readme_test_command_and_the_fast_tier_is_documented():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    quick = readme[readme.index("## Quick start"):readme.index("## A first example")]
    test_line = [line for line in quick.splitlines() if "pytest" in line]
    assert len(test_line) == 1 and test_line[0].endswith(ci), (test_line, ci)
    assert "-m \"not slow\"" not in ci  # CI runs both tiers
    assert 'python -m pytest -m "not slow"' in readme  # the development command


def test_the_documentation_site_builds_with_warnings_as_errors(tmp_path):
    """mkdocs + mkdocstrings, strict: a broken cross-reference (`[name][]` in a
    docstring), a missing page or a dead link fails the build. Every public name of the
    top level and of each subpackage gets an anchor in the API reference."""
    import subprocess
    import sys

    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d",
                          str(site)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    html = "".join(p.read_text() for p in (site / "api").glob("*/index.html"))
    import types

    import implicit_kit as ik

    missing = []
    for mod in [ik] + [getattr(ik, m) for m in ("homotopy", "hyper", "models", "nn",
                                                 "optimality", "regularizers", "solvers",
                                                 "data", "qp", "projection", "objective")]:
        for name in getattr(mod, "__all__", dir(mod)):
            obj = getattr(mod, name)
            if name.startswith("_") or isinstance(obj, types.ModuleType):
                continue
            mod_name = mod.__name__
            # re-exported at the top level, documented on their subpackage's page
            for sub in (ik.homotopy, ik.solvers):
                if mod is ik and getattr(sub, name, None) is obj:
                    mod_name = sub.__name__
            if f'id="{mod_name}.{name}"' not in html:
                missing.append(f"{mod_name}.{name}")
    assert not missing, f"public names without an API entry: {missing}"
    for page in ("design", "extending", "notebooks/01_equilibrium_and_implicit_gradients"):
        assert (site / page / "index.html").exists(), page
