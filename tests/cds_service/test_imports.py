"""The API process must stay light: serving hooks never imports torch or transformers."""

from __future__ import annotations

import subprocess
import sys


def test_api_process_never_imports_torch(settings) -> None:
    code = (
        "import sys\n"
        "from cds_service.app import create_app\n"
        "from cds_service.settings import Settings\n"
        f"app = create_app(Settings(database_url={settings.database_url!r}, "
        f"redis_url={settings.redis_url!r}, "
        "auth_disabled=True))\n"
        "app.test_client().get('/cds-services')\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'llguidance') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
