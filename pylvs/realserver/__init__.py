"""The real-server side of VS-DR, VS-Tun and VS-NAT (`pylvs realserver`).

- :mod:`pylvs.realserver.config`: ``setup`` / ``status`` / ``teardown`` of the
  VIP on ``lo``, the ARP sysctls, ``rp_filter`` and the NAT route, recorded
  in a state file so that teardown restores exactly what setup changed.
- :mod:`pylvs.realserver.decap`: parsing and validation of IPIP and GUE
  packets (pure functions, no sockets).
- :mod:`pylvs.realserver.run`: the user-space decapsulator for Tun real
  servers whose kernel has no ``ipip`` module (AF_PACKET in, TUN out).

docs/realserver.md explains every setting and the decapsulator's design.
"""
