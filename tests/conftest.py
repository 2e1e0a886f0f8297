"""Test-wide setup, before the first JAX computation (conftest is imported first).

- Two virtual CPU devices, so sharded code paths run as on a real mesh.
- A persistent compilation cache shared by the test processes: many tests build the
  same tiny models, and XLA:CPU compiles dominate the suite's time. Cached entries
  are keyed by the program and the JAX/XLA versions, so they never change results.
"""

import os
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), f"pvae_jax_test_xla_cache_{os.getuid()}"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
