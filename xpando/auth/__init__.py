"""Who calls the API and what they may do: API keys and their scopes (``keys``), and the
database side of issuing, checking and revoking them (``store``)."""
