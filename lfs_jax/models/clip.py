"""CLIP's text transformer (transformers' `CLIPTextModel`) in Flax.

input_ids [B, L] -> hidden states [B, L, hidden_size], the prompt encoder of Stable
Diffusion. Module names mirror transformers' (`text_model/encoder/layers_3/self_attn/
q_proj`) so `weights.convert.torch_to_flax` maps a checkpoint without a table. The
encoder blocks take any config with CLIP's field names (hidden_size,
intermediate_size, num_hidden_layers, num_attention_heads, hidden_act,
layer_norm_eps), so the vision tower can reuse them with `causal=False`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lfs_jax.errors import UnsupportedConfigError
from lfs_jax.models import layers
from lfs_jax.models.attention import dot_product_attention

# Torch buffers in the checkpoint that are not parameters (passed as `ignore=`).
IGNORED_KEYS = (r".*position_ids",)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # torch's exact erf GELU
}

# Keys transformers (4.x and 5.x) writes into a CLIP config that do not change the
# forward pass: bookkeeping, generation settings, training-only values (dropout is
# never applied here; Stable Diffusion checkpoints set it to 0).
_INERT_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "initializer_factor", "initializer_range", "attention_dropout", "dropout",
    "output_hidden_states", "output_attentions", "return_dict", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "tie_word_embeddings",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "finetuning_task", "id2label",
    "label2id", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "problem_type", "gradient_checkpointing",
})
# Only the text tower; CLIPModel configs are accepted through their text_config.
_ARCHITECTURES = ("CLIPTextModel", "CLIPModel")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Hashable CLIP text-transformer architecture; defaults are transformers' defaults."""

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512
  pad_token_id: Optional[int] = 1
  bos_token_id: Optional[int] = 49406
  eos_token_id: Optional[int] = 49407

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise UnsupportedConfigError(
          f"CLIP text config: hidden_act={self.hidden_act!r}; only "
          f"{sorted(ACTIVATIONS)} are implemented")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "max_position_embeddings", "projection_dim"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        raise UnsupportedConfigError(
            f"CLIP text config: {field}={value!r} must be a positive integer")
    if self.hidden_size % self.num_attention_heads:
      raise UnsupportedConfigError(
          f"CLIP text config: hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
    """Builds the config from a `text_encoder/config.json` (CLIPTextModel) dict.

    A full CLIPModel config (model_type "clip") is accepted too: its text_config
    (updated by the legacy text_config_dict, as transformers does) is read, and the
    top-level projection_dim, the one CLIPModel's text_projection uses, wins.

    Raises:
      UnsupportedConfigError: naming an unknown key or a value we do not implement.
    """
    config = dict(config)
    if config.get("model_type") == "clip":
      _check_architectures(config)
      text = dict(config.get("text_config") or {})
      text.update(config.get("text_config_dict") or {})
      if "projection_dim" in config:
        text["projection_dim"] = config["projection_dim"]
      text.pop("architectures", None)  # the text part of a CLIPModel
      config = text
    model_type = config.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
      raise UnsupportedConfigError(
          f"CLIP text config: model_type={model_type!r}; only 'clip_text_model' (or a "
          "'clip' config with a text_config) is implemented")
    _check_architectures(config)
    pruned = config.get("pruned_heads") or {}
    if pruned:
      raise UnsupportedConfigError(
          f"CLIP text config: pruned_heads={pruned!r}; pruned attention heads are not "
          "implemented")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in config
                     if not k.startswith("_") and k not in fields and k not in _INERT_KEYS)
    if unknown:
      raise UnsupportedConfigError(
          f"CLIP text config: unknown key(s) {unknown}; lfs_jax implements "
          f"{sorted(fields)}")
    return cls(**{k: v for k, v in config.items() if k in fields})


def _check_architectures(config: Mapping[str, Any]) -> None:
  for arch in config.get("architectures") or ():
    if arch not in _ARCHITECTURES:
      raise UnsupportedConfigError(
          f"CLIP text config: architectures contains {arch!r}; only "
          f"{list(_ARCHITECTURES)} are implemented (no text_projection head)")


