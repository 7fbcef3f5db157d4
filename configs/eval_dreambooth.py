"""DreamBooth's evaluation protocol (DINO, CLIP-I, CLIP-T), as a lifelong run.

Each evaluation field says where its value comes from, and says so where the source
could not be read here: the dataset repository github.com/google/dreambooth holds
the photos and prompts_and_classes.txt, not the paper's sampling settings, and the
paper (Ruiz et al., CVPR 2023, arXiv 2208.12242) was not readable with the tools of
this project. `arg` picks the base: "sd15" (default) or "tiny" (the CPU test model,
sizes scaled down, every other setting as here).

  python -m lfs_jax.main --config=configs/eval_dreambooth.py --workdir=runs/db \
      --config.model.path=/models/stable-diffusion-v1-5 \
      --config.data.root=/data/dreambooth/dataset
  python -m lfs_jax.main --mode=evaluate --workdir=runs/db \
      --clip=/models/clip-vit-base-patch32 --config.eval.dino=/models/dino-vits16
"""

from lfs_jax import config_base


def get_config(arg="sd15"):
  c = config_base.preset_base(arg, "eval_dreambooth")

  # Data: the dataset/ folder; class words and the 25 object / 25 live-subject prompts
  # from its prompts_and_classes.txt (README.md of google/dreambooth: "all of the prompts
  # used in the paper").
  c.data.format = "dreambooth"
  c.data.root = ""                # required: the DreamBooth dataset/ folder
  c.data.classes = ""
  c.data.sessions = "dog;cat;dog2;backpack;teapot"

  # Sampling: not published with the dataset, and the paper's Stable Diffusion
  # settings could not be verified here: lfs_jax's Stable Diffusion defaults.
  c.sample.sampler = "ddim"
  c.sample.steps = 50
  c.sample.guidance = 7.5

  # Evaluation.
  c.eval.num_prompts = 0          # all 25 prompts of the subject's list (prompts_and_classes.txt)
  c.eval.num_images = 4           # the count usually quoted for the paper's protocol (4 images per
  # ^ subject and prompt); NOT verified: the paper was not readable here
  c.eval.clip = ""                # required: a local openai/clip-vit-base-patch32 folder. CLIP-I /
  # ^ CLIP-T's CLIP model is ViT-B/32 in CustomConcept101's evaluate.py; the paper's choice
  # could not be verified here
  c.eval.image_encoders = "both"  # DINO (DreamBooth's metric) beside CLIP-I
  c.eval.dino = ""                # required: DINO ViT-S/16, a safetensors facebook/dino-vits16
  # ^ (the ViT-S/16 of DreamBooth's metric as usually quoted, NOT verified here; the model
  # CustomConcept101's evaluate.py loads, torch.hub dino_vits16, verified)
  c.eval.references = "train"     # the subject's real photos, the ones learned from (NOT verified
  # ^ against the paper; data.heldout + eval.references=heldout scores unseen photos instead)
  c.eval.keep_token = False       # CLIP-T scores the prompt without the identifier
  c.eval.protocol = "dreambooth"  # report.md leads with DINO, CLIP-I, CLIP-T: raw mean cosines
  # ^ (CLIP-T = TA, not CLIPScore)
  if arg == "tiny":
    config_base.scale_down(c)
  return c
