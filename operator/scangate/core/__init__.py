"""Pure logic with no I/O: no kopf, kubernetes or httpx imports here."""
