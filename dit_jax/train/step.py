"""The pure train step: the process's loss, AdamW update, EMA."""
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from dit_jax.diffusion import Process
from dit_jax.models import LABEL_DROPOUT_RNG, DiT
from dit_jax.train import sharding as shd
from dit_jax.train.state import Layout, TrainState, ema_update

X0_RNG_TAG = 3  # fold_in tag of the x0 key (posterior sampling); the others are a split

# What the step logs besides the process's loss terms (whose names it does not know).
OPTIMIZER_METRICS = ("grad_norm", "param_norm", "learning_rate")

# x0(batch, rng, frozen) -> the model's x_0 [batch, H, W, C]: an input pipeline's `x0`.
X0Fn = Callable[[dict[str, jax.Array], jax.Array, Any], jax.Array]


def step_keys(rng: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(x0, loss, label dropout) keys of step `step`: a pure function of (rng, step), so a resumed
  run draws exactly what an uninterrupted one would."""
  step_rng = jax.random.fold_in(rng, step)
  loss_rng, dropout_rng = jax.random.split(step_rng)
  return jax.random.fold_in(step_rng, X0_RNG_TAG), loss_rng, dropout_rng


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array,
               frozen: Any = None, *, model: DiT, process: Process, x0: X0Fn,
               tx: optax.GradientTransformation, lr_schedule: Callable[[Any], Any],
               ema_decay: float, mesh: Optional[jax.sharding.Mesh] = None,
               axis_rules: tuple = ()) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on a global batch.

  Args:
    state: the current TrainState (donated by the caller's jit).
    batch: a global batch of the input pipeline: `labels` [batch] int and what `x0` reads.
    rng: the run's base key; this step's keys are `step_keys(rng, state.step)`.
    frozen: `x0`'s constant inputs (the VAE's params when encoding on the fly), a jit argument.
    model, process: the DiT and the process whose loss it is trained on.
    x0: the pipeline's `x0(batch, rng, frozen)`: pixels, latents sampled from stored moments,
      or images encoded by the VAE.
    mesh, axis_rules: the layout's mesh and rules (`Layout.mesh`, `Layout.rules`): the model's
      activations are constrained by them (`sharding.activation_sharding`); None: unconstrained.
  Returns:
    (new state, scalar metrics: the means of the process's loss terms ("loss" among them), and
    grad_norm, param_norm, learning_rate).
  """
  x0_rng, loss_rng, dropout_rng = step_keys(rng, state.step)
  x_start = x0(batch, x0_rng, frozen)
  model_kwargs = {"y": batch["labels"]}

  def loss_fn(params):
    def model_fn(x, t, y):
      with shd.activation_sharding(mesh, axis_rules):  # read while the step is traced
        return model.apply({"params": params}, x, t, y, train=True,
                           rngs={LABEL_DROPOUT_RNG: dropout_rng})
    terms = process.loss_terms(model_fn, x_start, loss_rng, model_kwargs)
    return terms["loss"].mean(), terms

  (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema_update(state.ema_params, params, ema_decay))
  metrics = {name: term.mean() for name, term in terms.items()}
  metrics.update(grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                 learning_rate=jnp.asarray(lr_schedule(state.step), jnp.float32))
  return new_state, metrics


def jit_train_step(layout: Layout, *, model: DiT, process: Process, x0: X0Fn,
                   tx: optax.GradientTransformation, lr_schedule: Callable[[Any], Any],
                   ema_decay: float):
  """The trainer's jitted `(state, global batch, rng, frozen) -> (state, metrics)` on `layout`:
  state and batch in their shardings, activations constrained by its rules, the state donated.
  """
  step_fn = functools.partial(train_step, model=model, process=process, x0=x0, tx=tx,
                              lr_schedule=lr_schedule, ema_decay=ema_decay,
                              mesh=layout.mesh, axis_rules=layout.rules)
  replicated = shd.replicated(layout.mesh)
  return jax.jit(step_fn, in_shardings=(layout.state, layout.batch, replicated, replicated),
                 out_shardings=(layout.state, replicated), donate_argnums=0)
