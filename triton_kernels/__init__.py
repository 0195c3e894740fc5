"""Triton kernels of arcface-kernels (backend "triton"), installed as
``arcface_kernels.triton_kernels`` (this source folder is not a top-level package once
installed: triton ships its own ``triton_kernels``).

A leaf package: it imports torch and triton, never ``arcface_kernels``. Modules:
``math`` (the per-element math: margin psi / psi', base-2 conversions), ``kernels``
(the @triton.jit kernels), ``configs`` (launch configs), ``options`` (the environment
switches, read once) and ``launch`` (the launchers: plain tensors and numbers in and
out; registered as ops by ``arcface_kernels._triton``). Importing this package imports
nothing.
"""
