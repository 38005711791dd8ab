"""IPVS connection sync: the v1 wire protocol (``wire``) and the sync
daemons of `pylvs run` (``daemon``); docs/sync.md."""
