"""The mini world's lifelong benchmark (lfs_jax/mini, docs/mini_world.md).

The shipped base model (lfs_jax/assets/mini_base, trained by
`python -m lfs_jax.mini.train_base`) learns patterned shapes session after session;
the shipped oracle judges the samples. `arg`:
  full  (default) six sessions, every variant of issue 17 (the goal run; add
        --config.mini.seeds=0,1,2 for mean ± std);
  hard  full's variants on six sessions of six stars (one class: the harder case
        for forgetting; three designs from mini.concepts below);
  long  full's six sessions and three more of its classes (two squares, a circle):
        nine sessions, the harder case item 4 asks for when six do not make
        sequential Custom Diffusion forget (docs/mini_world_history.md, "Nine
        sessions (`:long`), three seeds", in the fine world);
  short three sessions (striped_star, dotted_star, ringed_star), custom_diffusion
        vs lfs+kv, separate+icgen the reference, four token rows a concept, 32 photos,
        300-step sessions (the bench's default, the README's first command);
  plastic  item 1 alone: custom_diffusion on three designs with four token rows a
        concept, 32 photos and 1,000-step sessions (does a concept get learned?);
  smoke two sessions, a handful of steps (the test).

  python -m lfs_jax.mini.bench --config=configs/mini.py:short --workdir=/tmp/lfs_mini

(configs/mini.py is this file; it lives in the package so that the benchmark's
default needs no checkout.)

Sweeps are one override away, e.g. --config.kd.steps=8 (T_tau),
--config.kd.weight=0.5 (lambda), --config.icgen.strength=0.4 (s); --config.kd.kv_weight=0
is the paper's loss alone (the K/V anchor off) for every variant.
"""

import os

import ml_collections

from lfs_jax import config_base

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")


# Star designs beside world.CONCEPTS' three (other patterns and colours; banded_star shares
# striped_star's pattern, so its photos have the same sizes and places in other colours).
HARD_CONCEPTS = ("checked_star=star,red,checks,white;split_star=star,green,split,orange;"
                 "banded_star=star,orange,stripes,purple")
# :long's three more sessions: two squares and a circle, so the square of session 2 is no
# longer the only one.
LONG_CONCEPTS = ("dotted_square=square,blue,dots,yellow;ringed_circle=circle,purple,ring,white;"
                 "split_square=square,yellow,split,blue")


