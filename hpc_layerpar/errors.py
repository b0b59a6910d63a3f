"""The errors a user can fix: each message names the value and the remedy. They end a job with exit
code 2 on every rank alike, before any training (cli.py); no traceback is printed for them."""
from __future__ import annotations


class UserError(ValueError):
    """Base of the errors caused by the user's input (config, data files, rank counts)."""


class ConfigError(UserError):
    """A configuration value is wrong; the message names the value and the remedy."""


class DataError(UserError):
    """A dataset file is missing, truncated or not what it claims; the message says how to fix it."""
