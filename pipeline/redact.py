"""Keep secrets out of everything the pipeline writes.

Two nets, both applied to run configs, summaries, artifact metadata, result files and log
records: by key name (``api_key``, ``password``, ``hf_token``, ...) and by value (the value of
any secret-looking environment variable, the W&B key from ``~/.netrc``, and the password part
of ``scheme://user:password@host`` URLs), so a secret that ends up under an innocent key is
caught too.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
from typing import Any

MASK = "***"

# A key is secret when it *ends* in one of these words; `pad_token` or `tokenizer` are not.
_SECRET_KEY = re.compile(
    r"(?i)(^|[_\-.])("
    r"api[_-]?key|secret([_-]?key)?|passw(or)?d|credentials?|private[_-]?key|"
    r"(access|auth|api|hf|wandb|bearer|refresh|session|github|gh)[_-]?token"
    r")$|^token$"
)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<user>[^/@:\s]+):(?P<pw>[^/@\s]+)@", re.I)
_MIN_SECRET_LEN = 8  # shorter values would mask ordinary words


_SECRET_ENV_WORDS = {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "APIKEY", "CREDENTIAL", "CREDENTIALS"}


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(str(key)))


def is_secret_env(name: str) -> bool:
    """Environment variables are named loosely (``MY_SERVICE_TOKEN``, ``AWS_SECRET_ACCESS_KEY``)."""
    return is_secret_key(name) or bool(_SECRET_ENV_WORDS & set(name.upper().split("_")))


def _netrc_passwords() -> list[str]:
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        hosts = netrc.netrc(path).hosts
    except (OSError, netrc.NetrcParseError):
        return []
    return [auth[2] for auth in hosts.values() if auth and auth[2]]


def secret_values() -> list[str]:
    """Values that must never be written anywhere, longest first."""
    found = {
        value
        for name, value in os.environ.items()
        if is_secret_env(name)
        and len(value) >= _MIN_SECRET_LEN
    }
    found.update(v for v in _netrc_passwords() if len(v) >= _MIN_SECRET_LEN)
    return sorted(found, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    for value in secrets if secrets is not None else secret_values():
        text = text.replace(value, MASK)
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of `obj` (dicts, lists, strings, scalars) with every secret masked."""
    if secrets is None:
        secrets = secret_values()
    if isinstance(obj, dict):
        return {
            k: (MASK if is_secret_key(k) and v not in (None, "") else redact(v, secrets))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, secrets) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj


class RedactingFilter(logging.Filter):
    """Masks secrets in log records before any handler formats them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
