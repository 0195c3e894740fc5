"""Triton kernels of arcface-kernels (backend "triton"). Importing this package does not
import triton; ``triton_kernels.ops`` does."""
