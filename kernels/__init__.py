"""Triton kernels, each beside its torch reference.

Import the submodules explicitly (they import triton; ``import idemrt`` must not):
``groupnorm_silu``, ``gdn`` (+ ``gdn_chain``), ``sampler_update``, ``loss_seed``.
On CPU they run only under the Triton interpreter (TRITON_INTERPRET=1 before triton is imported).
"""
