"""The mini world's lifelong benchmark; the config lives in lfs_jax/mini/config.py.

  python -m lfs_jax.mini.bench --config=configs/mini.py:short --workdir=/tmp/lfs_mini

`arg`: full (default: six sessions, every variant), hard (six stars), long (nine
sessions of three classes), short (three sessions, custom_diffusion vs lfs+kv, with
separate+icgen), plastic (item 1: custom_diffusion learning three designs), smoke (the
test's). Seeds: --config.mini.seeds=0,1,2.
Sweeps: --config.kd.steps (T_tau), --config.kd.weight (lambda), --config.icgen.strength (s).
"""

from lfs_jax.mini import config


def get_config(arg="full"):
  return config.get_config(arg)
