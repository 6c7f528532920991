"""The sampler registry: the one list of names, and a new sampler is one file plus one line.

README ("Sampling") shows a new sampler, DDIM on evenly spaced steps. These tests register that
very code and check that it samples what it says, and that every reader of the registry takes
it without another edit: sample.py's --sampler, a training config's sample.sampler (the grid
path training draws with) and the sampling benchmark.
"""
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from benchmarks import sampling_speed
from configs import digits
from dit_jax import checkpoints, generate, samplers
from dit_jax.diffusion import OFFICIAL_PROCESS
from dit_jax.models import create_model, init_params
from dit_jax.samplers.ddim import ddim_sample_loop
from conftest import normal
from train_utils import ROOT, env_with_devices

README = (ROOT / "README.md").read_text()
NAME = "ddim-even"  # the README's registry line: "ddim-even": Registered(ddim_even.sampler, ...)
FLOW = ["ode-euler", "ode-heun", "ode-dopri5", "sde-euler"]  # tests/test_flow_samplers.py
# sample.py with the README's sampler registered first, as its one registry line would.
SAMPLE_PY_WITH_EXAMPLE = """
import runpy, sys, types
from dit_jax import samplers
module = types.ModuleType("ddim_even")
exec(compile(sys.argv.pop(1), "README.md", "exec"), module.__dict__)
samplers.SAMPLERS[sys.argv.pop(1)] = samplers.Registered(module.sampler, "diffusion")
sys.argv[0] = "sample.py"
runpy.run_path("sample.py", run_name="__main__")
"""


def example_source() -> str:
  """The README's example sampler (the python block of dit_jax/samplers/ddim_even.py)."""
  block = re.search(r"```python\n(# dit_jax/samplers/ddim_even\.py\n.*?)```", README, re.S)
  assert block, "README: no example sampler"
  return block.group(1)


@pytest.fixture
def registered(monkeypatch):
  """The README's example sampler, registered under NAME for the test."""
  module = types.ModuleType("ddim_even")
  exec(compile(example_source(), "README.md", "exec"), module.__dict__)  # noqa: S102
  monkeypatch.setitem(samplers.SAMPLERS, NAME, samplers.Registered(module.sampler, "diffusion"))
  return module.sampler


def test_the_registry_is_the_one_list_of_names():
  names = list(samplers.SAMPLERS)
  assert names == ["ddpm", "ddim", "dpm-solver++", *FLOW]
  assert samplers.names("diffusion") == ["ddpm", "ddim", "dpm-solver++"]
  # The docs: README's sampler table lists exactly the registered samplers, in order.
  table = re.search(r"\| sampler \| steps.*?\n((?:\|.*\n)+)", README).group(1)
  assert re.findall(r"^\| `([^`]+)` \|", table, re.M) == names
  # The code: no other module types a sampler's name (each reads SAMPLERS instead).
  sources = [ROOT / "sample.py", ROOT / "train.py", *ROOT.glob("dit_jax/**/*.py"),
             *ROOT.glob("configs/*.py"), *ROOT.glob("benchmarks/*.py")]
  typed = [str(p.relative_to(ROOT)) for p in sources
           if re.search(r"""["']dpm-solver\+\+["']""", p.read_text())]
  assert typed == ["dit_jax/samplers/__init__.py"]
  with pytest.raises(ValueError, match=r"^--sampler: 'euler' is not a sampler; expected one "
                     r"of ddpm, ddim, dpm-solver\+\+, ode-euler, ode-heun, ode-dopri5, "
                     r"sde-euler$"):
    samplers.get("euler", "--sampler")


