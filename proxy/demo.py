"""``credicorp-proxy demo``: the emulator and the proxy on localhost, no set-up needed.

The one place where the product runs against its own emulator outside the
tests; only the ``demo`` command imports it, so no other command loads the
emulator.
"""

from __future__ import annotations

from importlib import resources

import yaml

from proxy.config import parse_config
from proxy.emulator.app import EmulatorServer
from proxy.serve import serve
from proxy.settings import Settings

DEMO_CURLS = """
credicorp-proxy demo is running.
  emulator (Credicorp stand-in): {emulator}
  proxy:                         {{proxy}}
  admin:                         {{admin}}/metrics  /healthz  /readyz

Try it (no credentials needed: the proxy adds a least-privilege token):
  # read a decision (token scoped to decisions:read only)
  curl -s {{proxy}}/partner/v1/decisions/dec_demo_001
  # create an application (token scoped to applications:write only)
  curl -s -X POST {{proxy}}/partner/v1/applications -H 'Content-Type: application/json' \\
       -d '{{{{"company_number": "09876543", "amount": 25000, "term_months": 12}}}}'
  # a route the table does not allow is refused by the proxy itself (403 route_not_allowed)
  curl -si -X DELETE {{proxy}}/partner/v1/applications/app_demo_001
  # see the tokens the emulator minted, one per scope set
  curl -s {emulator}/_emulator/stats

Press Ctrl-C to stop.
"""


def demo_settings(port: int, admin_port: int, emulator_url: str) -> Settings:
    """The packaged partner/v1 route table pointed at a local emulator, memory cache."""
    routes = yaml.safe_load(resources.files("proxy").joinpath("data/credicorp-partner-v1.yaml").read_text())
    raw = {
        "upstream": {"url": emulator_url},
        "auth": {"issuer": emulator_url, "client_id": "cc_client_demo", "client_secret": "demo-secret"},
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "cache": {"url": "memory://"},
        "routes": routes["routes"],
    }
    return parse_config(raw, env={})


async def serve_demo(port: int, admin_port: int, emulator_port: int) -> int:
    """Start the emulator, then serve the proxy in front of it until a signal; 0 after the drain."""
    async with EmulatorServer(host="127.0.0.1", port=emulator_port) as emulator:
        settings = demo_settings(port, admin_port, emulator.url)
        return await serve(settings, banner=DEMO_CURLS.format(emulator=emulator.url))
