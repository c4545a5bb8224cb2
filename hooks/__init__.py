"""CDS services: one module per service, each declaring itself with ``@service`` next to its handler."""
