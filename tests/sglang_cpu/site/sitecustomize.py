"""Loaded by every Python process of a CPU test SGLang server (its PYTHONPATH names this folder;
SGLang spawns its scheduler and detokenizer, so a patch must come from here, not from the launcher).

SGLang 0.5.23's host-memory allocator table (sglang/srt/mem_cache/pool_host/common.py,
``ALLOC_MEMORY_FUNCS``) has no "cpu" entry and falls back to CUDA host registration, which fails
without an NVIDIA driver when ``--enable-return-routed-experts`` allocates its host buffer. This
adds a "cpu" entry that allocates plain zeroed memory, when (and only when) that module is imported.
"""

import importlib.abc
import importlib.machinery
import sys

_TARGET = "sglang.srt.mem_cache.pool_host.common"


def _cpu_alloc(dims, dtype, device, pin_memory, allocator=None, registration_granularity_bytes=None):
    import torch

    return torch.zeros(dims, dtype=dtype, device="cpu")


class _PatchAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.ALLOC_MEMORY_FUNCS["cpu"] = _cpu_alloc


sys.meta_path.insert(0, _PatchAfterImport())
