"""Which names hold secrets, and masking their values in anything shown or saved (torch-free).

A name is secret when it is one of :data:`SECRET_ENV_VARS` or reads as one (a word SECRET / TOKEN / PASSWORD /
PASSWD / CREDENTIALS, or API_KEY / ACCESS_KEY / PRIVATE_KEY inside it). Used by the run YAML loader (a
misspelt secret key's value is not echoed), the launch plan (``***`` in print-args and launch.sh) and the
trainer's logs.
"""

from __future__ import annotations

import os

#: Environment variables whose values must never be shown (see :func:`redact`).
SECRET_ENV_VARS: tuple[str, ...] = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",  # not a secret, but masked in displays too
    "WANDB_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
)
_SECRET_NAME_WORDS = frozenset({"SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIALS"})
_SECRET_NAME_PARTS = ("API_KEY", "ACCESS_KEY", "PRIVATE_KEY")
MASK = "***"



def is_secret_name(name: str) -> bool:
    """Whether an environment variable / config key name holds a secret that must be masked."""
    upper = name.upper()
    if upper in SECRET_ENV_VARS or any(part in upper for part in _SECRET_NAME_PARTS):
        return True
    return any(word in _SECRET_NAME_WORDS for word in upper.replace("-", "_").split("_"))


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """The values of secret variables in ``environ`` (default ``os.environ``), longest first."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if v and len(v) >= 4 and is_secret_name(k)}
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: dict[str, str] | None = None) -> str:
    """``text`` with the value of every secret environment variable replaced by ``***``.

    Covers AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ACCESS_KEY_ID, WANDB_API_KEY, HF tokens and
    any variable whose name has a word SECRET/TOKEN/PASSWORD or contains API_KEY/ACCESS_KEY. Values shorter than
    4 characters are left alone (they would mangle unrelated text).
    """
    for value in secret_values(environ):
        text = text.replace(value, MASK)
    return text


def redact_env(env: dict[str, str]) -> dict[str, str]:
    """A copy of ``env`` with secret variables' values masked (for displays and saved files)."""
    return {k: (MASK if v and is_secret_name(k) else v) for k, v in env.items()}
