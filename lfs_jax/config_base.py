"""Every config field of lfs_jax, with its default and what it means.

The files in configs/ start from `get_config()` and change what their setup needs;
nothing in the library reads a field that is not defined here (strict `cfg.x`
access on a locked ConfigDict), so a typo on the command line is an error.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The defaults: the tiny in-process model on the bundled photos (CPU, minutes)."""
  c = ml_collections.ConfigDict()
  c.seed = 0                      # the one seed; everything random is split from it
  c.method = "lfs"                # "lfs" (DFKD; ICGen at sampling) | "custom_diffusion" (sequential baseline)
  c.compile_cache = "~/.cache/lfs_jax/xla"  # persistent XLA compilation cache ("" = off)

  c.model = ml_collections.ConfigDict()
  c.model.source = "tiny"         # "tiny": random tiny SD built in process | "local": diffusers folder at model.path
  c.model.path = ""               # local Stable Diffusion folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/)
  c.model.variant = ""            # weight-file variant to read, e.g. "fp16"; "" = plain files
  c.model.param_dtype = "float32"   # storage dtype of the frozen base: float32 | bfloat16
  c.model.compute_dtype = "float32"  # activations: float32 | bfloat16 (trainable weights stay float32)
  c.model.attention = "xla"       # attention kernel: xla | cudnn (GPU) | splash (TPU) | auto:
  # ^ splash on TPU for self-attention over >= 1024 tokens, cuDNN on GPU in half precision, else xla
  c.model.remat = "none"          # gradient checkpointing of the UNet's resnet/transformer blocks:
  # ^ none | blocks (keep only block inputs, recompute the rest: least memory) | dots (keep
  # the weight matmuls' outputs, recompute norms, activations, convs, attention logits)

  c.data = ml_collections.ConfigDict()
  c.data.format = "folders"       # folders | dreambooth | customconcept101
  c.data.root = ""                # dataset folder; "" = the bundled 64 px DreamBooth photos
  c.data.classes = "dog=dog,cat=cat,dog2=dog"  # folders format: concept=class word, comma separated
  c.data.sessions = "dog;cat;dog2"  # session order: ';' between sessions, ',' within one
  c.data.resolution = 32          # training image size in pixels
  c.data.min_side = 0.25          # refuse a photo whose shorter side is below this fraction of
  # ^ data.resolution (it would be upscaled into blur); 0 = accept any size
  c.data.max_aspect = 4.0         # refuse a photo longer than this many times its width (or
  # ^ the reverse): the centre square would lose most of it; 0 = any shape
  c.data.flip = True              # random horizontal flip (applied to the latents)
  c.data.rescale = True           # Custom Diffusion's random rescale with a loss mask
  c.data.rescale_min = 0.4        # [choice] range of the rescale factor (done in latent space)
  c.data.rescale_max = 1.4
  c.data.rescale_cues = False     # prefix the prompt of a photo rescaled below 0.6 with "a far away "
  # ^ or "very small ", above 1.2 with "zoomed in " or "close up " (Custom Diffusion: True; needs data.rescale)
  c.data.heldout = 0              # photos per concept held out as evaluation references only (never
  # ^ trained on, never an ICGen context), drawn by `seed` and the concept's name; 0 = none.
  # Recorded in concepts.json ("references"); evaluate against them with eval.references

  c.concepts = ml_collections.ConfigDict()
  c.concepts.token_format = "<c{}>"  # modifier token of the k-th concept (1-based)
  c.concepts.templates = ("photo of a {}", "a photo of a {}", "a picture of a {}")
  # ^ training prompts; "{}" becomes "<token> <class>" (or "<class>" for DFKD class prompts)
  c.concepts.initializer = "class"  # a new token's starting embedding: "class" (its concept's class
  # ^ word) or this word's for every concept (Custom Diffusion: "ktn", a rare token)
  c.concepts.vectors = 1           # embedding rows a modifier token: 1 as Custom Diffusion; n > 1
  # ^ textual inversion's multi-vector form: "<c3>" stands for "<c3> <c3>_1 … <c3>_{n-1}"

  c.train = ml_collections.ConfigDict()
  c.train.steps = 40              # optimiser steps per session
  c.train.batch_size = 2          # concept images per step
  c.train.learning_rate = 1e-5    # Custom Diffusion's base rate ...
  c.train.scale_lr = True         # ... multiplied by the batch size
  c.train.weight_decay = 1e-2
  c.train.adam_b1 = 0.9
  c.train.adam_b2 = 0.999
  c.train.adam_eps = 1e-8
  c.train.grad_clip = 1.0         # global-norm clip
  c.train.lr_schedule = "constant"  # the rate over a session: constant | cosine (from the full rate
  # ^ at the first step along half a cosine towards 0 at train.steps) (Custom Diffusion: constant)
  c.train.loss_reduction = "mean"  # denoising loss per image: mean (over masked elements) | cd
  # ^ (Custom Diffusion: "cd", the masked sum over the latent channels / mask pixels = 4x mean on SD)
  c.train.regulariser_lr_scale = 1.0  # learning rate x this when a regulariser doubles the batch
  # ^ (DFKD rows of method=lfs, prior.weight > 0) (Custom Diffusion: 2.0, with prior preservation)
  c.train.high_noise = 0.0        # share of the concept rows' timesteps drawn from [0.6 T, T) instead
  # ^ of [0, T): where a sample's shape and colours are decided (Custom Diffusion: 0, uniform);
  # ^ on the mini world's :plastic 0.5 learned less (acc own 0.653 against 0.722; docs/mini_world.md)
  c.train.snr_gamma = 0.0         # Min-SNR-gamma weights on the concept rows' denoising loss (Hang et
  # ^ al. 2023; diffusers' --snr_gamma, 5 suggested); 0 = off (Custom Diffusion: off, unweighted)
  # ^ on the mini world's :plastic 5 lifted CD's acc own 0.712 -> 0.778 (six seeds; docs/mini_world.md)
  c.train.token_lr_scale = 1.0    # the modifier tokens' embedding rows learn at the learning rate
  # ^ x this (the attention weights at the rate itself) (Custom Diffusion: 1.0, one rate for both)
  c.train.selection = "crossattn_kv"  # trainable UNet weights: crossattn_kv | crossattn | attn | lora | unet (all)
  c.train.lora_rank = 4           # selection=lora: rank r of the factors A [in, r], B [r, out]
  c.train.lora_alpha = 4.0        # selection=lora: W + (alpha / r) * A @ B (diffusers' lora_alpha)
  c.train.lora_targets = "attn2/to_k,attn2/to_v"  # selection=lora: attn<i>/<projection> patterns
  # ^ (fnmatch, comma-separated): "attn*/to_*" puts factors on every attention projection
  c.train.train_tokens = True     # learn the new modifier tokens' embedding rows
  c.train.log_every = 10          # steps between metric syncs (progress bar, TensorBoard)
  c.train.progress_every = 20     # steps between in-session progress checkpoints (0 = never)

  c.kd = ml_collections.ConfigDict()
  c.kd.weight = 1.0               # lambda of the DFKD loss (ignored for method=custom_diffusion)
  c.kd.mode = "trajectory"        # noise: z at t=T-1 | trajectory: points of the teacher's DDIM path from z
  c.kd.steps = 4                  # T_tau: DDIM steps of the teacher trajectory
  c.kd.prompts = "class,previous,empty"  # DFKD conditions: any of class, past_classes, previous, empty
  c.kd.from_base = ""             # [choice, off] kinds of kd.prompts distilled from the base, not session k-1 ("class,empty")
  c.kd.class_templates = ()       # templates of the class conditions ("a {} in the snow"); () = concepts.templates[0]
  c.kd.batch_size = 2             # pure-noise latents per step
  c.kd.cache_size = 0             # teacher trajectories computed once per session (0 = fresh every step)
  c.kd.kv_weight = 0.0            # [choice, off] weight of a K/V anchor: the attn2 to_k/to_v outputs on the
  # ^ DFKD conditions' text contexts kept to the teacher's (train/kd.py kv_anchor; 0 = off, the paper's loss)

  # Prior preservation (Custom Diffusion's and DreamBooth's regulariser), for either method:
  # class images generated ONCE by the base model (the project's sampler, sample.* settings,
  # fixed seeds from `seed`), cached in <workdir>/prior/ and reused on --resume; each step
  # adds train.batch_size of them (with the class prompt) to the batch, and the loss
  # prior.weight x their denoising loss (per-element mean, as Custom Diffusion's prior loss).
  c.prior = ml_collections.ConfigDict()
  c.prior.weight = 0.0            # weight of the class-image loss; 0 = off (Custom Diffusion: 1.0,
  # ^ DreamBooth: 1.0). With it on, the learning rate is also x train.regulariser_lr_scale
  c.prior.count = 200             # class images per class word (Custom Diffusion: 200)
  c.prior.template = "photo of a {}"  # the class prompt of the class images and of their loss rows,
  # ^ "{}" = the class word (Custom Diffusion's scripts: the class word alone, "{}")

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep_progress = 1  # progress checkpoints kept within a session

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                # devices on the data axis (-1 = all that remain)
  c.mesh.fsdp = 1                 # devices that shard the frozen base (the batch spans data x fsdp)
  c.mesh.frozen = "replicated"    # frozen base: replicated | fsdp (each leaf split on its largest
  # ^ dimension that mesh.fsdp divides, else replicated; see lfs_jax/parallel.py)
  c.mesh.trainable = "replicated" # trainable delta, optimizer state, teacher: replicated | fsdp
  c.mesh.fsdp_min_size = 1024     # with fsdp: a leaf of fewer elements stays whole (biases, norm
  # ^ scales: splitting them saves little memory and costs an all-gather each)

  # Several processes (hosts) in one job; machine settings, free to change on --resume.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.cluster = "auto"  # auto: join a Slurm (srun, >1 task), Open MPI or Cloud TPU job
  # ^ by jax.distributed.initialize() with no arguments | none: always one process
  c.distributed.coordinator = ""  # explicit start: "host:port" of process 0 ("" = auto)
  c.distributed.num_processes = 0  # explicit start: processes in the job
  c.distributed.process_id = -1   # explicit start: this process, 0..num_processes-1 (0 writes metadata)
  c.distributed.cpu_collectives = "gloo"  # CPU collectives between processes: gloo | mpi | none

  # Sampling (--mode=sample, evaluation). Free to change on a finished run.
  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = "ddim"       # ddim | ddpm (diffusers' schedulers for the model's scheduler config)
  c.sample.steps = 10             # denoising steps (tiny; 50 is the usual for Stable Diffusion)
  c.sample.guidance = 7.5         # classifier-free guidance scale w: eps_u + w (eps_c - eps_u)
  c.sample.guidance_rescale = 0.0  # phi of Lin et al. 2023 (diffusers' guidance_rescale): the guided
  # ^ output rescaled to the conditional one's per-image std, mixed by phi; 0 = off. The paper
  #   uses 0.7 for zero-terminal-SNR v-prediction models (SD 2.x-style, the mini base)
  c.sample.eta = 0.0              # DDIM eta (0 = deterministic); ignored by ddpm
  c.sample.num_images = 2         # images per prompt, with seeds seed, seed+1, ...
  c.sample.seed = 0               # seed of each prompt's first image
  c.sample.batch_size = 4         # images per sampler call (the last call is padded)
  c.sample.strict_tokens = True   # a "<word>" in a prompt must be a known modifier token (a typo
  # ^ is an error, not silent text); False: only words of concepts.token_format are checked

  # In-Context Generation (DESIGN 1.2): start from a concept's photo latent, noised to t_s = s*T.
  c.icgen = ml_collections.ConfigDict()
  c.icgen.strength = 0.6          # [choice] s in (0, 1]; 1 = plain text-to-image (bank ignored)
  c.icgen.select = "random"       # context latent: random (one photo, by image seed) | first | mean

  # Validation images while training (lfs_jax/train/validation.py): a fixed-seed grid of
  # what the model draws, into <workdir>/samples/validation/ and TensorBoard. Sampling
  # follows sample.* and icgen.*. Never changes training; free to change on --resume.
  c.validation = ml_collections.ConfigDict()
  c.validation.every_session = True  # a grid after each session (False = none)
  c.validation.every_steps = 0    # also a grid every N train steps inside a session (0 = off)
  c.validation.prompts_per_concept = 1  # rows per concept learned so far: its training prompt
  # ^ ("photo of a <c1> dog"), then its evaluation prompts ("a <c1> dog on the beach", ...)
  c.validation.prompts_per_class = 1  # rows per class word of those concepts: the same prompts
  # ^ without the token ("photo of a dog"); 0 = no class rows
  c.validation.seeds = 2          # columns: images per row, seeds sample.seed, sample.seed + 1, ...
  c.validation.variants = "icgen,plain"  # each concept prompt with ICGen (icgen.strength) and/or
  # ^ plain text-to-image (strength 1); class prompts never use ICGen (one row each)

  # Evaluation (--mode=evaluate, DESIGN 1.3): CLIP TA / IA of every concept after every
  # session. Free to change on a finished run; sampling follows sample.* and icgen.*.
  c.eval = ml_collections.ConfigDict()
  c.eval.clip = ""                # local Hugging Face CLIPModel folder (ViT-B/32 for the paper); --clip overrides
  c.eval.num_prompts = 0          # evaluation prompts per concept, the first of its list (0 = all)
  c.eval.num_images = 2           # images per prompt, seeds sample.seed, sample.seed + 1, ...
  c.eval.variants = "icgen,plain"  # icgen: ICGen at icgen.strength | plain: text-to-image (strength 1)
  c.eval.keep_token = False       # TA text keeps the modifier token (default: "photo of a dog", token removed)
  c.eval.batch_size = 32          # images or texts per CLIP call (the last call is padded)
  c.eval.grid = 16                # tiles in each cell's sample grid (first image of every prompt first)
  c.eval.out = "metrics"          # results folder inside the run directory
  c.eval.image_encoders = "clip"  # image alignment (IA) by: clip | dino | both (TA is always CLIP's)
  c.eval.dino = ""                # local Hugging Face ViTModel / Dinov2Model folder (DINO ViT-S/16:
  # ^ a safetensors copy of facebook/dino-vits16), needed when image_encoders is dino or both
  c.eval.references = "train"     # IA against: train (the photos learned from) | heldout (the
  # ^ data.heldout photos, never trained on) | both
  c.eval.protocol = ""            # "" | customconcept101 | dreambooth: report.md leads with that
  # ^ benchmark's published columns, under their published names
  return c


