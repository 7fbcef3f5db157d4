"""The DreamBooth dataset (subject folders + prompts_and_classes.txt) as a lifelong run.

`arg` picks the base model: "tiny" (default; a CPU smoke run) or "sd15".

  python -m lfs_jax.main --config=configs/dreambooth.py:sd15 --workdir=runs/db \
      --config.model.path=/models/stable-diffusion-v1-5 \
      --config.data.root=/data/dreambooth/dataset \
      --config.data.sessions="dog;cat;dog2;backpack;teapot"
"""

from lfs_jax import config_base


def get_config(arg="tiny"):
  c = config_base.get_config()
  if arg == "sd15":
    config_base.use_local_sd(c, resolution=512)
  elif arg != "tiny":
    raise ValueError(f"configs/dreambooth.py takes :tiny or :sd15, got :{arg}")
  c.data.format = "dreambooth"
  c.data.root = ""                # required: the DreamBooth `dataset/` folder
  c.data.classes = ""             # read from prompts_and_classes.txt
  c.data.sessions = "dog;cat;dog2;backpack;teapot"
  return c
