"""Where cgn-jax finds shared data and keeps its caches, without network access.

Data and weights come from `../shared/` beside a checkout (what every developer and
CI has), from `$CGN_JAX_SHARED`, or from directories the user names in the config.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path | None:
    """`$CGN_JAX_SHARED`, else `../shared` beside the working directory or beside this checkout."""
    candidates = []
    if os.environ.get("CGN_JAX_SHARED"):
        candidates.append(Path(os.environ["CGN_JAX_SHARED"]))
    candidates += [Path.cwd().parent / "shared", _REPO_ROOT.parent / "shared", Path.cwd() / "shared"]
    for c in candidates:
        if (c / "data").is_dir() or (c / "weights").is_dir():
            return c.resolve()
    return None


def resolve_dir(value: str, *shared_parts: str, what: str) -> Path:
    """`value` if set, else `shared/<parts>`; a clear error when neither exists."""
    if value:
        path = Path(value).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{what} directory {path} does not exist")
        return path
    shared = shared_dir()
    if shared is None or not (shared.joinpath(*shared_parts)).exists():
        raise FileNotFoundError(
            f"no {what} directory given and none found in ../shared/{'/'.join(shared_parts)}; "
            f"set it in the config (e.g. --config.dataset.mnist_dir=DIR) or set CGN_JAX_SHARED")
    return shared.joinpath(*shared_parts)


def cache_dir(*parts: str) -> Path:
    """`$CGN_JAX_HOME` (default ~/.cache/cgn_jax) / parts."""
    root = Path(os.environ.get("CGN_JAX_HOME", Path.home() / ".cache" / "cgn_jax")).expanduser()
    return root.joinpath(*parts)
