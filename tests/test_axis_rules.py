"""config.axis_rules are checked against the model's logical axes and the mesh: a typo is an
error naming it, never a silently replicated tensor."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import defaults
from dit_jax.models import LOGICAL_AXES, create_model, init_params, layers
from dit_jax.train import sharding as shd

MESH_AXES = ("data", "fsdp", "tensor")


def default_rules() -> list:
  return [list(pair) for pair in defaults.base_config().axis_rules]


def test_the_default_rules_cover_every_axis():
  rules = dict(shd.rules_from_config(default_rules(), MESH_AXES))
  assert set(rules) == {"batch", *LOGICAL_AXES}
  assert rules["batch"] == ("data", "fsdp") and rules["embed"] == "fsdp"
  assert rules["tokens"] is None and rules["bias"] == "fsdp"  # activations; tensor-split biases


@pytest.mark.parametrize("change, message", [
    (lambda r: r.__setitem__(1, ["emebd", "fsdp"]),
     "config.axis_rules: unknown logical axis 'emebd'; the model's axes are batch, layers, "),
    (lambda r: r.__setitem__(1, ["embed", "fsdpp"]),
     "config.axis_rules: 'embed' maps to 'fsdpp', which is not a mesh axis (data, fsdp, tensor)"),
    (lambda r: r.pop(2), "config.axis_rules: no rule for the logical axes mlp (map each"),
    (lambda r: r.append(["mlp", None]), "config.axis_rules: logical axis 'mlp' has two rules"),
    (lambda r: r.append(["mlp"]), "config.axis_rules: ['mlp'] is not a (logical axis, mesh "),
])
def test_a_wrong_rule_is_named(change, message):
  rules = default_rules()
  change(rules)
  with pytest.raises(ValueError) as error:
    shd.rules_from_config(rules, MESH_AXES)
  assert str(error.value).startswith(message), str(error.value)


def test_the_batch_rule_comes_first_so_activations_shard_over_the_batch():
  # flax gives a mesh axis to the first rule that claims it: with `embed` first, the residual
  # stream [batch, tokens, embed] would be split on its features over fsdp and the batch whole.
  rules = default_rules()
  rules.append(rules.pop(0))  # the batch rule last
  checked = shd.rules_from_config(rules, MESH_AXES)
  assert checked[0] == ("batch", ("data", "fsdp"))
  assert nn.logical_to_mesh_axes(layers.TOKENS, checked) == P(("data", "fsdp"), None, None)
  assert nn.logical_to_mesh_axes(("batch", "tokens", "mlp"), checked) == P(
      ("data", "fsdp"), None, "tensor")
  # Weights are unchanged by the order: the qkv kernel over fsdp x tensor, its bias over fsdp.
  assert nn.logical_to_mesh_axes(("embed", "qkv"), checked) == P("fsdp", "tensor")
  assert nn.logical_to_mesh_axes(("bias",), checked) == P("fsdp")


def _sharding_constraints(fn, *args) -> int:
  return str(jax.make_jaxpr(fn)(*args)).count("sharding_constraint")


def test_activation_constraints_act_only_inside_the_train_steps_mesh():
  model = create_model("S/2", depth=2, hidden_size=32, num_heads=2, input_size=8,
                       num_classes=10, scan_blocks=True)
  params = init_params(model, jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.01, params)  # adaLN-Zero would output zeros
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  t, y = jnp.array([3, 500]), jnp.array([1, 7])
  rules = shd.rules_from_config(shd.AXIS_RULES, MESH_AXES)

  def apply(mesh):
    def fn(params, x):
      with shd.activation_sharding(mesh, rules):
        return model.apply({"params": params}, x, t, y)
    return fn

  mesh = shd.make_mesh(MESH_AXES, (1, 1, 1))
  assert _sharding_constraints(apply(None), params, x) == 0
  with nn.logical_axis_rules(rules):  # rules without a mesh: still nothing
    assert _sharding_constraints(apply(None), params, x) == 0
  # In the step's mesh: the residual stream at the embedding, each block's entry, attention
  # output and exit (inside the scan), the MLP's hidden, the conditioning and the output.
  assert _sharding_constraints(apply(mesh), params, x) >= 7
  plain = jax.jit(lambda params, x: model.apply({"params": params}, x, t, y))(params, x)
  np.testing.assert_array_equal(jax.jit(apply(None))(params, x), plain)
  np.testing.assert_array_equal(jax.jit(apply(mesh))(params, x), plain)
