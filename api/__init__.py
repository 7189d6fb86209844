"""The FastAPI layer: starts and reads workflows, reads the database."""
