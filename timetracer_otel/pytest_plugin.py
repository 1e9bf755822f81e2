"""pytest plugin (see the pytest issue): per-test cassettes, record modes, network blocking."""
