"""config.axis_rules are checked against the model's logical axes and the mesh: a typo is an
error naming it, never a silently replicated tensor."""
import pytest

from configs import defaults
from dit_jax.models import LOGICAL_AXES
from dit_jax.train import sharding as shd

MESH_AXES = ("data", "fsdp", "tensor")


def default_rules() -> list:
  return [list(pair) for pair in defaults.base_config().axis_rules]


def test_the_default_rules_cover_every_axis():
  rules = dict(shd.rules_from_config(default_rules(), MESH_AXES))
  assert set(rules) == {"batch", *LOGICAL_AXES}
  assert rules["batch"] == ("data", "fsdp") and rules["embed"] == "fsdp"


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
