"""Process entry points that wire real clients into activity classes."""
