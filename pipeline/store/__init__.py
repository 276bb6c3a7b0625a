"""Storage and content addressing: local/URI file access (`storage`), fingerprints and cache keys (`fingerprint`),
and the checkpoint layout (listing and exporting Hugging Face checkpoints: `checkpoints`). A leaf: it imports no
other package of the library."""
