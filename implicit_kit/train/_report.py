"""Reporting: the progress bar, host metrics, memory, tables and plots."""

import math
import pathlib
import sys
import time

import jax
import numpy as np


def peak_memory_mb(compiled) -> tuple[float, str]:
    dev = jax.local_devices()[0]  # (this process's: the others' are not addressable)
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20, "device peak"
    try:
        m = compiled.memory_analysis()
        total = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
                 - m.alias_size_in_bytes)
        return total / 2**20, "compiled train step"
    except Exception:  # pragma: no cover - backends without memory analysis
        return math.nan, "unavailable"


class Progress:
    """A per-step bar on an interactive stderr; one summary line per epoch always."""

    def __init__(self, enabled: bool, name: str, epochs: int, steps: int):
        self.enabled, self.name, self.epochs, self.steps = enabled, name, epochs, steps
        self.bar = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def update(self, epoch: int, i: int, loss: float | None):
        if not self.bar:
            return
        width = 24
        done = int(width * i / self.steps)
        bar = "#" * done + "." * (width - done)
        rate = i / max(time.perf_counter() - self.t0, 1e-9)
        text = f"\r{self.name} epoch {epoch}/{self.epochs} [{bar}] {i}/{self.steps}"
        if loss is not None:
            text += f" loss {loss:.4f}"
        sys.stderr.write(text + f" {rate:.1f} it/s ")
        sys.stderr.flush()

    def start(self):
        self.t0 = time.perf_counter()

    def end(self, row: dict):
        if not self.enabled:
            return
        test = f" test acc {row['test_acc']:.4f}" if "test_acc" in row else ""
        sys.stderr.write(
            f"\r{self.name} epoch {row['epoch']}/{self.epochs} loss {row['loss']:.4f} "
            f"acc {row['acc']:.4f}{test} nfe {row['nfe']:.1f} "
            f"{row['seconds']:.1f}s{' ' * 20}\n"
        )
        sys.stderr.flush()


def host_tree(tree):
    """`tree`'s arrays as numpy arrays. An array that spans several processes must be
    replicated (the metrics, the parameters): each process reads its own copy."""

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            if not a.sharding.is_fully_replicated:
                raise ValueError("host_tree: a multi-process array must be replicated.")
            return np.asarray(a.addressable_data(0))
        return np.asarray(a)

    return jax.tree_util.tree_map(one, tree)


def to_host(tree) -> dict:
    """Host floats; NaN (a residual the model does not have) becomes `None` (JSON null)."""
    out = {k: float(v) for k, v in host_tree(tree).items()}
    return {k: (None if math.isnan(v) else v) for k, v in out.items()}


def plot_history(history: list[dict], run_dir, name: str) -> list[pathlib.Path]:
    """Loss/accuracy curves and forward steps per epoch as PNG files in `run_dir`."""
    # The object-oriented API: no pyplot state and no backend switch (a notebook keeps
    # its inline backend).
    from matplotlib.figure import Figure

    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    epochs = [h["epoch"] for h in history]
    paths = []
    fig = Figure(figsize=(9, 3.5))
    a1, a2 = fig.subplots(1, 2)
    a1.plot(epochs, [h["loss"] for h in history], label="train")
    a2.plot(epochs, [h["acc"] for h in history], label="train")
    ev = [h for h in history if "test_acc" in h]
    if ev:
        a1.plot([h["epoch"] for h in ev], [h["test_loss"] for h in ev], label="test")
        a2.plot([h["epoch"] for h in ev], [h["test_acc"] for h in ev], label="test")
    a1.set(xlabel="epoch", ylabel="cross-entropy", title=f"{name}: loss")
    a2.set(xlabel="epoch", ylabel="accuracy", title=f"{name}: accuracy")
    a1.legend()
    a2.legend()
    fig.tight_layout()
    paths.append(run_dir / "curves.png")
    fig.savefig(paths[-1], dpi=100)
    fig = Figure(figsize=(4.5, 3.5))
    ax = fig.subplots()
    ax.plot(epochs, [h["nfe"] for h in history], marker="o", label="train forward")
    if any(h.get("bwd_steps") is not None for h in history):
        bwd = [h.get("bwd_steps") for h in history]
        ax.plot(epochs, [math.nan if b is None else b for b in bwd], marker="s",
                label="train backward")
    if ev:
        ax.plot([h["epoch"] for h in ev], [h["test_nfe"] for h in ev], marker="^",
                label="test forward")
    ax.set(xlabel="epoch", ylabel="NFE per sample (backward: steps)", title=f"{name}: solver steps")
    ax.legend()
    fig.tight_layout()
    paths.append(run_dir / "forward_steps.png")
    fig.savefig(paths[-1], dpi=100)
    return paths


# The columns of a run's summary row and how they print (3 decimals, seconds to 0.1).
SUMMARY_FORMATS = {"test acc": ".3f", "params": "d", "NFE": ".1f", "steps": ".1f",
                   "s/epoch": ".1f", "peak MB": ".1f", "failures": ".3f"}


def summary_row(name: str, result) -> dict:
    """One row of the comparison table for a `FitResult`, read off the stats contract
    (the same columns for every model): the last evaluation's test accuracy, NFE, steps
    and failure rate, the mean seconds per epoch (the first, compiling epoch excluded
    when there are others) and the peak memory."""
    h = result.history
    last = h[-1]
    evals = [r for r in h if "test_acc" in r]
    ev = evals[-1] if evals else {}
    timed = [r["seconds"] for r in h[1:]] or [r["seconds"] for r in h]
    return {
        "model": name,
        "test acc": ev.get("test_acc", math.nan),
        "params": result.num_params,
        "NFE": ev.get("test_nfe", last["nfe"]),
        "steps": ev.get("test_num_steps", last["num_steps"]),
        "s/epoch": sum(timed) / len(timed),
        "peak MB": last["peak_memory_mb"],
        "failures": ev.get("test_failure_rate", math.nan),
    }


def comparison_figure(rows: list[dict]):
    """The figure of `plot_comparison`: test accuracy against forward NFE and against
    peak memory, one marker per model (its own colour and shape) named in one legend
    beside the panels, so that models at nearly the same point stay readable (labels
    written beside the points printed on top of each other)."""
    from matplotlib.figure import Figure  # no pyplot state, no backend switch

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    markers = "osD^vP*Xh<>p"
    for ax, key, label in ((axes[0], "NFE", "forward NFE per test sample"),
                           (axes[1], "peak MB", "peak memory of a train step (MB)")):
        for i, r in enumerate(rows):
            ax.scatter(r[key], r["test acc"], color=f"C{i}", s=60, alpha=0.8,
                       marker=markers[i % len(markers)], label=r["model"])
        ax.set(xlabel=label)
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="test accuracy", title="accuracy vs forward cost")
    axes[1].set(title="accuracy vs memory")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    return fig


def plot_comparison(rows: list[dict], path) -> pathlib.Path:
    """`comparison_figure(rows)` saved to `path`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = comparison_figure(rows)
    fig.savefig(path, dpi=110)
    return path
