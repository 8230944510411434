"""Pallas kernels for DSpark decoding, each with a pure-jnp reference that defines its answer.

This package depends only on jax and numpy. Subpackages:

* :mod:`pallas_kernels.verify` -- the speculative-decoding acceptance step (rejection sampling over a draft
  tree), as a Triton (GPU) / Mosaic (TPU) kernel plus the reference.
"""
