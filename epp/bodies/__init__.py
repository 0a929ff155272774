"""Request and response bodies: parse once, rewrite the model in place, read usage."""
