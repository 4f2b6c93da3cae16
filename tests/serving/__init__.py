"""Serving tests (a package, so that its package-scoped Serve fixture ends with it)."""
