"""Every config in configs/, with each argument its docstring documents, builds what a run builds
from it (model, process, mesh and checked axis rules, optimizer, sampling settings, the inputs'
spec and the state's layout) without reading data, and reads only keys configs/defaults.py
declares: the configs are locked, and nothing in the code reads a key by string fallback."""
import importlib
import pathlib

import pytest
from PIL import Image

from configs import defaults
from dit_jax import checkpoints, generate
from dit_jax.diffusion import process_from_config
from dit_jax.models import VARIANTS, build_model
from dit_jax.train import loop, resume_check
from dit_jax.train import sharding as shd
from dit_jax.train import state as state_lib
from dit_jax.train.inputs import element_spec_from_config, make_inputs

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGENET_ARGS = [name.removeprefix("DiT-") for name in VARIANTS] + ["XL/2,512", "S/8,512"]
# (config module, argument); "{folder}" is a temporary image folder of 2 classes.
CASES = ([("digits", ""), ("digits", "flow"), ("digits_scaling", ""), ("tiny", ""),
          ("folder", "{folder}"),
          ("folder", "{folder},32,2")]
         + [("imagenet", arg) for arg in IMAGENET_ARGS + ["XL/2,256,flow"]])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("classes")
  for label, color in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
    (root / label).mkdir()
    for i in range(2):
      Image.new("RGB", (40 + 8 * i, 36), color).save(root / label / f"{i}.png")
  return str(root)


def load(name: str, arg: str, folder: str):
  config = importlib.import_module(f"configs.{name}").get_config(arg.format(folder=folder))
  config.lock()  # a key the code reads but defaults.py lacks fails here, not at step 1000
  if name == "folder":
    config.model.num_classes = 2  # the temporary folder's
  return config


def test_the_walk_covers_every_config_file():
  files = {p.stem for p in (ROOT / "configs").glob("*.py")} - {"__init__", "defaults"}
  assert files == {name for name, _ in CASES}


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" for n, a in CASES])
def test_config_builds_model_process_and_layout_without_data(name, arg, folder):
  config = load(name, arg, folder)
  assert set(config.keys()) == set(defaults.base_config().keys())  # no key of its own
  model = build_model(config.model)
  process = process_from_config(config)
  assert process.learn_sigma == model.learn_sigma  # derived, not a second key to keep equal
  mesh = shd.make_mesh(config.mesh.axis_names, config.mesh.axis_sizes)
  rules = shd.rules_from_config(config.axis_rules, mesh.axis_names)
  loop.check_batch_size(config.batch_size, mesh, rules)
  tx, _ = state_lib.make_optimizer(config.optimizer)
  spec = generate.spec_from_config(config)
  assert spec.process == process
  if name == "imagenet":
    size = int(arg.split(",")[1] if "," in arg else 256)
    assert (model.input_size, model.in_channels) == (size // 8, 4)
  if model.in_channels == 4:  # as documented: extracted latents, the VAE for the sample grids
    config.latents_dir, config.vae.path = "LATENTS", "SD_VAE"  # names only: nothing is read
  element_spec = element_spec_from_config(config, model)
  side, channels = model.input_size, model.in_channels
  want = ((config.batch_size, side, side, 2 * channels) if config.latents_dir
          else (config.batch_size, side, side, channels))
  assert element_spec[next(iter(element_spec))].shape == want
  assert element_spec["labels"].shape == (config.batch_size,)
  layout = state_lib.make_layout(model, tx, element_spec, mesh, rules)
  params = layout.abstract_state.params
  assert params["final_layer"]["linear"]["kernel"].shape[-1] == (
      model.patch_size ** 2 * model.in_channels * (2 if process.learn_sigma else 1))


@pytest.mark.parametrize("name,arg", [("digits", ""), ("folder", "{folder},32,2")])
def test_the_spec_from_config_is_the_pipelines(name, arg, folder):
  config = load(name, arg, folder)
  model = build_model(config.model)
  with make_inputs(config, model) as inputs:
    assert inputs.element_spec == element_spec_from_config(config, model)


def test_the_documented_learn_sigma_false_run_has_one_key():
  config = load("tiny", "", "")
  config.model.learn_sigma = False
  assert not process_from_config(config).learn_sigma
  assert not generate.spec_from_config(config).process.learn_sigma  # the sample grids' too
  with pytest.raises(AttributeError):
    config.diffusion.learn_sigma = False  # gone: the model's value is the process's
  with pytest.raises(AttributeError):
    config.diffusion.timestep_respacing = "250"  # gone: samplers respace (sample.num_steps)


def test_an_old_workdir_whose_run_config_has_the_removed_keys_resumes():
  config = load("tiny", "", "")
  model, process = build_model(config.model), process_from_config(config)
  run = resume_check.run_config(config)
  run["diffusion"].update(learn_sigma=True, timestep_respacing="")  # as saved before
  saved = checkpoints.saved_config(model, process, run=run)
  assert resume_check.check_resume(saved, 100, config, "old") == {}
  old_layout = {"model": model.arch_config(), "run": run}  # from before the `process` item
  assert checkpoints.process_of(old_layout) == process


def test_an_unknown_sampler_is_refused_before_the_workdir_is_touched(tmp_path):
  config = load("digits", "", "")
  with config.unlocked():
    config.sample.sampler = "ddimm"
  with pytest.raises(ValueError, match=r"^config.sample.sampler: 'ddimm' is not a sampler; "
                     "expected one of ddpm, ddim, dpm-solver\\+\\+"):
    loop.setup(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
