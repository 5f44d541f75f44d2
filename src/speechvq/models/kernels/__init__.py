"""Speed-only kernels: custom autograd functions that compute what a plain torch op computes,
in a form measured faster on the CPU. The modules in :mod:`speechvq.models` choose between them."""
