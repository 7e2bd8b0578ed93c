"""sloth-phi: Phi-3 for sloth; the hooks are in :mod:`sloth_phi.plugin`."""
