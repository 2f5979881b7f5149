"""Model loading (hub, local folders, built-in offline models)."""
