"""sloth-template: Cwm models for sloth; the hooks are in :mod:`sloth_template.plugin`."""
