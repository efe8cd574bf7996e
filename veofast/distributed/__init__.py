"""Distributed layer: one DeviceMesh for all parallel axes, and the wrappers that apply parallelism to
single-device models from outside (FSDP2/DDP, Ulysses sequence parallel, expert parallel)."""
