"""HF <-> Megatron checkpoint conversion (the CLI lives in megatron_cppo/convert/cli.py)."""
