import equinox as eqx


class Fallback(eqx.Module):
    """Try solvers in turn: each later solver runs only where the previous ones failed.

    `Fallback(Anderson(), NewtonKrylov())` runs Anderson; where it did not succeed (max
    steps reached, non-finite values), NewtonKrylov restarts from the initial guess. Under
    `jax.vmap` this is decided per sample: samples that already converged are kept as
    they are. `stats["solver_index"]` says which solver produced each result; the step
    counts add up. If every solver fails, `result` is `RESULTS.fallback_exhausted`.

    **Arguments:**

    - `*solvers`: two or more forward solvers (implicit_kit's or optimistix's).
    """

    solvers: tuple

    def __init__(self, *solvers):
        if len(solvers) < 2:
            raise ValueError(
                f"`Fallback(...)` needs at least two solvers, got {len(solvers)}."
            )
        self.solvers = tuple(solvers)
