"""Train state (params, EMA, optimizer) and its creation directly in its sharded layout."""
import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dit_jax.models import DiT, dummy_inputs
from dit_jax.train import sharding as shd


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. `step` counts completed optimizer updates."""
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def make_optimizer(config: Any) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """AdamW with optional linear warmup and global-norm clipping; returns (tx, lr schedule).

  config: the `optimizer` section: learning_rate, weight_decay, b1, b2, eps, warmup_steps,
  grad_clip_norm (None or <= 0: no clipping).
  """
  if config.warmup_steps > 0:
    schedule = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
  else:
    schedule = optax.constant_schedule(config.learning_rate)
  parts = []
  if config.grad_clip_norm and config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay))
  return optax.chain(*parts), schedule


def init_state_boxed(rng: jax.Array, *, model: DiT, tx: optax.GradientTransformation) -> TrainState:
  """Initial state whose parameter leaves keep their logical-axis boxes (for `eval_shape`)."""
  x, t, y = dummy_inputs(model, 1)
  params = model.init(rng, x, t, y)["params"]
  # The EMA starts as a copy of the initial weights, as in the official train.py. A real copy:
  # the state is donated to the step, and one buffer cannot be donated twice.
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params))


def init_state(rng: jax.Array, *, model: DiT, tx: optax.GradientTransformation) -> TrainState:
  """Initial state with plain arrays (what the jitted, sharded init returns)."""
  return nn.unbox(init_state_boxed(rng, model=model, tx=tx))


def state_from_params(params: Any, *, tx: optax.GradientTransformation) -> TrainState:
  """A fresh state starting from given (e.g. imported official) weights."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params))


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf."""
  return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema, params)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a run's arrays live, derived from the model's logical axes and the inputs' spec."""
  mesh: jax.sharding.Mesh
  state: Any  # the TrainState's shardings
  abstract_state: Any  # its shapes with those shardings: the orbax restore target
  batch: dict[str, jax.sharding.NamedSharding]  # one per array of the inputs' element spec
  rules: tuple  # the checked axis rules, which also shard the activations in the train step


def make_layout(model: DiT, tx: Any, element_spec: dict[str, jax.ShapeDtypeStruct],
                mesh: jax.sharding.Mesh, rules: tuple) -> Layout:
  """The shardings of the state (from the parameters' logical axes) and of a batch (the inputs'
  `element_spec`: its arrays' leading axis is `batch`, whatever their rank).

  Raises a one-line ValueError, naming the parameter and suggesting a mesh that fits, if the
  mesh does not divide a dimension it shards (`sharding.check_divisible`).
  """
  boxed = jax.eval_shape(functools.partial(init_state_boxed, model=model, tx=tx),
                         jax.random.key(0))
  shd.check_divisible(boxed.params, mesh, rules)  # one line naming the parameter, not jit's
  state_shardings = shd.tree_shardings(boxed, mesh, rules)
  # The same abstract tree, with shardings, is the orbax restore target.
  abstract_state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), nn.unbox(boxed),
      state_shardings)
  batch = {name: shd.batch_sharding(mesh, rules, len(spec.shape))
           for name, spec in element_spec.items()}
  return Layout(mesh, state_shardings, abstract_state, batch, tuple(rules))


def init_sharded(model: DiT, tx: optax.GradientTransformation, layout: Layout,
                 rng: jax.Array) -> TrainState:
  """A fresh state, each array created directly in its shards (never whole on one device)."""
  init = functools.partial(init_state, model=model, tx=tx)
  return jax.jit(init, out_shardings=layout.state)(rng)
