"""Model FLOPs utilization: training FLOPs per image and the peak of known accelerators."""
from typing import Optional

import jax

from dit_jax.models import DiT, gflops
from dit_jax.models.flops import analytic_gmacs

# Dense bf16 peak FLOP/s per device (one jax device), from vendor specifications.
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("A10", 125e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v4", 275e12), ("TPU v3", 61.5e12), ("TPU v2", 23e12),
)


def peak_flops(device: Optional[jax.Device] = None) -> Optional[float]:
  """Peak bf16 FLOP/s of a device, or None when unknown (CPUs)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, flops in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return flops
  return None


def train_flops_per_image(model: DiT) -> float:
  """Forward MACs x 2 FLOPs x 3 (forward + backward), the usual training estimate."""
  try:
    macs = gflops(model)
  except TypeError:  # no cost analysis on this backend
    macs = analytic_gmacs(model)
  return 3 * 2 * macs * 1e9
