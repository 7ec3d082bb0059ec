"""Make the CUDA-built torchvision wheel importable next to a CPU-only torch.

Installed by scripts/cpu_env.sh into the virtual environment's site-packages together with a
one-line ``.pth`` file, so every interpreter of that environment (vLLM's spawned engine
processes included) loads it at start-up. It costs nothing until torchvision is imported.

Why: on CPU machines pip resolves torchvision to a build whose compiled operators need the CUDA
libraries. Loading them fails quietly, and then ``torchvision/_meta_registrations.py`` tries to
register fake kernels for ``torchvision::nms`` / ``torchvision::qnms``, operators that were never
defined, and the whole ``import torchvision`` dies ("operator torchvision::nms does not exist").
transformers' Qwen2-VL image processor and vLLM's Qwen2.5-VL model import torchvision's Python
transforms, which need none of the compiled operators. So, just before ``_meta_registrations`` is
imported, and only when torchvision's compiled operators did not load, this defines the schemas of
those two operators (no kernels); the fake registrations then succeed and the Python transforms
work. ``torchvision.ops.nms`` itself stays unavailable (it would raise when called).
"""

import importlib.abc
import sys

_TARGET = "torchvision._meta_registrations"
_libraries = []  # keep the Library objects alive: dropping one unregisters its schemas


def _define_missing_schemas():
    try:
        import torch
        from torchvision import extension
    except Exception:
        return
    if extension._has_ops():
        return  # a torchvision build that matches torch: nothing to do
    try:
        torch.ops.torchvision.nms.default
        return  # already defined
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _libraries.append(lib)


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == _TARGET:
            sys.meta_path.remove(self)
            _define_missing_schemas()
        return None  # let the normal finders import the module


if not any(isinstance(f, _Hook) for f in sys.meta_path):
    sys.meta_path.insert(0, _Hook())
