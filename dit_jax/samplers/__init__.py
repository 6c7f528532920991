"""The samplers, by name: the one list that sample.py's --sampler, config.sample.sampler, the
sampling benchmark and the docs read.

Every sampler has the signature of `loop.Sampler` and owns its step spacing; adding one is a
module in this package plus one line in `SAMPLERS` (README, "Sampling", has an example), which
says the kind of process it samples (`Process.kind`): a diffusion sampler cannot read a flow
model's outputs, nor a flow sampler a diffusion model's. Classifier-free guidance, the same for
all of them, is in `guidance.py`.
"""
import dataclasses
from typing import Optional

from dit_jax.diffusion import PROCESSES, Process
from dit_jax.samplers import ddim, ddpm, dpm_solver, flow_ode, flow_sde
from dit_jax.samplers.loop import Loop, Sampler, SamplerOptions, run, run_with_nfe


@dataclasses.dataclass(frozen=True)
class Registered:
  """A registered sampler and the kind of process it samples ("diffusion" or "flow")."""
  sampler: Sampler
  kind: str

  def __post_init__(self):
    if self.kind not in PROCESSES:
      raise ValueError(f"kind: {self.kind!r} is not one of {', '.join(PROCESSES)}")


SAMPLERS: dict[str, Registered] = {
    "ddpm": Registered(ddpm.sampler, "diffusion"),
    "ddim": Registered(ddim.sampler, "diffusion"),
    "dpm-solver++": Registered(dpm_solver.sampler, "diffusion"),
    "ode-euler": Registered(flow_ode.euler, "flow"),
    "ode-heun": Registered(flow_ode.heun, "flow"),
    "ode-dopri5": Registered(flow_ode.dopri5, "flow"),
    "sde-euler": Registered(flow_sde.sampler, "flow"),
}

# Each kind's default (sampler, num_steps): the paper's DDPM-250 for a diffusion; for a flow,
# Heun at 50 evaluations (SiT's ODE default is adaptive Dopri5, whose cost varies).
DEFAULTS = {"diffusion": ("ddpm", 250), "flow": ("ode-heun", 50)}


def get(name: str, what: str = "sampler", process: Optional[Process] = None) -> Sampler:
  """The sampler registered as `name`; else a ValueError naming `what` (a flag, a config key)
  and the registered names. Given the `process` to sample, a sampler of another kind is
  refused, naming those of its kind."""
  if name not in SAMPLERS:
    raise ValueError(f"{what}: {name!r} is not a sampler; expected one of "
                     f"{', '.join(SAMPLERS)}")
  registered = SAMPLERS[name]
  if process is not None and registered.kind != process.kind:
    raise ValueError(f"{what}: {name!r} samples {registered.kind} processes, not this "
                     f"{process.kind} ({process.describe()}); the {process.kind} samplers: "
                     f"{', '.join(names(process.kind))}")
  return registered.sampler


def names(kind: str) -> list[str]:
  """The samplers of processes of this kind, in registry order."""
  return [name for name, registered in SAMPLERS.items() if registered.kind == kind]


def default_for(process: Process) -> tuple[str, int]:
  """(sampler, num_steps) to sample a process of this kind with by default."""
  return DEFAULTS[process.kind]


def describe() -> str:
  """`ddpm (diffusion): <first line of its docstring>; ...`, for --help texts."""
  lines = {name: ((r.sampler.__doc__ or "").strip().splitlines() or [""])[0].rstrip(".")
           for name, r in SAMPLERS.items()}
  return "; ".join(f"{name} ({SAMPLERS[name].kind}): {line}" for name, line in lines.items())


__all__ = ["DEFAULTS", "SAMPLERS", "Loop", "Registered", "Sampler", "SamplerOptions",
           "default_for", "describe", "get", "names", "run", "run_with_nfe"]
