"""fastgen's Triton kernels, one module per op; installed as ``fastgen.kernels``."""
