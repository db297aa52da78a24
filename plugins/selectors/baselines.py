"""Built-in plugin (placeholder until implemented)."""
