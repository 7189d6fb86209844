"""AI providers an expert node answers through."""
