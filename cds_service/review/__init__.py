"""The review app: a SMART on FHIR app where a clinician the EHR signed in reviews, edits and signs drafts.

``routes`` (pages and forms), ``smart`` (SMART launch, tokens, the id_token, FHIR reads), ``sessions``
(server-side state in Redis) and ``templates/review``; ``init_review`` installs it on the app.
"""

from __future__ import annotations

from flask import Flask

from cds_service.review.routes import bp
from cds_service.review.sessions import ReviewStore
from cds_service.settings import purpose_key


def init_review(app: Flask) -> None:
    """Register the review app's blueprint and its Redis-backed store on ``app``."""
    services = app.extensions["cds"]
    settings = services.settings
    app.extensions["review"] = ReviewStore(
        services.redis, purpose_key(settings, "review-app"), settings.smart_session_ttl_s
    )
    app.register_blueprint(bp)