def init_inputs(config: CLIPTextConfig, batch: int = 1) -> Tuple[jax.Array]:
  """Dummy input_ids [batch, max_position_embeddings] int32 for init / eval_shape."""
  return (jnp.zeros((batch, config.max_position_embeddings), jnp.int32),)


def abstract_params(config: CLIPTextConfig, dtype=jnp.float32):
  """The parameter tree as ShapeDtypeStructs in `dtype` (nothing is allocated)."""
  module = CLIPTextModel(config)
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.key(0), *init_inputs(config))["params"])
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)


def torch_rename(torch_key: str) -> str:
  """Adds the `text_model.` prefix that transformers >= 5 no longer saves.

  Hub checkpoints (transformers 4.x) name `text_model.encoder.layers.0...`;
  transformers 5 saves a CLIPTextModel as `encoder.layers.0...`. Used as
  `torch_to_flax(..., rename=torch_rename)`; prefixed names pass unchanged.
  """
  return re.sub(r"^(embeddings|encoder|final_layer_norm)\.", r"text_model.\1.", torch_key)


def pooled(last_hidden: jax.Array, input_ids: jax.Array,
           eos_token_id: Optional[int]) -> jax.Array:
  """The end-of-text hidden state per prompt, transformers' `pooler_output`.

  Follows transformers' rule: with the legacy eos_token_id == 2 of old configs
  (SD 1.x/2.x text encoders) the position of the largest id, which is the
  end-of-text token only while no added token (id >= vocab) is in the prompt;
  otherwise the first position of eos_token_id.

  Args:
    last_hidden: [B, L, D] output of CLIPTextModel.
    input_ids: [B, L] ids the output was computed from.
    eos_token_id: the config's eos_token_id.

  Returns:
    [B, D].
  """
  if eos_token_id == 2:
    idx = jnp.argmax(input_ids, axis=-1)
  else:
    idx = jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)
  return jnp.take_along_axis(last_hidden, idx[:, None, None], axis=1)[:, 0]


class CLIPAttention(layers.Module):
  """Multi-head self-attention with biased q/k/v/out projections, [B, L, D] -> same."""

  hidden_size: int
  num_heads: int
  causal: bool
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, l, _ = x.shape
    head_dim = self.hidden_size // self.num_heads
    dense = functools.partial(layers.Dense, self.hidden_size, dtype=self.dtype)
    q, k, v = (dense(name=n)(x).reshape(b, l, self.num_heads, head_dim)
               for n in ("q_proj", "k_proj", "v_proj"))
    out = dot_product_attention(q, k, v, implementation=self.attention,
                                is_causal=self.causal, scale=head_dim ** -0.5)
    return dense(name="out_proj")(out.reshape(b, l, self.hidden_size))


