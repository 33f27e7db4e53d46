"""Pallas kernels for the hot loops of sparse-attn (accelerator paths).

One module per kernel: ``pack_signs``, ``hamming_scores``, ``table_match_counts`` and
``sparse_decode_attention``, each with its ``*_reference`` twin in plain ``jnp``, which is
also the CPU path; ``backend`` picks interpret mode, the Triton lowering or Mosaic. This
package imports nothing from ``sparse_attn`` or ``models``.
"""
