"""The documentation: the site builds strictly, the configuration page matches the settings model, the README
stays short and links to pages that exist."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

from support import ROOT

from cds_service.cli import build_parser
from cds_service.settings import ENV_PREFIX
from cds_service.settings import Settings

DOCS = ROOT / "docs"
README = ROOT / "README.md"


def settings_table_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("settings_table", ROOT / "scripts" / "settings_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").exists()


def test_every_setting_is_documented_with_a_meaning() -> None:
    fields = Settings.model_fields
    undescribed = [name for name, field in fields.items() if not (field.description or "").strip()]
    assert undescribed == [], f"settings without a docstring in cds_service/settings.py: {undescribed}"
    page = (DOCS / "configuration.md").read_text()
    module = settings_table_module()
    documented = set(re.findall(rf"^\| `({ENV_PREFIX}\w+)` \|", page, flags=re.M))
    missing = [f"{ENV_PREFIX}{name.upper()}" for name in fields]
    missing = [name for name in missing if name not in documented]
    assert missing == [], f"undocumented settings (run scripts/settings_table.py --write): {missing}"
    stale = "docs/configuration.md is stale: run scripts/settings_table.py --write"
    assert module.page_with_table(page) == page, stale


def test_readme_is_short_and_its_links_exist() -> None:
    text = README.read_text()
    assert len(text.encode()) <= 10 * 1024
    for history in ("Before this work", "Not met", "earlier run"):
        assert history not in text
    links = re.findall(r"\]\((docs/[^)#]+)", text)
    assert links, "the README links to the documentation"
    for link in links:
        assert (ROOT / link).is_file(), link


def test_every_subcommand_is_on_the_command_line_page() -> None:
    page = (DOCS / "cli.md").read_text()
    subcommands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    missing = [name for name in subcommands if f"| `{name}` |" not in page]
    assert missing == [], missing
