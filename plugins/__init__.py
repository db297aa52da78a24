"""Built-in Stratos plugins. Each module registers itself through the same hooks a third party uses."""
