"""Model intake: GGUF validation and metadata, checksums, and the embedded default model."""
