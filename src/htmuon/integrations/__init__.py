"""Adapters to training platforms (each imports its platform lazily; import the submodule you need)."""
