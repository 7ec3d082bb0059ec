"""Building blocks shared by the models (megatron ModuleSpec submodules)."""
