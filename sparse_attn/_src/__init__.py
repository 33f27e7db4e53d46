"""Internals of sparse_attn: not API, may change without notice."""
