"""megatron_cppo: CPPO (Contrastive Perception Policy Optimization) on megatron-core.

Importing this package changes nothing in torch or megatron-core, with one exception that is needed
before megatron-core can even be imported: megatron-core >= 0.17 imports triton unconditionally, and
triton is absent on most CPU machines, so a stand-in for the one leaf module that needs it is installed
(see ``megatron_cppo.platform.install_triton_leaf_standin``). Everything else the CPU platform layer
does happens in ``megatron_cppo.platform.activate()``, which parallel initialisation calls and which is a
no-op when CUDA is available.
"""

__version__ = "0.1.0"

from megatron_cppo import platform as _platform

_platform.install_triton_leaf_standin()
