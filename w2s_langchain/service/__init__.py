"""The service behind every entry point: presets and the config they make, and
the `Aligner` that loads the models once and runs searches on them."""
