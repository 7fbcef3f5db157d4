"""CustomConcept101's published single-concept protocol, as a lifelong run.

Every evaluation field below says where its value comes from: customconcept101/
README.md, evaluate.py, sample.py and src/diffusers_sample.py of
github.com/adobe-research/custom-diffusion (read 2026-12). `arg` picks the base:
"sd15" (default: a local Stable Diffusion folder) or "tiny" (the CPU test model,
sizes scaled down, every other setting as here).

  python -m lfs_jax.main --config=configs/eval_customconcept101.py --workdir=runs/cc101 \
      --config.model.path=/models/stable-diffusion-v1-4 \
      --config.data.root=/data/customconcept101 \
      --config.data.sessions="pet_dog1;pet_cat1;plushie_panda;scene_barn"
  python -m lfs_jax.main --mode=evaluate --workdir=runs/cc101 \
      --clip=/models/clip-vit-base-patch32 --config.eval.dino=/models/dino-vits16
"""

from lfs_jax import config_base


def get_config(arg="sd15"):
  # The table's runs fine-tuned Stable Diffusion v1-4 (README.md of the repository:
  # "All our results are based on fine-tuning stable-diffusion-v1-4"): point
  # model.path at a diffusers copy of it to match; training follows use_local_sd.
  c = config_base.preset_base(arg, "eval_customconcept101")

  # Data: dataset.json, prompts/*.txt and the unzipped benchmark_dataset/ (README.md,
  # "Download dataset"); each concept is worded as its instance_prompt words it.
  c.data.format = "customconcept101"
  c.data.root = ""                # required: the customconcept101/ folder
  c.data.classes = ""             # read from dataset.json
  c.data.sessions = "pet_dog1;pet_cat1;plushie_panda;scene_barn"  # any benchmark_dataset/ names

  # Sampling. The table's columns are "200 DDPM" and "50 DDPM" (README.md, "Single
  # concept"); sample.py samples with DDIMSampler, --ddim_steps 200, --ddim_eta 1.0
  # (DDIM at eta 1 is DDPM's ancestral step) and --scale 6; src/diffusers_sample.py
  # with num_inference_steps=200, guidance_scale=6., eta=1.
  c.sample.sampler = "ddim"
  c.sample.eta = 1.0
  c.sample.steps = 200            # the table's first column; 50 for its second
  c.sample.guidance = 6.0
  c.sample.seed = 42              # both sampling scripts seed 42 (lfs_jax draws seeds 42, 43, ...
  # ^ per image, so its noise is not theirs)

  # Evaluation: customconcept101/evaluate.py.
  c.eval.num_prompts = 0          # all of the concept's prompt file ("the final 20 prompts for
  # ^ each concept", README.md "Evaluation prompts")
  c.eval.num_images = 5           # src/diffusers_sample.py's --batch_size default (per prompt):
  # ^ 20 prompts x 5 = 100, evaluate.py's --numgen default. The count behind the published
  # table is not stated in the sources read (sample.py's --n_samples default is 6).
  c.eval.clip = ""                # required: evaluate.py loads clip.load("ViT-B/32"): a local
  # ^ openai/clip-vit-base-patch32 folder
  c.eval.image_encoders = "both"  # the table: Textual-alignment (CLIP), Image-alignment (CLIP),
  # ^ Image-alignment (DINO)
  c.eval.dino = ""                # required: evaluate.py loads torch.hub dino_vits16: a safetensors
  # ^ copy of facebook/dino-vits16 (its preprocessing: README "DINO image alignment")
  c.eval.references = "train"     # evaluate.py --target_paths: the concept's own photos
  c.eval.keep_token = False       # evaluate.py scores each image against the text its prompts.json
  # ^ holds; the sources read do not show whether <new1> stays in it. lfs_jax removes it.
  c.eval.protocol = "customconcept101"  # report.md leads with the table's three columns:
  # ^ text alignment as CLIPScore 2.5*max(cos, 0) (evaluate.py get_clip_score, w=2.5), image
  # alignments as raw mean cosines (clipeval_image, dinoeval_image)
  if arg == "tiny":
    config_base.scale_down(c)
  return c
