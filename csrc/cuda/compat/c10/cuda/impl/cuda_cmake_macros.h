// Stand-in for the header that CUDA builds of torch generate (CPU builds of torch ship
// c10/cuda/*.h without it). setup.py adds this folder to the include path only when
// torch lacks the real file, i.e. for the CUDA compile check against a CPU-only torch.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
