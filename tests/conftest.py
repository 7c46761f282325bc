import jax


# Gradients are checked in float64 throughout (finite differences need the digits).
jax.config.update("jax_enable_x64", True)
