"""Deployment tests: manifests, the configuration reference, a multi-host run."""
