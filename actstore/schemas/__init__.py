"""Typed configs, table schemas, array attributes and content-hash ids: every shape of data declared once."""
