"""Flow matching on stochastic interpolants (SiT, Ma et al. 2024): the second `Process`.

A sample of the data x and a standard normal eps are joined by a path

  x_t = alpha_t x + sigma_t eps,  t in [0, 1],

in SiT's orientation: t = 0 is pure noise (alpha = 0, sigma = 1) and t = 1 the data (alpha = 1,
sigma = 0). The `linear` path has alpha_t = t, sigma_t = 1 - t; the `gvp` path (generalised
variance preserving) alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2). Along a path the
velocity is u_t = alpha'_t x + sigma'_t eps. The model, fed the continuous t itself (not scaled
to 0..999: SiT's released weights take t in [0, 1]), predicts one of three equivalent things:

  - `velocity`: E[u_t | x_t], the drift of the probability-flow ODE dx = v dt (the default);
  - `noise`: E[eps | x_t];
  - `score`: grad log p_t(x_t) = -E[eps | x_t] / sigma_t.

They convert into each other through the noise estimate (`to_noise`, `from_noise`):
v = (alpha'/alpha) x + (sigma' - alpha' sigma / alpha) eps_hat; solved for eps_hat, the
denominator alpha sigma' - alpha' sigma is -1 on the linear path and -pi/2 on gvp, never 0.
Going from noise or score back to velocity divides by alpha (no information about the data at
t = 0), and the score divides by sigma (t = 1): that is why those predictions train and sample
on [eps, 1 - eps] (`interval`), as SiT does, while velocity uses all of [0, 1].

The model's output has the data's channels (`learn_sigma=False`: no variance to learn; the
flow configs build the model so). A model with variance channels (`learn_sigma=True`, e.g.
SiT's released checkpoints, which keep DiT's 2x output and discard its second half) works too:
the first half is the prediction and the rest is ignored, in training and sampling alike.
"""
import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion.gaussian_diffusion import ModelFn
from dit_jax.diffusion.losses import mean_flat
from dit_jax.noise import standard_normal

PATHS = ("linear", "gvp")
PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = ("none", "velocity", "likelihood")
# SiT's endpoint offset for noise and score predictions (velocity needs none).
DEFAULT_EPS = 1e-3