def test_readme_example_is_ddim_on_evenly_spaced_steps(registered):
  def model_fn(x, t, y):  # depends on x, the original step number and the label
    eps = 0.3 * x + 1e-3 * t[:, None, None, None] + 0.05 * y[:, None, None, None]
    return jnp.concatenate([eps, jnp.zeros_like(eps)], axis=-1)

  noise = normal(jax.random.key(0), (2, 4, 4, 3))
  kwargs = dict(num_steps=5, clip_denoised=False, eta=0.0, model_kwargs={"y": jnp.array([1, 2])})
  out = samplers.run(samplers.get(NAME)(OFFICIAL_PROCESS, model_fn, noise, jax.random.key(1),
                                        **kwargs))
  by_hand = ddim_sample_loop(OFFICIAL_PROCESS.diffusion("5"), model_fn, noise,
                             clip_denoised=False, model_kwargs={"y": jnp.array([1, 2])})
  np.testing.assert_allclose(out, by_hand, rtol=1e-6, atol=1e-6)
  strided = samplers.run(samplers.get("ddim")(OFFICIAL_PROCESS, model_fn, noise,
                                              jax.random.key(1), **kwargs))
  assert not np.allclose(out, strided, atol=1e-3)  # its own spacing, not ddim's "ddim5"


