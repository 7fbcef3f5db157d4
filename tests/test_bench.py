"""The benchmark commands (bench/) in their tiny CPU mode: they run and print valid records.

No timing thresholds here (DESIGN 4: speed lives in docs/benchmarks.md); only that
a workload runs through lfs_jax's own code and reports positive times and FLOPs.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # bench/ sits beside lfs_jax/ but is not installed with it
  sys.path.insert(0, ROOT)

import bench  # noqa: E402
from bench import bench_jax, load_cached, run  # noqa: E402

# The SD 1.5 component configs shipped with the tests (tests/data/README.md).
SD15 = os.path.join(ROOT, "tests", "data", "sd_configs", "sd15")


def _lines(text):
  return [json.loads(l) for l in text.splitlines() if l.startswith("{")]


def _check(rec, workload, framework):
  assert set(bench.FIELDS) <= set(rec), set(bench.FIELDS) - set(rec)
  assert rec["workload"] == workload and rec["framework"] == framework
  assert rec["batch"] == 2 and rec["resolution"] == 32  # the tiny CPU size
  assert rec["ms"] > 0 and rec["img_per_s"] > 0 and rec["flops"] > 0
  assert rec["mfu"] is None and rec["peak_mem_gib"] is None  # no card, no device stats on CPU


def test_jax_bench_tiny_vae(capsys):
  records = bench_jax.run(["--size", "tiny", "--workloads", "vae", "--compile-cache", "",
                           "--warmup", "0", "--iters", "1"])
  printed = _lines(capsys.readouterr().out)
  assert printed == records and len(records) == 1
  rec = records[0]
  _check(rec, "vae", "jax")
  assert rec["compile_s"] > 0 and "cache_warm" in rec


def test_torch_bench_tiny_vae(capsys):
  from bench import bench_torch  # pylint: disable=g-import-not-at-top
  from diffusers.utils import logging  # pylint: disable=g-import-not-at-top
  threads, verbosity = torch.get_num_threads(), logging.get_verbosity()
  try:
    records = bench_torch.run(["--size", "tiny", "--workloads", "vae", "--warmup", "0",
                               "--iters", "1"])
  finally:  # the bench pins one thread on a CPU and quietens diffusers
    torch.set_num_threads(threads)
    logging.set_verbosity(verbosity)
  printed = _lines(capsys.readouterr().out)
  assert printed == records and len(records) == 1
  _check(records[0], "vae", "torch-eager")


def test_record_mfu_and_table():
  rec = bench.record(workload="cd", framework="jax", device="NVIDIA H100 80GB HBM3", batch=8,
                     resolution=512, ms=50.0, peak_mem_gib=12.0, compile_s=20.0,
                     flops=13.4e12, notes="", cache_warm=False)
  assert rec["img_per_s"] == 160.0
  assert rec["mfu"] == pytest.approx(13.4e12 / 0.05 / 989e12, abs=1e-4)
  assert bench.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert bench.peak_flops("NVIDIA H200") == 989e12
  assert bench.peak_flops("cpu (2 cores)") is None
  text = run.table([rec])
  assert "| cd | jax |" in text and "27.1%" in text and "cold" in text
  # With a PyTorch record of the same workload on the same card, both rows use its
  # FLOP count (XLA's compiled count on a GPU misses the cuDNN/cuBLAS calls).
  ref = bench.record(workload="cd", framework="torch-eager", device="NVIDIA H100 80GB HBM3",
                     batch=8, resolution=512, ms=100.0, peak_mem_gib=12.5, compile_s=None,
                     flops=14.0e12, notes="")
  low = dict(rec, flops=0.5e12)
  rows = run.table([low, ref]).splitlines()
  assert "| 280.00 | 28.3% |" in rows[2] and "| 140.00 | 14.2% |" in rows[3]


def test_sd15_configs_match_shipped():
  for name, want in (("unet/config.json", bench.SD15_UNET), ("vae/config.json", bench.SD15_VAE),
                     ("text_encoder/config.json", bench.SD15_TEXT),
                     ("scheduler/scheduler_config.json", bench.SD15_SCHEDULER)):
    with open(os.path.join(SD15, name)) as f:
      assert json.load(f) == want, name


_FILL_CACHE = """
import sys, jax, jax.numpy as jnp
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.jit(lambda x: jnp.sin(x) @ x + 1.0, inline=False)(jnp.ones((32, 32))).block_until_ready()
"""


def test_load_cached_times_each_load_of_a_cached_executable(tmp_path, capsys):
  cache = tmp_path / "xla"
  subprocess.run([sys.executable, "-c", _FILL_CACHE, str(cache)], check=True, timeout=300)
  assert load_cached.main([str(cache), "--match", "jit_", "--repeat", "2"]) == 0
  records = _lines(capsys.readouterr().out)
  assert records and [r["load"] for r in records[:2]] == [0, 1]
  for r in records:
    assert r["entry"].startswith("jit_") and r["entry"].endswith("-cache")
    assert r["load_s"] > 0 and r["user_s"] >= 0 and r["system_s"] >= 0
    assert r["serialized_bytes"] > r["cached_bytes"] > 0  # the entry is compressed
    assert r["minor_faults"] >= 0 and r["max_rss_mib"] > 0
  # nothing matches: a clear failure, not an empty success
  assert load_cached.main([str(cache), "--match", "no_such_function"]) == 1
  assert "no cache entries matching 'no_such_function'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    load_cached.main([str(tmp_path / "missing")])
