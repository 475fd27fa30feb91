"""Built-in plugins. Each module is registered through the public hooks, like a third party's."""