@dataclasses.dataclass(frozen=True)
class FlowProcess:
  """A flow-matching process: the settings of `config.flow` (SiT's `create_transport`).

  `path`, `prediction`, `learn_sigma` and the endpoint offsets decide what the model's outputs
  mean, so checkpoints record them; `loss_weight` only weighs the loss of noise and score
  predictions (SiT's `loss_weight`: none, velocity or likelihood), so it is neither recorded
  nor compared, like the diffusion's `use_kl`.
  """
  path: str = "linear"  # or "gvp"
  prediction: str = "velocity"  # or "noise", "score"
  learn_sigma: bool = False  # the model has variance channels after its prediction (ignored)
  # t is drawn from [train_eps, 1 - train_eps] in training, sampled over [sample_eps, 1 -
  # sample_eps]; None: SiT's choice, 0 for velocity, 1e-3 for noise and score predictions.
  train_eps: Optional[float] = None
  sample_eps: Optional[float] = None
  loss_weight: str = dataclasses.field(default="none", compare=False)

  kind = "flow"  # a class constant: what `to_dict` records first

  def __post_init__(self):
    for field, value, choices in (("path", self.path, PATHS),
                                  ("prediction", self.prediction, PREDICTIONS),
                                  ("loss_weight", self.loss_weight, LOSS_WEIGHTS)):
      if value not in choices:
        raise ValueError(f"flow.{field}: {value!r} is not one of {', '.join(choices)}")
    default = 0.0 if self.prediction == "velocity" else DEFAULT_EPS
    for field in ("train_eps", "sample_eps"):
      value = getattr(self, field)
      value = default if value is None else float(value)
      if not 0.0 <= value < 0.5:
        raise ValueError(f"flow.{field}: must be in [0, 0.5), got {value}")
      if self.prediction != "velocity" and value == 0.0:
        raise ValueError(f"flow.{field}: {self.prediction} prediction is singular at t = 0 "
                         "and t = 1; it needs a positive offset (SiT: 1e-3)")
      object.__setattr__(self, field, value)  # resolved, so equal settings compare equal
    if self.loss_weight != "none" and self.prediction == "velocity":
      raise ValueError(f"flow.loss_weight: {self.loss_weight!r} weighs noise and score "
                       "predictions; velocity prediction has the plain loss ('none')")

  @classmethod
  def from_config(cls, settings: Mapping[str, Any]) -> "FlowProcess":
    """From `config.flow` (plus learn_sigma) or a saved process; missing fields take defaults."""
    values = {f.name: settings[f.name] for f in dataclasses.fields(cls) if f.name in settings}
    if "learn_sigma" in values:
      values["learn_sigma"] = bool(values["learn_sigma"])
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    """What checkpoints record: `kind` = "flow" and the compared fields."""
    return {"kind": self.kind, **{f.name: getattr(self, f.name)
                                  for f in dataclasses.fields(self) if f.compare}}

  def describe(self) -> str:
    """`flow matching, linear path, velocity prediction`."""
    return f"flow matching, {self.path} path, {self.prediction} prediction"

  # The path.
  def coefficients(self, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(alpha_t, sigma_t, d alpha / dt, d sigma / dt) at t (any shape, float32)."""
    t = jnp.asarray(t, jnp.float32)
    if self.path == "linear":
      return t, 1.0 - t, jnp.ones_like(t), -jnp.ones_like(t)
    half_pi = np.pi / 2
    return (jnp.sin(half_pi * t), jnp.cos(half_pi * t), half_pi * jnp.cos(half_pi * t),
            -half_pi * jnp.sin(half_pi * t))

  def interpolate(self, data: jax.Array, noise: jax.Array, t: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """(x_t, u_t): the point of the path at t `[batch]` and its velocity, both `[batch, ...]`."""
    alpha, sigma, d_alpha, d_sigma = (_expand(c, data) for c in self.coefficients(t))
    return alpha * data + sigma * noise, d_alpha * data + d_sigma * noise

  def interval(self, eps: float) -> tuple[float, float]:
    """The times [t0, t1] a process with endpoint offset eps trains or samples on."""
    return eps, 1.0 - eps

  # Conversions between the three predictions (all `[batch, ...]`, t `[batch]`).
  def to_noise(self, prediction: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
    """The noise estimate E[eps | x_t] of a model output in this process's prediction."""
    alpha, sigma, d_alpha, d_sigma = (_expand(c, x) for c in self.coefficients(t))
    if self.prediction == "noise":
      return prediction
    if self.prediction == "score":
      return -sigma * prediction
    # alpha v = alpha' x + (alpha sigma' - alpha' sigma) eps, the bracket never 0.
    return (alpha * prediction - d_alpha * x) / (alpha * d_sigma - d_alpha * sigma)

  def from_noise(self, noise: jax.Array, x: jax.Array, t: jax.Array, into: str) -> jax.Array:
    """The noise estimate as `into` (velocity, noise or score): the inverse of `to_noise`."""
    alpha, sigma, d_alpha, d_sigma = (_expand(c, x) for c in self.coefficients(t))
    if into == "noise":
      return noise
    if into == "score":
      return -noise / sigma
    if into != "velocity":
      raise ValueError(f"into: {into!r} is not one of {', '.join(PREDICTIONS)}")
    data = (x - sigma * noise) / alpha
    return d_alpha * data + d_sigma * noise

  def velocity(self, prediction: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
    """The probability-flow ODE's drift v(x, t) from a model output."""
    if self.prediction == "velocity":
      return prediction
    return self.from_noise(self.to_noise(prediction, x, t), x, t, "velocity")

  def score(self, prediction: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
    """grad log p_t(x) from a model output."""
    if self.prediction == "score":
      return prediction
    return self.from_noise(self.to_noise(prediction, x, t), x, t, "score")

  def diffusion_coefficient(self, t: jax.Array, form: str = "sigma", norm: float = 1.0
                            ) -> jax.Array:
    """w(t) of the SDE dx = [v + w s] dt + sqrt(2 w) dW, which has the ODE's marginals.

    SiT's forms: `constant` (norm), `SBDM` (norm times the path's own diffusion, that of the
    score-based SDE), `sigma` (norm sigma_t), `linear` (norm (1 - t)), `decreasing` and
    `increasing-decreasing`.
    """
    t = jnp.asarray(t, jnp.float32)
    if form == "constant":
      return jnp.full_like(t, norm)
    if form == "SBDM":
      return norm * self.path_diffusion(t)
    if form == "sigma":
      return norm * self.coefficients(t)[1]
    if form == "linear":
      return norm * (1.0 - t)
    if form == "decreasing":
      return 0.25 * (norm * jnp.cos(np.pi * t) + 1.0) ** 2
    if form == "increasing-decreasing":
      return norm * jnp.sin(np.pi * t) ** 2
    raise ValueError(f"diffusion_form: {form!r} is not one of {', '.join(DIFFUSION_FORMS)}")

  def path_diffusion(self, t: jax.Array) -> jax.Array:
    """(alpha' / alpha) sigma^2 - sigma sigma': the diffusion of the SDE whose drift is
    -(alpha' / alpha) x (SiT's `compute_drift`), which weighs its losses."""
    alpha, sigma, d_alpha, d_sigma = self.coefficients(t)
    return d_alpha / alpha * sigma ** 2 - sigma * d_sigma

  # Training.
  def loss_terms(self, model_fn: ModelFn, x0: jax.Array, rng: jax.Array,
                 model_kwargs: Optional[Mapping[str, Any]] = None) -> dict[str, jax.Array]:
    """SiT's training loss at t uniform on the train interval (`t_rng, noise_rng =
    split(rng)`): the squared error of the prediction against its target, averaged over all
    but the batch axis; `{"loss": [batch]}`.

    x0 is the clean data (the name the `Process` protocol gives it), at t = 1 on the path.
    """
    t_rng, noise_rng = jax.random.split(rng)
    t0, t1 = self.interval(self.train_eps)
    t = jax.random.uniform(t_rng, (x0.shape[0],), jnp.float32, t0, t1)
    noise = standard_normal(noise_rng, x0.shape, x0.dtype)
    x_t, u_t = self.interpolate(x0, noise, t)
    out = model_fn(x_t, t, **(model_kwargs or {}))[..., :x0.shape[-1]].astype(jnp.float32)
    if self.prediction == "velocity":
      return {"loss": mean_flat((out - u_t) ** 2)}
    sigma = _expand(self.coefficients(t)[1], x0)
    diffusion = _expand(self.path_diffusion(t), x0)
    weight = {"none": 1.0, "velocity": (diffusion / sigma) ** 2,
              "likelihood": diffusion / sigma ** 2}[self.loss_weight]
    if self.prediction == "noise":
      return {"loss": mean_flat(weight * (out - noise) ** 2)}
    return {"loss": mean_flat(weight * (out * sigma + noise) ** 2)}


DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")


def _expand(values: jax.Array, like: jax.Array) -> jax.Array:
  """`[batch]` (or a scalar) -> broadcastable against `like` `[batch, ...]`."""
  values = jnp.asarray(values, jnp.float32)
  if values.ndim == 0:
    return values
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))
