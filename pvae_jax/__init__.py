"""pvae_jax: PixelVAE and PixelCNNs with auxiliary variables in JAX/Flax.

Importing the package has no side effects: no JAX backend is initialised and no
flag is parsed. Submodules are imported explicitly (``from pvae_jax.nn import masks``).
"""

__version__ = "0.1.0"
