"""Build script. The package is pure Python plus an optional C++/CUDA extension
(arcface_kernels._C); see csrc/ and the README for the build switches."""
from setuptools import setup

setup()
