"""The model catalog: the registry of packaged GGUF models (models/registry.json
of a checkout), pulling and verifying their files, and resolving a name or a path."""
