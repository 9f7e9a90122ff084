"""Typed configuration: ``schema`` (and ``job_sections``) hold the dataclasses, ``loader`` fills them,
``resolve`` checks them against each other and derives what a run needs."""

from rlhf_ray.config.errors import ConfigError
from rlhf_ray.config.loader import load_config, save_config, to_dict
from rlhf_ray.config.resolve import Resolved, resolve
from rlhf_ray.config.schema import Config

__all__ = ["Config", "ConfigError", "Resolved", "load_config", "resolve", "save_config", "to_dict"]
