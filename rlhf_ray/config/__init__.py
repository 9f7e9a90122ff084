"""Typed configuration: ``schema`` holds the dataclasses, ``loader`` fills them."""

from rlhf_ray.config.loader import ConfigError, load_config, save_config, to_dict
from rlhf_ray.config.schema import Config

__all__ = ["Config", "ConfigError", "load_config", "save_config", "to_dict"]
