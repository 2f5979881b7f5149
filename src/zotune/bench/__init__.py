"""Speed and memory measurement (``zotune bench``)."""
