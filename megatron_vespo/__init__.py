"""megatron_vespo: VESPO policy optimisation for Mixture-of-Experts models on Megatron-Core."""

import logging as _logging

__version__ = "0.1.0"

# A CUDA build of torch on a machine without a GPU (the only build the registry has for Python
# 3.12) warns "No CUDA runtime is found" whenever torch.utils.cpp_extension is imported, which
# Megatron-Core 0.17+ does at import: noise in every command's output on a CPU node.
_logging.getLogger("torch.utils.cpp_extension").addFilter(
    lambda record: "No CUDA runtime is found" not in record.getMessage())
