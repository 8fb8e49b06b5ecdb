"""Integrations with other libraries (diffusers pipelines): imported on demand, never by ``import adapterbank``."""
