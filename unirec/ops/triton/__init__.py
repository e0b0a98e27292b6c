"""Triton kernels (imported lazily: importing unirec never imports triton)."""
