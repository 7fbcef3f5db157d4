"""Exceptions that name the bad input, shared across the package."""


class ConfigError(ValueError):
  """A configuration value that lfs_jax cannot honour (names the field)."""


class UnsupportedConfigError(ConfigError):
  """A model config asks for an architecture feature lfs_jax does not implement."""


class EvalError(ValueError):
  """An evaluation that cannot run or resume (names the folder, file or setting)."""
