"""The diffusion process a model was trained for: what its checkpoint records, what sampling uses.

A model's outputs mean something only under its process: the noise schedule and number of steps
define the timesteps it was trained on, `predict_xstart` whether it outputs x_0 or eps,
`learn_sigma` / `sigma_small` its variance. Sampling with another process draws wrong samples
without any error, so checkpoints record it (`dit_jax.checkpoints`) and samplers take it from
there; a sampler's own respacing (`--num_steps`) applies on top of it.
"""
import dataclasses
from typing import Any, Mapping

from dit_jax.diffusion.gaussian_diffusion import GaussianDiffusion, create_diffusion


@dataclasses.dataclass(frozen=True)
class DiffusionProcess:
  """The settings of `config.diffusion` that sampling must match (the loss ones aside)."""
  noise_schedule: str = "linear"  # or "squaredcos_cap_v2"
  diffusion_steps: int = 1000
  learn_sigma: bool = True  # the second half of the model's output: variance values
  sigma_small: bool = False  # a fixed variance: the posterior's (True) or beta (False)
  predict_xstart: bool = False  # the model predicts x_0 (else the noise eps)

  @classmethod
  def from_config(cls, settings: Mapping[str, Any]) -> "DiffusionProcess":
    """From `config.diffusion` or a saved process; a missing field takes the official value."""
    types = {"noise_schedule": str, "diffusion_steps": int}
    values = {f.name: types.get(f.name, bool)(settings[f.name])
              for f in dataclasses.fields(cls) if f.name in settings}
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def diffusion(self, timestep_respacing: str = "") -> GaussianDiffusion:
    """The process, respaced (`"250"`, `"ddim50"`; empty: every step) for sampling."""
    return create_diffusion(timestep_respacing, **self.to_dict())

  def describe(self) -> str:
    """`linear schedule, 1000 steps, eps prediction, learned sigma`."""
    sigma = ("learned sigma" if self.learn_sigma else
             "fixed small sigma" if self.sigma_small else "fixed large sigma")
    target = "x0" if self.predict_xstart else "eps"
    return (f"{self.noise_schedule} schedule, {self.diffusion_steps} steps, {target} "
            f"prediction, {sigma}")


# facebookresearch/DiT's process, which every released checkpoint was trained with.
OFFICIAL_PROCESS = DiffusionProcess()
