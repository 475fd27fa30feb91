"""What a base model is: architecture detection from config and module structure (issue 13)."""
