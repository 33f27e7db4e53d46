"""Pallas kernels for the hot loops of sparse-attn (accelerator paths).

Every kernel module defines the kernel and its ``*_reference`` twin in plain ``jnp``; the
twin is the CPU path. This package imports nothing from ``sparse_attn`` or ``models``.
The kernels themselves (sign-pack, Hamming scoring, table-match counting, sparse decode
attention) are tracked by the Pallas issue; until then the estimators run their jnp paths.
"""
