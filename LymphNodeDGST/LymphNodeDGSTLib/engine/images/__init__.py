"""CT and label images on disk and in space: reading and writing, integrity checks, geometry."""
