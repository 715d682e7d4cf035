"""The HTTP side: routes, the OpenAI wire, validation, auth, idempotency. No torch here."""
