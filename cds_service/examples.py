"""Example hook requests shipped with the package, and calling a running service with one (development).

``medgemma-cds call SERVICE --example NAME`` reads ``data/examples/NAME.json``, gives it a fresh
``hookInstance``, signs the call as the development issuer (``dev_issuer``) and prints the cards.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx

from cds_service.dev_issuer import mint_token

EXAMPLES = Path(__file__).parent / "data" / "examples"


class CallProblem(Exception):
    """The call could not be made or was refused; the message says what to do about it."""


def example_names() -> list[str]:
    """Return the names of the bundled example requests (file names without ``.json``), sorted."""
    return sorted(path.stem for path in EXAMPLES.glob("*.json"))


def load_example(name: str) -> dict[str, Any]:
    """Return an example request body with a fresh ``hookInstance``; CallProblem naming the examples if
    there is no such example."""
    path = EXAMPLES / f"{name}.json"
    if name not in example_names():
        raise CallProblem(f"no example named {name!r}; the examples are: {', '.join(example_names())}")
    body = json.loads(path.read_text())
    body["hookInstance"] = str(uuid.uuid4())
    return dict(body)


def example_for_hook(hook: str) -> str | None:
    """Return the first example request for ``hook``, if there is one."""
    for name in example_names():
        if json.loads((EXAMPLES / f"{name}.json").read_text()).get("hook") == hook:
            return name
    return None


def call_service(
    http: httpx.Client, base_url: str, public_url: str, service_id: str, example: str | None
) -> list[dict[str, Any]]:
    """Fire ``service_id`` at ``base_url`` with an example body (default: the first for its hook) signed for
    ``{public_url}/cds-services/{service_id}``; return the cards."""
    base_url = base_url.rstrip("/")
    try:
        discovery = http.get(f"{base_url}/cds-services").json()
    except (httpx.HTTPError, ValueError):
        raise CallProblem(
            f"no CDS service answers at {base_url} (is `medgemma-cds serve` running?)"
        ) from None
    hooks = {service["id"]: service["hook"] for service in discovery.get("services", [])}
    if service_id not in hooks:
        raise CallProblem(
            f"{base_url} offers no service {service_id!r}; it offers: {', '.join(sorted(hooks))}"
        )
    example = example or example_for_hook(hooks[service_id])
    if example is None:
        raise CallProblem(
            f"no example request for {hooks[service_id]}; the examples are: {', '.join(example_names())}"
        )
    body = load_example(example)
    if body["hook"] != hooks[service_id]:
        raise CallProblem(
            f"example {example!r} is a {body['hook']} call; {service_id} answers {hooks[service_id]}"
        )
    token = mint_token(f"{public_url.rstrip('/')}/cds-services/{service_id}")
    response = http.post(
        f"{base_url}/cds-services/{service_id}", json=body, headers={"Authorization": f"Bearer {token}"}
    )
    if response.status_code == 401:
        raise CallProblem(
            "the service refused the development token (401): run it with MEDGEMMA_CDS_DEV_MODE=true, as the "
            "same user, and with the same MEDGEMMA_CDS_PUBLIC_URL as this command"
        )
    if response.status_code != 200:
        raise CallProblem(f"{service_id} answered {response.status_code}: {response.text[:500]}")
    return list(response.json()["cards"])
