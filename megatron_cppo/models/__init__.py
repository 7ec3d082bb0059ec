"""Model families on megatron-core. One package per family; each registers itself nowhere else."""
