"""The local development issuer: JWTs for calling the service by hand, trusted in development mode only.

An EHR signs every hook call with its private key (CDS Hooks §Trusting CDS Clients). To call the service from
a terminal without an EHR, ``medgemma-cds token`` signs as this issuer with a key made on first use and kept
in the user's cache folder (``~/.cache/medgemma-cds/dev-issuer.jwk``, mode 0600); a service in development
mode on the same machine trusts that key. Outside development mode the issuer is never trusted.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey

from cds_service.auth import IssuerTrust

log = logging.getLogger(__name__)

DEV_ISSUER = "urn:medgemma-cds:dev-issuer"
ALGORITHM = "ES384"
#: How long a development token lives: long enough to paste, short enough to be harmless.
TOKEN_LIFETIME_S = 300


def cache_dir() -> Path:
    """Return the user's cache folder of medgemma-cds (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medgemma-cds"


def key_path() -> Path:
    """Return the file holding the development issuer's private key."""
    return cache_dir() / "dev-issuer.jwk"


def load_or_create_key(path: Path | None = None) -> ECKey:
    """Return the development issuer's key, creating it on first use.

    Creation is atomic (written aside, then hard-linked into place, which fails if another process got there
    first), so serve's workers and a ``token`` command started together agree on one key.
    """
    path = path or key_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = ECKey.generate_key("P-384", parameters={"alg": ALGORITHM, "use": "sig"}, private=True)
        document = key.as_dict(private=True) | {"kid": key.thumbprint()}
        descriptor, aside = tempfile.mkstemp(dir=path.parent, prefix=".dev-issuer-")
        try:
            with os.fdopen(descriptor, "w") as out:
                json.dump(document, out)
            os.chmod(aside, 0o600)
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(aside)
    return ECKey.import_key(json.loads(path.read_text()))


def public_jwks_file(key: ECKey) -> Path:
    """Return a JWK Set file with the key's public half, for the verifier's trust configuration."""
    path = cache_dir() / f"dev-issuer-{key.kid}.jwks.json"
    if not path.exists():
        descriptor, aside = tempfile.mkstemp(dir=path.parent, prefix=".dev-issuer-")
        with os.fdopen(descriptor, "w") as out:
            json.dump({"keys": [key.as_dict(private=False)]}, out)
        os.replace(aside, path)
    return path


def mint_token(audience: str, key: ECKey | None = None, lifetime_s: int = TOKEN_LIFETIME_S) -> str:
    """Return a JWT for one endpoint (``aud``: the exact URL called) signed as the development issuer."""
    key = key or load_or_create_key()
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": DEV_ISSUER,
        "aud": audience,
        "iat": now,
        "exp": now + lifetime_s,
        "jti": uuid.uuid4().hex,
    }
    header = {"alg": ALGORITHM, "typ": "JWT", "kid": key.kid}
    return jwt.encode(header, claims, key, algorithms=[ALGORITHM])


def development_trust() -> IssuerTrust | None:
    """Return the trust entry of the development issuer, or None (logged) when its key can't be kept."""
    try:
        return IssuerTrust(jwks_file=public_jwks_file(load_or_create_key()))
    except OSError as error:
        log.warning(
            "development mode: the development issuer's key can't be kept in %s (%s); "
            "tokens from `medgemma-cds token` will be refused",
            cache_dir(),
            type(error).__name__,
        )
        return None
