"""Test-wide setup: two virtual CPU devices, so sharded code paths run as on a real mesh.

This must happen before the first JAX computation; conftest is imported first.
"""

import jax

jax.config.update("jax_num_cpu_devices", 2)
