"""Machinery shared by every loraforge method: config base, the composed layer, the driver."""
