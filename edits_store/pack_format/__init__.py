"""The edit-pack format by stage (the face is edits_store.format): manifest and content hash, strict
JSON, tensors, bounded I/O, loading."""
