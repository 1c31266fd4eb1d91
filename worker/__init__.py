"""unitgen's worker runtime: serves one app on the socket that systemd passes in.

Installed as ``unitgen_worker`` (not ``worker``) so that it never shadows a user
module of that name.
"""
