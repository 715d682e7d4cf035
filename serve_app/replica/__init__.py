"""One model's deployment: the ModelServer, its step loop, the pure scheduler, encoding."""
