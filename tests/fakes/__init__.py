"""Loopback stand-ins for external services (real protocols, real SDKs on the client side)."""
