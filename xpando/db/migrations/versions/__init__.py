"""One module per schema change, oldest first: ``0001_baseline`` is the schema of the first
release; each later one changes it and names the one before (``down_revision``)."""
