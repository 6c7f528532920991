"""The samplers, by name: the one list that sample.py's --sampler, config.sample.sampler, the
sampling benchmark and the docs read.

Every sampler has the signature of `loop.Sampler` and owns its step spacing; adding one is a
module in this package plus one line in `SAMPLERS` (README, "Sampling", has an example).
Classifier-free guidance, the same for all of them, is in `guidance.py`.
"""
from dit_jax.samplers import ddim, ddpm, dpm_solver
from dit_jax.samplers.loop import Loop, Sampler, run

SAMPLERS: dict[str, Sampler] = {
    "ddpm": ddpm.sampler,
    "ddim": ddim.sampler,
    "dpm-solver++": dpm_solver.sampler,
}


def get(name: str, what: str = "sampler") -> Sampler:
  """The sampler registered as `name`; else a ValueError naming `what` (a flag, a config key)
  and the registered names."""
  if name not in SAMPLERS:
    raise ValueError(f"{what}: {name!r} is not a sampler; expected one of "
                     f"{', '.join(SAMPLERS)}")
  return SAMPLERS[name]


def describe() -> str:
  """`ddpm: <first line of its docstring>; ddim: ...`, for --help texts."""
  lines = {name: ((sampler.__doc__ or "").strip().splitlines() or [""])[0].rstrip(".")
           for name, sampler in SAMPLERS.items()}
  return "; ".join(f"{name}: {line}" for name, line in lines.items())


__all__ = ["SAMPLERS", "Loop", "Sampler", "describe", "get", "run"]
