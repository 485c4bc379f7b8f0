"""The wire between server and clients: delta vectors, the typed protocol every message is
checked against, and the table of fields (what each message carries, what is in clear)."""
