"""FSDP at pod scale, by simulation: per-device memory of the trainer's step stays flat as fake
devices are added at a fixed per-device batch, the state shards as arithmetic says, the scanned
blocks' weights are gathered one block at a time, and a mesh that does not divide the model is
refused in one line before anything is compiled (issue 15).

The step is compiled ahead of time (nothing materialized) by `benchmarks.memory_plan`, in one
process with 64 fake CPU devices; the 8-device meshes use the first 8 of them.
"""
import subprocess

import pytest
from jax.sharding import AbstractMesh, AxisType

from benchmarks import memory_plan
from dit_jax.models import abstract_params, create_model
from dit_jax.train import sharding as shd
from train_utils import ROOT, env_with_devices, train_command

# A mid-size DiT (10.9M parameters; the blocks hold most of them, as in XL/2), 64 px images
# (8x8x4 latents, 16 tokens), 4 images per batch shard.
MODEL = dict(depth=2, hidden_size=512, num_heads=8)
PARAMS = 10_909_728
BATCH = 4
# (data, fsdp, tensor) at 8 and at 64 devices.
MESHES = {"fsdp": [(1, 8, 1), (1, 64, 1)], "data x fsdp": [(2, 4, 1), (2, 32, 1)],
          "fsdp x tensor": [(1, 4, 2), (1, 32, 2)]}


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[int, ...], dict]:
  jobs = [dict(variant="S/2", overrides=MODEL, image_size=64, mesh=mesh, batch=BATCH, remat=None)
          for meshes in MESHES.values() for mesh in meshes]
  return {tuple(r["mesh"]): r for r in memory_plan.run_jobs(jobs, 64, timeout=900)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", MESHES)
def test_temporary_memory_per_device_does_not_grow_with_devices(compiled, kind):
  # Without the activations' constraints it grew 2.5x (data x fsdp) to 4.7x (fsdp) from 8 to 64
  # devices: the partitioner held batch-sized activations whole on every device.
  at_8, at_64 = (compiled[mesh]["temp"] for mesh in MESHES[kind])
  assert at_64 <= 1.25 * at_8, (kind, at_8, at_64)


@pytest.mark.slow
@pytest.mark.parametrize("kind", MESHES)
def test_state_per_device_is_the_arithmetic(compiled, kind):
  for mesh in MESHES[kind]:
    result = compiled[mesh]
    assert result["params"] == PARAMS
    # params, EMA, Adam's mu and nu in float32, sharded over the fsdp x tensor devices.
    expected = memory_plan.state_arithmetic(PARAMS, mesh[1] * mesh[2])
    # pylint: disable-next=protected-access
    state = result["args"] - BATCH * memory_plan._batch_bytes(64)
    assert abs(state / expected - 1) < 0.10, (mesh, state, expected)


@pytest.mark.slow
def test_scanned_blocks_gather_their_weights_one_block_at_a_time(compiled):
  largest_kernel = 512 * 6 * 512 * 4  # a block's adaLN kernel in float32
  for mesh in MESHES["fsdp"]:
    gathers = compiled[mesh]["collectives"]["all-gather"]
    # No gather of the stacked [depth, ...] weights before the loop: the largest is one block's.
    assert gathers["largest"] == largest_kernel, (mesh, gathers)
    # Every weight gathered about twice a step (forward, backward), whatever the device count.
    assert 1.5 * PARAMS * 4 < gathers["bytes"] < 2.5 * PARAMS * 4, (mesh, gathers)
    reduced = compiled[mesh]["collectives"]["all-reduce"]  # the gradients, once a step
    assert 0.9 * PARAMS * 4 < reduced["bytes"] < 1.1 * PARAMS * 4, (mesh, reduced)


def test_xl2_on_256_devices_of_fsdp_is_refused_with_a_mesh_that_fits():
  model = create_model("XL/2", scan_blocks=True)
  mesh = AbstractMesh((1, 256, 1), shd.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  with pytest.raises(ValueError) as error:
    shd.check_divisible(abstract_params(model, boxed=True), mesh, shd.AXIS_RULES)
  assert str(error.value) == (
      "config.mesh: parameter blocks/adaLN_modulation/kernel dimension 1 (embed, size 1152) "
      "does not split over mesh axis fsdp=256 (1152 % 256 != 0); a mesh that fits: "
      "(data=2, fsdp=128, tensor=1), i.e. --config.mesh.axis_sizes=2,128,1")
  fits = AbstractMesh((2, 128, 1), shd.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  shd.check_divisible(abstract_params(model, boxed=True), fits, shd.AXIS_RULES)


def test_a_tensor_axis_that_divides_nothing_goes_to_data():
  model = create_model("S/2", depth=1, hidden_size=96, num_heads=6, scan_blocks=True)
  mesh = AbstractMesh((1, 2, 5), shd.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  with pytest.raises(ValueError) as error:
    shd.check_divisible(abstract_params(model, boxed=True), mesh, shd.AXIS_RULES)
  assert str(error.value).endswith(
      "dimension 2 (adaln, size 576) does not split over mesh axis tensor=5 (576 % 5 != 0); "
      "a mesh that fits: (data=5, fsdp=2, tensor=1), i.e. --config.mesh.axis_sizes=5,2,1")


@pytest.mark.slow
def test_train_py_refuses_a_mesh_that_does_not_divide_the_model_in_one_line(tmp_path):
  # hidden 24 over fsdp=16: the largest fsdp that divides 24 (and every other dimension it
  # shards) is 8; the other 2 go to `data`. Refused before anything is written.
  result = subprocess.run(
      train_command(tmp_path / "run", model__hidden_size=24, mesh__axis_sizes="(1,16,1)"),
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=env_with_devices(16))
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  line = result.stderr.strip().splitlines()[-1]
  assert line == ("error: config.mesh: parameter blocks_0/adaLN_modulation/kernel dimension 0 "
                  "(embed, size 24) does not split over mesh axis fsdp=16 (24 % 16 != 0); a mesh "
                  "that fits: (data=2, fsdp=8, tensor=1), i.e. --config.mesh.axis_sizes=2,8,1")
  assert not (tmp_path / "run").exists()
