"""accelerate-compress: compressed, error-compensated gradient exchange for Hugging Face Accelerate.

Turn it on in the launch config, with no change to the training script::

    accelerate-compress launch --cpu --num_processes 2 --compressor sign train.py
    ACCELERATE_COMPRESSION="compressor=sign,feedback=doublesqueeze" accelerate-compress launch train.py

or in the script, after ``accelerator.prepare``: ``accelerate_compress.enable(accelerator, model)``
(the config comes from ``ACCELERATE_COMPRESSION`` when not given). Builds on :mod:`lightning_compress`'s
core and does not import Lightning.
"""

from accelerate_compress.adapter import CompressionCheckpoint, enable
from accelerate_compress.flag import ENV_VAR, config_from_env, parse_setting

__all__ = ["ENV_VAR", "CompressionCheckpoint", "config_from_env", "enable", "parse_setting"]
