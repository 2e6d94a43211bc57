"""Peer drivers: scripts run by the peers' own virtual environments (see ``_peer_common``)."""
