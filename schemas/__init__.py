"""The wire contract of Stratos: every message on the bus is a msgspec Struct defined here."""

SCHEMA_VERSION = 1
"""Bumped on a breaking change; agents report it with telemetry and the daemon refuses others."""
