"""Flax NNX decoders that use ``sparse_attn`` estimators (Llama family).

Imports flow ``models -> sparse_attn -> pallas_kernels``. The decoders, checkpoint loading
and generation are tracked by the models issue; nothing is exported yet.
"""
