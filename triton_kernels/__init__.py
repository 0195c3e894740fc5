"""Triton kernels of arcface-kernels (backend "triton").

Modules: ``math`` (the per-element math: margin psi / psi', online log-sum-exp),
``kernels`` (the @triton.jit kernels), ``configs`` (launch configs, env switches) and
``ops`` (the launchers, registered as torch.library ops ``arcface_kernels::triton_fwd``
and ``triton_bwd``; imported lazily by ``arcface_kernels.backends``). Importing this
package imports nothing: triton is loaded only with ``triton_kernels.ops``.
"""
