"""The job config: its typed schema, the sweep grammar, and a model's effective options."""
