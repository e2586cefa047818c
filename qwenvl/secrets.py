"""Which names hold secrets, and masking their values in anything shown or saved (torch-free).

A name is secret when it is one of :data:`SECRET_ENV_VARS` or reads as one (a word SECRET / TOKEN / PASSWORD /
PASSWD / CREDENTIALS, or API_KEY / ACCESS_KEY / PRIVATE_KEY inside it). Used by the run YAML loader (a
misspelt secret key's value is not echoed), the launch plan (``***`` in print-args and launch.sh) and the
trainer's logs.
"""

from __future__ import annotations

import os
import re

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


# --------------------------------------------------------------------------------------------
# URLs: a password in the userinfo (``http://user:pass@host/``) or a credential in the query string
# (a presigned S3 URL's ``X-Amz-Signature``, an Azure SAS ``sig``, an API ``token`` / ``key``) is masked
# wherever a URL is shown or logged. URLs are parsed by :mod:`urllib.parse`, never by hand.

#: Query / fragment parameters whose values are credentials (compared case-insensitively); any
#: parameter whose name reads as a secret (:func:`is_secret_name`: ``api_key``, ``password``, ...) too.
URL_SECRET_PARAMS = frozenset({
    "x-amz-signature", "x-amz-credential", "x-amz-security-token",
    "x-goog-signature", "x-goog-credential",
    "token", "sig", "signature", "access_token", "key", "apikey", "awsaccesskeyid",
    "password", "passwd", "pwd", "secret", "auth", "authorization", "code", "client_secret", "refresh_token",
    "id_token", "session_token", "sessiontoken",
})
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
# scheme://user:password@ where the password may hold '/' (a host has no ':' before its first '/')
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@?#\s]*:[^@\s]*@")


def _secret_param(name: str) -> bool:
    return name.lower() in URL_SECRET_PARAMS or is_secret_name(name)


def _mask_params(text: str) -> str:
    """A query string (or fragment) with the values of credential parameters replaced by ``***``; the
    text unchanged when it holds none."""
    from urllib.parse import parse_qsl, quote, urlencode

    if "=" not in text:
        return text
    pairs = parse_qsl(text, keep_blank_values=True)
    if not any(_secret_param(k) for k, _ in pairs):
        return text
    return urlencode([(k, MASK if _secret_param(k) else v) for k, v in pairs], quote_via=quote, safe="/:*,")


def mask_url(url: str) -> str:
    """``url`` safe to show: ``http://user:pass@host/a?X-Amz-Signature=abc`` -> ``http://***@host/a?X-Amz-Signature=***``.

    The userinfo (user and password) becomes ``***``; the values of credential parameters
    (:data:`URL_SECRET_PARAMS`, and names that read as secrets) in the query and fragment become ``***``.
    Anything else (a local path, a URL without credentials) comes back unchanged. A URL that cannot be
    parsed keeps only its scheme (``http://***``): nothing of it is shown rather than a secret."""
    from urllib.parse import urlsplit, urlunsplit

    text = str(url)
    if "://" not in text and "?" not in text and "#" not in text:
        return text
    m = _USERINFO.match(text)
    if m:  # user:password@ even when the password holds a '/' (AWS secret keys do), which urllib reads as a path
        text = f"{m.group(1)}{MASK}@{text[m.end():]}"
    try:
        parts = urlsplit(text)
    except ValueError:  # e.g. an unbalanced [ in the host
        scheme = text.split("://", 1)[0] if "://" in text else ""
        return f"{scheme}://{MASK}" if scheme else MASK
    netloc = parts.netloc
    if "@" in netloc:  # userinfo@host[:port], as urllib itself splits it (the last @)
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query, fragment = _mask_params(parts.query), _mask_params(parts.fragment)
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return text
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def mask_urls(text: str) -> str:
    """``text`` with every URL in it passed through :func:`mask_url` (messages, log lines, errors)."""
    text = str(text)
    if "://" not in text:
        return text
    def one(m: re.Match) -> str:
        url = m.group()
        core = url.rstrip(".,;:)]}")  # sentence punctuation after a URL is not part of it
        return mask_url(core) + url[len(core):]

    return _URL_IN_TEXT.sub(one, text)


def url_host(url: str) -> str:
    """``host[:port]`` of a URL as written, without any userinfo (``http://u:p@h:8000/x`` -> ``h:8000``)."""
    from urllib.parse import urlsplit

    try:
        return urlsplit(str(url)).netloc.rpartition("@")[2]
    except ValueError:
        return MASK


def url_without_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    """``(url without its userinfo, (user, password) or None)``: for a request that sends them as HTTP Basic
    authentication (what fsspec/aiohttp do with the same URL) instead of taking them as part of the host."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(str(url))
    if "@" not in parts.netloc:
        return str(url), None
    bare = urlunsplit((parts.scheme, url_host(url), parts.path, parts.query, parts.fragment))
    return bare, (unquote(parts.username or ""), unquote(parts.password or ""))
