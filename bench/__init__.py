"""Benchmarks of arcface-kernels: time, peak memory and TFLOP/s of every backend and of
peer libraries, side by side, with CSV results and PNG plots.

Installed with the package as :mod:`arcface_kernels.bench`: run ``arcface-kernels bench
--help`` from any directory (results go to ./arcface-bench/ unless --out says otherwise);
in a checkout ``python -m bench`` is the same command, and ``python -m bench static`` the
static report of the compiled kernels (bench/static, a checkout-only tool). The pieces:

* :mod:`bench.providers` - what is measured (reference, torch.compile(reference), each
  backend of :func:`arcface_kernels.available_backends`, and peers when installed);
* :mod:`bench.harness` - how it is measured (triton.testing.do_bench on GPUs,
  torch.utils.benchmark on CPUs, :func:`arcface_kernels._memory.peak_memory`) and the
  sweep that writes the CSV;
* :mod:`bench.plots` - time and memory against C per provider (matplotlib, Agg);
* ``bench/gpu_check.sh`` - the one command for a GPU machine.

Nothing here is imported by the library, and nothing touches CUDA at import time.
"""
