"""Every hyperparameter of a dit-jax run, with the paper's values; the other configs adjust it."""
import dataclasses

import ml_collections
from ml_collections import config_dict

from dit_jax.samplers import loop
from dit_jax.train import sharding


def optional(field_type: type) -> config_dict.FieldReference:
  """A field that is None by default but typed, so `--config.x=...` overrides it."""
  return config_dict.FieldReference(None, field_type=field_type)


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # parameters, data order, flips, noise and timesteps all derive from it.

  config.data = ml_collections.ConfigDict()
  config.data.name = "imagenet2012"  # "digits", "folder", or a tfds dataset name.
  config.data.folder = ""  # for name="folder": one sub-folder per class.
  config.data.data_dir = optional(str)  # tfds data_dir (None: tfds default).
  config.data.split = "train"  # the tfds split.
  config.data.image_size = 256  # pixels after the ADM center crop.
  config.data.random_flip = True  # horizontal flip with probability 0.5.
  config.data.num_threads = 8  # image decoding threads per process.
  config.data.prefetch = 2  # batches decoded ahead.
  config.data.channels = optional(int)  # tfds: None keeps the stored channels; 3 makes gray RGB.

  # Latent space. Pre-extracted latents (python -m dit_jax.latents.extract) are the fast path;
  # without them, a VAE path makes the run encode images on the fly.
  config.latents_dir = ""  # a directory of extracted latents: training reads it, not images.
  # Where a gs:// latents_dir is copied first (ArrayRecord reads only local files); empty:
  # $DIT_LATENTS_CACHE, else a folder under the system's temporary directory.
  config.latents_cache_dir = ""
  config.vae = ml_collections.ConfigDict()
  config.vae.path = ""  # diffusers AutoencoderKL folder (sd-vae-ft-ema): encode / decode grids.

  config.model = ml_collections.ConfigDict()
  config.model.variant = "XL/2"  # S|B|L|XL x /2,/4,/8 (the table in dit_jax.models).
  config.model.input_size = 32  # side of the model's input (latent side = image_size / 8).
  config.model.in_channels = 4  # 4: VAE latents; 3 (RGB) or 1 (gray) in pixel space.
  config.model.num_classes = 1000  # labels 0..num_classes-1; num_classes is the null class.
  # Second half of the output: variance values (the process learns sigma iff the model does).
  config.model.learn_sigma = True
  config.model.class_dropout_prob = 0.1  # label -> null class, for classifier-free guidance.
  # Architecture overrides (None: the variant's value), for custom sizes.
  config.model.depth = optional(int)
  config.model.hidden_size = optional(int)
  config.model.num_heads = optional(int)
  config.model.patch_size = optional(int)
  config.model.mlp_ratio = 4.0  # MLP hidden size / hidden_size.
  # How it runs; none of these change the parameters' values.
  config.model.dtype = "bfloat16"  # compute dtype; params stay float32.
  config.model.param_dtype = "float32"  # dtype of the stored parameters.
  # None: unrolled on GPUs (the scan's stacked residuals cost DiT-XL/2 1.48x in speed on an
  # H100, benchmarks/README.md), under nn.scan elsewhere (one compiled block: compile time
  # independent of depth). True / False force one layout.
  config.model.scan_blocks = optional(bool)
  # Blocks per iteration of that scan; None: all of them on CPU (XLA's CPU loop stacks every
  # residual: DiT-S/2 trains 1.12x faster unrolled), 1 elsewhere (compile time independent of
  # depth).
  config.model.scan_unroll = optional(int)
  config.model.remat_policy = optional(str)  # e.g. "nothing_saveable".
  config.model.attention_impl = optional(str)  # None | "xla" | "cudnn".

  # The process (dit_jax.diffusion.process_from_config): "diffusion" (the paper's; settings in
  # config.diffusion) or "flow" (flow matching on SiT's interpolants; config.flow). Checkpoints
  # record it; learn_sigma is model.learn_sigma.
  config.process = "diffusion"
  # Diffusion: training draws t from every step; samplers respace it (sample.num_steps).
  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.noise_schedule = "linear"  # or "squaredcos_cap_v2".
  config.diffusion.diffusion_steps = 1000  # T: the number of noise levels.
  config.diffusion.sigma_small = False  # fixed variance (learn_sigma=False): posterior's or beta.
  config.diffusion.predict_xstart = False  # the model predicts x_0 (else the noise eps).
  config.diffusion.use_kl = False  # loss: the variational bound alone (else MSE [+ VB]).
  config.diffusion.rescale_learned_sigmas = False  # VB term x diffusion_steps / 1000.
  # Flow matching (dit_jax.diffusion.flow), SiT's orientation: x_t = alpha_t x + sigma_t eps, t = 0
  # noise and t = 1 data. A flow model has no variance: set model.learn_sigma = False (True
  # keeps SiT's 2x output, its second half unused).
  config.flow = ml_collections.ConfigDict()
  config.flow.path = "linear"  # alpha = t, sigma = 1 - t; or "gvp": sin / cos of pi t / 2.
  config.flow.prediction = "velocity"  # what the model outputs; or "noise", "score".
  config.flow.loss_weight = "none"  # noise / score predictions: "velocity" or "likelihood".
  # Endpoint offsets of t in training and sampling; None: 0 for velocity, 1e-3 otherwise.
  config.flow.train_eps = optional(float)
  config.flow.sample_eps = optional(float)

  config.batch_size = 256  # global, over all devices and hosts.
  config.num_steps = 400_000  # training steps (the paper: 400K for XL/2).
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-4  # AdamW, constant after warmup.
  config.optimizer.weight_decay = 0.0  # decoupled (AdamW).
  config.optimizer.b1 = 0.9  # Adam moment decays and epsilon.
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.warmup_steps = 0  # linear warmup from 0 (the paper uses none).
  config.optimizer.grad_clip_norm = 0.0  # global-norm clipping; 0 disables (the paper).
  config.ema_decay = 0.9999  # of the EMA parameters that sample and evaluate.
  config.init_from = ""  # an orbax checkpoint from `python -m dit_jax.convert` to fine-tune.
  # Resuming with changes that alter training (batch size, optimizer, seed, data, EMA, ...)
  # is refused unless listed here: keys or sections, comma-separated ("batch_size,optimizer").
  # Accepted changes are logged and kept in WORKDIR/config_history.jsonl.
  config.resume_changes = ""

  # Mesh: data parallel over `data`, parameters sharded over `fsdp`, matmuls over `tensor`.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.axis_names = sharding.MESH_AXES  # ("data", "fsdp", "tensor")
  config.mesh.axis_sizes = (-1, 1, 1)  # -1 takes the remaining devices.
  # Logical axis (the model's annotations) -> mesh axis or None (replicated); the table is in
  # dit_jax/train/sharding.py (the throughput benchmark uses it too).
  config.axis_rules = sharding.AXIS_RULES

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 5000  # and at the last step.
  config.checkpoint.keep = 3  # the last K ...
  config.checkpoint.keep_period = 50_000  # ... plus every M-th step, permanently.
  config.checkpoint.async_save = True  # write in the background while training goes on.

  config.log_every_steps = 100  # console line, metrics.jsonl and TensorBoard scalars.
  # TensorBoard event files in the workdir (scalars, sample grids, the config), written without
  # TensorFlow by dit_jax/train/tensorboard_writer.py, through dit_jax.fs like every other file.
  config.tensorboard = True
  # (first step, number of steps) to trace with jax.profiler into WORKDIR/profile (TensorBoard's
  # profile plugin; perfetto_trace.json.gz), steps numbered as in metrics.jsonl, e.g.
  # --config.profile_steps=10,3; () is off. dit_jax/train/profiling.py says what it holds.
  config.profile_steps = ()
  config.sample = ml_collections.ConfigDict()
  config.sample.every_steps = 10_000  # EMA sample grid to TensorBoard and samples/*.png.
  config.sample.classes = (88, 207, 279, 360, 387, 388, 417, 974)  # one grid row per class.
  config.sample.per_class = 8  # grid columns, as sample.py --per_class (dit_jax.generate)
  config.sample.sampler = "ddim"  # a name of dit_jax.samplers.SAMPLERS (sample.py --help).
  config.sample.num_steps = 50  # sampling steps (a respacing of the process).
  config.sample.eta = 0.0  # DDIM's noise: 0 is deterministic.
  config.sample.cfg_scale = 4.0  # 4.0 for pictures, 1.5 for FID.
  # 3: the official quirk; None guides all channels (typed, so --config can override a None).
  config.sample.guidance_channels = config_dict.FieldReference(3, field_type=int)
  config.sample.clip_denoised = False  # True only for pixel-space models.
  # The flow samplers' settings (dit_jax.samplers.loop.SamplerOptions: ode-dopri5's tolerances,
  # sde-euler's diffusion coefficient and last step), SiT's defaults; diffusion samplers ignore
  # them.
  config.sample.options = ml_collections.ConfigDict(dataclasses.asdict(loop.SamplerOptions()))

  config.eval = ml_collections.ConfigDict()
  config.eval.digits = False  # grade samples with a classifier of the real digits.
  config.eval.num_samples = 1000  # guided EMA samples graded at the end.
  config.eval.batch_size = 500  # samples per sampling call.
  return config


def use_flow(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Switches a config to flow matching (SiT's recipe on the same backbone and budget): the
  linear path with velocity prediction, a model without variance channels (a flow has no
  variance to learn), and an ODE sampler (Heun, `sample.num_steps` model evaluations)."""
  config.process = "flow"
  config.model.learn_sigma = False
  config.sample.sampler = "ode-heun"
  return config