class CLIPMLP(layers.Module):
  """fc1 -> activation -> fc2."""

  hidden_size: int
  intermediate_size: int
  hidden_act: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = layers.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
    x = ACTIVATIONS[self.hidden_act](x)
    return layers.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(layers.Module):
  """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

  config: Any  # CLIPTextConfig, or any config with CLIP's field names
  causal: bool
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    h = layers.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="layer_norm1")(x)
    x = x + CLIPAttention(c.hidden_size, c.num_attention_heads, self.causal,
                          dtype=self.dtype, attention=self.attention, name="self_attn")(h)
    h = layers.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="layer_norm2")(x)
    return x + CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act,
                       dtype=self.dtype, name="mlp")(h)


class CLIPEncoder(layers.Module):
  """A stack of `config.num_hidden_layers` CLIPEncoderLayers (`layers_0`, ...)."""

  config: Any
  causal: bool
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, *, num_layers: Optional[int] = None) -> jax.Array:
    """Runs the first `num_layers` layers (all by default) on x [B, L, D]."""
    n = self.config.num_hidden_layers if num_layers is None else num_layers
    for i in range(n):
      x = layers.block(self, CLIPEncoderLayer,
                       (self.config, self.causal, self.dtype, self.attention), f"layers_{i}", x)
    return x


class CLIPTextEmbeddings(layers.Module):
  """Token embedding (optionally extended by extra rows) plus learned positions."""

  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array,
               extra_embeddings: Optional[jax.Array] = None) -> jax.Array:
    c = self.config
    init = nn.initializers.normal(0.02)
    table = layers.Embed(c.vocab_size, c.hidden_size, embedding_init=init,
                     name="token_embedding").embedding
    if extra_embeddings is not None:
      if extra_embeddings.ndim != 2 or extra_embeddings.shape[1] != c.hidden_size:
        raise ValueError(
            f"extra_embeddings must be [N, {c.hidden_size}], got {extra_embeddings.shape}")
      table = jnp.concatenate([table, extra_embeddings.astype(table.dtype)], axis=0)
    positions = layers.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=init,
                         name="position_embedding").embedding
    # Out-of-range ids give NaN rows (jnp.take's "fill" mode), never a silent clamp.
    tokens = jnp.take(table, input_ids, axis=0, mode="fill", fill_value=jnp.nan)
    pos = positions[:input_ids.shape[1]]
    return (tokens + pos[None]).astype(self.dtype)


class CLIPTextTransformer(layers.Module):
  """transformers' CLIPTextTransformer (the `text_model` submodule)."""

  config: CLIPTextConfig
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, input_ids, *, extra_embeddings=None, hidden_layer: int = -1,
               final_layer_norm: bool = True):
    c = self.config
    n = c.num_hidden_layers
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
    if input_ids.shape[1] > c.max_position_embeddings:
      raise ValueError(
          f"input_ids has length {input_ids.shape[1]}, more than "
          f"max_position_embeddings={c.max_position_embeddings}")
    if not -(n + 1) <= hidden_layer <= n:
      raise ValueError(
          f"hidden_layer={hidden_layer} is outside [-{n + 1}, {n}] (hidden_states has "
          f"{n + 1} entries: the embeddings and {n} layer outputs)")
    x = CLIPTextEmbeddings(c, dtype=self.dtype, name="embeddings")(
        input_ids, extra_embeddings)
    x = CLIPEncoder(c, causal=True, dtype=self.dtype, attention=self.attention,
                    name="encoder")(x, num_layers=hidden_layer % (n + 1))
    if final_layer_norm:
      x = layers.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype,
                       name="final_layer_norm")(x)
    return x


class CLIPTextModel(layers.Module):
  """transformers' CLIPTextModel: input_ids [B, L] int -> hidden states [B, L, D].

  Attributes:
    config: the architecture.
    dtype: computation dtype (parameters keep theirs).
    attention: "xla", "cudnn" or "auto" (see models.attention).
  """

  config: CLIPTextConfig
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, input_ids: jax.Array, *, extra_embeddings: Optional[jax.Array] = None,
               hidden_layer: int = -1, final_layer_norm: bool = True) -> jax.Array:
    """Encodes prompts with CLIP's causal text transformer.

    Args:
      input_ids: [B, L] int token ids, L <= max_position_embeddings. Ids >= vocab_size
        select rows of extra_embeddings.
      extra_embeddings: optional [N, D] rows appended to the token-embedding table
        (modifier tokens trained per session while the base table stays frozen).
      hidden_layer: which entry of transformers' `hidden_states` tuple to return
        (0 = embeddings, -1 = last layer, -2 = penultimate, the "clip skip" one).
        Layers after it are not computed.
      final_layer_norm: apply final_layer_norm to that entry. The defaults give
        transformers' last_hidden_state; hidden_layer=-2 with False gives the raw
        hidden_states[-2].

    Returns:
      [B, L, D] in `dtype`.
    """
    return CLIPTextTransformer(self.config, dtype=self.dtype, attention=self.attention,
                               name="text_model")(
        input_ids, extra_embeddings=extra_embeddings, hidden_layer=hidden_layer,
        final_layer_norm=final_layer_norm)