def get_config(arg="full"):
  # The numbers in the comments below were measured in the fine world (patterns of 1-3 px,
  # before the twenty-first session) unless they say "coarse world".
  c = config_base.get_config()
  c.model.source = "local"
  c.model.path = os.path.join(ASSETS, "mini_base")
  c.data.format = "folders"
  c.data.root = ""                # the benchmark renders the photos into --workdir/photos
  c.data.sessions = ("striped_star;checked_square;dotted_star;split_circle;ringed_star;"
                     "striped_circle")
  c.data.classes = ""             # from the concepts (lfs_jax/mini/world.py)
  c.data.resolution = 32
  c.data.flip = False             # a flip would swap a two-tone split's colours
  c.data.rescale = False          # the photos already vary in size and position
  c.concepts.templates = ("a {}",)  # the world's caption form: "a <c1> star"
  # Custom Diffusion's recipe (config_base) measured here and not taken
  # (docs/mini_world_history.md, "Recipe changes tried", 2026-12-02, single runs of the
  # short config, CD alone, on the previous base):
  # rescale + its caption cues cost the concepts (accuracy right after their session
  # 0.17 -> 0.04, nIA 0.59 -> 0.39) and the class prompts (0.38 -> 0.20); the cd loss
  # reduction (4x the mean) scored within noise of the mean for CD alone; with lfs+kv
  # (three seeds, :short, "Custom Diffusion's recipe fields") it quarters kd.weight /
  # kd.kv_weight against the denoising loss: concepts learned more, class prompts 8.3
  # points under (limit 3); ktn scored within one std of the class word on three seeds
  # (CD, :short), and every documented mini number uses the class word.
  # On the shipped base (2026-12-04, three seeds, docs/mini_world.md, "Custom Diffusion's
  # recipe fields"): the rescale, with or without its cues, costs CD the concepts (acc
  # own 0.35 -> 0.04-0.06); cd is within the seeds' spread; ktn learns as much and keeps
  # the class prompts better, but CD then forgets about half as much (nIAD :long 0.211
  # -> 0.100, :full 0.185 -> 0.110, under the goal's 0.2 on every world) while lfs+kv
  # keeps with either: the class word stays, for every variant alike, and the docs say
  # the forgetting is partly its doing.
  c.train.loss_reduction = "mean"
  c.concepts.initializer = "class"
  c.data.rescale_cues = False
  # x2 with a regulariser: lfs+kv within the seeds' spread, class 3.6 points under (the
  # same docs section); kd.weight = 10 was tuned without it. x2 with `cd` for
  # custom_diffusion+prior (:hard, 3 seeds): nIAD 0.089 -> 0.187, class 24.0 -> 41.1 under
  c.train.regulariser_lr_scale = 1.0
  c.train.steps = 120
  c.train.batch_size = 4
  c.train.learning_rate = 3e-4    # x batch size; at 1e-4 concepts were only partly learned (docs)
  c.train.log_every = 20
  c.train.progress_every = 0
  # lambda; at 1 the class prompts ended at 0.573 after six sessions, at 10 at 0.823
  # (docs/mini_world_history.md, "History: superseded findings that still matter").
  c.kd.weight = 10.0
  c.kd.batch_size = 4
  c.kd.steps = 4
  c.kd.kv_weight = 1000.0         # our K/V anchor (not the paper's): without it the class prompts lose ~24 points (docs)
  # ^ 300 from 2026-12-03 to 2026-12-06: in the coarse world (twenty-second session, three
  #   seeds, docs/mini_world.md, "Item 4 in the coarse world") 300 left :long's class
  #   prompts 3.3 points under (limit 3), 1000 1.2 under, learning as much with ICGen
  #   (acc own 0.333 against 0.306) but almost nothing without it (dfkd+kv 0.056, the
  #   anchor alone 0.051: the weights barely learn); on :short 1000 keeps too (acc own
  #   0.417 against 300's 0.458). Lower weights let the weights learn only as the class
  #   prompts go (twenty-third session, :long, three seeds): dfkd+kv 0.074 at 300 (3.3
  #   under), 0.218 at 100 (6.8 under; lfs+kv NOT met), the paper's dfkd 0.329 (10.2 under).
  # ^ 100 until 2026-12-03 (fine world): on :long (nine sessions) it left the class prompts 4.7 points
  #   under (limit 3), 300 0.9 under; 300 was chosen there and then checked on :hard and
  #   :full, where it keeps too, acc own within 0.03 of 100's (three seeds each); on
  #   :short it costs the final-nIA condition that 100 met (0.653 vs 0.688, bar 0.675;
  #   docs/mini_world.md, "The K/V anchor's weight")
  c.sample.steps = 20
  c.sample.guidance = 4.0
  c.sample.batch_size = 16
  c.icgen.strength = 0.6
  c.icgen.select = "random"
  c.prior.weight = 1.0            # the custom_diffusion+prior variants only (Custom Diffusion: 1.0)
  c.prior.count = 64              # class images per class (Custom Diffusion: 200; 64 keeps the
  # ^ mini run's generation under a minute a class on 2 CPU cores)
  c.prior.template = "a {}"       # the world's caption form: "a star"
  # Validation grids (lfs_jax/train/validation.py) off: the benchmark draws its own
  # samples_session<k>.png and its timings are documented without them. Turned on
  # (--config.validation.every_session=True), a grid is 1 prompt x (ICGen, plain) x 4
  # seeds per concept and 1 class prompt x 4 seeds per class (32 px tiles).
  c.validation.every_session = False
  c.validation.seeds = 4

  c.mini = ml_collections.ConfigDict()
  c.mini.variants = ",".join((    # which to judge (lfs_jax/mini/bench.py VARIANTS):
      "custom_diffusion",         # sequential Custom Diffusion, no regulariser
      "custom_diffusion+icgen",   # ... sampled with ICGen
      "custom_diffusion+prior",   # + prior preservation (prior.*: class images the base drew)
      "custom_diffusion+prior+icgen",
      "dfkd", "lfs",              # the paper's DFKD (kd.kv_weight 0), without / with ICGen
      "dfkd+kv", "lfs+kv",        # ours: DFKD + the K/V anchor, without / with ICGen
      "anchor", "anchor+icgen",   # the K/V anchor alone (kd.weight 0)
      "separate", "separate+icgen"))  # each concept alone from the base: no forgetting
  c.mini.seeds = ""               # "0,1,2": every variant on each seed, mean ± std (workdir/seed<s>/);
  # ^ "" = the one `seed`, straight into the workdir
  c.mini.concepts = ""            # extra concept designs "name=shape,colour,pattern,colour2;..."
  c.mini.photos = 4               # rendered photos per concept (training and ICGen context)
  c.mini.references = 8           # fresh renders per concept that IA is scored against (held out)
  c.mini.eval_images = 8          # samples per concept prompt
  c.mini.class_prompts = 8        # class prompts per class ("a red star on a white background")
  c.mini.class_seeds = 8          # samples (seeds) per class prompt: 192 a session (±2.5 points)
  c.mini.oracle = ""              # oracle folder ("" = the shipped one)
  c.mini.kd_class_templates = 0   # >0: DFKD class conditions in caption form (world.class_templates)

  if arg == "short":
    # The first three of :hard's six stars, with four token rows a concept, 32 photos and
    # 300-step sessions (since the twenty-first session, in the coarse world: with one
    # row, four photos and 120 steps ours learned 0.167 +- 0.110 a star against CD's
    # 0.472 and CD's nIAD was 0.051; with these, three seeds: CD learns 0.542 +- 0.144
    # and ends at 0.319, nIAD 0.102 +- 0.015, lfs+kv learns 0.458 +- 0.182 and keeps
    # every condition, separate+icgen 0.569; docs/mini_world.md, "The README's first
    # command"). Three sessions are fewer than the six the forgetting goal asks.
    c.data.sessions = "striped_star;dotted_star;ringed_star"
    c.concepts.vectors = 4
    c.mini.photos = 32
    c.train.steps = 300
    # separate+icgen (each star alone from the base, sampled with ICGen) is the reference
    # the keep line holds lfs+kv's final nIA to.
    c.mini.variants = "custom_diffusion,lfs+kv,separate+icgen"
    c.mini.class_seeds = 4        # 32 class samples a session (one class: 3.1 points each)
  elif arg == "hard":
    # Six stars, one a session: every session bends the same class word's keys and values.
    c.mini.concepts = HARD_CONCEPTS
    c.data.sessions = "striped_star;dotted_star;ringed_star;checked_star;split_star;banded_star"
  elif arg == "long":
    # :full's six and three more of its classes: nine sessions, three classes.
    c.mini.concepts = LONG_CONCEPTS
    c.data.sessions = (c.data.sessions + ";dotted_square;ringed_circle;split_square")
  elif arg == "plastic":
    # Item 1 (plasticity) alone: sequential Custom Diffusion on three designs (two stars
    # and a square), with the session recipe that learned the most in the mini world
    # (docs/mini_world.md, "Plasticity (item 1)"): four token rows a concept, 32 photos,
    # 1,000-step sessions; 64 samples a concept. Three sessions: "CD forgets" cannot be met.
    c.data.sessions = "striped_star;checked_square;dotted_star"
    c.mini.variants = "custom_diffusion"
    c.concepts.vectors = 4
    c.mini.photos = 32
    c.train.steps = 1000
    c.mini.eval_images = 64
    # ^ 16 until the thirty-first session: the same 16 noise seeds on every training seed
    # drew the best recipe's concepts right in 0.778 of samples, 64 in 0.652
    # (docs/mini_world.md, "How many samples"); --config.mini.eval_images=16 gives the
    # earlier figures.
    c.mini.class_seeds = 4
  elif arg == "smoke":
    c.data.sessions = "striped_star;dotted_star"
    c.mini.variants = "custom_diffusion+prior,lfs,separate"  # three runs, prior preservation too
    c.prior.count = 4
    c.train.steps = 4
    c.sample.steps = 4
    c.mini.eval_images = 2
    c.mini.class_prompts = 2
    c.mini.class_seeds = 1
  elif arg != "full":
    raise ValueError(f"configs/mini.py takes :full, :hard, :long, :short, :plastic or :smoke, "
                     f"got :{arg}")
  return c
