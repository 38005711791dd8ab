"""`pylvs check`: the set-up errors of an LVS director and its real servers,
found by asking the running director for its configuration and probing the
network from its namespace (what the LVS ``configure`` script checked).

- ``checks``: each check (services, VIPs, DR connectivity, the ARP problem,
  NAT reply routes, Tun decapsulation and MTU, settings) and its Result;
- ``probe``: routes, addresses, sysctls, and the ARP/TCP/IPIP probes sent
  with AF_PACKET and bounded waits.

docs/check.md describes each check and what it sends.
"""

from .checks import FAIL, OK, WARN, Result, run_checks

__all__ = ["FAIL", "OK", "WARN", "Result", "run_checks"]