def preset_base(arg: str, name: str) -> ml_collections.ConfigDict:
  """The defaults on the base model a preset's `arg` names: "sd15" (a local Stable
  Diffusion folder, use_local_sd) or "tiny" (scaled down by the preset: scale_down)."""
  c = get_config()
  if arg == "sd15":
    use_local_sd(c, resolution=512)
  elif arg != "tiny":
    raise ValueError(f"configs/{name}.py takes :sd15 or :tiny, got :{arg}")
  return c


def scale_down(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sizes of an evaluation preset cut to a CPU test (the tiny model), settings kept.

  Only counts change (steps, images, prompts, batch sizes); the sampler, eta,
  guidance, encoders, references and protocol stay the preset's.
  """
  c.model.source = "tiny"
  c.train.steps = 2
  c.sample.steps = 3
  c.sample.batch_size = 2
  c.eval.num_images = 1
  c.eval.num_prompts = 2
  c.eval.batch_size = 4
  c.eval.grid = 0
  return c


def use_local_sd(c: ml_collections.ConfigDict, resolution: int) -> ml_collections.ConfigDict:
  """Switches a config to a local Stable Diffusion folder with Custom Diffusion's recipe."""
  c.model.source = "local"
  c.model.path = ""               # required: --config.model.path=/path/to/model
  c.model.compute_dtype = "bfloat16"
  c.model.attention = "auto"
  c.data.root = ""                # required: your concept folders
  c.data.resolution = resolution
  c.train.steps = 250             # Custom Diffusion's single-concept recipe
  # Custom Diffusion's recipe in full (config fields above; no mini-world measurement
  # has argued for other values on Stable Diffusion).
  c.train.loss_reduction = "cd"
  c.train.regulariser_lr_scale = 2.0
  c.concepts.initializer = "ktn"
  c.data.rescale_cues = True
  c.train.batch_size = 8
  c.train.log_every = 25
  c.train.progress_every = 100
  c.kd.batch_size = 8
  c.sample.steps = 50
  c.sample.batch_size = 8
  # Validation after each session: 2 prompts x (ICGen, plain) x 2 seeds per concept
  # learned so far, plus one class prompt per class word x 2 seeds.
  c.validation.prompts_per_concept = 2
  return c
