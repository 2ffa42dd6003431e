"""The registered datasets, one module each; `trainables.data` imports them all on its first
lookup. A module here registers its builder with `trainables.data.register_dataset`."""
