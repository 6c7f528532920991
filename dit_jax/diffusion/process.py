"""The process a model is trained for: its training objective, what checkpoints record, what
sampling uses.

`Process` is the seam between a generative process and the rest of the code. The train step
knows only `loss_terms` (the process draws its own times and noise), the checkpoints only
`to_dict` and `describe`, and sampling takes the process a checkpoint records. Two implement it:
`DiffusionProcess` (the official Gaussian diffusion, `GaussianDiffusion` doing the work) and
`FlowProcess` (flow matching on SiT's interpolants, `dit_jax.diffusion.flow`): `config.process`
chooses, `process_from_config` builds it, `process_from_dict` reads a recorded one back.

A model's outputs mean something only under its process: the noise schedule and number of steps
define the timesteps it was trained on, `predict_xstart` whether it outputs x_0 or eps,
`learn_sigma` / `sigma_small` its variance. Sampling with another process draws wrong samples
without any error, so checkpoints record it (`dit_jax.checkpoints`) and samplers take it from
there; a sampler's own respacing (`--num_steps`) applies on top of it.
"""
import dataclasses
from typing import Any, Mapping, Optional, Protocol

import jax

from dit_jax.diffusion.flow import FlowProcess
from dit_jax.diffusion.gaussian_diffusion import GaussianDiffusion, ModelFn, create_diffusion

PROCESSES = ("diffusion", "flow")  # the values of config.process


class Process(Protocol):
  """A generative process as training, checkpoints and sampling see it.

  Implementations are frozen dataclasses: hashable (a static argument of jitted functions, a
  cache key) and comparable (a checkpoint's process against a config's).
  """

  kind: str  # "diffusion" or "flow": which samplers apply (`dit_jax.samplers.SAMPLERS`)

  @property
  def learn_sigma(self) -> bool:
    """Whether the model outputs variance values after its prediction (2x channels)."""

  def loss_terms(self, model_fn: ModelFn, x0: jax.Array, rng: jax.Array,
                 model_kwargs: Optional[Mapping[str, Any]] = None) -> dict[str, jax.Array]:
    """Per-example training terms, each `[batch]`, "loss" (the one minimised) among them.

    The process draws its own times and noise from `rng` and calls `model_fn(x_t, t,
    **model_kwargs)`; what t is (integer steps, continuous times) is its own business. The
    other terms (e.g. "mse", "vb") are parts of the loss, logged as they come.

    Args:
      model_fn: the model, `model_fn(x [batch, H, W, C], t [batch], **model_kwargs)`.
      x0: `[batch, H, W, C]` clean data (pixels in [-1, 1] or scaled latents).
      rng: a PRNG key; the same key gives the same terms.
      model_kwargs: the model's other inputs (`{"y": labels}`).
    """

  def to_dict(self) -> dict[str, Any]:
    """What checkpoints record (JSON); `process_from_config` reads it back."""

  def describe(self) -> str:
    """One line for messages: `linear schedule, 1000 steps, eps prediction, learned sigma`."""


@dataclasses.dataclass(frozen=True)
class DiffusionProcess:
  """The official Gaussian diffusion: the settings of `config.diffusion`.

  The first five fields are those sampling must match. `use_kl` and `rescale_learned_sigmas`
  only choose the loss (the hybrid MSE + VB loss by default, see
  `GaussianDiffusion.training_losses`): sampling does not depend on them, so checkpoints do not
  record them (the run config has them) and processes that differ only in them are equal.
  """
  noise_schedule: str = "linear"  # or "squaredcos_cap_v2"
  diffusion_steps: int = 1000
  learn_sigma: bool = True  # the second half of the model's output: variance values
  sigma_small: bool = False  # a fixed variance: the posterior's (True) or beta (False)
  predict_xstart: bool = False  # the model predicts x_0 (else the noise eps)
  # Loss only (compare=False: not recorded, not compared).
  use_kl: bool = dataclasses.field(default=False, compare=False)  # the VLB alone (RESCALED_KL)
  # The VB term times diffusion_steps / 1000 (RESCALED_MSE).
  rescale_learned_sigmas: bool = dataclasses.field(default=False, compare=False)

  kind = "diffusion"  # a class constant, not recorded: a process without `kind` is a diffusion

  @classmethod
  def from_config(cls, settings: Mapping[str, Any]) -> "DiffusionProcess":
    """From `config.diffusion` or a saved process; a missing field takes the official value."""
    types = {"noise_schedule": str, "diffusion_steps": int}
    values = {f.name: types.get(f.name, bool)(settings[f.name])
              for f in dataclasses.fields(cls) if f.name in settings}
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    """The recorded fields: all but the loss-only ones."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare}

  def diffusion(self, timestep_respacing: str = "") -> GaussianDiffusion:
    """The process, respaced (`"250"`, `"ddim50"`; empty: every step) for sampling."""
    return create_diffusion(timestep_respacing, **dataclasses.asdict(self))

  def loss_terms(self, model_fn: ModelFn, x0: jax.Array, rng: jax.Array,
                 model_kwargs: Optional[Mapping[str, Any]] = None) -> dict[str, jax.Array]:
    """`GaussianDiffusion.loss_terms` of the unspaced process: t uniform over every step."""
    return self.diffusion().loss_terms(model_fn, x0, rng, model_kwargs)

  def describe(self) -> str:
    """`linear schedule, 1000 steps, eps prediction, learned sigma`."""
    sigma = ("learned sigma" if self.learn_sigma else
             "fixed small sigma" if self.sigma_small else "fixed large sigma")
    target = "x0" if self.predict_xstart else "eps"
    return (f"{self.noise_schedule} schedule, {self.diffusion_steps} steps, {target} "
            f"prediction, {sigma}")


def process_from_config(config: Any) -> Process:
  """The process a training config describes: `config.process` ("diffusion", the default, with
  `config.diffusion`; or "flow" with `config.flow`), learning sigma iff the model outputs
  variance values (`config.model.learn_sigma`: derived, not repeated in the config).

  Diffusion training draws t from every step of the process; samplers respace it
  (`config.sample.num_steps`). Flow training draws a continuous t.
  """
  kind = config.get("process", "diffusion")
  if kind not in PROCESSES:
    raise ValueError(f"config.process: {kind!r} is not one of {', '.join(PROCESSES)}")
  section = config.diffusion if kind == "diffusion" else config.flow
  return process_from_dict({**section, "kind": kind, "learn_sigma": config.model.learn_sigma})


def process_from_dict(settings: Mapping[str, Any]) -> Process:
  """The process `Process.to_dict` recorded (`kind` absent: a diffusion, as before flows)."""
  kind = settings.get("kind", "diffusion")
  if kind == "flow":
    return FlowProcess.from_config(settings)
  if kind == "diffusion":
    return DiffusionProcess.from_config(settings)
  raise ValueError(f"process.kind: {kind!r} is not one of {', '.join(PROCESSES)}")


# facebookresearch/DiT's process, which every released checkpoint was trained with.
OFFICIAL_PROCESS = DiffusionProcess()
