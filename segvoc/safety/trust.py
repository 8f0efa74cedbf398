"""Rule D, configs read from files are data, not code.

``hydra.utils.instantiate`` runs whatever ``_target_`` names. A config that comes from a file (a checkpoint's stored
run config, an exported model's metadata) is therefore checked here, before anything is built from it: every
``_target_`` in it must start with one of ``ALLOWED`` (segvoc's own modules and the libraries whose classes segvoc's
own configs name), and the object it names must be defined there too (``segvoc.utils.os.system`` starts with
``segvoc.`` but is ``os.system``), or the command stops with one line naming the key, the target and the file.

Files segvoc writes for this user carry a signature of their config: an HMAC-SHA256 under a key that only this user
can read (``$SEGVOC_HOME/trust.key``, default ``~/.config/segvoc``, mode 0600, made on first use). A config whose
signature verifies was composed from this user's own command line, which segvoc trusts as typed (a custom model
class, a test callback), so it is not limited to the allowlist; a downloaded file's signature does not verify under
another user's key. ``trusted_targets=[prefix, ...]`` typed on the command line trusts more prefixes on purpose.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import inspect
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from segvoc.errors import UntrustedConfigError

# module prefixes whose classes segvoc's own configs instantiate
ALLOWED: tuple[str, ...] = (
    "segvoc.",
    "torch.optim.",                 # optimizers and torch.optim.lr_scheduler
    "torch.nn.",
    "torchvision.models.",
    "segmentation_models_pytorch.",
    "albumentations.",
    "pytorch_lightning.callbacks.",
    "pytorch_lightning.loggers.",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
)
# single objects outside those prefixes, allowed by their exact name
ALLOWED_NAMES: frozenset[str] = frozenset({"pytorch_lightning.Trainer", "lightning.pytorch.Trainer"})
SIGNATURE_KEY = "cfg_signature"  # where checkpoints (hyper_parameters) and exported metadata keep the signature


def _key_file() -> Path:
    home = os.environ.get("SEGVOC_HOME")
    return (Path(home) if home else Path.home() / ".config" / "segvoc") / "trust.key"


def _key(create: bool) -> bytes | None:
    path = _key_file()
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        if not create:
            return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it meanwhile
        return _key(create=False)
    except OSError:
        return None  # no writable home: files are written unsigned and read under the allowlist
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return _key(create=False)


def _canonical(cfg: Any) -> bytes:
    return json.dumps(cfg, sort_keys=True, default=str, separators=(",", ":")).encode()


def sign(cfg: dict[str, Any]) -> str | None:
    """The signature of a plain-container config under this user's key (None when no key can be made)."""
    key = _key(create=True)
    return None if key is None else hmac.new(key, _canonical(cfg), hashlib.sha256).hexdigest()


def signed_by_me(cfg: dict[str, Any], signature: str | None) -> bool:
    """Whether ``signature`` is this user's signature of ``cfg``."""
    key = _key(create=False)
    if key is None or not signature:
        return False
    return hmac.compare_digest(hmac.new(key, _canonical(cfg), hashlib.sha256).hexdigest(), str(signature))


def targets(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``(key, _target_ value)`` in a plain-container config, nested ones included."""
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{key}.{k}" if key else str(k)
            if k == "_target_":
                yield path, v
            else:
                yield from targets(v, path)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from targets(v, f"{key}[{i}]")


def _defined_under(target: str, prefixes: tuple[str, ...]) -> bool:
    """Whether the object ``target`` names is defined in a module under ``prefixes`` (its ``__module__``), not
    merely reached through one: an attribute walk may leave the package (``torch.nn.modules.module.torch.hub.load``).
    Only modules under ``prefixes`` are imported to find out; a name that does not resolve passes here and fails
    later as not found, with nothing built."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes (as Hydra's locate)
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except Exception:  # noqa: BLE001 - not a module (or one that fails to import): try a shorter name
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return True  # not found: instantiate names it, with nothing built
        break
    else:
        return True
    module = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", None)
    return isinstance(module, str) and any(f"{module}.".startswith(p) for p in prefixes)


def allowed(target: Any, extra: Iterable[str] = ()) -> bool:
    """Whether ``target`` names an object defined under one of ``ALLOWED`` module prefixes (or is one of
    ``ALLOWED_NAMES``), or starts with a prefix the user typed in ``extra`` (trusted as typed)."""
    if not isinstance(target, str):
        return False
    if target in ALLOWED_NAMES or any(target.startswith(p if p.endswith(".") else p + ".") for p in extra):
        return True
    return any(target.startswith(p) for p in ALLOWED) and _defined_under(target, ALLOWED)


def check_config(cfg: dict[str, Any], source: str | Path, signature: str | None = None,
                 extra: Iterable[str] = ()) -> None:
    """Refuse (``UntrustedConfigError``) a config read from ``source`` that names a ``_target_`` outside the
    allowlist, unless this user's own segvoc signed it. ``extra``: prefixes typed in ``trusted_targets``."""
    if signed_by_me(cfg, signature):
        return
    extra = list(extra)
    for key, target in targets(cfg):
        if not allowed(target, extra):
            raise UntrustedConfigError(
                f"{source}: its stored config sets {key}={target!r}, which segvoc does not build from a file it "
                f"reads (not under {', '.join(p.rstrip('.') for p in ALLOWED[:3])}, ...); nothing was built. If you "
                f"trust this file, add trusted_targets=[{str(target).rpartition('.')[0] or target}] to the command")
