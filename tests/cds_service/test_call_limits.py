"""The ceiling per call, through the app: too many findings roll into one card, a cut Bundle is named as not
checked, and /metrics counts each limit met."""

from __future__ import annotations

import re

from flask.testing import FlaskClient
from support import Issuer
from test_hostile_inputs import order_call

from cds_service.settings import Settings

SERVICE = "/cds-services/order-review"


def limit_count(client: FlaskClient, service: str, limit: str) -> float:
    """Return ``medgemma_cds_limits_total`` for a service and limit from /metrics (0 before any)."""
    text = client.get("/metrics").get_data(as_text=True)
    found = re.search(rf'medgemma_cds_limits_total{{limit="{limit}",service="{service}"}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def test_findings_past_the_card_limit_roll_into_one_card_that_names_them(
    client: FlaskClient, issuer: Issuer, settings: Settings
) -> None:
    before = limit_count(client, "order-review", "cards")
    # 30 selected orders against 10 active medications of the same drugs: a finding per duplicate pair.
    response = client.post(SERVICE, json=order_call("order-select", 30, 10), headers=issuer.headers(SERVICE))
    assert response.status_code == 200, response.get_json()
    cards = response.get_json()["cards"]
    assert len(cards) == settings.max_cards
    rolled_up = cards[-1]
    (count,) = re.findall(r"^(\d+) more findings \(too large to show", rolled_up["summary"])
    # Each finding not shown is counted and named (up to 30) in the card's detail.
    assert int(count) >= 30 - (settings.max_cards - 1)
    assert rolled_up["detail"].count("\n- ") == min(int(count), 30) + (int(count) > 30)
    assert rolled_up["indicator"] == max(
        (c["indicator"] for c in cards[:-1]), key=["info", "warning", "critical"].index
    )
    assert limit_count(client, "order-review", "cards") == before + 1


def test_a_prefetch_bundle_past_the_entry_limit_is_read_in_part_and_said_so(
    client: FlaskClient, issuer: Issuer, settings: Settings
) -> None:
    before = limit_count(client, "order-review", "prefetch-entries")
    listed = settings.max_prefetch_entries + 25
    response = client.post(
        SERVICE, json=order_call("order-select", 1, listed), headers=issuer.headers(SERVICE)
    )
    assert response.status_code == 200, response.get_json()
    summaries = [card["summary"] for card in response.get_json()["cards"]]
    assert "Not checked: 25 more 'medications' entries (too large: at most 100 are read)" in summaries
    assert limit_count(client, "order-review", "prefetch-entries") == before + 1
