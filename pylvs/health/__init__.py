"""Health checks of real servers, as keepalived's checkers run them
(docs/health.md): TCP_CHECK, HTTP_GET, SSL_GET, UDP_CHECK, MISC_CHECK and
PING_CHECK on the control loop (asyncio), scheduled by
``manager.HealthManager``, which tells the Balancer's health overlay what
forwards."""
