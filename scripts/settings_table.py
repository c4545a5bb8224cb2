"""Prints the README's configuration table from ``Settings.model_fields`` (rerun it after adding a setting).

Run: ``.venv/bin/python scripts/settings_table.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic_core import PydanticUndefined

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cds_service.settings import Settings  # noqa: E402

# Defaults that are computed per process and so have no fixed value to print.
COMPUTED = {"secret_key": "random per process"}


def default_of(name: str, field: Any) -> str:
    """Return a field's default as the README shows it."""
    if name in COMPUTED:
        return COMPUTED[name]
    if field.default_factory is not None:
        return f"`{field.default_factory()!r}`".replace("'", '"')
    if field.default is PydanticUndefined or field.default is None:
        return "unset"
    return f"`{str(field.default).lower() if isinstance(field.default, bool) else field.default}`"


def main() -> None:
    """Print one Markdown row per setting: environment variable, type, default, description."""
    prefix = Settings.model_config["env_prefix"]
    print("| Environment variable | Type | Default | Meaning |")
    print("| --- | --- | --- | --- |")
    for name, field in Settings.model_fields.items():
        kind = (
            str(field.annotation)
            .replace("typing.", "")
            .replace("pathlib.", "")
            .replace("pydantic.types.", "")
        )
        kind = kind.replace("<class '", "").replace("'>", "").replace("|", "or")
        description = (field.description or "").replace("|", "or")
        print(f"| `{prefix}{name.upper()}` | {kind} | {default_of(name, field)} | {description} |")


if __name__ == "__main__":
    main()
