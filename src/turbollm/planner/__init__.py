"""Memory before loading: the plan (plan.py: where every tensor and KV byte lives, refused
with the fix when it does not fit), `fit --auto`'s search (fit.py), and what the process
holds (process_memory.py)."""

from turbollm.planner.plan import (MIB, Device, Plan, TensorPlace, accelerators, compute_bytes, cpu_device,
                                   loader_placement, normalize_device, parse_override, parse_size, plan,
                                   plan_for_devices, resolve_residency, suggest)

__all__ = ["MIB", "Device", "Plan", "TensorPlace", "accelerators", "compute_bytes", "cpu_device", "loader_placement",
           "normalize_device", "parse_override", "parse_size", "plan", "plan_for_devices", "resolve_residency", "suggest"]