@pytest.mark.slow
def test_config_benchmark_and_sample_py_take_a_registered_sampler(registered, tmp_path):
  # A training config: the sampling settings its grids and digits grade are drawn with.
  config = digits.get_config()
  config.sample.sampler = NAME
  assert generate.spec_from_config(config).sampler == NAME
  config.sample.sampler = "euler"
  with pytest.raises(ValueError, match=r"^config\.sample\.sampler: 'euler' is not a sampler; "
                     r"expected one of ddpm, ddim, dpm-solver\+\+, ode-euler, ode-heun, "
                     r"ode-dopri5, sde-euler, ddim-even$"):
    generate.spec_from_config(config)
  # The benchmark measures every registered sampler unless told otherwise.
  assert sampling_speed.parse_args([]).samplers == ["ddpm", "ddim", "dpm-solver++", *FLOW, NAME]
  assert sampling_speed.parse_args(["--samplers", NAME]).samplers == [NAME]

  # sample.py: --sampler takes it, and the grid is the one generate.sample_grid draws with it.
  model = create_model("S/2", input_size=8, in_channels=1, num_classes=10, depth=1,
                       hidden_size=32, num_heads=2)
  params = jax.tree.map(lambda p: p + 0.05 * normal(jax.random.key(1), p.shape),
                        init_params(model, jax.random.key(0)))
  checkpoints.save_params(str(tmp_path / "ckpt"), params, model)
  grid = tmp_path / "grid.png"
  args = [sys.executable, "-c", SAMPLE_PY_WITH_EXAMPLE, example_source(), NAME,
          f"--checkpoint={tmp_path / 'ckpt'}", f"--sampler={NAME}", "--num_steps=4",
          "--cfg_scale=2", "--classes=0,1", "--per_class=2", f"--out={grid}"]
  result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env_with_devices(1))
  assert result.returncode == 0, result.stderr[-3000:]
  spec = generate.SamplingSpec(sampler=NAME, num_steps=4, cfg_scale=2.0, guidance_channels=None,
                               clip_denoised=True, seed=0)
  _, expected = generate.sample_grid(model, params, spec, [0, 1], per_class=2)
  np.testing.assert_array_equal(np.asarray(Image.open(grid)), expected)
  ddim = generate.sample_grid(model, params, generate.SamplingSpec(
      **{**spec.__dict__, "sampler": "ddim"}), [0, 1], per_class=2)[1]
  assert not np.array_equal(ddim, expected)
  helpfull = subprocess.run(args[:5] + ["--helpfull"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env=env_with_devices(1))
  # absl wraps the help lines, also after a hyphen ("sde-" / "euler").
  text = " ".join(helpfull.stdout.split()).replace("- ", "-")
  assert f"<ddpm|ddim|dpm-solver++|{'|'.join(FLOW)}|{NAME}>" in text, text[-3000:]
  assert (f"{NAME} (diffusion): Deterministic DDIM on num_steps evenly spaced steps" in text
          ), text[-3000:]



@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm-solver++"])
def test_diffusion_samplers_count_their_evaluations_and_ignore_the_flow_options(name):
  calls = []

  def model_fn(x, t, y):  # eps and variance values, counting its evaluations as they run
    jax.debug.callback(lambda: calls.append(1), ordered=True)
    eps = 0.3 * x + 0.05 * y[:, None, None, None]
    return jnp.concatenate([eps, jnp.zeros_like(eps)], axis=-1)

  noise = normal(jax.random.key(0), (2, 4, 4, 1))
  kwargs = dict(num_steps=6, clip_denoised=False, eta=0.0, model_kwargs={"y": jnp.array([1, 2])})
  sampler = samplers.get(name, process=OFFICIAL_PROCESS)
  plain = samplers.run(sampler(OFFICIAL_PROCESS, model_fn, noise, jax.random.key(1), **kwargs))
  calls.clear()
  out, nfe = jax.jit(lambda z: samplers.run_with_nfe(sampler(
      OFFICIAL_PROCESS, model_fn, z, jax.random.key(1), **kwargs,
      options=samplers.SamplerOptions(last_step="none", rtol=0.5))))(noise)
  jax.effects_barrier()
  assert int(nfe) == len(calls) == 6
  np.testing.assert_allclose(out, plain, rtol=1e-5, atol=1e-5)

@pytest.mark.slow
def test_the_sampling_benchmark_runs_every_registered_sampler():
  """benchmarks.sampling_speed on its tiny model: each sampler on the process of its kind (a
  flow on a model without learned sigma), the Python-driven steps drawing what the compiled
  chain draws; the adaptive solver has no steps to drive, and reports its own evaluations."""
  models = {kind: sampling_speed.build("tiny", learn_sigma=kind == "diffusion")
            for kind in ("diffusion", "flow")}
  for name, registered in samplers.SAMPLERS.items():
    model, params = models[registered.kind]
    assert sampling_speed.process_for(model, name).kind == registered.kind
    z = normal(jax.random.key(2), (2, 8, 8, 4))
    labels = jnp.array([3, 4])
    compiled, nfe = sampling_speed.scan_loop(model, params, name, 4, z, labels)()
    assert compiled.shape == (4, 8, 8, 4) and np.isfinite(compiled).all(), name
    stepwise = sampling_speed.python_loop(model, params, name, 4, z, labels)
    if name == "ode-dopri5":
      assert stepwise is None and int(nfe) > 4 and (int(nfe) - 1) % 6 == 0
    else:
      assert int(nfe) == 4, name
      # (random weights: values in the hundreds, float32 rounding differing between programs)
      np.testing.assert_allclose(stepwise(), compiled, rtol=1e-4, atol=1e-4, err_msg=name)


def test_a_fully_unrolled_scan_samples_in_the_unrolled_layout():
  """A scanned model whose scan runs unrolled (CPU's default) samples in the unrolled layout,
  its weights taken out of their stacks once (`straight_layout`), with the samples of the
  scanned model run as a loop; a rolled scan (`scan_unroll=1`) keeps its layout."""
  from dit_jax.models import DiT
  from dit_jax.samplers import guidance
  model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=4,
              num_classes=10, scan_blocks=True)
  params = init_params(model, jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.05 * normal(jax.random.key(1), p.shape),
                        params)  # adaLN-Zero starts as the identity: give the blocks weight
  straight, unstacked = guidance.straight_layout(model, params)
  assert not straight.scan_blocks and "blocks" not in unstacked
  assert {f"blocks_{i}" for i in range(3)} <= set(unstacked)
  rolled = model.clone(scan_unroll=1)
  assert guidance.straight_layout(rolled, params) == (rolled, params)
  labels, rng = jnp.array([1, 7]), jax.random.key(2)
  got = guidance.make_sample_fn(model, sampler="ddim", num_steps=3)(params, labels, rng)
  expected = guidance.make_sample_fn(rolled, sampler="ddim", num_steps=3)(params, labels, rng)
  assert float(jnp.std(expected)) > 0.1
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
